"""Bifrost-1 with a UNet decoder (SD 1.x / 2.x / SDXL): CLIP latents (from MAR decoding, or a real image's ViT)
-> the latent UNet ControlNet -> UNet sampling with classifier-free guidance -> the VAE.

    plan = DPMSolverMultistepConfig.from_hf_config(scheduler_json).set_timesteps(25)
    latents = sample_unet_latents(unet, unet_vars, controlnet, cn_vars, plan, clip_latents, noise,
                                  prompt_embeds, negative_prompt_embeds, guidance_scale=5.0)
    images = decode_unet_latents(vae, vae_vars, latents)                    # (B, H, W, 3) in [-1, 1]

The ControlNet's condition embedding is computed once per image; with guidance the UNet and the ControlNet run
once per step on [unconditional; conditional] (the ControlNet on both halves, as diffusers' ControlNet pipelines
without guess mode). SDXL passes ``added_cond_kwargs`` (pooled text + time ids) and their negative counterparts.
Everything is a pure function of arrays: wrap it in ``jax.jit`` with the modules and the plan closed over.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from bifrost_jax.sample.schedulers.base import Plan, sample_loop
from bifrost_jax.sample.schedulers.guidance import cfg_denoise


def unet_model_fn(unet, unet_variables, controlnet=None, controlnet_variables=None, *,
                  conditioning_scale: float = 1.0):
    """``model(x, t, encoder_hidden_states, controlnet_cond_embedding, added_cond_kwargs)``: the ControlNet's
    residuals (if any) fed to the UNet; ``t`` a scalar timestep."""
    def model(x, t, encoder_hidden_states, controlnet_cond_embedding=None, added_cond_kwargs=None):
        timestep = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        down = mid = None
        if controlnet is not None:
            down, mid = controlnet.apply(controlnet_variables, x, timestep, encoder_hidden_states,
                                         conditioning_scale=conditioning_scale, added_cond_kwargs=added_cond_kwargs,
                                         controlnet_cond_embedding=controlnet_cond_embedding)
        return unet.apply(unet_variables, x, timestep, encoder_hidden_states, added_cond_kwargs,
                          down_block_additional_residuals=down, mid_block_additional_residual=mid)
    return model


def sample_unet_latents(unet, unet_variables, controlnet, controlnet_variables, plan: Plan, clip_latents, noise,
                        prompt_embeds, negative_prompt_embeds=None, *, guidance_scale: float = 1.0,
                        guidance_rescale: float = 0.0, conditioning_scale: float = 1.0,
                        added_cond_kwargs: Optional[dict] = None,
                        negative_added_cond_kwargs: Optional[dict] = None):
    """Denoised UNet latents (B, H, W, C) from unit Gaussian ``noise``. ``clip_latents`` (B, h*w, C_clip) condition
    the latent ControlNet (``controlnet`` None: plain text-to-image). ``negative_*`` default to the positive
    ``added_cond_kwargs`` and are required embeddings when ``guidance_scale != 1``."""
    cond = None
    if controlnet is not None:
        cond = controlnet.apply(controlnet_variables, clip_latents, method=controlnet.embed_condition)
    model = unet_model_fn(unet, unet_variables, controlnet, controlnet_variables,
                          conditioning_scale=conditioning_scale)
    positive = dict(encoder_hidden_states=prompt_embeds, controlnet_cond_embedding=cond,
                    added_cond_kwargs=added_cond_kwargs)
    negative = None
    if guidance_scale != 1.0:
        if negative_prompt_embeds is None:
            raise ValueError("classifier-free guidance (guidance_scale != 1) needs negative_prompt_embeds")
        negative = dict(encoder_hidden_states=negative_prompt_embeds, controlnet_cond_embedding=cond,
                        added_cond_kwargs=negative_added_cond_kwargs or added_cond_kwargs)
    denoise = cfg_denoise(model, positive, negative, guidance_scale, guidance_rescale)
    return sample_loop(plan, denoise, noise * plan.init_noise_sigma)


def sdxl_text_conditioning(clip_l, clip_l_variables, clip_g, clip_g_variables, ids_l, ids_g, mask_l=None,
                           mask_g=None):
    """SDXL's text conditioning (diffusers ``StableDiffusionXLPipeline.encode_prompt`` without clip_skip):
    ``(prompt_embeds, pooled)``, prompt_embeds = [penultimate hidden states of the ViT-L encoder ``clip_l``
    (``CLIPTextModel``), of the bigG encoder ``clip_g`` (``CLIPTextModelWithProjection``)] on the feature axis, and
    pooled = the bigG encoder's projected pooled output (``added_cond_kwargs["text_embeds"]``)."""
    _, _, hidden_l = clip_l.apply(clip_l_variables, ids_l, mask_l, output_hidden_states=True)
    pooled, _, hidden_g = clip_g.apply(clip_g_variables, ids_g, mask_g, output_hidden_states=True)
    return jnp.concatenate([hidden_l[-2], hidden_g[-2]], axis=-1), pooled


def encode_unet_text(clip, clip_variables, ids, clip_2=None, clip_2_variables=None, ids_2=None):
    """(prompt_embeds, pooled) of the UNet family's frozen text encoders, no attention masks (as diffusers' SD
    pipelines): SD 1.x / 2.x: the CLIP text encoder's last hidden state (its pooled output, which the UNet does not
    read, as ``pooled``); SDXL (``clip_2`` given): ``sdxl_text_conditioning``."""
    if clip_2 is None:
        return clip.apply(clip_variables, ids)
    return sdxl_text_conditioning(clip, clip_variables, clip_2, clip_2_variables, ids, ids_2)


def sdxl_time_ids(batch: int, original_size: tuple[int, int], crop_top_left: tuple[int, int] = (0, 0),
                  target_size: Optional[tuple[int, int]] = None):
    """SDXL micro-conditioning ``time_ids`` (batch, 6): original (h, w), crop (top, left), target (h, w) in pixels
    (the target defaults to the original size)."""
    target_size = original_size if target_size is None else target_size
    row = jnp.asarray([*original_size, *crop_top_left, *target_size], jnp.float32)
    return jnp.broadcast_to(row, (batch, 6))


def decode_unet_latents(vae, vae_variables, latents):
    """Images (B, 8H, 8W, 3) in [-1, 1] from UNet latents (divided by the VAE's ``scaling_factor`` first)."""
    return vae.apply(vae_variables, vae.config.diffusion_to_latents(latents.astype(jnp.float32)), method=vae.decode)
