"""The FLUX.1 transformer (dev/schnell architecture) in Flax Linen, mirroring diffusers ``FluxTransformer2DModel``.

Double-stream blocks (separate text and image weights, joint attention), single-stream blocks (parallel attention and
MLP over the concatenated [text; image] sequence), 3-axis interleaved RoPE from ``txt_ids``/``img_ids``, timestep
(+ distilled guidance) + pooled-text conditioning, and ControlNet residual injection exactly as diffusers does it.

The building blocks (embedders, both block kinds, the RoPE table, the residual schedule) are shared with the
ControlNets in ``controlnet.py``. Parameter names follow the diffusers module names so that the key maps in
``port/flux.py`` read as a table:
``transformer_blocks_{i}/attn/to_q/kernel`` <- ``transformer_blocks.{i}.attn.to_q.weight``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from bifrost_jax.nn.attention import dot_product_attention
from bifrost_jax.nn.layers import Dense, LayerNorm, RMSNorm, activation, default_kernel_init, param_with_axes
from bifrost_jax.nn.rope import apply_rotary_interleaved, rope_frequencies
from bifrost_jax.nn.stack import maybe_remat, scanned

Dtype = Any

# config.json keys that describe the file rather than the model
_HF_META_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


def _check_hf_keys(cfg: dict, known: Sequence[str], what: str) -> dict:
    """The model fields of a diffusers config dict; raises on fields this port does not implement."""
    unknown = sorted(k for k in cfg if k not in known and k not in _HF_META_KEYS)
    if unknown:
        raise ValueError(f"{what} config: unsupported field(s) {unknown}; this port implements {sorted(known)}")
    return {k: v for k, v in cfg.items() if k in known}


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """Fields of the diffusers ``FluxTransformer2DModel`` config.json (defaults: FLUX.1-dev except guidance)."""
    patch_size: int = 1
    in_channels: int = 64
    out_channels: Optional[int] = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"FLUX config: axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                             f"{self.attention_head_dim}")
        if any(a % 2 for a in self.axes_dims_rope):
            raise ValueError(f"FLUX config: every axes_dims_rope entry must be even, got {self.axes_dims_rope}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.patch_size * self.patch_size * (self.out_channels or self.in_channels)

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "FluxConfig":
        known = [f.name for f in dataclasses.fields(cls)]
        return cls(**_check_hf_keys(cfg, known, "FluxTransformer2DModel"))

    def to_hf_config(self) -> dict:
        out = dataclasses.asdict(self)
        out["axes_dims_rope"] = list(self.axes_dims_rope)
        return {"_class_name": "FluxTransformer2DModel", **out}


# ----------------------------------------------------------------------------------------------------------------
# conditioning: timestep / guidance / pooled text, RoPE table

def timestep_embedding(t, dim: int = 256, max_period: float = 10000.0, flip_sin_to_cos: bool = True,
                       downscale_freq_shift: float = 0.0):
    """diffusers ``get_timestep_embedding`` in float32: [cos, sin] with ``flip_sin_to_cos`` (FLUX's and SD's
    default), [sin, cos] without; frequencies exp(-log(max_period) * i / (dim/2 - downscale_freq_shift))."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    parts = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
    emb = jnp.concatenate(parts, axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class MLPEmbedder(nn.Module):
    """Linear -> act -> Linear (diffusers ``TimestepEmbedding`` and ``PixArtAlphaTextProjection(act_fn="silu")``)."""
    features: int
    act_fn: str = "silu"
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = Dense(self.features, kernel_axes=("cond", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                  name="linear_1")(x)
        x = activation(self.act_fn)(x)
        return Dense(self.features, kernel_axes=("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype,
                     name="linear_2")(x)


class TimeTextEmbed(nn.Module):
    """``CombinedTimestep(Guidance)TextProjEmbeddings``: temb = MLP(sin(t)) [+ MLP(sin(g))] + MLP(pooled)."""
    inner_dim: int
    guidance_embeds: bool
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, timestep, guidance, pooled_projection):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        temb = MLPEmbedder(self.inner_dim, name="timestep_embedder", **kw)(
            timestep_embedding(timestep).astype(self.dtype))
        if self.guidance_embeds:
            if guidance is None:
                raise ValueError("this FLUX model has guidance_embeds=True: pass `guidance` (e.g. 3.5 per example)")
            temb = temb + MLPEmbedder(self.inner_dim, name="guidance_embedder", **kw)(
                timestep_embedding(guidance).astype(self.dtype))
        return temb + MLPEmbedder(self.inner_dim, name="text_embedder", **kw)(pooled_projection)


def _batched_ids(ids, batch: int):
    """(S, 3) or (B, S, 3) position ids -> (B or 1, S, 3). diffusers deprecates the batched form and keeps only
    row 0; here a batch of ids is honoured per example (identical results whenever the rows agree)."""
    ids = jnp.asarray(ids)
    if ids.ndim == 2:
        return ids[None]
    if ids.ndim == 3 and ids.shape[0] in (1, batch):
        return ids
    raise ValueError(f"position ids must be (S, n_axes) or (B, S, n_axes) with B={batch}, got shape {ids.shape}")


def rope_table(txt_ids, img_ids, axes_dims: Sequence[int], batch: int, theta: float = 10000.0):
    """cos, sin of shape (B or 1, S_txt + S_img, 1, head_dim/2) for the interleaved-pair FLUX RoPE, float32.
    Each id column i rotates its own ``axes_dims[i]`` channels (diffusers ``FluxPosEmbed``)."""
    ids = jnp.concatenate([_batched_ids(txt_ids, batch), _batched_ids(img_ids, batch)], axis=1)
    if ids.shape[-1] != len(axes_dims):
        raise ValueError(f"position ids have {ids.shape[-1]} columns but axes_dims_rope has {len(axes_dims)} entries")
    angles = jnp.concatenate([rope_frequencies(ids[..., i], d, theta) for i, d in enumerate(axes_dims)], axis=-1)
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def _rope(x, rope):
    cos, sin = rope
    return apply_rotary_interleaved(x, cos, sin)


# ----------------------------------------------------------------------------------------------------------------
# blocks

def _modulate(x, shift, scale):
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class AdaLNModulation(nn.Module):
    """SiLU(temb) -> Linear(D -> n*D), split in n chunks (the ``linear`` of diffusers' AdaLayerNorm* classes)."""
    n: int
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, temb):
        d = temb.shape[-1]
        out = Dense(self.n * d, kernel_axes=("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype,
                    name="linear")(jax.nn.silu(temb))
        return jnp.split(out, self.n, axis=-1)


class LinearParams(nn.Module):
    """The "kernel" (in, out) and "bias" of a Linear, returned instead of applied (for compute-time fusion of several
    projections of the same input; same names, axes and init as ``nn.layers.Dense``)."""
    features: int
    kernel_axes: tuple = ("embed", "heads")
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, in_features: int):
        kernel = param_with_axes(self, "kernel", default_kernel_init, (in_features, self.features), self.param_dtype,
                                 self.kernel_axes)
        bias = param_with_axes(self, "bias", nn.initializers.zeros, (self.features,), self.param_dtype,
                               (self.kernel_axes[-1],))
        return kernel, bias


class FluxAttention(nn.Module):
    """Joint attention of a FLUX block. With ``context=True`` (double-stream) the text stream has its own
    ``add_{q,k,v}_proj``, q/k norms and ``to_add_out``; the [text; image] sequence is attended jointly.
    Without (single-stream) it is plain self-attention over the given sequence and has no output projection
    (the block's ``proj_out`` fuses it with the MLP)."""
    heads: int
    head_dim: int
    context: bool
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None

    def _dense(self, features, name, axes=("embed", "heads")):
        return Dense(features, kernel_axes=axes, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def _norm(self, name):
        # torch.nn.RMSNorm: normalise in fp32, cast back to the input dtype, then multiply by the weight
        return RMSNorm(eps=1e-6, dtype=self.dtype, param_dtype=self.param_dtype, scale_order="input", name=name)

    def _qkv(self, x, q_name, k_name, v_name, nq_name, nk_name):
        # One matmul for q, k and v, fused at compute time: the three (D, inner) kernels (separate parameters, the
        # diffusers layout) are stacked on a new axis, so the sharded output axis stays aligned (a concatenation
        # along it would need a reshard under tensor parallelism).
        inner = self.heads * self.head_dim
        params = [LinearParams(inner, kernel_axes=("embed", "heads"), param_dtype=self.param_dtype, name=n)(x.shape[-1])
                  for n in (q_name, k_name, v_name)]
        kernel = jnp.stack([k for k, _ in params], axis=1).astype(self.dtype)    # (D, 3, inner)
        bias = jnp.stack([b for _, b in params], axis=0).astype(self.dtype)      # (3, inner)
        y = jnp.einsum("bsd,dne->bsne", x.astype(self.dtype), kernel) + bias
        y = y.reshape(y.shape[:2] + (3, self.heads, self.head_dim))
        q = self._norm(nq_name)(y[:, :, 0])
        k = self._norm(nk_name)(y[:, :, 1])
        return q, k, y[:, :, 2]

    @nn.compact
    def __call__(self, hidden_states, rope, encoder_hidden_states=None):
        q, k, v = self._qkv(hidden_states, "to_q", "to_k", "to_v", "norm_q", "norm_k")
        n_txt = 0
        if self.context:
            cq, ck, cv = self._qkv(encoder_hidden_states, "add_q_proj", "add_k_proj", "add_v_proj",
                                   "norm_added_q", "norm_added_k")
            n_txt = encoder_hidden_states.shape[1]
            q = jnp.concatenate([cq, q], axis=1)
            k = jnp.concatenate([ck, k], axis=1)
            v = jnp.concatenate([cv, v], axis=1)
        q, k = _rope(q, rope), _rope(k, rope)
        out = dot_product_attention(q, k, v, implementation=self.attention_impl)
        out = out.reshape(out.shape[:2] + (self.heads * self.head_dim,)).astype(self.dtype)
        out = checkpoint_name(out, "attn_out")
        if not self.context:
            return out
        d_model = hidden_states.shape[-1]
        img = self._dense(d_model, "to_out", ("heads", "embed"))(out[:, n_txt:])
        txt = self._dense(d_model, "to_add_out", ("heads", "embed"))(out[:, :n_txt])
        return img, txt


class FeedForward(nn.Module):
    """Linear(D -> 4D) -> GELU(tanh) -> Linear(4D -> D) (diffusers ``FeedForward(activation_fn="gelu-approximate")``;
    parameters ``proj_in`` = ``net.0.proj``, ``proj_out`` = ``net.2``)."""
    mult: int = 4
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        h = Dense(d * self.mult, kernel_axes=("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype,
                  name="proj_in")(x)
        h = jax.nn.gelu(h, approximate=True)
        return Dense(d, kernel_axes=("mlp", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                     name="proj_out")(h)


def _constrain(x):
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))


class FluxDoubleBlock(nn.Module):
    """diffusers ``FluxTransformerBlock``: AdaLN-Zero on both streams, joint attention, gated FFs."""
    heads: int
    head_dim: int
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, hidden_states, encoder_hidden_states, temb, rope):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ln = LayerNorm(eps=1e-6, use_scale=False, use_bias=False, dtype=self.dtype)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = AdaLNModulation(6, name="norm1", **kw)(temb)
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = AdaLNModulation(
            6, name="norm1_context", **kw)(temb)

        attn_img, attn_txt = FluxAttention(self.heads, self.head_dim, context=True, name="attn",
                                           attention_impl=self.attention_impl, **kw)(
            _modulate(ln(hidden_states), shift_msa, scale_msa), rope,
            _modulate(ln(encoder_hidden_states), c_shift_msa, c_scale_msa))

        hidden_states = hidden_states + gate_msa[:, None] * attn_img
        ff = FeedForward(name="ff", **kw)(_modulate(ln(hidden_states), shift_mlp, scale_mlp))
        hidden_states = hidden_states + gate_mlp[:, None] * ff

        encoder_hidden_states = encoder_hidden_states + c_gate_msa[:, None] * attn_txt
        ff_c = FeedForward(name="ff_context", **kw)(_modulate(ln(encoder_hidden_states), c_shift_mlp, c_scale_mlp))
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp[:, None] * ff_c
        hidden_states = checkpoint_name(_constrain(hidden_states), "block_out")
        encoder_hidden_states = checkpoint_name(_constrain(encoder_hidden_states), "block_out")
        return encoder_hidden_states, hidden_states


class FluxSingleBlock(nn.Module):
    """diffusers ``FluxSingleTransformerBlock`` on the concatenated [text; image] sequence ``x``: AdaLN-Zero,
    attention and MLP in parallel, one ``proj_out`` over [attn, mlp], gated residual. (diffusers splits and
    re-concatenates the streams around every block; keeping them concatenated is the same computation.)"""
    heads: int
    head_dim: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x, temb, rope):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d = x.shape[-1]
        shift, scale, gate = AdaLNModulation(3, name="norm", **kw)(temb)
        h = _modulate(LayerNorm(eps=1e-6, use_scale=False, use_bias=False, dtype=self.dtype)(x), shift, scale)
        mlp = jax.nn.gelu(Dense(int(d * self.mlp_ratio), kernel_axes=("embed", "mlp"), name="proj_mlp", **kw)(h),
                          approximate=True)
        attn = FluxAttention(self.heads, self.head_dim, context=False, name="attn",
                             attention_impl=self.attention_impl, **kw)(h, rope)
        out = Dense(d, kernel_axes=("mlp", "embed"), name="proj_out", **kw)(jnp.concatenate([attn, mlp], axis=-1))
        x = x + gate[:, None] * out
        return checkpoint_name(_constrain(x), "block_out")


