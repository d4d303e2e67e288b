"""The Bifrost-1 pipeline with a UNet decoder (SD 1.x / 2.x / SDXL, docs/unet.md): MAR-decoded CLIP latents -> the
latent UNet ControlNet -> UNet sampling with text classifier-free guidance (``sample.unet_decoder``) -> the VAE.

:class:`UNetBifrostPipeline` is a :class:`BifrostPipeline` whose decoder stages are the UNet's, so ``generate``,
``reconstruct``, ``bifrost generate`` and ``bifrost eval geneval / dpg`` run on it unchanged. The base class's decoder
fields and options keep their names:

* ``transformer`` / ``transformer_variables`` hold the UNet (``unet`` is an alias);
* ``encode_text`` is a :class:`UNetTextEncoder` (CLIP's last hidden state, or SDXL's two encoders and pooled text);
* ``options.flux_steps`` is the number of sampling steps of ``scheduler`` (a DDIM / Euler / DPM-Solver++ config
  carrying the noise schedule the UNet was trained with), ``options.guidance`` the text CFG scale (the negative
  prompt is the empty prompt, as diffusers' default); ``conditioning_scale`` scales the ControlNet's residuals.

Latents travel as (B, H*W, C), the layout of FLUX's packed latents with 1x1 "packing": ``noise`` draws them,
``sample_flux`` returns them and ``decode`` reshapes them to (B, H, W, C) for the VAE. Geometry: CLIP grid (h, w) ->
2x upsampler (2h, 2w) -> k 2x stages of the condition embedding -> latents (2h 2^k, 2w 2^k) -> pixels times the VAE
downsampling. SDXL's micro-conditioning time ids are (image size, crop (0, 0), image size).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bifrost_jax.sample.pipeline import BifrostPipeline, to_uint8
from bifrost_jax.sample.schedulers.base import Plan
from bifrost_jax.sample.unet_decoder import (decode_unet_latents, encode_unet_text, sample_unet_latents,
                                             sdxl_time_ids)

Variables = Any


@functools.partial(jax.jit, static_argnames=("clip", "clip_2"))
def _text_stage(clip, clip_variables, clip_2, clip_2_variables, ids, ids_2):
    embeds, pooled = encode_unet_text(clip, clip_variables, ids, clip_2, clip_2_variables, ids_2)
    return embeds.astype(jnp.float32), pooled.astype(jnp.float32)


@dataclasses.dataclass
class UNetTextEncoder:
    """The UNet family's text side: ``clip`` (``CLIPTextModel``) and, for SDXL, ``clip_2``
    (``CLIPTextModelWithProjection``), each with its tokenizer ``fn(prompts) -> int32 ids``. Returns
    ``(prompt_embeds (B, L, cross_attention_dim), pooled (B, P))``."""
    clip: Any
    clip_variables: Variables
    clip_tokenize: Callable[[Sequence[str]], np.ndarray]
    clip_2: Any = None
    clip_2_variables: Optional[Variables] = None
    clip_2_tokenize: Optional[Callable[[Sequence[str]], np.ndarray]] = None

    def __call__(self, prompts: Sequence[str]):
        prompts = list(prompts)
        ids_2 = None if self.clip_2 is None else jnp.asarray(self.clip_2_tokenize(prompts))
        return _text_stage(self.clip, self.clip_variables, self.clip_2, self.clip_2_variables,
                           jnp.asarray(self.clip_tokenize(prompts)), ids_2)


@functools.partial(jax.jit, static_argnames=("unet", "controlnet", "scheduler", "num_steps", "guidance_scale",
                                             "latent_hw", "image_size"))
def _unet_stage(unet, controlnet, unet_variables, controlnet_variables, clip_latents, prompt_embeds, pooled,
                negative_embeds, negative_pooled, noise, conditioning_scale, *, scheduler, num_steps: int,
                guidance_scale: float, latent_hw, image_size):
    """(B, H*W, C) denoised UNet latents from (B, H*W, C) unit noise."""
    b, c = noise.shape[0], noise.shape[-1]
    plan: Plan = scheduler.set_timesteps(num_steps)
    added = negative_added = None
    if unet.config.addition_embed_type == "text_time":
        time_ids = sdxl_time_ids(b, image_size)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        negative_added = {"text_embeds": negative_pooled, "time_ids": time_ids}
    latents = sample_unet_latents(unet, unet_variables, controlnet, controlnet_variables, plan, clip_latents,
                                  noise.reshape(b, *latent_hw, c), prompt_embeds, negative_embeds,
                                  guidance_scale=guidance_scale, conditioning_scale=conditioning_scale,
                                  added_cond_kwargs=added, negative_added_cond_kwargs=negative_added)
    return latents.reshape(b, -1, c)


@functools.partial(jax.jit, static_argnames=("vae", "latent_hw", "output_type"))
def _decode_stage(vae, vae_variables, latents, *, latent_hw, output_type):
    x = latents.reshape(latents.shape[0], *latent_hw, latents.shape[-1])
    images = decode_unet_latents(vae, vae_variables, x)
    return to_uint8(images) if output_type == "uint8" else images.astype(jnp.float32)


@dataclasses.dataclass
class UNetBifrostPipeline(BifrostPipeline):
    """A ``BifrostPipeline`` with the UNet decoder (see the module docstring). ``scheduler``: a sampling-scheduler
    config (``sample.schedulers``: ``DDIMConfig``, ``EulerDiscreteConfig``, ``DPMSolverMultistepConfig``)."""
    scheduler: Any = None

    def __post_init__(self):
        u, cn, v = self.unet.config, self.controlnet.config, self.vae.config
        if self.scheduler is None:
            raise ValueError("UNetBifrostPipeline: give a scheduler (e.g. DPMSolverMultistepConfig of the UNet's "
                             "noise schedule)")
        if not cn.is_latent:
            raise ValueError("UNetBifrostPipeline: the ControlNet must be a LatentUNetControlNet")
        if u.in_channels != v.latent_channels or cn.in_channels != u.in_channels:
            raise ValueError(f"UNetBifrostPipeline: UNet in_channels {u.in_channels}, ControlNet in_channels "
                             f"{cn.in_channels} and VAE latent_channels {v.latent_channels} must agree")
        self._check_condition_sources()
        self._negative = None

    @property
    def unet(self):
        return self.transformer

    # -- geometry ------------------------------------------------------------------------------------------------
    @property
    def latent_hw(self) -> tuple[int, int]:
        h, w = self.clip_grid
        k = 2 ** self.controlnet.config.conditioning_stages
        return 2 * h * k, 2 * w * k

    @property
    def packed_grid(self) -> tuple[int, int]:
        return self.latent_hw  # latents travel unpacked, one "token" per latent pixel

    # -- stages --------------------------------------------------------------------------------------------------
    def negative_text(self, batch: int):
        """The empty prompt's (prompt_embeds, pooled), repeated ``batch`` times (the unconditional CFG branch)."""
        if self._negative is None:
            self._negative = self.encode_prompts([""])
        embeds, pooled = self._negative
        return jnp.repeat(embeds, batch, axis=0), jnp.repeat(pooled, batch, axis=0)

    def sample_flux(self, clip_latents, prompt_embeds, pooled, noise, *, flux_steps: int, guidance: float,
                    conditioning_scale: float):
        """(B, H*W, C) UNet latents sampled from ``noise`` with ``flux_steps`` scheduler steps, text CFG scale
        ``guidance`` and the ControlNet's residuals times ``conditioning_scale``."""
        neg_embeds, neg_pooled = self.negative_text(noise.shape[0]) if float(guidance) != 1.0 else (None, None)
        with self._context():
            return _unet_stage(self.unet, self.controlnet, self.transformer_variables, self.controlnet_variables,
                               self._put(clip_latents), self._put(prompt_embeds), self._put(pooled),
                               self._put(neg_embeds), self._put(neg_pooled), self._put(noise),
                               jnp.float32(conditioning_scale), scheduler=self.scheduler, num_steps=int(flux_steps),
                               guidance_scale=float(guidance), latent_hw=self.latent_hw,
                               image_size=self.image_size)

    def decode(self, packed, *, output_type: str = "uint8"):
        if output_type not in ("uint8", "float"):
            raise ValueError(f"output_type={output_type!r}: use 'uint8' or 'float'")
        with self._context():
            return _decode_stage(self.vae, self.vae_variables, packed, latent_hw=self.latent_hw,
                                 output_type=output_type)
