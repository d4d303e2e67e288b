"""The one attention entry point of bifrost-jax.

``dot_product_attention(q, k, v, ...)`` with q (B, L, H, D), k/v (B, S, K, D), K dividing H (grouped-query
attention without repeating K/V in memory). Softmax always in float32. ``implementation``:
- "xla": einsum + fp32 softmax; works everywhere, supports arbitrary boolean masks and additive biases.
- "cudnn": ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU flash attention).
- "splash": Pallas splash attention on TPU (issue: pod scale).
- None: chosen by platform ("xla" on CPU).
Masked query rows that see no key at all produce zeros, never NaN.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


def default_implementation() -> str:
    return "xla"


def dot_product_attention(q, k, v, *, mask: Optional[jax.Array] = None, bias: Optional[jax.Array] = None,
                          scale: Optional[float] = None, implementation: Optional[str] = None):
    """Attention over (B, L, H, D) queries and (B, S, K, D) keys/values.

    mask: boolean, broadcastable to (B, H, L, S); True = may attend.
    bias: additive float bias broadcastable to (B, H, L, S).
    """
    implementation = implementation or default_implementation()
    b, l, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    if h % kh:
        raise ValueError(f"attention: {h} query heads are not a multiple of {kh} key/value heads")
    scale = (1.0 / d ** 0.5) if scale is None else scale
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation="cudnn")
    if implementation != "xla":
        raise ValueError(f"attention: unknown implementation {implementation!r} (xla, cudnn, splash)")
    groups = h // kh
    qg = q.reshape(b, l, kh, groups, d)
    logits = jnp.einsum("blkgd,bskd->bkgls", qg, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        bias = jnp.broadcast_to(bias, (bias.shape[0], h) + bias.shape[2:]) if bias.shape[1] == 1 else bias
        logits = logits + bias.astype(jnp.float32).reshape(bias.shape[0], kh, groups, *bias.shape[2:])
    if mask is not None:
        mask = jnp.broadcast_to(mask, (mask.shape[0], h) + mask.shape[2:]) if mask.shape[1] == 1 else mask
        mask = mask.reshape(mask.shape[0], kh, groups, *mask.shape[2:])
        logits = jnp.where(mask, logits, _NEG)
    probs = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        # rows with no visible key: zeros rather than a uniform average over masked keys
        probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bkgls,bskd->blkgd", probs.astype(v.dtype), v)
    return out.reshape(b, l, h, d)