# scan bodies: the carry first, per-layer inputs next, broadcast inputs last

class _ScanDouble(nn.Module):
    heads: int
    head_dim: int
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None
    collect: bool = False  # emit each layer's image stream (ControlNet)

    @nn.compact
    def __call__(self, carry, res_index, temb, rope, residuals):
        txt, img = carry
        txt, img = FluxDoubleBlock(self.heads, self.head_dim, self.dtype, self.param_dtype, self.attention_impl,
                                   name="block")(img, txt, temb, rope)
        if residuals is not None:
            img = img + jax.lax.dynamic_index_in_dim(residuals, res_index, 0, keepdims=False).astype(img.dtype)
        return (txt, img), (img if self.collect else None)


class _ScanSingle(nn.Module):
    heads: int
    head_dim: int
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None
    collect: bool = False
    n_txt: int = 0

    @nn.compact
    def __call__(self, x, res_index, temb, rope, residuals):
        x = FluxSingleBlock(self.heads, self.head_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                            attention_impl=self.attention_impl, name="block")(x, temb, rope)
        if residuals is not None:
            r = jax.lax.dynamic_index_in_dim(residuals, res_index, 0, keepdims=False).astype(x.dtype)
            x = jnp.concatenate([x[:, :self.n_txt], x[:, self.n_txt:] + r], axis=1)
        return x, (x[:, self.n_txt:] if self.collect else None)


