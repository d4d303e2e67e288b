"""The Qwen2.5(-VL) language model: decoder-only transformer with multimodal rotary positions (M-RoPE).

Mirrors transformers' ``Qwen2_5_VLTextModel`` (the ``model.language_model`` of
``Qwen2_5_VLForConditionalGeneration``): token embedding, ``num_hidden_layers`` pre-norm blocks (RMSNorm ->
grouped-query attention with biased q/k/v and unbiased o -> residual; RMSNorm -> SwiGLU MLP -> residual) and a
final RMSNorm. Returns the final hidden states; the LM head belongs to the full VL model (``models/qwen/vl.py``).

The pieces are public because the Bifrost-1 dual-branch MLLM (``models/bifrost.py``) builds a second weight set
from them: ``QwenAttentionProjections`` (one or several named q/k/v/o sets in ONE module scope, so branch weights
sit beside the originals as in the official checkpoint), ``QwenMLP``, ``mrope_cos_sin`` / ``apply_mrope`` and the
mask / position helpers.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from bifrost_jax.nn.attention import dot_product_attention
from bifrost_jax.nn.layers import Dense, Embed, RMSNorm, activation
from bifrost_jax.nn.rope import apply_rotary_half, rope_frequencies
from bifrost_jax.nn.stack import maybe_remat, scanned

Dtype = Any


# ----------------------------------------------------------------------------------------------------------------
# config

@dataclasses.dataclass(frozen=True)
class QwenTextConfig:
    """Text-model hyper-parameters (defaults: Qwen2.5-VL-7B-Instruct)."""
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: Optional[int] = None  # None -> hidden_size // num_attention_heads (the only layout HF supports)
    vocab_size: int = 152064
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple[int, ...] = (16, 24, 24)
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    max_position_embeddings: int = 128000
    bos_token_id: Optional[int] = 151643
    eos_token_id: Optional[int] = 151645
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
        if self.head_dim * self.num_attention_heads != self.hidden_size:
            raise ValueError(f"QwenTextConfig: head_dim ({self.head_dim}) * num_attention_heads "
                             f"({self.num_attention_heads}) must equal hidden_size ({self.hidden_size}); "
                             "transformers' Qwen2.5-VL attention derives head_dim from hidden_size")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"QwenTextConfig: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2 or sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"QwenTextConfig: mrope_section {list(self.mrope_section)} must sum to head_dim/2 = "
                             f"{self.head_dim // 2}")
        activation(self.hidden_act)  # raises on an unknown name

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> "QwenTextConfig":
        """From a transformers ``Qwen2_5_VLTextConfig`` dict (``config.json["text_config"]``). A full
        ``Qwen2_5_VLConfig`` dict (with ``text_config`` inside) is accepted too; then ``tie_word_embeddings`` is read
        from the outer dict, where transformers 5.x keeps it. Old flat 4.x configs (text fields at top level,
        ``rope_scaling={"type": "mrope", ...}``, top-level ``rope_theta``) also work."""
        outer = dict(config)
        text = dict(outer.get("text_config") or outer)
        tie = bool(outer.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
        if text.get("use_sliding_window", False):
            raise ValueError("QwenTextConfig: use_sliding_window=True is not supported (Qwen2.5-VL checkpoints "
                             "use full attention)")
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"QwenTextConfig: rope_parameters.rope_type={rope_type!r} is not supported "
                             "(only default / mrope)")
        theta = rope.get("rope_theta", text.get("rope_theta", 1e6))
        section = rope.get("mrope_section", text.get("mrope_section"))
        if section is None:
            raise ValueError("QwenTextConfig: the config has no rope_parameters.mrope_section "
                             "(nor rope_scaling.mrope_section)")
        hidden, heads = text["hidden_size"], text["num_attention_heads"]
        head_dim = text.get("head_dim") or hidden // heads
        eos = text.get("eos_token_id", 151645)
        return cls(
            hidden_size=hidden, intermediate_size=text["intermediate_size"],
            num_hidden_layers=text["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=text.get("num_key_value_heads") or heads, head_dim=head_dim,
            vocab_size=text["vocab_size"], rms_norm_eps=text.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            mrope_section=tuple(section), tie_word_embeddings=tie, hidden_act=text.get("hidden_act", "silu"),
            max_position_embeddings=text.get("max_position_embeddings", 128000),
            bos_token_id=text.get("bos_token_id", 151643), eos_token_id=eos,
            pad_token_id=text.get("pad_token_id"))

    def to_hf_config(self) -> dict:
        """The ``text_config`` dict of a transformers 5.x ``Qwen2_5_VLConfig`` (put ``tie_word_embeddings`` at the
        outer level too when writing a full config)."""
        return {
            "model_type": "qwen2_5_vl_text",
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps, "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta,
                                "mrope_section": list(self.mrope_section)},
            "use_sliding_window": False, "sliding_window": None, "attention_dropout": 0.0,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
        }


# ----------------------------------------------------------------------------------------------------------------
# rotary positions, masks

def mrope_cos_sin(position_ids, head_dim: int, theta: float, mrope_section: Sequence[int]):
    """cos, sin (B, L, head_dim) in float32 from 3-D positions (3, B, L) (temporal, height, width).

    The head_dim/2 frequencies are split into ``mrope_section`` chunks; chunk i takes its angles from position
    axis i % 3; the result is duplicated as cat(f, f) for the rotate-half pairing (transformers'
    ``Qwen2_5_VLRotaryEmbedding``)."""
    position_ids = jnp.asarray(position_ids)
    if position_ids.ndim == 2:  # (B, L): the same position on all three axes
        position_ids = jnp.broadcast_to(position_ids[None], (3,) + position_ids.shape)
    if position_ids.shape[0] != 3:
        raise ValueError(f"mrope_cos_sin: position_ids must be (3, B, L) or (B, L), got {position_ids.shape}")
    if sum(mrope_section) != head_dim // 2:
        raise ValueError(f"mrope_cos_sin: mrope_section {list(mrope_section)} must sum to head_dim/2 = {head_dim // 2}")
    freqs = rope_frequencies(position_ids, head_dim, theta)  # (3, B, L, D/2)
    chunks, start = [], 0
    for i, size in enumerate(mrope_section):
        chunks.append(freqs[i % 3, ..., start:start + size])
        start += size
    freq = jnp.concatenate(chunks, axis=-1)
    emb = jnp.concatenate([freq, freq], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_mrope(x, cos, sin):
    """Rotate x (B, L, H, D) with cos/sin (B, L, D) (from ``mrope_cos_sin``); math in float32."""
    return apply_rotary_half(x, cos[:, :, None, :], sin[:, :, None, :])


def text_position_ids(attention_mask, pad_position: int = 1):
    """(3, B, L) positions for a text-only (left-padded) batch: real tokens count 0, 1, ... over non-pad tokens;
    pads get ``pad_position`` (irrelevant to real tokens: pads are never attended to)."""
    m = jnp.asarray(attention_mask).astype(jnp.int32)
    pos = jnp.where(m > 0, jnp.cumsum(m, axis=-1) - 1, pad_position)
    return jnp.broadcast_to(pos[None], (3,) + pos.shape)


def causal_padding_mask(attention_mask):
    """Boolean (B, 1, L, L): query i may see key j iff j <= i and j is a real token. Pad query rows that see no key
    give zeros in ``dot_product_attention`` (never NaN)."""
    keys = jnp.asarray(attention_mask).astype(bool)
    length = keys.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    return causal[None, None] & keys[:, None, None, :]


# ----------------------------------------------------------------------------------------------------------------
# modules

class QwenAttentionProjections(nn.Module):
    """q/k/v (with bias) and o (without) projections of one attention layer.

    ``prefixes`` names one projection set per entry, all in this module's scope: ("",) gives q_proj ... o_proj
    (plain Qwen); ("", "vision_branch_") adds vision_branch_q_proj ... (the Bifrost-1 generation branch, matching
    the official ``self_attn.vision_branch_*`` names). ``qkv`` / ``out`` pick a set by prefix."""
    config: QwenTextConfig
    prefixes: tuple[str, ...] = ("",)
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for p in self.prefixes:
            setattr(self, f"{p}q_proj", Dense(c.num_attention_heads * c.head_dim, use_bias=True,
                                              kernel_axes=("embed", "heads"), **kw))
            setattr(self, f"{p}k_proj", Dense(c.num_key_value_heads * c.head_dim, use_bias=True,
                                              kernel_axes=("embed", "kv_heads"), **kw))
            setattr(self, f"{p}v_proj", Dense(c.num_key_value_heads * c.head_dim, use_bias=True,
                                              kernel_axes=("embed", "kv_heads"), **kw))
            setattr(self, f"{p}o_proj", Dense(c.hidden_size, use_bias=False, kernel_axes=("heads", "embed"),
                                              **kw))

    def _check(self, prefix):
        if prefix not in self.prefixes:
            raise ValueError(f"QwenAttentionProjections: no projection set {prefix!r}; have {self.prefixes}")

    def qkv(self, x, prefix: str = ""):
        """x (B, L, E) -> q (B, L, H, D), k, v (B, L, K, D) (before RoPE)."""
        self._check(prefix)
        c = self.config
        b, length = x.shape[:2]
        q = getattr(self, f"{prefix}q_proj")(x).reshape(b, length, c.num_attention_heads, c.head_dim)
        k = getattr(self, f"{prefix}k_proj")(x).reshape(b, length, c.num_key_value_heads, c.head_dim)
        v = getattr(self, f"{prefix}v_proj")(x).reshape(b, length, c.num_key_value_heads, c.head_dim)
        q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", "act_kv"))
        k = nn.with_logical_constraint(k, ("batch", "length", "act_heads", "act_kv"))
        v = nn.with_logical_constraint(v, ("batch", "length", "act_heads", "act_kv"))
        return q, k, v

    def out(self, attn, prefix: str = ""):
        """attn (B, L, H, D) -> (B, L, E)."""
        self._check(prefix)
        b, length = attn.shape[:2]
        return getattr(self, f"{prefix}o_proj")(attn.reshape(b, length, -1))


class QwenMLP(nn.Module):
    """SwiGLU MLP: down(act(gate(x)) * up(x)), no biases."""
    config: QwenTextConfig
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        gate = Dense(c.intermediate_size, kernel_axes=("embed", "mlp"), name="gate_proj", **kw)(x)
        up = Dense(c.intermediate_size, kernel_axes=("embed", "mlp"), name="up_proj", **kw)(x)
        h = activation(c.hidden_act)(gate) * up
        h = nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))
        return Dense(c.hidden_size, kernel_axes=("mlp", "embed"), name="down_proj", **kw)(h)


def pre_norm_block(x, cos, sin, mask, *, attn: QwenAttentionProjections, input_layernorm, post_attention_layernorm,
                   mlp, prefix: str = "", past_kv=None):
    """One Qwen block on x (B, L, E) with the given modules; returns (x', (k, v)), k/v of x's own tokens after RoPE.

    ``past_kv``: keys/values (B, S, K, D) of other tokens placed BEFORE x's own in the attention (the Bifrost image
    rows attend to the text prefix this way; ``mask`` is then (B, 1|H, L, S + L)). Shared by the plain decoder layer
    and the Bifrost-1 dual-branch layer so both compute the text rows with literally the same code."""
    h = input_layernorm(x)
    q, k, v = attn.qkv(h, prefix)
    q, k = apply_mrope(q, cos, sin), apply_mrope(k, cos, sin)
    keys, values = k, v
    if past_kv is not None:
        keys = jnp.concatenate([past_kv[0].astype(k.dtype), k], axis=1)
        values = jnp.concatenate([past_kv[1].astype(v.dtype), v], axis=1)
    o = attn.out(dot_product_attention(q, keys, values, mask=mask), prefix)
    x = x + checkpoint_name(o, "attn_out")
    x = x + mlp(post_attention_layernorm(x))
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    return checkpoint_name(x, "block_out"), (k, v)


class QwenDecoderLayer(nn.Module):
    """One pre-norm block. ``__call__(hidden_states, cos, sin, mask)``; with ``scan_carry`` it returns
    ``(hidden_states, None)`` as ``nn.scan`` wants.

    With ``kv_cache`` (text decoding, ``sample/text.py``) it takes ``past_kv`` = (k, v) (B, S, K, D) of earlier
    tokens (S may be 0), attends over [past ; own] with ``mask`` (B, 1, L, S + L), and always returns
    ``(hidden_states, (k, v))``: the layer's own keys/values after RoPE, for the caller to write into its cache."""
    config: QwenTextConfig
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    scan_carry: bool = False
    kv_cache: bool = False

    @nn.compact
    def __call__(self, hidden_states, cos, sin, mask, past_kv=None):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x, kv = pre_norm_block(
            hidden_states, cos, sin, mask,
            attn=QwenAttentionProjections(c, name="self_attn", **kw),
            input_layernorm=RMSNorm(c.rms_norm_eps, name="input_layernorm", **kw),
            post_attention_layernorm=RMSNorm(c.rms_norm_eps, name="post_attention_layernorm", **kw),
            mlp=QwenMLP(c, name="mlp", **kw), past_kv=past_kv)
        if self.kv_cache:
            return x, kv
        return (x, None) if self.scan_carry else x


