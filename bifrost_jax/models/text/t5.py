"""The T5 (v1.1) encoder: FLUX's ``text_encoder_2`` (T5-XXL), a Flax port of transformers' ``T5EncoderModel``.

Pre-norm blocks (T5LayerNorm = RMS scale without mean subtraction or bias), self-attention with NO 1/sqrt(d)
scaling and a bucketed relative position bias that the first block owns and every block reuses, gated-GELU (v1.1)
or plain ReLU (original T5) feed-forward. The bias is computed once, outside the (optionally scanned) stack, so
the table lives at model level (``relative_attention_bias``) and not inside block 0.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from bifrost_jax.nn.attention import dot_product_attention
from bifrost_jax.nn.layers import ACTIVATIONS, Dense, Embed, RMSNorm, activation, param_with_axes
from bifrost_jax.nn.stack import maybe_remat, scanned, stack_name

Dtype = Any


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
    """The architecture fields of a transformers ``T5Config`` that the encoder uses. Defaults are transformers'
    ``T5Config`` defaults (so a config.json that omits a field means the same here); FLUX's encoder is
    ``T5_V1_1_XXL`` below."""
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    # kept only so that an exported config.json says what the original did (the encoder never reads them)
    pad_token_id: Optional[int] = 0
    eos_token_id: Optional[int] = 1

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def dense_act_fn(self) -> str:
        # transformers maps "gated-gelu" to the tanh approximation (gelu_new) for backward compatibility
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    def __post_init__(self):
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"T5 config: feed_forward_proj={self.feed_forward_proj!r} is not 'ACT' or 'gated-ACT'")
        if self.dense_act_fn not in ACTIVATIONS:
            raise ValueError(f"T5 config: feed_forward_proj={self.feed_forward_proj!r}: activation "
                             f"{self.dense_act_fn!r} is not supported (known: {sorted(ACTIVATIONS)})")

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "T5EncoderConfig":
        model_type = cfg.get("model_type", "t5")
        if model_type != "t5":
            # umt5 has a relative bias in every layer; mt5/longt5 differ in other ways
            raise ValueError(f"T5 config: model_type={model_type!r} is not supported (only 't5')")
        if cfg.get("is_decoder", False):
            raise ValueError("T5 config: is_decoder=True is not supported (this is the encoder only)")
        eos = cfg.get("eos_token_id", 1)
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: cfg[k] for k in fields if k in cfg and k != "eos_token_id"}
        kwargs["eos_token_id"] = eos if not isinstance(eos, list) else (eos[0] if eos else None)
        return cls(**kwargs)

    def to_hf_config(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(model_type="t5", architectures=["T5EncoderModel"], is_encoder_decoder=False, use_cache=False,
                   is_decoder=False, num_decoder_layers=self.num_layers, dense_act_fn=self.dense_act_fn,
                   is_gated_act=self.is_gated_act)
        return out


# FLUX.1's text_encoder_2 (google/t5-v1_1-xxl encoder)
T5_V1_1_XXL = T5EncoderConfig(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                              feed_forward_proj="gated-gelu")


def relative_position_bucket(query_length: int, key_length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(query_length, key_length) int32 buckets of ``key_pos - query_pos``, bidirectional (encoder) rule.

    Computed with numpy in float32 at trace time (the lengths are static), in the same order of operations as
    transformers' ``T5Attention._relative_position_bucket`` so that boundary positions (e.g. distance 16, 32, 64
    with 32 buckets / max distance 128) land in the same bucket.
    """
    rel = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    half = num_buckets // 2
    bucket = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    max_exact = half // 2
    is_small = dist < max_exact
    # distance 0 would take log(0); it is a "small" distance anyway, so clamp it out of the log
    large = max_exact + (np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(max_exact))
                         / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
    large = np.minimum(large.astype(np.int64), half - 1)
    return (bucket + np.where(is_small, dist, large)).astype(np.int32)