def residual_schedule(n_blocks: int, n_samples: int, repeat: bool = False) -> np.ndarray:
    """Which ControlNet sample each of ``n_blocks`` transformer blocks receives (diffusers: ``i // ceil(N/M)``,
    or ``i % M`` with ``controlnet_blocks_repeat``)."""
    if n_samples <= 0:
        raise ValueError("ControlNet residuals: got an empty list of samples")
    if repeat:
        return np.arange(n_blocks) % n_samples
    interval = int(math.ceil(n_blocks / n_samples))
    idx = np.arange(n_blocks) // interval
    return idx


def _stack_samples(samples):
    """A list/tuple of (B, S, D) residuals or one stacked (M, B, S, D) array -> stacked array (or None)."""
    if samples is None:
        return None
    if isinstance(samples, (list, tuple)):
        if not samples:
            return None
        return jnp.stack(samples)
    if samples.ndim != 4:
        raise ValueError(f"ControlNet samples: expected a list of (B, S, D) arrays or one (M, B, S, D) array, got "
                         f"shape {samples.shape}")
    return samples


def flux_blocks(module: nn.Module, cfg: FluxConfig, hidden_states, encoder_hidden_states, temb, rope, *,
                controlnet_block_samples=None, controlnet_single_block_samples=None,
                controlnet_blocks_repeat: bool = False, collect: bool = False):
    """The double-stream then single-stream blocks, created as submodules of ``module`` (call it inside its
    compact method): unscanned ``transformer_blocks_{i}`` / ``single_transformer_blocks_{i}``, or with
    ``module.scan_layers`` one ``transformer_blocks`` / ``single_transformer_blocks`` with stacked parameters.
    Adds ControlNet residuals when given; with ``collect`` also returns every block's image-token output (the
    ControlNet's block samples, a stacked (N, B, S_img, D) array when scanned, a list otherwise).
    Returns (text tokens, image tokens, double-block outputs, single-block outputs)."""
    kw = dict(dtype=module.dtype, param_dtype=module.param_dtype, attention_impl=module.attention_impl)
    heads, head_dim = cfg.num_attention_heads, cfg.attention_head_dim
    n_double, n_single = cfg.num_layers, cfg.num_single_layers
    double_res = _stack_samples(controlnet_block_samples)
    single_res = _stack_samples(controlnet_single_block_samples)
    double_idx = (residual_schedule(n_double, double_res.shape[0], controlnet_blocks_repeat)
                  if double_res is not None else np.zeros(n_double, np.int32))
    single_idx = (residual_schedule(n_single, single_res.shape[0])
                  if single_res is not None else np.zeros(n_single, np.int32))
    n_txt = encoder_hidden_states.shape[1]
    double_out, single_out = [], []
    txt, img = encoder_hidden_states, hidden_states

    if module.scan_layers:
        in_axes = (0, nn.broadcast, nn.broadcast, nn.broadcast)
        if n_double:
            body = scanned(_ScanDouble, n_double, in_axes=in_axes, remat=module.remat_policy)
            (txt, img), double_out = body(heads, head_dim, collect=collect, name="transformer_blocks", **kw)(
                (txt, img), jnp.asarray(double_idx, jnp.int32), temb, rope, double_res)
        x = jnp.concatenate([txt, img], axis=1)
        if n_single:
            body = scanned(_ScanSingle, n_single, in_axes=in_axes, remat=module.remat_policy)
            x, single_out = body(heads, head_dim, collect=collect, n_txt=n_txt, name="single_transformer_blocks",
                                 **kw)(x, jnp.asarray(single_idx, jnp.int32), temb, rope, single_res)
    else:
        double_cls = maybe_remat(FluxDoubleBlock, module.remat_policy)
        for i in range(n_double):
            txt, img = double_cls(heads, head_dim, name=f"transformer_blocks_{i}", **kw)(img, txt, temb, rope)
            if double_res is not None:
                img = img + double_res[int(double_idx[i])].astype(img.dtype)
            double_out.append(img)
        x = jnp.concatenate([txt, img], axis=1)
        single_cls = maybe_remat(FluxSingleBlock, module.remat_policy)
        for i in range(n_single):
            x = single_cls(heads, head_dim, name=f"single_transformer_blocks_{i}", **kw)(x, temb, rope)
            if single_res is not None:
                r = single_res[int(single_idx[i])].astype(x.dtype)
                x = jnp.concatenate([x[:, :n_txt], x[:, n_txt:] + r], axis=1)
            single_out.append(x[:, n_txt:])
    return x[:, :n_txt], x[:, n_txt:], double_out, single_out


