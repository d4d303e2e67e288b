"""Bifrost-1's dual-branch MLLM: a frozen Qwen2.5-VL language model plus a trainable "vision generation branch".

Every decoder layer holds the original (frozen) weights and a copy for image slots (docs/design.md §3.2-§3.4):
``self_attn.{q,k,v,o}_proj`` + ``self_attn.vision_branch_{q,k,v,o}_proj``, ``mlp`` + ``vision_branch_mlp``,
``input_layernorm`` / ``post_attention_layernorm`` + ``vision_branch_*`` copies; the model adds ``vision_branch_norm``
(copy of the final norm), ``vision_head`` (Linear hidden -> clip_dim with bias), ``mask_token`` (clip_dim,) and
``learnable_pos_emb`` (N, hidden). The original names equal ``QwenLanguageModel``'s, so the text weights load with
``port.qwen_text.text_key_map``; the branch names mirror the official checkpoint's.

Sequence: T text-prefix tokens (left-padded prompt), then N image slots. Routing is by SLICING at that fixed
boundary: text rows only ever meet the original weights, image rows only the branch (the official code runs both
weight sets on every token and mixes them by the image mask, 2x the FLOPs; ``official_forward`` keeps that literal
formulation as the reference). Attention is joint: the image rows' softmax runs over [text keys ; image keys]. The
text rows' softmax runs over the text keys alone, which is exact because the causal mask hides every image key from
them (docs/design.md §4.4) -- and it is what makes the text-prefix K/V cache (``encode_prefix`` / ``decode_images``) exact.

Inputs (docs/design.md §4.2): image slot n = ``mask_token`` where masked else the CLIP latent, plus ``learnable_pos_emb[n]``.
Positions (§4.3): real text tokens 0..T_real-1 counted over non-pad tokens, left pads 1, image slots 0 on all three
M-RoPE axes. Mask (§4.4): text causal; image slots see every real text token and every image slot; pads are never
keys; fully-masked pad query rows give zeros (no NaN).

Also here: the stage-B loss (``mse_loss``, all slots, fp32) and MAR masking (``random_orders``,
``sample_mar_mask``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from bifrost_jax.models.qwen.decoder import (QwenAttentionProjections, QwenMLP, QwenTextConfig, apply_mrope,
                                             causal_padding_mask, mrope_cos_sin, pre_norm_block, text_position_ids)
from bifrost_jax.nn.attention import dot_product_attention
from bifrost_jax.nn.layers import Dense, Embed, RMSNorm, param_with_axes
from bifrost_jax.nn.stack import maybe_remat, scanned

Dtype = Any
BRANCH = "vision_branch_"


# ----------------------------------------------------------------------------------------------------------------
# config

@dataclasses.dataclass(frozen=True)
class BifrostConfig:
    """The MLLM side of Bifrost-1. ``clip_dim`` must equal the text hidden size: visible image slots ARE the
    Qwen2.5-VL ViT-merger latents, fed as input embeddings without a projector (docs/design.md §4.2)."""
    text: QwenTextConfig = dataclasses.field(default_factory=QwenTextConfig)
    num_image_tokens: int = 256
    image_grid: tuple[int, int] = (16, 16)
    clip_dim: Optional[int] = None  # None -> text.hidden_size
    # MAR's masking-ratio distribution: r ~ N(mean, std) truncated to [min, max]
    mask_ratio_min: float = 0.7
    mask_ratio_max: float = 1.0
    mask_ratio_mean: float = 1.0
    mask_ratio_std: float = 0.25

    def __post_init__(self):
        if isinstance(self.text, Mapping):
            object.__setattr__(self, "text", QwenTextConfig(**dict(self.text)))
        object.__setattr__(self, "image_grid", tuple(int(g) for g in self.image_grid))
        if self.clip_dim is None:
            object.__setattr__(self, "clip_dim", self.text.hidden_size)
        if self.clip_dim != self.text.hidden_size:
            raise ValueError(f"BifrostConfig: clip_dim ({self.clip_dim}) must equal the text hidden_size "
                             f"({self.text.hidden_size}): image-slot inputs are CLIP latents used as embeddings")
        h, w = self.image_grid
        if h * w != self.num_image_tokens:
            raise ValueError(f"BifrostConfig: image_grid {self.image_grid} has {h * w} cells, but "
                             f"num_image_tokens is {self.num_image_tokens}")
        if not 0.0 < self.mask_ratio_min <= self.mask_ratio_max <= 1.0 or self.mask_ratio_std <= 0:
            raise ValueError(f"BifrostConfig: bad mask-ratio distribution min={self.mask_ratio_min} "
                             f"max={self.mask_ratio_max} std={self.mask_ratio_std} (need 0 < min <= max <= 1, std > 0)")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["text"]["mrope_section"] = list(self.text.mrope_section)
        d["image_grid"] = list(self.image_grid)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BifrostConfig":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"BifrostConfig: unknown field(s) {sorted(unknown)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------------------------
# masks and positions of the generation sequence

def image_position_ids(batch: int, num_image_tokens: int):
    """All image slots sit at M-RoPE position (0, 0, 0) (learnable_pos_emb carries their layout, docs/design.md §4.3)."""
    return jnp.zeros((3, batch, num_image_tokens), jnp.int32)


def image_query_mask(attention_mask, num_image_tokens: int):
    """Boolean (B, 1, N, T + N): image queries see every real text key and every image key."""
    text_keys = jnp.asarray(attention_mask).astype(bool)
    b, t = text_keys.shape
    text = jnp.broadcast_to(text_keys[:, None, None, :], (b, 1, num_image_tokens, t))
    return jnp.concatenate([text, jnp.ones((b, 1, num_image_tokens, num_image_tokens), bool)], axis=-1)


def official_attention_bias(attention_mask, num_image_tokens: int, dtype=jnp.float32):
    """The official dense additive (B, 1, L, L) mask: causal + key padding at finfo.min, then the image x image block
    set to 0 (``full_vision_mask``). Pad query rows stay fully masked (uniform softmax: finite garbage)."""
    m = jnp.asarray(attention_mask).astype(bool)
    b = m.shape[0]
    full = jnp.concatenate([m, jnp.ones((b, num_image_tokens), bool)], axis=-1)
    length = full.shape[-1]
    allowed = jnp.tril(jnp.ones((length, length), bool))[None, None] & full[:, None, None, :]
    allowed = allowed.at[:, :, -num_image_tokens:, -num_image_tokens:].set(True)
    return jnp.where(allowed, 0.0, jnp.finfo(dtype).min).astype(dtype)


# ----------------------------------------------------------------------------------------------------------------
# the dual-branch decoder layer

class BifrostDecoderLayer(nn.Module):
    """Original + generation-branch weights of one layer. ``__call__(carry, per_layer, shared)``:

    - routed (``shared`` without "select"): ``carry = (x_text, x_image)``; either may be None.
      x_text (B, T, E) goes through the original weights (causal, ``shared["text_mask"]``); x_image (B, N, E)
      through the branch, attending to this layer's text K/V (computed now, or ``per_layer = (k, v)`` from a
      cache) and to itself. Returns ``((x_text', x_image'), kv)`` where kv = (k, v) of the text rows after RoPE
      when only text was given (``encode_prefix``), else None.
    - official (``shared["select"]``, (B, L, 1) float image mask): ``carry = x`` (B, L, E); both weight sets on every
      token mixed by the mask, dense additive bias. Returns ``(x', None)``.
    Always a (carry, per-layer output) pair, scanned (``nn.scan``) or not."""
    config: QwenTextConfig
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, carry, per_layer, shared):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = QwenAttentionProjections(c, prefixes=("", BRANCH), name="self_attn", **kw)
        orig = dict(attn=attn, prefix="", mlp=QwenMLP(c, name="mlp", **kw),
                    input_layernorm=RMSNorm(c.rms_norm_eps, name="input_layernorm", **kw),
                    post_attention_layernorm=RMSNorm(c.rms_norm_eps, name="post_attention_layernorm", **kw))
        branch = dict(attn=attn, prefix=BRANCH, mlp=QwenMLP(c, name=f"{BRANCH}mlp", **kw),
                      input_layernorm=RMSNorm(c.rms_norm_eps, name=f"{BRANCH}input_layernorm", **kw),
                      post_attention_layernorm=RMSNorm(c.rms_norm_eps, name=f"{BRANCH}post_attention_layernorm",
                                                       **kw))
        if "select" in shared:
            return self._official(carry, shared, orig, branch), None
        return self._routed(carry, per_layer, shared, orig, branch)

    @staticmethod
    def _routed(carry, per_layer, shared, orig, branch):
        x_text, x_image = carry
        kv = per_layer
        emit_kv = x_image is None
        if x_text is not None:
            x_text, kv = pre_norm_block(x_text, *shared["text_rope"], shared["text_mask"], **orig)
        if x_image is not None:
            if kv is None:
                raise ValueError("BifrostDecoderLayer: image rows need the text K/V (text rows or a cache)")
            x_image, _ = pre_norm_block(x_image, *shared["image_rope"], shared["image_mask"], past_kv=kv, **branch)
        return (x_text, x_image), (kv if emit_kv else None)

    @staticmethod
    def _official(x, shared, orig, branch):
        """docs/design.md §3.3 literally: sel(f)(.) = m * branch_f(.) + (1 - m) * orig_f(.) for every norm and projection."""
        m = shared["select"].astype(x.dtype)
        sel = lambda o, b: m * b + (1 - m) * o  # noqa: E731
        cos, sin = shared["rope"]
        attn = orig["attn"]
        h = sel(orig["input_layernorm"](x), branch["input_layernorm"](x))
        q_o, k_o, v_o = attn.qkv(h, "")
        q_b, k_b, v_b = attn.qkv(h, BRANCH)
        m4 = m[:, :, :, None]
        q = m4 * q_b + (1 - m4) * q_o
        k = m4 * k_b + (1 - m4) * k_o
        v = m4 * v_b + (1 - m4) * v_o
        q, k = apply_mrope(q, cos, sin), apply_mrope(k, cos, sin)
        o = dot_product_attention(q, k, v, bias=shared["bias"])
        x = x + sel(attn.out(o, ""), attn.out(o, BRANCH))
        h = sel(orig["post_attention_layernorm"](x), branch["post_attention_layernorm"](x))
        x = x + sel(orig["mlp"](h), branch["mlp"](h))
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))


# ----------------------------------------------------------------------------------------------------------------
# the model

class BifrostMLLM(nn.Module):
    """``__call__(input_ids, attention_mask, clip_latents, mask) -> pred (B, N, clip_dim)``.

    input_ids / attention_mask: the left-padded TEXT PREFIX (B, T) (ending in <|vision_start|>); the N image slots
    are appended inside. clip_latents (B, N, clip_dim): ground truth (training) or already-decoded latents
    (inference); mask (B, N) bool, True = masked (replaced by mask_token)."""
    config: BifrostConfig
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"

    def setup(self):
        c, t = self.config, self.config.text
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = Embed(t.vocab_size, t.hidden_size, **kw)
        if self.scan_layers:
            stack = scanned(BifrostDecoderLayer, t.num_hidden_layers, in_axes=(0, nn.broadcast),
                            remat=self.remat_policy)
            self.layers = stack(t, **kw)
        else:
            block = maybe_remat(BifrostDecoderLayer, self.remat_policy)
            self.layers = [block(t, **kw) for _ in range(t.num_hidden_layers)]  # layers_0, layers_1, ...
        self.norm = RMSNorm(t.rms_norm_eps, **kw)
        self.vision_branch_norm = RMSNorm(t.rms_norm_eps, **kw)
        self.vision_head = Dense(c.clip_dim, use_bias=True, kernel_axes=("embed", "cond"), **kw)
        # zero-init as the official code (the branch starts as the frozen model seeing only positions)
        self.mask_token = param_with_axes(self, "mask_token", nn.initializers.zeros, (c.clip_dim,),
                                          self.param_dtype, ("norm",))
        self.learnable_pos_emb = param_with_axes(self, "learnable_pos_emb", nn.initializers.zeros,
                                                 (c.num_image_tokens, t.hidden_size), self.param_dtype,
                                                 (None, "embed"))

    # -- pieces ----------------------------------------------------------------------------------------------------
    def _check_image_inputs(self, clip_latents, mask):
        n, cdim = self.config.num_image_tokens, self.config.clip_dim
        if clip_latents.shape[1:] != (n, cdim):
            raise ValueError(f"BifrostMLLM: clip_latents must be (B, {n}, {cdim}), got {clip_latents.shape}")
        if mask.shape != clip_latents.shape[:2]:
            raise ValueError(f"BifrostMLLM: mask must be (B, {n}), got {mask.shape}")

    def embed_images(self, clip_latents, mask):
        """z_emb = where(mask, mask_token, clip_latents) + learnable_pos_emb, in the compute dtype."""
        self._check_image_inputs(clip_latents, mask)
        z = jnp.where(jnp.asarray(mask, bool)[..., None], self.mask_token.astype(self.dtype),
                      clip_latents.astype(self.dtype))
        z = z + self.learnable_pos_emb.astype(self.dtype)
        return nn.with_logical_constraint(z, ("batch", "length", "act_embed"))

    def _text_shared(self, attention_mask):
        t = self.config.text
        rope = mrope_cos_sin(text_position_ids(attention_mask, pad_position=1), t.head_dim, t.rope_theta,
                             t.mrope_section)
        return {"text_rope": rope, "text_mask": causal_padding_mask(attention_mask)}

    def _image_shared(self, attention_mask):
        t, n = self.config.text, self.config.num_image_tokens
        b = attention_mask.shape[0]
        rope = mrope_cos_sin(image_position_ids(b, n), t.head_dim, t.rope_theta, t.mrope_section)
        return {"image_rope": rope, "image_mask": image_query_mask(attention_mask, n)}

    def _layers(self, carry, shared, cache=None):
        """Run every layer: (carry, text K/V stacked on a leading layer axis, or None)."""
        if self.scan_layers:
            per_layer = None if cache is None else (cache["k"], cache["v"])
            return self.layers(carry, per_layer, shared)
        kvs = []
        for i, layer in enumerate(self.layers):
            per_layer = None if cache is None else (cache["k"][i], cache["v"][i])
            carry, kv = layer(carry, per_layer, shared)
            kvs.append(kv)
        if kvs[0] is None:
            return carry, None
        return carry, (jnp.stack([k for k, _ in kvs]), jnp.stack([v for _, v in kvs]))

    def _predict(self, x_image):
        return self.vision_head(self.vision_branch_norm(x_image))

    # -- public API -----------------------------------------------------------------------------------------------
    def __call__(self, input_ids, attention_mask, clip_latents, mask):
        """The full (training) forward: text prefix + N image slots in one pass -> pred (B, N, clip_dim)."""
        x_text = nn.with_logical_constraint(self.embed_tokens(input_ids), ("batch", "length", "act_embed"))
        x_image = self.embed_images(clip_latents, mask)
        shared = {**self._text_shared(attention_mask), **self._image_shared(attention_mask)}
        (x_text, x_image), _ = self._layers((x_text, x_image), shared)
        if self.is_initializing():  # the text head's norm is part of the frozen model (text_hidden uses it)
            self.norm(x_text)
        return self._predict(x_image)

    def encode_prefix(self, input_ids, attention_mask):
        """Per-layer text K/V (after RoPE) of the prompt, computed once per prompt: a dict of arrays
        {"k", "v": (layers, B, T, K, D), "attention_mask": (B, T) bool}. Exact: text never attends to images."""
        x_text = nn.with_logical_constraint(self.embed_tokens(input_ids), ("batch", "length", "act_embed"))
        _, (k, v) = self._layers((x_text, None), self._text_shared(attention_mask))
        return {"k": k, "v": v, "attention_mask": jnp.asarray(attention_mask).astype(bool)}

    def decode_images(self, cache, clip_latents, mask):
        """Image slots only, attending to the cached text K/V and to themselves; equals ``__call__``."""
        x_image = self.embed_images(clip_latents, mask)
        (_, x_image), _ = self._layers((None, x_image), self._image_shared(cache["attention_mask"]), cache)
        return self._predict(x_image)

    def text_hidden(self, input_ids, attention_mask):
        """Final (normed) hidden states of the text prefix: those of the frozen Qwen2.5-VL language model."""
        x_text = nn.with_logical_constraint(self.embed_tokens(input_ids), ("batch", "length", "act_embed"))
        (x_text, _), _ = self._layers((x_text, None), self._text_shared(attention_mask))
        return self.norm(x_text)

    def official_forward(self, input_ids, attention_mask, clip_latents, mask):
        """The official formulation (docs/design.md §3.3 literally): the full T + N sequence, BOTH weight sets applied to every
        token and mixed by the image-position mask, a dense (B, 1, L, L) additive mask, the final norm mixed too.
        Same result as ``__call__`` at about twice the FLOPs; the reference for tests and benchmarks."""
        n = self.config.num_image_tokens
        t = self.config.text
        x = jnp.concatenate([self.embed_tokens(input_ids), self.embed_images(clip_latents, mask)], axis=1)
        b, length = x.shape[:2]
        select = jnp.concatenate([jnp.zeros((b, length - n)), jnp.ones((b, n))], axis=1)[..., None]
        positions = jnp.concatenate([text_position_ids(attention_mask, pad_position=1),
                                     image_position_ids(b, n)], axis=-1)
        shared = {"select": select, "bias": official_attention_bias(attention_mask, n),
                  "rope": mrope_cos_sin(positions, t.head_dim, t.rope_theta, t.mrope_section)}
        x, _ = self._layers(x, shared)
        m = select.astype(x.dtype)
        x = m * self.vision_branch_norm(x) + (1 - m) * self.norm(x)
        return self.vision_head(x[:, -n:])


# ----------------------------------------------------------------------------------------------------------------
# parameters: trainable split and branch initialisation

# per layer: original submodule -> its generation-branch copy (attention projections live inside self_attn)
_LAYER_COPIES = {"mlp": f"{BRANCH}mlp", "input_layernorm": f"{BRANCH}input_layernorm",
                 "post_attention_layernorm": f"{BRANCH}post_attention_layernorm"}
_ATTN_COPIES = {f"{p}_proj": f"{BRANCH}{p}_proj" for p in ("q", "k", "v", "o")}
TRAINABLE_TOP_LEVEL = ("vision_branch_norm", "vision_head", "mask_token", "learnable_pos_emb")


def _layer_names(params) -> list[str]:
    return [k for k in params if k == "layers" or k.startswith("layers_")]


def init_branch_from_original(params, source=None):
    """``params`` with every generation-branch weight replaced by a copy of its original counterpart (docs/design.md §3.2: the
    branch starts as the frozen model). ``source``: take the copies from this ``QwenLanguageModel``-shaped tree
    instead (same layer layout). Works for both layer layouts; the copies are distinct buffers (so a train state can
    be donated)."""
    params = dict(params)
    source = params if source is None else source
    copy = lambda tree: jax.tree.map(lambda a: jnp.array(a, copy=True), tree)  # noqa: E731
    for name in _layer_names(params):
        if name not in source:
            raise ValueError(f"init_branch_from_original: source has no {name!r} (layer layouts differ?)")
        layer, src_layer = dict(params[name]), source[name]
        attn = dict(layer["self_attn"])
        for o, b in _ATTN_COPIES.items():
            attn[b] = copy(src_layer["self_attn"][o])
        layer["self_attn"] = attn
        for o, b in _LAYER_COPIES.items():
            layer[b] = copy(src_layer[o])
        params[name] = layer
    params["vision_branch_norm"] = copy(source["norm"])
    return params


def is_trainable(path: tuple[str, ...]) -> bool:
    """Stage B trains the branch, its final norm, the head, the mask token and the position embedding (docs/design.md §3.4)."""
    return path[0] in TRAINABLE_TOP_LEVEL or any(p.startswith(BRANCH) for p in path)


def trainable_mask(params):
    """A pytree of bools matching ``params`` (True = trained in stage B), for ``optax.masked`` & co."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: is_trainable(k) for k in flat})


# ----------------------------------------------------------------------------------------------------------------
# loss and MAR masking (pure functions)

def mse_loss(pred, target):
    """Mean over (B, N, C) of (pred - target)^2 in float32, every slot (visible and masked) counted (docs/design.md §6.1)."""
    d = pred.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(jnp.square(d))


def random_orders(rng, batch: int, num_tokens: int):
    """(B, N) int32: an independent random permutation of 0..N-1 per row (MAR ``sample_orders``)."""
    keys = jax.random.split(rng, batch)
    return jax.vmap(lambda k: jax.random.permutation(k, num_tokens))(keys).astype(jnp.int32)


def sample_mask_ratio(rng, shape=(), *, ratio_min=0.7, ratio_max=1.0, mean=1.0, std=0.25):
    """r ~ N(mean, std) truncated to [ratio_min, ratio_max] (MAR's ``stats.truncnorm``), float32."""
    z = jax.random.truncated_normal(rng, (ratio_min - mean) / std, (ratio_max - mean) / std, shape, jnp.float32)
    return jnp.clip(mean + std * z, ratio_min, ratio_max)


def mask_from_orders(orders, num_masked):
    """(B, N) bool: the first ``num_masked`` (scalar or (B,)) positions of each row's order are masked."""
    ranks = jnp.argsort(orders, axis=-1)  # rank of each position in its row's order
    return ranks < jnp.reshape(jnp.asarray(num_masked), (-1, 1))


def sample_mar_mask(rng, batch: int, num_tokens: int, *, ratio_min=0.7, ratio_max=1.0, mean=1.0, std=0.25,
                    per_example: bool = False, return_orders: bool = False):
    """MAR ``random_masking``: a random order per image; the first ceil(N * r) positions of it are masked
    (True = masked), r ~ truncated normal. MAR draws ONE r per batch (default); ``per_example`` draws one per row."""
    k_order, k_ratio = jax.random.split(rng)
    orders = random_orders(k_order, batch, num_tokens)
    r = sample_mask_ratio(k_ratio, (batch,) if per_example else (), ratio_min=ratio_min, ratio_max=ratio_max,
                          mean=mean, std=std)
    count = jnp.ceil(num_tokens * r).astype(jnp.int32)
    mask = mask_from_orders(orders, jnp.broadcast_to(count, (batch,)))
    return (mask, orders) if return_orders else mask


def sample_mar_mask_for(config: BifrostConfig, rng, batch: int, **kw):
    """``sample_mar_mask`` with the distribution from ``config``."""
    return sample_mar_mask(rng, batch, config.num_image_tokens, ratio_min=config.mask_ratio_min,
                           ratio_max=config.mask_ratio_max, mean=config.mask_ratio_mean, std=config.mask_ratio_std,
                           **kw)
