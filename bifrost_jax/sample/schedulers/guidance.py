"""Classifier-free guidance for the UNet family (text CFG; FLUX.1-dev uses distilled guidance instead).

    pred = uncond + scale * (cond - uncond)                                  (``guided``)
    pred = r * pred * std(cond) / std(pred) + (1 - r) * pred                 (``guidance_rescale`` r > 0)

The rescale is diffusers' ``rescale_noise_cfg`` (arXiv 2305.08891 §3.4; SD 2.x v-models with zero-SNR schedules,
SDXL pipelines' ``guidance_rescale``), with torch's unbiased per-example standard deviation.
``cfg_denoise`` wraps a model into the ``denoise`` function of ``sample_loop``: one batched call on
[unconditional; conditional] inputs, skipped entirely at scale 1.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def _std(x):
    axes = tuple(range(1, x.ndim))
    n = 1
    for a in axes:
        n *= x.shape[a]
    mean = jnp.mean(x, axis=axes, keepdims=True)
    return jnp.sqrt(jnp.sum(jnp.square(x - mean), axis=axes, keepdims=True) / (n - 1))


def guided(uncond, cond, guidance_scale: float, guidance_rescale: float = 0.0):
    """The guided prediction from the unconditional and conditional ones."""
    pred = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale > 0.0:
        rescaled = pred * (_std(cond) / _std(pred))
        pred = guidance_rescale * rescaled + (1.0 - guidance_rescale) * pred
    return pred


def cfg_denoise(model: Callable, cond_kwargs: dict, uncond_kwargs: dict, guidance_scale: float,
                guidance_rescale: float = 0.0) -> Callable:
    """``denoise(x, t)`` for ``sample_loop``: ``model(x, t, **kwargs)`` on [uncond; cond] (each kwargs leaf batched
    along axis 0, same batch as x), combined by ``guided``; ``cond_kwargs`` only when ``guidance_scale == 1``."""
    if guidance_scale == 1.0:
        return lambda x, t: model(x, t, **cond_kwargs)
    both = jax.tree.map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond_kwargs, cond_kwargs)

    def denoise(x, t):
        out = model(jnp.concatenate([x, x], axis=0), t, **both)
        uncond, cond = jnp.split(out, 2, axis=0)
        return guided(uncond, cond, guidance_scale, guidance_rescale)

    return denoise