def flux_embed(module: nn.Module, cfg: FluxConfig, encoder_hidden_states, pooled_projections, timestep, guidance,
               batch: int):
    """``context_embedder`` and ``time_text_embed`` (timestep and guidance scaled by 1000 as diffusers does), created
    as submodules of ``module``. Returns (text tokens, temb)."""
    kw = dict(dtype=module.dtype, param_dtype=module.param_dtype)

    def scaled(t):
        # diffusers: ``t.to(hidden_states.dtype) * 1000``, i.e. rounded to the compute dtype (bf16 in a bf16 model)
        t = jnp.broadcast_to(jnp.asarray(t).reshape(-1), (batch,)).astype(module.dtype)
        return (t * jnp.asarray(1000, module.dtype)).astype(jnp.float32)

    timestep = scaled(timestep)
    guidance = None if guidance is None else scaled(guidance)
    temb = TimeTextEmbed(cfg.inner_dim, cfg.guidance_embeds, name="time_text_embed", **kw)(
        timestep, guidance, pooled_projections)
    txt = Dense(cfg.inner_dim, kernel_axes=("cond", "embed"), name="context_embedder", **kw)(encoder_hidden_states)
    return _constrain(txt), temb


def x_embedder(module: nn.Module, cfg: FluxConfig) -> Dense:
    return Dense(cfg.inner_dim, kernel_axes=("cond", "embed"), dtype=module.dtype, param_dtype=module.param_dtype,
                 name="x_embedder")


