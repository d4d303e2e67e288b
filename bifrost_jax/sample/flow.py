"""FLUX flow-matching Euler sampling (docs/design.md §8.2) and the training-time sigma distribution (docs/design.md §9).

Conventions (rectified flow, as FLUX and diffusers' FlowMatchEulerDiscreteScheduler):
``x_sigma = (1 - sigma) * x0 + sigma * eps``, the model predicts the velocity ``eps - x0``, and the transformer
receives ``timestep = sigma`` (diffusers multiplies by 1000 inside the FLUX forward).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX.1-dev's resolution-dependent shift mu: linear in the number of packed image tokens."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def flux_sigmas(num_steps: int, image_seq_len: int, *, dynamic_shift: bool = True, shift: float = 3.0,
                base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                max_shift: float = 1.15) -> np.ndarray:
    """The (num_steps + 1,) float32 sigma schedule ending in 0, as FluxPipeline + FlowMatchEulerDiscreteScheduler
    (FLUX.1-dev: dynamic exponential shift with mu from the token count; schnell-style static ``shift`` otherwise)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    if dynamic_shift:
        mu = calculate_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
        sigmas = np.exp(mu) / (np.exp(mu) + (1.0 / sigmas - 1.0))
    else:
        sigmas = shift * sigmas / (1.0 + (shift - 1.0) * sigmas)
    return np.append(sigmas.astype(np.float32), np.float32(0.0))


def euler_sample(velocity_fn: Callable[[jax.Array, jax.Array], jax.Array], latents: jax.Array,
                 sigmas) -> jax.Array:
    """Integrate ``x <- x + (sigma_next - sigma) * v(x, sigma)`` over the schedule with a static-shape scan.

    ``velocity_fn(x, sigma)`` gets a scalar float32 sigma; the update is done in float32 (as diffusers' step) and
    the state keeps ``latents.dtype``.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)

    def step(x, pair):
        sigma, sigma_next = pair
        v = velocity_fn(x, sigma)
        x = (x.astype(jnp.float32) + (sigma_next - sigma) * v.astype(jnp.float32)).astype(latents.dtype)
        return x, None

    out, _ = jax.lax.scan(step, latents, (sigmas[:-1], sigmas[1:]))
    return out


def sample_training_sigmas(rng: jax.Array, batch: int, *, weighting: str = "logit_normal", logit_mean: float = 0.0,
                           logit_std: float = 1.0, num_train_timesteps: int = 1000) -> jax.Array:
    """Training sigmas as diffusers' ``compute_density_for_timestep_sampling`` + the example script: u ~ sigmoid(N(m,s))
    (or uniform), snapped to the 1000-step grid, sigma = t / 1000 in (0, 1]."""
    if weighting == "logit_normal":
        u = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (batch,)))
    elif weighting == "uniform":
        u = jax.random.uniform(rng, (batch,))
    else:
        raise ValueError(f"unknown sigma weighting {weighting!r} (logit_normal, uniform)")
    # index into the descending 1000-step schedule t = 1000 ... 1, as the diffusers example does
    idx = jnp.clip((u * num_train_timesteps).astype(jnp.int32), 0, num_train_timesteps - 1)
    return (num_train_timesteps - idx).astype(jnp.float32) / num_train_timesteps


def add_noise(x0: jax.Array, noise: jax.Array, sigmas: jax.Array) -> jax.Array:
    s = sigmas.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(jnp.float32)
    return ((1.0 - s) * x0.astype(jnp.float32) + s * noise.astype(jnp.float32)).astype(x0.dtype)
