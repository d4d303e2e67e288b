"""The CLIP text transformer: FLUX's ``text_encoder`` (CLIP ViT-L/14 text tower), a Flax port of transformers'
``CLIPTextModel``, and ``CLIPTextModelWithProjection`` (SDXL's ``text_encoder_2``: the pooled output through a
bias-free ``text_projection``; SDXL reads its penultimate hidden states too).

Token + learned absolute position embeddings, pre-LayerNorm blocks with causal (plus padding) self-attention and a
two-layer MLP (quick_gelu for OpenAI CLIP, or ``hidden_act``), a final LayerNorm. FLUX uses ``pooler_output``, the
final hidden state at each sequence's end-of-text token.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from bifrost_jax.nn.attention import dot_product_attention
from bifrost_jax.nn.layers import ACTIVATIONS, Dense, Embed, LayerNorm, activation
from bifrost_jax.nn.stack import maybe_remat, scanned, stack_name

Dtype = Any


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of a transformers ``CLIPTextConfig`` that the text model uses. Defaults are transformers'
    defaults (a config.json that omits a field means the same here); FLUX's encoder is ``CLIP_VIT_L_14`` below."""
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # eos_token_id picks the pooled position (see ``pooled_positions``); pad/bos/projection_dim are only kept so
    # that an exported config.json says what the original did
    eos_token_id: int = 49407
    bos_token_id: Optional[int] = 49406
    pad_token_id: Optional[int] = 1
    projection_dim: Optional[int] = 512

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIP text config: hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP text config: hidden_act={self.hidden_act!r} is not supported "
                             f"(known: {sorted(ACTIVATIONS)})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "CLIPTextConfig":
        model_type = cfg.get("model_type", "clip_text_model")
        if model_type == "clip":  # a full CLIPModel config: take its text tower
            if "text_config" not in cfg:
                raise ValueError("CLIP config: model_type='clip' without a text_config")
            return cls.from_hf_config({"model_type": "clip_text_model", **cfg["text_config"]})
        if model_type != "clip_text_model":
            raise ValueError(f"CLIP text config: model_type={model_type!r} is not supported ('clip_text_model')")
        if isinstance(cfg.get("eos_token_id"), list):
            raise ValueError(f"CLIP text config: eos_token_id={cfg['eos_token_id']!r}: a list is not supported "
                             "(the pooled position needs one end-of-text id)")
        if cfg.get("eos_token_id", 0) is None:
            raise ValueError("CLIP text config: eos_token_id=None; the pooled output needs an end-of-text id")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: cfg[k] for k in fields if k in cfg})

    def to_hf_config(self, architecture: str = "CLIPTextModel") -> dict:
        out = dataclasses.asdict(self)
        out.update(model_type="clip_text_model", architectures=[architecture])
        return out


# FLUX.1's text_encoder (openai/clip-vit-large-patch14 text tower, with the legacy eos_token_id 2 in its config)
CLIP_VIT_L_14 = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, eos_token_id=2, bos_token_id=0, pad_token_id=1,
                               projection_dim=768)


