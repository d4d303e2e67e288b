"""The Stable Diffusion family's components: the UNet, its latent ControlNet (sized by the UNet it steers, like
diffusers ``ControlNetModel.from_unet``) and SDXL's second text encoder (``CLIPTextModelWithProjection``). The SD VAE
is the ``vae`` component (``AutoencoderKL`` with 4 latent channels and its scaling factor). Training phases and the
generation pipeline build them here and load them with ``load_component`` (docs/unet.md, docs/design.md §12.2).
"""
from __future__ import annotations

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
                                     latent_size: tuple[int, int]) -> Component:
    """The latent UNet ControlNet of ``config.controlnet``: the encoder of the ``unet`` it steers (diffusers
    ``from_unet``'s config copy), fed ``clip_grid`` CLIP latents of width ``clip_latent_dim`` and upsampled to the
    UNet's ``latent_size`` (the number of 2x stages follows, docs/unet.md). ``conditioning_embedding_out_channels``
    (empty: 256 halving per stage) is checked against a ported ControlNet's config.json like every model field."""
    stages = latent_stages(tuple(clip_grid), tuple(latent_size))
    stated = {"conditioning_embedding_out_channels": tuple(section.get("conditioning_embedding_out_channels", ())
                                                           or latent_embedding_channels(stages))}
    fields = resolve_model_config(stated, key="config.controlnet", kind="unet_controlnet",
                                  port_dir=section.get("port_dir", "") or "")
    channels = tuple(fields["conditioning_embedding_out_channels"])
    if len(channels) - 1 != stages:
        raise ValueError(f"config.controlnet.conditioning_embedding_out_channels={list(channels)} has "
                         f"{len(channels) - 1} stages; CLIP grid {clip_grid} to latents {latent_size} needs {stages} "
                         "(docs/unet.md, resolution arithmetic)")
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