class QwenLanguageModel(nn.Module):
    """transformers ``Qwen2_5_VLTextModel``: ``__call__(input_ids=None, inputs_embeds=None, position_ids=None,
    attention_mask=None) -> last_hidden_state (B, L, E)`` (after the final norm).

    position_ids: (3, B, L) int (M-RoPE) or (B, L); None -> real tokens counted 0, 1, ... (left pads skipped).
    attention_mask: (B, L), 1 = real, 0 = pad; causal and padding masking are applied inside."""
    config: QwenTextConfig
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    kv_cache: bool = False  # build the layers for ``forward_cached`` (same parameters; ``module.clone(kv_cache=True)``)

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kv_cache=self.kv_cache)
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype)
        if self.scan_layers:
            # with a cache, each layer's past K/V is scanned over (axis 0 of the stacked cache)
            in_axes = (nn.broadcast, nn.broadcast, nn.broadcast, 0) if self.kv_cache else nn.broadcast
            stack = scanned(QwenDecoderLayer, c.num_hidden_layers, in_axes=in_axes, remat=self.remat_policy)
            self.layers = stack(c, scan_carry=True, **kw)
        else:
            block = maybe_remat(QwenDecoderLayer, self.remat_policy)
            self.layers = [block(c, **kw) for _ in range(c.num_hidden_layers)]  # named layers_0, layers_1, ...
        self.norm = RMSNorm(c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def __call__(self, input_ids=None, inputs_embeds=None, position_ids=None, attention_mask=None):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("QwenLanguageModel: pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        b, length = x.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((b, length), dtype=jnp.int32)
        if position_ids is None:
            position_ids = text_position_ids(attention_mask)
        cos, sin = mrope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta,
                                 self.config.mrope_section)
        mask = causal_padding_mask(attention_mask)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        if self.kv_cache:
            raise ValueError("QwenLanguageModel(kv_cache=True): call forward_cached")
        if self.scan_layers:
            x, _ = self.layers(x, cos, sin, mask)
        else:
            for layer in self.layers:
                x = layer(x, cos, sin, mask)
        return self.norm(x)

    def forward_cached(self, inputs_embeds, position_ids, mask, past_k, past_v):
        """L new tokens after S cached ones: ``inputs_embeds`` (B, L, E), ``position_ids`` (3, B, L), ``mask``
        boolean (B, 1, L, S + L) over [cache ; new] keys, ``past_k`` / ``past_v`` (layers, B, S, K, D) (S may be
        0). Returns (final-normed hidden (B, L, E), (k, v) (layers, B, L, K, D) of the new tokens after RoPE).
        Needs ``kv_cache=True``; the same parameters as ``__call__``."""
        if not self.kv_cache:
            raise ValueError("QwenLanguageModel.forward_cached needs kv_cache=True (module.clone(kv_cache=True))")
        c = self.config
        cos, sin = mrope_cos_sin(position_ids, c.head_dim, c.rope_theta, c.mrope_section)
        x = nn.with_logical_constraint(inputs_embeds.astype(self.dtype), ("batch", "length", "act_embed"))
        if self.scan_layers:
            x, (k, v) = self.layers(x, cos, sin, mask, (past_k, past_v))
        else:
            ks, vs = [], []
            for i, layer in enumerate(self.layers):
                x, (k_i, v_i) = layer(x, cos, sin, mask, (past_k[i], past_v[i]))
                ks.append(k_i)
                vs.append(v_i)
            k, v = jnp.stack(ks), jnp.stack(vs)
        return self.norm(x), (k, v)
