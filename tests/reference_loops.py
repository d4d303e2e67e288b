"""Generation written out step by step, independent of the pipeline's jitted stages: the references that the
pipeline tests compare ``BifrostPipeline`` against (FLUX.1-dev's sigma schedule, a diffusers-style Euler loop that
recomputes the ControlNet condition at every step, the paper's reconstruction: ViT latents -> ControlNet + FLUX ->
VAE)."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from bifrost_jax.data.qwen_image import patchify
from bifrost_jax.models.flux.vae import latent_image_ids, unpack_latents


def reference_sigmas(steps, seq_len):
    """FLUX.1-dev's schedule written out: linspace(1, 1/n, n), exponential shift with mu linear in seq_len."""
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq_len - 256)
    s = np.linspace(1.0, 1.0 / steps, steps)
    s = math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0))
    return list(s) + [0.0]


def reference_flux_loop(pipe, clip_latents, embeds, pooled, noise, *, steps, guidance, scale):
    """Packed FLUX latents after a Python Euler loop; the ControlNet gets the RAW CLIP latents at every step (its
    upsampler and all run each time, as diffusers' pipeline does)."""
    h, w = pipe.packed_grid
    img_ids, txt_ids = latent_image_ids(h, w), jnp.zeros((embeds.shape[1], 3))
    b = clip_latents.shape[0]
    g = jnp.full((b,), guidance)
    cn = jax.jit(lambda x, t: pipe.controlnet.apply(
        pipe.controlnet_variables, x, controlnet_cond=clip_latents, conditioning_scale=scale,
        encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t, img_ids=img_ids, txt_ids=txt_ids,
        guidance=g))
    tr = jax.jit(lambda x, t, blocks, singles: pipe.transformer.apply(
        pipe.transformer_variables, x, embeds, pooled, t, img_ids, txt_ids, guidance=g,
        controlnet_block_samples=blocks, controlnet_single_block_samples=singles))
    sigmas = reference_sigmas(steps, h * w)
    x = np.asarray(noise, np.float32)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        t = jnp.full((b,), s, jnp.float32)
        blocks, singles = cn(x, t)
        x = x + (s_next - s) * np.asarray(tr(x, t, blocks, singles), np.float32)
    return x


def reference_vit_latents(pipe, images_uint8):
    """(B, N, C) Qwen ViT(+merger) latents of uint8 images already at ``pipe.vision_size``."""
    images = np.asarray(images_uint8)
    assert images.shape[1:3] == pipe.vision_size, (images.shape, pipe.vision_size)
    v = pipe.vision.config
    pixel_values = patchify(images, value_range=(0.0, 255.0), patch_size=v.patch_size,
                            temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size)
    grid = (1, images.shape[1] // v.patch_size, images.shape[2] // v.patch_size)
    return jnp.asarray(jax.jit(pipe.vision.apply, static_argnums=2)(pipe.vision_variables, pixel_values, grid),
                       jnp.float32)


def reference_decode(pipe, packed):
    """uint8 images from packed FLUX latents: unpack, undo the diffusion scaling, VAE decode, [-1, 1] -> 0..255."""
    z = pipe.vae.config.diffusion_to_latents(unpack_latents(jnp.asarray(packed, jnp.float32), *pipe.latent_hw))
    x = np.asarray(jax.jit(lambda v, z: pipe.vae.apply(v, z, method=pipe.vae.decode))(pipe.vae_variables, z),
                   np.float32)
    return np.round(np.clip(x / 2.0 + 0.5, 0.0, 1.0) * 255.0).astype(np.uint8)


def reference_reconstruct(pipe, images_uint8, *, seed, indices, steps, guidance, scale, prompts=None):
    """The paper's reconstruction written out: image i starts from N(0, 1) noise drawn with
    ``fold_in(PRNGKey(seed), indices[i])``; text is the empty prompt unless ``prompts``."""
    latents = reference_vit_latents(pipe, images_uint8)
    b = latents.shape[0]
    embeds, pooled = pipe.encode_text([""] * b if prompts is None else list(prompts))
    h, w = pipe.packed_grid
    shape = (1, h * w, pipe.transformer.config.in_channels)
    noise = np.concatenate([np.asarray(jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), int(i)),
                                                         shape, jnp.float32)) for i in indices])
    packed = reference_flux_loop(pipe, latents, jnp.asarray(embeds, jnp.float32), jnp.asarray(pooled, jnp.float32),
                                 noise, steps=steps, guidance=guidance, scale=scale)
    return reference_decode(pipe, packed)