class T5Attention(nn.Module):
    """T5 self-attention: q/k/v/o without bias, head dim ``d_kv`` independent of ``d_model``, no logit scaling."""
    config: T5EncoderConfig
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x, mask, position_bias):
        cfg = self.config
        inner = cfg.num_heads * cfg.d_kv
        dense = lambda n, f, axes: Dense(f, use_bias=False, kernel_axes=axes, dtype=self.dtype,  # noqa: E731
                                         param_dtype=self.param_dtype, name=n)
        b, l, _ = x.shape
        heads = lambda t: nn.with_logical_constraint(  # noqa: E731
            t.reshape(b, l, cfg.num_heads, cfg.d_kv), ("batch", "length", "act_heads", "act_kv"))
        q = heads(dense("q", inner, ("embed", "heads"))(x))
        k = heads(dense("k", inner, ("embed", "heads"))(x))
        v = heads(dense("v", inner, ("embed", "heads"))(x))
        out = dot_product_attention(q, k, v, mask=mask, bias=position_bias, scale=1.0,
                                    implementation=self.attention_impl)
        out = dense("o", cfg.d_model, ("heads", "embed"))(out.reshape(b, l, inner))
        return checkpoint_name(out, "attn_out")


class T5FeedForward(nn.Module):
    """``wo(act(wi_0 x) * wi_1 x)`` (gated, v1.1) or ``wo(act(wi x))`` (original T5)."""
    config: T5EncoderConfig
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = lambda n, f, axes: Dense(f, use_bias=False, kernel_axes=axes, dtype=self.dtype,  # noqa: E731
                                         param_dtype=self.param_dtype, name=n)
        act = activation(cfg.dense_act_fn)
        if cfg.is_gated_act:
            h = act(dense("wi_0", cfg.d_ff, ("embed", "mlp"))(x)) * dense("wi_1", cfg.d_ff, ("embed", "mlp"))(x)
        else:
            h = act(dense("wi", cfg.d_ff, ("embed", "mlp"))(x))
        h = nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))
        return dense("wo", cfg.d_model, ("mlp", "embed"))(h)


class T5Block(nn.Module):
    """One encoder block: x + SelfAttention(norm(x)), then x + FF(norm(x)). Returns ``(x, None)`` for nn.scan."""
    config: T5EncoderConfig
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x, mask, position_bias):
        cfg = self.config
        norm = lambda n: RMSNorm(eps=cfg.layer_norm_epsilon, dtype=self.dtype,  # noqa: E731
                                 param_dtype=self.param_dtype, name=n)
        x = x + T5Attention(cfg, self.dtype, self.param_dtype, self.attention_impl,
                            name="self_attn")(norm("self_attn_norm")(x), mask, position_bias)
        x = x + T5FeedForward(cfg, self.dtype, self.param_dtype, name="ff")(norm("ff_norm")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return checkpoint_name(x, "block_out"), None


class T5EncoderModel(nn.Module):
    """``__call__(input_ids, attention_mask=None) -> last_hidden_state`` (B, L, d_model), like transformers'
    ``T5EncoderModel(...).last_hidden_state``. ``attention_mask`` (B, L): 1 = token, 0 = padding."""
    config: T5EncoderConfig
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        cfg = self.config
        b, l = input_ids.shape
        x = Embed(cfg.vocab_size, cfg.d_model, dtype=self.dtype, param_dtype=self.param_dtype,
                  name="shared")(input_ids)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

        # the first block's relative position bias, shared by all blocks: (1, H, L, L), kept in float32
        table = param_with_axes(self, "relative_attention_bias", nn.initializers.normal(cfg.d_model ** -0.5),
                                (cfg.relative_attention_num_buckets, cfg.num_heads), self.param_dtype,
                                (None, "heads"))
        buckets = relative_position_bucket(l, l, cfg.relative_attention_num_buckets,
                                           cfg.relative_attention_max_distance)
        position_bias = jnp.take(table.astype(jnp.float32), jnp.asarray(buckets), axis=0)  # (L, L, H)
        position_bias = position_bias.transpose(2, 0, 1)[None]
        mask = None if attention_mask is None else (attention_mask[:, None, None, :] != 0)

        block_kw = dict(config=cfg, dtype=self.dtype, param_dtype=self.param_dtype,
                        attention_impl=self.attention_impl)
        if self.scan_layers:
            stack = scanned(T5Block, cfg.num_layers, remat=self.remat_policy)
            x, _ = stack(**block_kw, name="block")(x, mask, position_bias)
        else:
            block_cls = maybe_remat(T5Block, self.remat_policy)
            for i in range(cfg.num_layers):
                x, _ = block_cls(**block_kw, name=stack_name("block", i))(x, mask, position_bias)
        return RMSNorm(eps=cfg.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="final_layer_norm")(x)
