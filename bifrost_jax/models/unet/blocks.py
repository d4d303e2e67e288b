"""The UNet's stages, NHWC: diffusers ``CrossAttnDownBlock2D`` / ``DownBlock2D``, ``UNetMidBlock2DCrossAttn`` and
``CrossAttnUpBlock2D`` / ``UpBlock2D`` (one class per direction, ``cross_attention`` choosing the variant).

A down block returns its output and the skip tensors (one per resnet, plus the downsampled one); an up block takes
its skips in the same order and consumes them from the end, as diffusers does.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from bifrost_jax.models.unet.config import UNet2DConditionConfig
from bifrost_jax.models.unet.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from bifrost_jax.models.unet.transformer import Transformer2DModel
from bifrost_jax.nn.stack import maybe_remat

Dtype = Any


class _Stage(nn.Module):
    """Fields shared by the stages: the config, the compute options, and which block (down-block index)."""
    config: UNet2DConditionConfig
    index: int
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: Optional[str] = None

    def resnet(self, out_channels: int, name: str, output_scale_factor: float = 1.0):
        cfg = self.config
        return maybe_remat(ResnetBlock2D, self.remat_policy)(
            out_channels, cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn, output_scale_factor, dtype=self.dtype,
            param_dtype=self.param_dtype, name=name)

    def transformer(self, name: str):
        cfg = self.config
        return Transformer2DModel(cfg.heads[self.index], cfg.transformer_layers[self.index], cfg.norm_num_groups,
                                  cfg.use_linear_projection, dtype=self.dtype, param_dtype=self.param_dtype,
                                  scan_layers=self.scan_layers, remat_policy=self.remat_policy,
                                  implementation=self.attention_impl, name=name)


class DownBlock2D(_Stage):
    """``layers_per_block`` resnets (each followed by a transformer when ``cross_attention``), then a downsample
    unless it is the last block. Returns (output, skips)."""
    cross_attention: bool = True
    add_downsample: bool = True

    @nn.compact
    def __call__(self, x, temb, context=None, mask=None):
        cfg = self.config
        channels = cfg.block_out_channels[self.index]
        skips = []
        for j in range(cfg.layers[self.index]):
            x = self.resnet(channels, f"resnets_{j}")(x, temb)
            if self.cross_attention:
                x = self.transformer(f"attentions_{j}")(x, context, mask)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(channels, cfg.downsample_padding, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="downsamplers_0")(x)
            skips.append(x)
        return x, tuple(skips)


class MidBlock2DCrossAttn(_Stage):
    """resnet, then (transformer, resnet); the resnets divide by ``mid_block_scale_factor``."""

    @nn.compact
    def __call__(self, x, temb, context, mask=None):
        cfg = self.config
        channels = cfg.block_out_channels[-1]
        x = self.resnet(channels, "resnets_0", cfg.mid_block_scale_factor)(x, temb)
        x = self.transformer("attentions_0")(x, context, mask)
        return self.resnet(channels, "resnets_1", cfg.mid_block_scale_factor)(x, temb)


class UpBlock2D(_Stage):
    """``layers_per_block + 1`` resnets on [x, skip] (channel concatenation, skips taken from the end), each followed
    by a transformer when ``cross_attention``; then an upsample (to ``upsample_size`` if given) unless it is the last
    block. ``index`` is the DOWN-block index whose per-block settings it mirrors."""
    cross_attention: bool = True
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips: Sequence, temb, context=None, mask=None, upsample_size=None):
        cfg = self.config
        channels = cfg.block_out_channels[self.index]
        skips = list(skips)
        for j in range(cfg.layers[self.index] + 1):
            x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
            x = self.resnet(channels, f"resnets_{j}")(x, temb)
            if self.cross_attention:
                x = self.transformer(f"attentions_{j}")(x, context, mask)
        if self.add_upsample:
            x = Upsample2D(channels, dtype=self.dtype, param_dtype=self.param_dtype, name="upsamplers_0")(
                x, upsample_size)
        return x
