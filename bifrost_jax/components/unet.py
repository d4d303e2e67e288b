"""The Stable Diffusion family's components: the UNet, its latent ControlNet (sized by the UNet it steers, like
diffusers ``ControlNetModel.from_unet``) and SDXL's second text encoder (``CLIPTextModelWithProjection``). The SD VAE
is the ``vae`` component (``AutoencoderKL`` with 4 latent channels and its scaling factor). Training phases and the
generation pipeline build them here and load them with ``load_component`` (docs/unet.md, docs/design.md §12.2).
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from bifrost_jax.components.component import Component, module_kwargs, section_model_config
from bifrost_jax.components.model_config import resolve_model_config
from bifrost_jax.models.text.clip import CLIPTextConfig, CLIPTextModelWithProjection
from bifrost_jax.models.unet.config import UNet2DConditionConfig
from bifrost_jax.models.unet.controlnet import (LatentUNetControlNet, UNetControlNetConfig, copied_from_unet,
                                                latent_embedding_channels, latent_stages)
from bifrost_jax.models.unet.unet import UNet2DConditionModel


def unet_component(section, trainable: bool) -> Component:
    """``UNet2DConditionModel`` of ``config.unet`` (``config``: diffusers UNet config.json fields; empty: the
    port's)."""
    cfg = UNet2DConditionConfig.from_hf_config(section_model_config(section, "unet", "unet"))
    module = UNet2DConditionModel(cfg, **module_kwargs(section))
    return Component("unet", module, (), module.dummy_inputs(), section, ("unet",), trainable)


def clip_projection_component(section) -> Component:
    """SDXL's second text encoder (``text_encoder_2``) of ``config.clip_2``: pooled + projected and per-token."""
    module = CLIPTextModelWithProjection(
        CLIPTextConfig.from_hf_config(section_model_config(section, "clip_2", "clip")), **module_kwargs(section))
    return Component("clip_2", module, (jnp.zeros((1, 2), jnp.int32),), {}, section, ("clip-text-projection",))


def latent_unet_controlnet_component(section, unet: Component, clip_latent_dim: int, clip_grid: tuple[int, int],
                                     latent_size: Optional[tuple[int, int]] = None) -> Component:
    """The latent UNet ControlNet of ``config.controlnet``: the encoder of the ``unet`` it steers (diffusers
    ``from_unet``'s config copy), fed ``clip_grid`` CLIP latents of width ``clip_latent_dim``. Its condition
    embedding's widths ``conditioning_embedding_out_channels`` (one more than its 2x stages, docs/unet.md) come from
    the section, else a ported ControlNet's config.json (checked against the section like every model field), else
    the default for ``latent_size`` (the UNet's latents: 256 halving per stage); with ``latent_size`` given, the
    stages must take the grid there."""
    port_dir = section.get("port_dir", "") or ""
    stated = {}
    widths = tuple(section.get("conditioning_embedding_out_channels", ()) or ())
    if widths:
        stated["conditioning_embedding_out_channels"] = widths
    elif latent_size is not None and not port_dir:
        stated["conditioning_embedding_out_channels"] = latent_embedding_channels(
            latent_stages(tuple(clip_grid), tuple(latent_size)))
    elif not port_dir:
        raise ValueError("config.controlnet: set conditioning_embedding_out_channels (its length - 1 is the number "
                         "of 2x stages from the upsampled CLIP grid to the UNet's latents, docs/unet.md) or a port_dir")
    fields = resolve_model_config(stated, key="config.controlnet", kind="unet_controlnet", port_dir=port_dir)
    channels = tuple(fields["conditioning_embedding_out_channels"])
    if latent_size is not None and len(channels) - 1 != latent_stages(tuple(clip_grid), tuple(latent_size)):
        raise ValueError(f"config.controlnet.conditioning_embedding_out_channels={list(channels)} has "
                         f"{len(channels) - 1} stages; CLIP grid {tuple(clip_grid)} to latents {tuple(latent_size)} "
                         f"needs {latent_stages(tuple(clip_grid), tuple(latent_size))} (docs/unet.md, resolution "
                         "arithmetic)")
    cfg = UNetControlNetConfig.from_unet_config(unet.module.config, conditioning_embedding_out_channels=channels,
                                                clip_latent_dim=int(clip_latent_dim), clip_grid=tuple(clip_grid))
    module = LatentUNetControlNet(cfg, **module_kwargs(section))
    return Component("controlnet", module, (), module.dummy_inputs(), section, ("latent-unet-controlnet",),
                     trainable=True)


def controlnet_params_from_unet(unet_params: dict) -> dict:
    """The ControlNet subtrees diffusers ``from_unet`` copies from the UNet (``conv_in``, time and added embeddings,
    down blocks, mid block), taken from the UNet's params; the zero convolutions and the condition embedding keep
    their own init."""
    return {k: v for k, v in unet_params.items() if copied_from_unet(k)}
