"""Rotary position embedding helpers (tables in float32, as the PyTorch references compute them).

Two pairings exist upstream:
- interleaved pairs (x[2i], x[2i+1]): FLUX (diffusers ``apply_rotary_emb(use_real_unbind_dim=-1)``);
- halves (x[i], x[i + D/2]) with ``rotate_half``: Qwen2.5 / Qwen2.5-VL.
"""
from __future__ import annotations

import jax.numpy as jnp


def rope_frequencies(positions, dim: int, theta: float):
    """(..., dim/2) angles = positions * theta^(-2i/dim), float32."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    return positions.astype(jnp.float32)[..., None] * inv_freq


def apply_rotary_interleaved(x, cos, sin):
    """x (..., D); cos/sin (..., D/2) broadcastable; rotates pairs (2i, 2i+1). Computed in fp32."""
    x32 = x.astype(jnp.float32)
    xr = x32.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
    x0, x1 = xr[..., 0], xr[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary_half(x, cos, sin):
    """x (..., D); cos/sin (..., D) broadcastable (already duplicated as cat(freqs, freqs)). fp32 math."""
    x32 = x.astype(jnp.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)