class FluxTransformer2DModel(nn.Module):
    """diffusers ``FluxTransformer2DModel``: ``__call__`` returns the (B, S_img, out_channels) prediction.

    ``controlnet_block_samples`` / ``controlnet_single_block_samples``: lists of (B, S_img, D) residuals (or one
    stacked (M, B, S_img, D) array each) as returned by the ControlNets; double block i gets sample
    ``i // ceil(num_layers / M)`` (``i % M`` with ``controlnet_blocks_repeat``), single block j gets
    ``j // ceil(num_single_layers / M)`` added to its image tokens only.
    """
    config: FluxConfig
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                 guidance=None, controlnet_block_samples=None, controlnet_single_block_samples=None,
                 controlnet_blocks_repeat: bool = False):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _constrain(x_embedder(self, cfg)(hidden_states))
        txt, temb = flux_embed(self, cfg, encoder_hidden_states, pooled_projections, timestep, guidance, x.shape[0])
        rope = rope_table(txt_ids, img_ids, cfg.axes_dims_rope, x.shape[0])
        _, x, _, _ = flux_blocks(self, cfg, x, txt, temb, rope, controlnet_block_samples=controlnet_block_samples,
                                 controlnet_single_block_samples=controlnet_single_block_samples,
                                 controlnet_blocks_repeat=controlnet_blocks_repeat)
        scale, shift = AdaLNModulation(2, name="norm_out", **kw)(temb)  # diffusers order: scale first
        x = _modulate(LayerNorm(eps=1e-6, use_scale=False, use_bias=False, dtype=self.dtype)(x), shift, scale)
        return Dense(cfg.output_channels, kernel_axes=("embed", "cond"), name="proj_out", **kw)(x)

    def dummy_inputs(self, batch: int = 1, img_len: int = 4, txt_len: int = 2):
        """Small inputs with the right trailing shapes (for ``init`` / ``eval_shape``)."""
        cfg = self.config
        return dict(hidden_states=jnp.zeros((batch, img_len, cfg.in_channels), jnp.float32),
                    encoder_hidden_states=jnp.zeros((batch, txt_len, cfg.joint_attention_dim), jnp.float32),
                    pooled_projections=jnp.zeros((batch, cfg.pooled_projection_dim), jnp.float32),
                    timestep=jnp.zeros((batch,), jnp.float32),
                    img_ids=jnp.zeros((img_len, len(cfg.axes_dims_rope)), jnp.float32),
                    txt_ids=jnp.zeros((txt_len, len(cfg.axes_dims_rope)), jnp.float32),
                    guidance=jnp.zeros((batch,), jnp.float32) if cfg.guidance_embeds else None)
