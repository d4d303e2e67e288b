"""Qwen2.5-VL vision tower (transformers ``Qwen2_5_VisionTransformerPretrainedModel``) in Flax Linen.

It produces Bifrost-1's "patch-level CLIP latents": the 2x2-merged ViT tokens, in row-major merged-grid order
(docs/design.md §5). Differences from the PyTorch layout, all output-preserving:

- Images are batched as ``(B, patches, 1176)`` and all images of a batch share one static (H, W); attention is
  computed per image (full blocks) or per window (window blocks), never with one dense mask over the batch (the
  official code's memory trap, docs/design.md §5.4).
- Tokens live in a *padded window layout* from the patch embedding to the merger: windows in row-major order,
  each holding ``w x w`` merged units (padded where the merged grid does not divide into windows), each unit its
  4 patches. This is the PyTorch window permutation with fixed-size windows, so window attention is a reshape
  and full attention is a key mask over the padding. The merger output is gathered back to row-major order.
- Blocks differ only in window vs. full attention. Unscanned, each block knows its kind statically; scanned, the
  kind is a per-layer boolean fed through the scan and chosen with ``lax.cond``.
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
from bifrost_jax.nn.layers import Dense, RMSNorm, activation
from bifrost_jax.nn.rope import apply_rotary_half, rope_frequencies
from bifrost_jax.nn.stack import maybe_remat, scanned

Dtype = Any

# config.json keys that carry no architecture information (or only affect video / initialisation)
_IGNORED_VISION_KEYS = {
    "model_type", "architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path",
    "initializer_range", "tokens_per_second", "return_dict", "output_hidden_states", "output_attentions",
    "use_cache", "id2label", "label2id", "chunk_size_feed_forward", "problem_type", "is_encoder_decoder",
    "tie_word_embeddings", "base_config_key",
}


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig:
    """The vision_config of a transformers Qwen2.5-VL checkpoint (defaults: Qwen2.5-VL-7B)."""
    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    out_hidden_size: int = 3584
    hidden_act: str = "silu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0
    # kept for a faithful export only (video timing; images never use it)
    tokens_per_second: int = 2
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision_config: hidden_size {self.hidden_size} is not a multiple of num_heads "
                             f"{self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"vision_config: head_dim {self.head_dim} must be a multiple of 4 (2-D rotary over "
                             "h and w halves)")
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            raise ValueError(f"vision_config: window_size {self.window_size} px is not a multiple of "
                             f"patch_size*spatial_merge_size = {self.patch_size * self.spatial_merge_size}")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"vision_config: fullatt_block_indexes {bad} outside 0..{self.depth - 1}")
        activation(self.hidden_act)  # raises on an unknown name

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch vector: C * T * P * P (1176 for Qwen2.5-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2

    @property
    def window_units(self) -> int:
        """Window side in merged units (112 px / 14 / 2 = 4 for Qwen2.5-VL)."""
        return self.window_size // self.patch_size // self.spatial_merge_size

    def is_full(self, i: int) -> bool:
        return i in self.fullatt_block_indexes

    @classmethod
    def from_hf_config(cls, d: dict) -> "QwenVisionConfig":
        d = dict(d)
        kw: dict[str, Any] = {}
        # legacy (Qwen2.5-VL hub) spellings
        if "in_chans" in d:
            in_chans = d.pop("in_chans")
            if d.setdefault("in_channels", in_chans) != in_chans:
                raise ValueError(f"vision_config: in_chans {in_chans} != in_channels {d['in_channels']}")
        if "spatial_patch_size" in d:
            sps = d.pop("spatial_patch_size")
            if d.setdefault("patch_size", sps) != sps:
                raise ValueError(f"vision_config: spatial_patch_size {sps} != patch_size {d['patch_size']}")
        if "num_attention_heads" in d:
            d.setdefault("num_heads", d.pop("num_attention_heads"))
        if "num_hidden_layers" in d:
            d.setdefault("depth", d.pop("num_hidden_layers"))
        rope = d.pop("rope_parameters", None) or {}
        if "rope_theta" in d:
            rope = {**rope, "rope_theta": d.pop("rope_theta")}
        if rope.get("rope_type", "axial") != "axial":
            raise ValueError(f"vision_config: rope_parameters.rope_type {rope['rope_type']!r} is not supported "
                             "(only 'axial')")
        if "rope_theta" in rope:
            kw["rope_theta"] = float(rope["rope_theta"])
        extra = set(rope) - {"rope_type", "rope_theta"}
        if extra:
            raise ValueError(f"vision_config: rope_parameters fields {sorted(extra)} are not supported")
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_theta"}
        for k, v in d.items():
            if k in names:
                kw[k] = tuple(v) if k == "fullatt_block_indexes" else v
            elif k not in _IGNORED_VISION_KEYS:
                raise ValueError(f"vision_config: field {k!r} is not supported by QwenVisionConfig")
        for k in ("patch_size", "temporal_patch_size"):
            if not isinstance(kw.get(k, 1), int):
                raise ValueError(f"vision_config: non-square {k} {kw[k]!r} is not supported")
        return cls(**kw)

    def to_hf_config(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rope_theta"}
        d["fullatt_block_indexes"] = list(self.fullatt_block_indexes)
        d["rope_parameters"] = {"rope_type": "axial", "rope_theta": self.rope_theta}
        d["model_type"] = "qwen2_5_vl_vision"
        return d


# ----------------------------------------------------------------------------------------------------------------
# static layout of one image (NumPy, from the grid and the config; identical for every image of a batch)

@dataclasses.dataclass(frozen=True)
class WindowLayout:
    """Where every patch of a (gh, gw) patch grid sits in the padded window layout."""
    grid_h: int                 # patches
    grid_w: int
    num_windows: int
    window_len: int             # patches per (padded) window
    unit_index: np.ndarray      # (num_windows * units_per_window,) row-major merged-unit index, -1 = padding
    unit_valid: np.ndarray      # (num_windows * units_per_window,) bool
    patch_hw: np.ndarray        # (num_windows * window_len, 2) patch row/col (0 for padding)
    row_major_slot: np.ndarray  # (merged units,) slot of each row-major merged unit in the layout

    @property
    def num_tokens(self) -> int:
        return self.num_windows * self.window_len

    @property
    def has_padding(self) -> bool:
        return not bool(self.unit_valid.all())

    def patch_valid(self, merge_unit: int) -> np.ndarray:
        return np.repeat(self.unit_valid, merge_unit)


def normalize_grid_thw(grid_thw) -> tuple[int, int, int]:
    """One static (t, h, w) from a tuple, or a (3,) / (N, 3) array whose rows are all equal."""
    g = np.asarray(grid_thw)
    if g.ndim == 2:
        if len(g) == 0 or not (g == g[:1]).all():
            raise ValueError(f"grid_thw: all images of a batch must share one grid, got {g.tolist()}")
        g = g[0]
    if g.shape != (3,):
        raise ValueError(f"grid_thw must be (t, h, w), got shape {g.shape}")
    t, h, w = (int(x) for x in g)
    if t != 1:
        raise ValueError(f"grid_thw: t={t}; only still images (t=1) are supported")
    return t, h, w


def window_layout(cfg: QwenVisionConfig, grid_thw) -> WindowLayout:
    _, gh, gw = normalize_grid_thw(grid_thw)
    m = cfg.spatial_merge_size
    if gh % m or gw % m:
        raise ValueError(f"grid_thw: patch grid {gh}x{gw} is not a multiple of spatial_merge_size {m}")
    mh, mw = gh // m, gw // m
    ws = cfg.window_units
    nwh, nww = math.ceil(mh / ws), math.ceil(mw / ws)
    r = np.arange(nwh * ws).reshape(nwh, 1, ws, 1)
    c = np.arange(nww * ws).reshape(1, nww, 1, ws)
    r, c = np.broadcast_arrays(r, c)                      # (nwh, nww, ws, ws): window-major, unit row-major
    r, c = r.reshape(-1), c.reshape(-1)
    valid = (r < mh) & (c < mw)
    unit_index = np.where(valid, r * mw + c, -1)
    sub_r, sub_c = np.divmod(np.arange(m * m), m)        # patch order inside a merge unit (row-major)
    ph = (r[:, None] * m + sub_r[None]).reshape(-1)
    pw = (c[:, None] * m + sub_c[None]).reshape(-1)
    pvalid = np.repeat(valid, m * m)
    patch_hw = np.stack([np.where(pvalid, ph, 0), np.where(pvalid, pw, 0)], axis=-1)
    slot = np.empty(mh * mw, dtype=np.int64)
    slot[unit_index[valid]] = np.nonzero(valid)[0]
    return WindowLayout(gh, gw, nwh * nww, ws * ws * m * m, unit_index, valid, patch_hw, slot)


def vision_rope(cfg: QwenVisionConfig, layout: WindowLayout):
    """cos/sin (tokens, head_dim) in float32: head_dim/4 frequencies for h, then for w, the pair duplicated."""
    pos = jnp.asarray(layout.patch_hw)
    angles = rope_frequencies(pos, cfg.head_dim // 2, cfg.rope_theta)      # (N, 2, head_dim/4)
    angles = jnp.concatenate([angles[:, 0], angles[:, 1]], axis=-1)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


# ----------------------------------------------------------------------------------------------------------------
# modules

class VisionAttention(nn.Module):
    config: QwenVisionConfig
    num_windows: int
    window_len: int
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x, cos, sin, window_mask, full_mask, is_full):
        cfg = self.config
        b, n, _ = x.shape
        h, d = cfg.num_heads, cfg.head_dim
        qkv = Dense(3 * cfg.hidden_size, use_bias=True, kernel_axes=("embed", "heads"), dtype=self.dtype,
                    param_dtype=self.param_dtype, name="qkv")(x)
        qkv = qkv.reshape(b, n, 3, h, d)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = apply_rotary_half(q, cos[None, :, None, :], sin[None, :, None, :])
        k = apply_rotary_half(k, cos[None, :, None, :], sin[None, :, None, :])
        impl = self.attention_impl

        def full(q, k, v):
            return dot_product_attention(q, k, v, mask=full_mask, implementation=impl)

        def windowed(q, k, v):
            shape = (b * self.num_windows, self.window_len, h, d)
            mask = None if window_mask is None else jnp.tile(window_mask, (b, 1, 1, 1))
            out = dot_product_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), mask=mask,
                                        implementation=impl)
            return out.reshape(b, n, h, d)

        if isinstance(is_full, (bool, np.bool_)):
            out = full(q, k, v) if is_full else windowed(q, k, v)
        else:
            out = jax.lax.cond(is_full, full, windowed, q, k, v)
        out = checkpoint_name(out.reshape(b, n, h * d), "attn_out")
        return Dense(cfg.hidden_size, use_bias=True, kernel_axes=("heads", "embed"), dtype=self.dtype,
                     param_dtype=self.param_dtype, name="proj")(out)


class VisionMLP(nn.Module):
    """SwiGLU with biases: down(act(gate(x)) * up(x))."""
    config: QwenVisionConfig
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = lambda f, axes, name: Dense(f, use_bias=True, kernel_axes=axes, dtype=self.dtype,  # noqa: E731
                                            param_dtype=self.param_dtype, name=name)
        gate = dense(cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
        up = dense(cfg.intermediate_size, ("embed", "mlp"), "up_proj")(x)
        hdn = activation(cfg.hidden_act)(gate) * up
        hdn = nn.with_logical_constraint(hdn, ("batch", "length", "act_mlp"))
        return dense(cfg.hidden_size, ("mlp", "embed"), "down_proj")(hdn)


class VisionBlock(nn.Module):
    """Pre-norm block. ``full_attention``: the block's kind when unscanned; None when it comes from the scan
    (``is_full`` argument)."""
    config: QwenVisionConfig
    num_windows: int
    window_len: int
    full_attention: Optional[bool] = None
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x, cos, sin, window_mask, full_mask, is_full=None):
        cfg = self.config
        kind = self.full_attention if self.full_attention is not None else is_full
        if kind is None:
            raise ValueError("VisionBlock: give full_attention (unscanned) or is_full (scanned)")
        norm = lambda name: RMSNorm(1e-6, dtype=self.dtype, param_dtype=self.param_dtype, name=name)  # noqa: E731
        x = x + VisionAttention(cfg, self.num_windows, self.window_len, self.dtype, self.param_dtype,
                                self.attention_impl, name="attn")(norm("norm1")(x), cos, sin, window_mask,
                                                                    full_mask, kind)
        x = x + VisionMLP(cfg, self.dtype, self.param_dtype, name="mlp")(norm("norm2")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return checkpoint_name(x, "block_out"), None


class PatchMerger(nn.Module):
    """RMSNorm per patch -> the 4 patches of a merge unit concatenated -> Linear -> GELU(erf) -> Linear."""
    config: QwenVisionConfig
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        b, n, c = x.shape
        width = c * cfg.merge_unit
        x = RMSNorm(1e-6, dtype=self.dtype, param_dtype=self.param_dtype, name="ln_q")(x)
        x = x.reshape(b, n // cfg.merge_unit, width)
        x = Dense(width, use_bias=True, kernel_axes=("embed", "mlp"), dtype=self.dtype,
                  param_dtype=self.param_dtype, name="mlp_0")(x)
        x = activation("gelu")(x)
        return Dense(cfg.out_hidden_size, use_bias=True, kernel_axes=("mlp", "embed"), dtype=self.dtype,
                     param_dtype=self.param_dtype, name="mlp_2")(x)


class QwenVisionTransformer(nn.Module):
    """``__call__(pixel_values (B, patches, patch_dim), grid_thw=(1, H/14, W/14)) -> (B, (H/28)*(W/28),
    out_hidden_size)``, merged tokens in row-major order. ``grid_thw`` must be static (Python ints / NumPy)."""
    config: QwenVisionConfig
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, pixel_values, grid_thw: Sequence[int]):
        cfg = self.config
        layout = window_layout(cfg, grid_thw)
        if pixel_values.ndim != 3:
            raise ValueError(f"pixel_values must be (batch, patches, {cfg.patch_dim}), got {pixel_values.shape}")
        b, n, pd = pixel_values.shape
        if n != layout.grid_h * layout.grid_w or pd != cfg.patch_dim:
            raise ValueError(f"pixel_values {pixel_values.shape} do not match grid_thw {tuple(grid_thw)}: expected "
                             f"(batch, {layout.grid_h * layout.grid_w}, {cfg.patch_dim})")
        mu = cfg.merge_unit
        x = Dense(cfg.hidden_size, use_bias=False, kernel_axes=("conv_in", "embed"), dtype=self.dtype,
                  param_dtype=self.param_dtype, name="patch_embed")(pixel_values)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        # processor order (row-major merge units, 4 patches each) -> padded window layout
        x = x.reshape(b, n // mu, mu, cfg.hidden_size)
        idx = jnp.asarray(np.where(layout.unit_valid, layout.unit_index, 0))
        x = jnp.take(x, idx, axis=1)
        if layout.has_padding:
            x = jnp.where(jnp.asarray(layout.unit_valid)[None, :, None, None], x, 0)
        x = x.reshape(b, layout.num_tokens, cfg.hidden_size)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

        cos, sin = vision_rope(cfg, layout)
        if layout.has_padding:
            pvalid = layout.patch_valid(mu)
            full_mask = jnp.asarray(pvalid)[None, None, None, :]
            window_mask = jnp.asarray(pvalid.reshape(layout.num_windows, 1, 1, layout.window_len))
        else:
            full_mask = window_mask = None

        common = dict(config=cfg, num_windows=layout.num_windows, window_len=layout.window_len, dtype=self.dtype,
                      param_dtype=self.param_dtype, attention_impl=self.attention_impl)
        if self.scan_layers:
            stack = scanned(VisionBlock, cfg.depth,
                            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
                            remat=self.remat_policy)
            kinds = jnp.asarray([cfg.is_full(i) for i in range(cfg.depth)])
            x, _ = stack(**common, name="blocks")(x, cos, sin, window_mask, full_mask, kinds)
        else:
            block_cls = maybe_remat(VisionBlock, self.remat_policy)
            for i in range(cfg.depth):
                x, _ = block_cls(**common, full_attention=cfg.is_full(i), name=f"blocks_{i}")(
                    x, cos, sin, window_mask, full_mask, None)

        y = PatchMerger(cfg, self.dtype, self.param_dtype, name="merger")(x)     # (B, slots, out)
        y = jnp.take(y, jnp.asarray(layout.row_major_slot), axis=1)
        return nn.with_logical_constraint(y, ("batch", "length", "act_embed"))