def pooled_positions(input_ids, eos_token_id: int):
    """Index of the pooled (end-of-text) token per sequence, transformers' rule exactly: with the legacy
    ``eos_token_id == 2`` the position of the largest id (the EOT id is the largest in the CLIP vocabulary),
    otherwise the first position equal to ``eos_token_id`` (0 if there is none)."""
    if eos_token_id == 2:
        return jnp.argmax(input_ids.astype(jnp.int32), axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections and 1/sqrt(head_dim) scaling."""
    config: CLIPTextConfig
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.config
        dense = lambda n, axes: Dense(cfg.hidden_size, kernel_axes=axes, dtype=self.dtype,  # noqa: E731
                                      param_dtype=self.param_dtype, name=n)
        b, l, _ = x.shape
        heads = lambda t: nn.with_logical_constraint(  # noqa: E731
            t.reshape(b, l, cfg.num_attention_heads, cfg.head_dim), ("batch", "length", "act_heads", "act_kv"))
        q = heads(dense("q_proj", ("embed", "heads"))(x))
        k = heads(dense("k_proj", ("embed", "heads"))(x))
        v = heads(dense("v_proj", ("embed", "heads"))(x))
        out = dot_product_attention(q, k, v, mask=mask, scale=cfg.head_dim ** -0.5,
                                    implementation=self.attention_impl)
        out = dense("out_proj", ("heads", "embed"))(out.reshape(b, l, cfg.hidden_size))
        return checkpoint_name(out, "attn_out")


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = Dense(cfg.intermediate_size, kernel_axes=("embed", "mlp"), dtype=self.dtype,
                  param_dtype=self.param_dtype, name="fc1")(x)
        h = nn.with_logical_constraint(activation(cfg.hidden_act)(h), ("batch", "length", "act_mlp"))
        return Dense(cfg.hidden_size, kernel_axes=("mlp", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                     name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """x + attn(LN1(x)), then x + mlp(LN2(x)). Returns ``(x, x if return_hidden else None)`` for nn.scan (the
    second output stacks every layer's hidden state)."""
    config: CLIPTextConfig
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None
    return_hidden: bool = False

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.config
        norm = lambda n: LayerNorm(eps=cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa
                                   name=n)
        x = x + CLIPAttention(cfg, self.dtype, self.param_dtype, self.attention_impl,
                              name="self_attn")(norm("layer_norm1")(x), mask)
        x = x + CLIPMLP(cfg, self.dtype, self.param_dtype, name="mlp")(norm("layer_norm2")(x))
        x = checkpoint_name(nn.with_logical_constraint(x, ("batch", "length", "act_embed")), "block_out")
        return x, (x if self.return_hidden else None)


def clip_text_forward(module, input_ids, attention_mask=None, position_ids=None, output_hidden_states=False):
    """(last_hidden_state, pooler_output, hidden_states or None), defining the text tower's parameters in
    ``module``'s compact scope. ``hidden_states`` is transformers' tuple: the embeddings, then every layer's output
    (the last one before ``final_layer_norm``)."""
    cfg = module.config
    b, l = input_ids.shape
    if l > cfg.max_position_embeddings:
        raise ValueError(f"{type(module).__name__}: sequence length {l} exceeds max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    if position_ids is None:
        position_ids = jnp.arange(l)[None, :]
    kw = dict(dtype=module.dtype, param_dtype=module.param_dtype)
    x = Embed(cfg.vocab_size, cfg.hidden_size, name="token_embedding", **kw)(input_ids)
    x = x + Embed(cfg.max_position_embeddings, cfg.hidden_size, axes=(None, "embed"), name="position_embedding",
                  **kw)(position_ids)
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

    mask = jnp.tril(jnp.ones((l, l), dtype=bool))[None, None]  # (1, 1, L, L) causal
    if attention_mask is not None:
        mask = mask & (attention_mask[:, None, None, :] != 0)

    layer_kw = dict(config=cfg, attention_impl=module.attention_impl,
                    return_hidden=output_hidden_states, **kw)
    hidden = [x]
    if module.scan_layers:
        x, stacked = scanned(CLIPEncoderLayer, cfg.num_hidden_layers, remat=module.remat_policy)(
            **layer_kw, name="layers")(x, mask)
        if output_hidden_states:
            hidden += [stacked[i] for i in range(cfg.num_hidden_layers)]
    else:
        layer_cls = maybe_remat(CLIPEncoderLayer, module.remat_policy)
        for i in range(cfg.num_hidden_layers):
            x, _ = layer_cls(**layer_kw, name=stack_name("layers", i))(x, mask)
            hidden.append(x)
    x = LayerNorm(eps=cfg.layer_norm_eps, name="final_layer_norm", **kw)(x)
    pooled = jnp.take_along_axis(x, pooled_positions(input_ids, cfg.eos_token_id)[:, None, None], axis=1)[:, 0]
    return x, pooled, (tuple(hidden) if output_hidden_states else None)


class CLIPTextModel(nn.Module):
    """``__call__(input_ids, attention_mask=None, position_ids=None) -> (last_hidden_state, pooler_output)``,
    like transformers' ``CLIPTextModel``; with ``output_hidden_states=True`` a third element, the hidden states
    (see ``clip_text_forward``). ``attention_mask`` (B, L): 1 = token, 0 = padding (combined with the causal
    mask)."""
    config: CLIPTextConfig
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, output_hidden_states: bool = False):
        x, pooled, hidden = clip_text_forward(self, input_ids, attention_mask, position_ids, output_hidden_states)
        return (x, pooled, hidden) if output_hidden_states else (x, pooled)


class CLIPTextModelWithProjection(CLIPTextModel):
    """transformers' ``CLIPTextModelWithProjection``: ``__call__(...) -> (text_embeds, last_hidden_state)`` (its
    output order), plus the hidden states with ``output_hidden_states=True``. ``text_embeds`` is the pooled output
    through ``text_projection`` (hidden_size -> projection_dim, no bias). SDXL takes ``text_embeds`` as the pooled
    prompt embedding and ``hidden_states[-2]`` as the per-token one."""

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, output_hidden_states: bool = False):
        cfg = self.config
        if not cfg.projection_dim:
            raise ValueError("CLIPTextModelWithProjection: the config has no projection_dim")
        x, pooled, hidden = clip_text_forward(self, input_ids, attention_mask, position_ids, output_hidden_states)
        text_embeds = Dense(cfg.projection_dim, use_bias=False, kernel_axes=("embed", "mlp"), dtype=self.dtype,
                            param_dtype=self.param_dtype, name="text_projection")(pooled)
        return (text_embeds, x, hidden) if output_hidden_states else (text_embeds, x)
