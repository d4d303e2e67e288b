"""diffusers ``UNet2DConditionModel`` in Flax, NHWC: Stable Diffusion 1.x, 2.x and SDXL.

    unet = UNet2DConditionModel(config)                                # config: UNet2DConditionConfig
    out = unet.apply(variables, sample, timestep, encoder_hidden_states,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},      # SDXL only
                     down_block_additional_residuals=down, mid_block_additional_residual=mid)  # ControlNet

``sample`` is (B, H, W, C) latents (H, W need not be multiples of the total stride: the decoder then upsamples to the
skips' sizes as diffusers does); the output has the same shape: epsilon or v, per the scheduler's
``prediction_type`` (a scheduler setting, not a UNet one). ``encoder_attention_mask`` (B, S) masks text keys.
ControlNet residuals are NHWC too: one per skip tensor (``len(skip_shapes(...))``) and one for the mid block.

Module names mirror diffusers (``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`` is the Flax path
``down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_k``), so ``bifrost_jax.port.unet`` is a naming rule.
``scan_layers`` scans the blocks inside each spatial transformer; ``remat_policy`` rematerialises every resnet and
transformer block.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from bifrost_jax.models.flux.vae import IMAGE_AXES, Conv2d
from bifrost_jax.models.unet.blocks import DownBlock2D, MidBlock2DCrossAttn, UpBlock2D
from bifrost_jax.models.unet.config import CROSS_DOWN, CROSS_UP, UNet2DConditionConfig
from bifrost_jax.models.unet.embeddings import unet_time_embedding
from bifrost_jax.nn.layers import GroupNorm, activation

Dtype = Any

# The output conv has 4 (latent) channels, which no "conv_out" mesh axis divides: keep it replicated.
LATENT_OUT_AXES = ("conv_hw", None, "conv_in", None)


def _stage_kw(module) -> dict:
    return dict(dtype=module.dtype, param_dtype=module.param_dtype, scan_layers=module.scan_layers,
                remat_policy=module.remat_policy, attention_impl=module.attention_impl)


def check_inputs(cfg: UNet2DConditionConfig, sample, encoder_hidden_states, what: str) -> None:
    if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
        raise ValueError(f"{what}: sample must be NHWC latents with {cfg.in_channels} channels, got shape "
                         f"{sample.shape}")
    if (encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != cfg.cross_dims[0]
            or encoder_hidden_states.shape[0] != sample.shape[0]):
        raise ValueError(f"{what}: encoder_hidden_states must be ({sample.shape[0]}, tokens, {cfg.cross_dims[0]}) "
                         f"(cross_attention_dim), got shape {encoder_hidden_states.shape}")


def embed_and_conv_in(module: nn.Module, cfg: UNet2DConditionConfig, sample, timestep, added_cond_kwargs):
    """(conv_in(sample), emb), defining ``conv_in`` / ``time_embedding`` / ``add_embedding`` in ``module``."""
    if cfg.center_input_sample:
        sample = 2 * sample - 1.0
    emb = unet_time_embedding(module, cfg, timestep, sample.shape[0], added_cond_kwargs, module.dtype,
                              module.param_dtype)
    k = cfg.conv_in_kernel
    h = Conv2d(cfg.block_out_channels[0], k, padding=(k - 1) // 2, dtype=module.dtype, param_dtype=module.param_dtype,
               name="conv_in")(nn.with_logical_constraint(sample, IMAGE_AXES))
    return h, emb


def down_path(module: nn.Module, cfg: UNet2DConditionConfig, h, emb, context, mask):
    """(output, skips) of the down blocks (skips start with ``h`` itself), defining ``down_blocks_{i}``."""
    skips = [h]
    n = cfg.num_blocks
    for i, kind in enumerate(cfg.down_block_types):
        h, res = DownBlock2D(cfg, i, cross_attention=kind == CROSS_DOWN, add_downsample=i < n - 1,
                             name=f"down_blocks_{i}", **_stage_kw(module))(h, emb, context, mask)
        skips.extend(res)
    return h, skips


def mid_block(module: nn.Module, cfg: UNet2DConditionConfig, h, emb, context, mask):
    return MidBlock2DCrossAttn(cfg, cfg.num_blocks - 1, name="mid_block", **_stage_kw(module))(h, emb, context, mask)


def _check_residual_pair(down_res, mid_res):
    if (down_res is None) != (mid_res is None):
        raise ValueError("UNet: pass both down_block_additional_residuals and mid_block_additional_residual "
                         "(ControlNet residuals), or neither")


def _check_residuals(skips, down_res, mid_res, mid_shape):
    if down_res is None:
        return
    if len(down_res) != len(skips):
        raise ValueError(f"UNet: {len(down_res)} down_block_additional_residuals for {len(skips)} skip tensors")
    for i, (s, r) in enumerate(zip(skips, down_res)):
        if tuple(r.shape) != tuple(s.shape):
            raise ValueError(f"UNet: down_block_additional_residuals[{i}] has shape {tuple(r.shape)}, the skip "
                             f"tensor is {tuple(s.shape)}")
    if tuple(mid_res.shape) != tuple(mid_shape):
        raise ValueError(f"UNet: mid_block_additional_residual has shape {tuple(mid_res.shape)}, the mid block "
                         f"output is {tuple(mid_shape)}")


class UNet2DConditionModel(nn.Module):
    """diffusers ``UNet2DConditionModel`` (see the module docstring); returns the (B, H, W, out_channels) prediction."""
    config: UNet2DConditionConfig
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, sample, timestep, encoder_hidden_states, added_cond_kwargs: Optional[dict] = None,
                 down_block_additional_residuals: Optional[Sequence] = None,
                 mid_block_additional_residual=None, encoder_attention_mask=None):
        cfg = self.config
        check_inputs(cfg, sample, encoder_hidden_states, "UNet2DConditionModel")
        _check_residual_pair(down_block_additional_residuals, mid_block_additional_residual)
        factor = 2 ** cfg.num_upsamplers
        forward_upsample_size = any(d % factor for d in sample.shape[1:3])
        context = encoder_hidden_states.astype(self.dtype)
        mask = encoder_attention_mask
        h, emb = embed_and_conv_in(self, cfg, sample, timestep, added_cond_kwargs)
        h, skips = down_path(self, cfg, h, emb, context, mask)
        h = mid_block(self, cfg, h, emb, context, mask)
        _check_residuals(skips, down_block_additional_residuals, mid_block_additional_residual, h.shape)
        if down_block_additional_residuals is not None:
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_block_additional_residuals)]
            h = h + mid_block_additional_residual.astype(h.dtype)

        n = cfg.num_blocks
        for i, kind in enumerate(cfg.up_block_types):
            index = n - 1 - i
            take = cfg.layers[index] + 1
            res, skips = skips[-take:], skips[:-take]
            last = i == n - 1
            size = tuple(skips[-1].shape[1:3]) if (not last and forward_upsample_size) else None
            h = UpBlock2D(cfg, index, cross_attention=kind == CROSS_UP, add_upsample=not last,
                          name=f"up_blocks_{i}", **_stage_kw(self))(h, res, emb, context, mask, size)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = activation(cfg.act_fn)(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(h))
        k = cfg.conv_out_kernel
        return Conv2d(cfg.out_channels, k, padding=(k - 1) // 2, kernel_axes=LATENT_OUT_AXES, name="conv_out",
                      **kw)(h)

    def dummy_inputs(self, batch: int = 1, text_len: int = 2) -> dict:
        """Small inputs with the right trailing shapes (for ``init`` / ``eval_shape``)."""
        cfg = self.config
        size = 2 ** cfg.num_upsamplers
        return dict(sample=jnp.zeros((batch, size, size, cfg.in_channels), jnp.float32),
                    timestep=jnp.zeros((batch,), jnp.float32),
                    encoder_hidden_states=jnp.zeros((batch, text_len, cfg.cross_dims[0]), jnp.float32),
                    added_cond_kwargs=dummy_added_cond_kwargs(cfg, batch))


def dummy_added_cond_kwargs(cfg: UNet2DConditionConfig, batch: int) -> Optional[dict]:
    """Zero SDXL ``added_cond_kwargs`` of the right shapes (None without ``text_time``)."""
    if cfg.addition_embed_type != "text_time":
        return None
    return {"text_embeds": jnp.zeros((batch, cfg.text_embeds_dim), jnp.float32),
            "time_ids": jnp.zeros((batch, cfg.num_time_ids), jnp.float32)}


def skip_shapes(config: UNet2DConditionConfig, batch: int, height: int, width: int) -> list[tuple[int, ...]]:
    """NHWC shapes of the skip tensors (= ControlNet down residuals) for (height, width) latents, in order."""
    shapes = [(batch, height, width, config.block_out_channels[0])]
    for i, c in enumerate(config.block_out_channels):
        shapes += [(batch, height, width, c)] * config.layers[i]
        if i < config.num_blocks - 1:
            height, width = -(-height // 2), -(-width // 2)
            shapes.append((batch, height, width, c))
    return shapes
