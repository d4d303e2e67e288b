"""The UNet's convolutional pieces, NHWC: diffusers ``ResnetBlock2D`` with a timestep embedding, ``Downsample2D`` and
``Upsample2D`` (nearest, to 2x or to an explicit size for latents not divisible by the UNet's total stride).

Module names are diffusers' (``norm1``, ``conv1``, ``time_emb_proj``, ...) so that the port is a naming rule.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from bifrost_jax.models.flux.vae import IMAGE_AXES, Conv2d, nearest_upsample2x
from bifrost_jax.nn.layers import Dense, GroupNorm, activation

Dtype = Any


class ResnetBlock2D(nn.Module):
    """GN-act-conv3x3, + Linear(act(temb)) per channel, GN-act-conv3x3, + (1x1 conv) shortcut, / output_scale.
    ``resnet_time_scale_shift="default"`` (an additive time embedding), dropout omitted (inference and the
    frozen-UNet training of the ControlNet)."""
    out_channels: int
    groups: int
    eps: float = 1e-5
    act_fn: str = "silu"
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        act = activation(self.act_fn)
        h = act(GroupNorm(self.groups, self.eps, name="norm1", **kw)(x))
        h = Conv2d(self.out_channels, 3, padding=1, name="conv1", **kw)(h)
        t = Dense(self.out_channels, kernel_axes=("embed", "conv_out"), name="time_emb_proj", **kw)(act(temb))
        h = h + t[:, None, None, :].astype(h.dtype)
        h = act(GroupNorm(self.groups, self.eps, name="norm2", **kw)(h))
        h = Conv2d(self.out_channels, 3, padding=1, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = Conv2d(self.out_channels, 1, name="conv_shortcut", **kw)(x)
        out = x.astype(self.dtype) + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return checkpoint_name(nn.with_logical_constraint(out, IMAGE_AXES), "block_out")


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv; ``padding`` 1 (the UNet default) pads every side, 0 pads right/bottom by one (diffusers)."""
    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        pad = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
        return Conv2d(self.out_channels, 3, stride=2, padding=pad, name="conv", dtype=self.dtype,
                      param_dtype=self.param_dtype)(x)


def nearest_resize(x, size: tuple[int, int]):
    """``F.interpolate(mode="nearest", size=size)`` on NHWC: source index floor(dst * in / out), as torch."""
    h, w = x.shape[1:3]
    if size == (2 * h, 2 * w):
        return nearest_upsample2x(x)
    rows = np.minimum(np.floor(np.arange(size[0]) * np.float32(h / size[0])).astype(int), h - 1)
    cols = np.minimum(np.floor(np.arange(size[1]) * np.float32(w / size[1])).astype(int), w - 1)
    return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
    """Nearest upsampling (2x, or to ``output_size``), then a 3x3 conv."""
    out_channels: int
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, output_size: Optional[tuple[int, int]] = None):
        size = tuple(output_size) if output_size is not None else (2 * x.shape[1], 2 * x.shape[2])
        return Conv2d(self.out_channels, 3, padding=1, name="conv", dtype=self.dtype,
                      param_dtype=self.param_dtype)(nearest_resize(x, size))
