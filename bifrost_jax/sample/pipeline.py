"""The Bifrost-1 generation pipeline (spec 8) and reconstruction mode (spec 10.3), plus ``bifrost generate``.

    pipe = build_pipeline(config, workdir)                      # or BifrostPipeline(...) from modules + variables
    images = pipe.generate(["a red circle"], num_images_per_prompt=4, seed=42)      # uint8 (B, H, W, 3)
    recon = pipe.reconstruct(real_images_uint8)                  # ViT latents of real images -> ControlNet + FLUX

``generate`` runs four jitted, static-shape stages:

1. MAR decoding of the N patch-level CLIP latents (``sample.mar.mar_decode``) from the chat-formatted prompt
   (``data.prompt.build_t2i_prompt``); the unconditional prompt "" is built and run only when ``mllm_cfg != 1``.
2. FLUX's text encoders on the RAW user prompt (spec 8.2): any ``encode_text(prompts) -> (prompt_embeds (B, L, D),
   pooled (B, P))``; ``FluxTextEncoder`` is the T5 + CLIP one.
3. Flow-matching Euler sampling (``sample.flow``: FLUX.1-dev's dynamic shift from the packed-token count) of FLUX
   with the latent ControlNet. The ControlNet's condition embedding (2x upsampler + zero-init Linear) does not depend
   on the timestep and is computed ONCE per image before the loop (spec 7.5); each step the ControlNet turns it into
   residuals (times ``conditioning_scale``), injected into FLUX. The distilled guidance value goes to both models
   (when their config has ``guidance_embeds``).
4. Unpack, VAE decode of ``latents / scaling + shift``, [-1, 1] -> uint8.

Seeding follows the official script: every prompt re-seeds with ``seed`` (or its own entry of a list of seeds), so
the images of a prompt depend on (prompt, seed) only, never on the other prompts of the batch, the batch size, or
the hosts/devices it was sharded over (which makes sharded evaluation reproducible). From a prompt's key come the
MAR orders of its ``num_images_per_prompt`` rows and their FLUX noise.

The latent grid sets the image size: CLIP grid (h, w) -> FLUX packed grid (2h, 2w) -> VAE latent (4h, 4w) -> pixels
(4h * f, 4w * f) with f the VAE downsampling (8 for FLUX: 16x16 -> 512x512).

With a ``mesh``, batches are sharded on the "batch" logical axis (rows padded up to a multiple of the batch shards);
the variables keep whatever sharding they were loaded with.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import sys
import tempfile
import zlib
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bifrost_jax.configs import positive_int
from bifrost_jax.data.prompt import build_t2i_prompt, build_uncond_prompt
from bifrost_jax.data.qwen_image import patchify
from bifrost_jax.models.bifrost import BifrostMLLM
from bifrost_jax.models.flux.controlnet import LatentControlNet
from bifrost_jax.models.flux.transformer import FluxTransformer2DModel
from bifrost_jax.models.flux.vae import AutoencoderKL, latent_image_ids, unpack_latents
from bifrost_jax.models.qwen.vision import QwenVisionTransformer
from bifrost_jax.sample.flow import euler_sample, flux_sigmas
from bifrost_jax.sample.mar import mar_decode
from bifrost_jax.sample.weights_check import WeightsError, check_weight_sources

Variables = Any
TextEncodeFn = Callable[[Sequence[str]], tuple[Any, Any]]


# ----------------------------------------------------------------------------------------------------------------
# jitted stages (modules are static: hashable frozen dataclasses)

@functools.partial(jax.jit, static_argnames=("model", "num_steps", "cfg_weight"))
def _mar_stage(model, variables, input_ids, attention_mask, uncond_input_ids, uncond_attention_mask, keys, *,
               num_steps: int, cfg_weight: float):
    """(P, K, N, C): ``mar_decode`` per prompt (vmapped), each prompt with its own key for its K rows."""
    def one(ids, am, uids, uam, key):
        return mar_decode(model, variables, ids, am, key, num_steps=num_steps, cfg_weight=cfg_weight,
                          uncond_input_ids=uids, uncond_attention_mask=uam)
    return jax.vmap(one)(input_ids, attention_mask, uncond_input_ids, uncond_attention_mask, keys)


def flux_velocity_fn(transformer, controlnet, transformer_variables, controlnet_variables, cond_embedding,
                     prompt_embeds, pooled, img_ids, txt_ids, guidance, conditioning_scale):
    """``v(x, sigma)`` of FLUX with the latent ControlNet's residuals from a precomputed condition embedding."""
    b = cond_embedding.shape[0]
    g = jnp.full((b,), guidance, jnp.float32)
    g_flux = g if transformer.config.guidance_embeds else None
    g_cn = g if controlnet.config.guidance_embeds else None

    def velocity(x, sigma):
        t = jnp.full((b,), sigma, jnp.float32)  # the models scale timestep (= sigma) by 1000 themselves
        blocks, singles = controlnet.apply(
            controlnet_variables, x, conditioning_scale=conditioning_scale, encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled, timestep=t, img_ids=img_ids, txt_ids=txt_ids, guidance=g_cn,
            controlnet_cond_embedding=cond_embedding)
        return transformer.apply(transformer_variables, x, prompt_embeds, pooled, t, img_ids, txt_ids, guidance=g_flux,
                                 controlnet_block_samples=blocks, controlnet_single_block_samples=singles)
    return velocity


@functools.partial(jax.jit, static_argnames=("transformer", "controlnet"))
def _flux_stage(transformer, controlnet, transformer_variables, controlnet_variables, clip_latents, prompt_embeds,
                pooled, noise, sigmas, img_ids, txt_ids, guidance, conditioning_scale):
    """Packed FLUX latents (B, S_img, C) after Euler sampling from ``noise``."""
    cond = controlnet.apply(controlnet_variables, clip_latents, method=controlnet.embed_condition)
    velocity = flux_velocity_fn(transformer, controlnet, transformer_variables, controlnet_variables, cond,
                                prompt_embeds, pooled, img_ids, txt_ids, guidance, conditioning_scale)
    return euler_sample(velocity, noise, sigmas)


def to_uint8(images):
    """[-1, 1] float images -> uint8, as diffusers' image processor: clip((x + 1) / 2) * 255, rounded."""
    x = jnp.clip(images.astype(jnp.float32) / 2.0 + 0.5, 0.0, 1.0)
    return jnp.round(x * 255.0).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("vae", "latent_hw"))
def _decode_stage(vae, vae_variables, packed, *, latent_hw):
    z = vae.config.diffusion_to_latents(unpack_latents(packed.astype(jnp.float32), *latent_hw))
    return to_uint8(vae.apply(vae_variables, z, method=vae.decode))


@functools.partial(jax.jit, static_argnames=("vision", "grid_thw"))
def _vision_stage(vision, vision_variables, images_uint8, *, grid_thw):
    cfg = vision.config
    pixel_values = patchify(images_uint8, value_range=(0.0, 255.0), patch_size=cfg.patch_size,
                            temporal_patch_size=cfg.temporal_patch_size, merge_size=cfg.spatial_merge_size)
    return vision.apply(vision_variables, pixel_values, grid_thw).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("t5", "clip"))
def _text_stage(t5, t5_variables, clip, clip_variables, t5_ids, clip_ids):
    prompt_embeds = t5.apply(t5_variables, t5_ids)
    _, pooled = clip.apply(clip_variables, clip_ids)
    return prompt_embeds.astype(jnp.float32), pooled.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# FLUX's text side

def hf_tokenizer(path: str, max_length: int) -> Callable[[Sequence[str]], np.ndarray]:
    """``fn(prompts) -> int32 (B, max_length)`` with a transformers tokenizer directory (FLUX.1-dev's ``tokenizer``
    (CLIP, 77) or ``tokenizer_2`` (T5, 512)): padded to max_length, truncated, as FluxPipeline does."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)

    def tokenize(prompts):
        out = tok(list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="np")
        return np.asarray(out["input_ids"], np.int32)
    return tokenize


def hash_tokenizer(vocab_size: int, max_length: int, *, eos_token_id: int, pad_token_id: int,
                   bos_token_id: Optional[int] = None) -> Callable[[Sequence[str]], np.ndarray]:
    """A file-free word tokenizer for tiny test/demo encoders: each lower-cased word -> a stable id (crc32) among
    the ids that are not special; then EOS, padding with ``pad_token_id``, truncated to ``max_length`` (EOS kept)."""
    special = {i for i in (eos_token_id, pad_token_id, bos_token_id) if i is not None}
    free = [i for i in range(vocab_size) if i not in special]

    def tokenize(prompts):
        out = np.full((len(prompts), max_length), pad_token_id, np.int32)
        for b, p in enumerate(prompts):
            ids = ([] if bos_token_id is None else [bos_token_id])
            ids += [free[zlib.crc32(w.encode()) % len(free)] for w in p.lower().split()]
            ids = ids[:max_length - 1] + [eos_token_id]
            out[b, :len(ids)] = ids
        return out
    return tokenize


@dataclasses.dataclass
class FluxTextEncoder:
    """FLUX's text side: T5 (``prompt_embeds``, all tokens) and CLIP (``pooled``, the EOT token), each with its own
    tokenizer ``fn(prompts) -> int32 ids``. Like diffusers FluxPipeline, no attention mask is passed to either."""
    t5: Any
    t5_variables: Variables
    t5_tokenize: Callable[[Sequence[str]], np.ndarray]
    clip: Any
    clip_variables: Variables
    clip_tokenize: Callable[[Sequence[str]], np.ndarray]

    def __call__(self, prompts: Sequence[str]):
        prompts = list(prompts)
        return _text_stage(self.t5, self.t5_variables, self.clip, self.clip_variables,
                           jnp.asarray(self.t5_tokenize(prompts)), jnp.asarray(self.clip_tokenize(prompts)))


# ----------------------------------------------------------------------------------------------------------------
# the pipeline

@dataclasses.dataclass
class SamplingOptions:
    """Defaults of the released evaluation (spec 8): 256 MAR steps (one slot per step), no MLLM CFG, 28 FLUX steps,
    guidance 3.5, ControlNet scale 0.7, 4 images per prompt, seed 42."""
    num_images_per_prompt: int = 4
    seed: int = 42
    mar_steps: Optional[int] = None       # None: one slot per step (num_image_tokens)
    mllm_cfg: float = 1.0
    flux_steps: int = 28
    guidance: float = 3.5
    conditioning_scale: float = 0.7


@dataclasses.dataclass
class BifrostPipeline:
    """Modules + variables of every stage (see the module docstring). ``vision`` is only needed for
    ``reconstruct``; ``mllm``/``tokenizer`` only for ``generate``."""
    transformer: FluxTransformer2DModel
    transformer_variables: Variables
    controlnet: LatentControlNet
    controlnet_variables: Variables
    vae: AutoencoderKL
    vae_variables: Variables
    encode_text: TextEncodeFn
    mllm: Optional[BifrostMLLM] = None
    mllm_variables: Optional[Variables] = None
    tokenizer: Any = None                  # data.prompt.Tokenizer of the MLLM
    max_prompt_length: int = 300
    vision: Optional[QwenVisionTransformer] = None
    vision_variables: Optional[Variables] = None
    mesh: Any = None
    options: SamplingOptions = dataclasses.field(default_factory=SamplingOptions)

    def __post_init__(self):
        cn, t = self.controlnet.config, self.transformer.config
        if not cn.is_latent:
            raise ValueError("BifrostPipeline: the ControlNet must be a latent ControlNet (clip_latent_dim/clip_grid)")
        if t.in_channels != 4 * self.vae.config.latent_channels:
            raise ValueError(f"BifrostPipeline: FLUX in_channels {t.in_channels} != 4 x VAE latent_channels "
                             f"{self.vae.config.latent_channels} (2x2 packing)")
        if cn.in_channels != t.in_channels:
            raise ValueError(f"BifrostPipeline: ControlNet in_channels {cn.in_channels} != FLUX {t.in_channels}")
        if self.mllm is not None:
            m = self.mllm.config
            if tuple(m.image_grid) != tuple(cn.clip_grid) or m.clip_dim != cn.clip_latent_dim:
                raise ValueError(f"BifrostPipeline: the MLLM makes {m.image_grid} x {m.clip_dim} latents but the "
                                 f"ControlNet expects {cn.clip_grid} x {cn.clip_latent_dim}")
        if self.vision is not None:
            v = self.vision.config
            if v.out_hidden_size != cn.clip_latent_dim:
                raise ValueError(f"BifrostPipeline: the vision tower makes {v.out_hidden_size}-d latents, the "
                                 f"ControlNet expects {cn.clip_latent_dim}")

    # -- geometry ------------------------------------------------------------------------------------------------
    @property
    def clip_grid(self) -> tuple[int, int]:
        return tuple(self.controlnet.config.clip_grid)

    @property
    def packed_grid(self) -> tuple[int, int]:
        h, w = self.clip_grid
        return 2 * h, 2 * w

    @property
    def latent_hw(self) -> tuple[int, int]:
        h, w = self.packed_grid
        return 2 * h, 2 * w

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) in pixels of the generated images."""
        f = self.vae.config.downsample_factor
        h, w = self.latent_hw
        return h * f, w * f

    @property
    def vision_size(self) -> tuple[int, int]:
        """(height, width) in pixels of the ViT view whose merged grid is the CLIP grid (448x448 for 16x16)."""
        if self.vision is None:
            raise ValueError("this pipeline has no vision tower (needed for reconstruction)")
        v = self.vision.config
        unit = v.patch_size * v.spatial_merge_size
        h, w = self.clip_grid
        return h * unit, w * unit

    # -- sharding ------------------------------------------------------------------------------------------------
    def _batch_shards(self) -> int:
        if self.mesh is None:
            return 1
        from bifrost_jax.parallel.rules import logical_to_mesh_spec
        axes = logical_to_mesh_spec(("batch",))[0]
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        return int(np.prod([self.mesh.shape[a] for a in axes])) if axes else 1

    def _put(self, x):
        """Shard the leading axis of ``x`` on "batch" (rows are padded to a multiple of the shards beforehand)."""
        if self.mesh is None or x is None:
            return x if x is None else jnp.asarray(x)
        from jax.sharding import NamedSharding
        from bifrost_jax.parallel.rules import logical_to_mesh_spec
        spec = logical_to_mesh_spec(("batch",) + (None,) * (np.ndim(x) - 1))
        return jax.device_put(x, NamedSharding(self.mesh, spec))

    def _context(self):
        from bifrost_jax.parallel.rules import axis_rules
        return axis_rules(self.mesh)

    # -- stages --------------------------------------------------------------------------------------------------
    def decode_latents(self, prompts: Sequence[str], keys, *, num_images_per_prompt: int, mar_steps: Optional[int],
                       mllm_cfg: float):
        """(P, K, N, C) float32 CLIP latents by MAR decoding; ``keys`` (P, 2): one PRNG key per prompt."""
        if self.mllm is None or self.tokenizer is None:
            raise ValueError("generate needs the MLLM and its tokenizer")
        p, k = len(prompts), num_images_per_prompt
        ids, am = build_t2i_prompt(self.tokenizer, list(prompts), max_length=self.max_prompt_length)
        rep = lambda a: np.repeat(a[:, None], k, axis=1)  # noqa: E731  (P, K, T)
        uids = uam = None
        if float(mllm_cfg) != 1.0:  # the uncond prompt "" is neither built nor run without CFG
            u_ids, u_am = build_uncond_prompt(self.tokenizer, 1, max_length=self.max_prompt_length)
            uids, uam = np.broadcast_to(u_ids, (p, k, ids.shape[1])), np.broadcast_to(u_am, (p, k, ids.shape[1]))
        steps = self.mllm.config.num_image_tokens if mar_steps is None else int(mar_steps)
        # no logical-axis rules here: under the vmap over prompts the model's "batch" constraints would name the
        # rows of ONE prompt; the prompt axis carries the input sharding instead
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            return _mar_stage(self.mllm, self.mllm_variables, self._put(rep(ids)), self._put(rep(am)),
                              self._put(uids), self._put(uam), self._put(keys), num_steps=steps,
                              cfg_weight=float(mllm_cfg))

    def sigmas(self, flux_steps: int) -> np.ndarray:
        h, w = self.packed_grid
        return flux_sigmas(int(flux_steps), h * w)

    def sample_flux(self, clip_latents, prompt_embeds, pooled, noise, *, flux_steps: int, guidance: float,
                    conditioning_scale: float):
        """Packed FLUX latents (B, S_img, C) from noise, conditioned on CLIP latents (B, N, C_clip) and text."""
        h, w = self.packed_grid
        img_ids = latent_image_ids(h, w)
        txt_ids = jnp.zeros((prompt_embeds.shape[1], 3), jnp.float32)
        with self._context():
            return _flux_stage(self.transformer, self.controlnet, self.transformer_variables,
                               self.controlnet_variables, self._put(clip_latents), self._put(prompt_embeds),
                               self._put(pooled), self._put(noise), jnp.asarray(self.sigmas(flux_steps)), img_ids,
                               txt_ids, jnp.float32(guidance), jnp.float32(conditioning_scale))

    def decode(self, packed):
        """uint8 images (B, H, W, 3) from packed FLUX latents."""
        with self._context():
            return _decode_stage(self.vae, self.vae_variables, packed, latent_hw=self.latent_hw)

    def noise(self, keys, num_images: int):
        """(len(keys) * num_images, S_img, C) float32: the FLUX starting noise, ``num_images`` rows per key."""
        h, w = self.packed_grid
        shape = (num_images, h * w, self.transformer.config.in_channels)
        return jax.vmap(lambda key: jax.random.normal(key, shape, jnp.float32))(keys).reshape((-1,) + shape[1:])

    def _text(self, prompts: Sequence[str]):
        embeds, pooled = self.encode_text(list(prompts))
        return jnp.asarray(embeds, jnp.float32), jnp.asarray(pooled, jnp.float32)

    # -- public API ----------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str] | str, *, num_images_per_prompt: Optional[int] = None,
                 seed: int | Sequence[int] | None = None, mar_steps: Optional[int] = None,
                 mllm_cfg: Optional[float] = None, flux_steps: Optional[int] = None, guidance: Optional[float] = None,
                 conditioning_scale: Optional[float] = None, return_latents: bool = False):
        """uint8 images (P * K, H, W, 3), the K images of prompt p at rows p*K .. p*K+K-1. Unset options come from
        ``self.options``. ``seed``: one for every prompt (the official re-seeding) or one per prompt."""
        o = self.options
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("generate: no prompts")
        k = o.num_images_per_prompt if num_images_per_prompt is None else int(num_images_per_prompt)
        seed = o.seed if seed is None else seed
        seeds = [int(seed)] * len(prompts) if np.ndim(seed) == 0 else [int(s) for s in seed]
        if len(seeds) != len(prompts):
            raise ValueError(f"generate: {len(seeds)} seeds for {len(prompts)} prompts")
        # pad the prompt count to a multiple of the batch shards (each prompt is independent; padding is dropped)
        n = len(prompts)
        pad = (-n) % self._batch_shards()
        prompts_p, seeds_p = prompts + [prompts[-1]] * pad, seeds + [seeds[-1]] * pad
        keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds_p])
        split = jax.vmap(jax.random.split)(keys)           # (P, 2, 2): MAR key, noise key
        mar_keys, noise_keys = split[:, 0], split[:, 1]
        latents = self.decode_latents(prompts_p, mar_keys, num_images_per_prompt=k,
                                      mar_steps=o.mar_steps if mar_steps is None else mar_steps,
                                      mllm_cfg=o.mllm_cfg if mllm_cfg is None else mllm_cfg)
        latents = latents.reshape((-1,) + latents.shape[2:])
        embeds, pooled = self._text(prompts_p)
        embeds, pooled = jnp.repeat(embeds, k, axis=0), jnp.repeat(pooled, k, axis=0)
        packed = self.sample_flux(latents, embeds, pooled, self.noise(noise_keys, k),
                                  flux_steps=o.flux_steps if flux_steps is None else flux_steps,
                                  guidance=o.guidance if guidance is None else guidance,
                                  conditioning_scale=(o.conditioning_scale if conditioning_scale is None
                                                      else conditioning_scale))
        images = np.asarray(jax.device_get(self.decode(packed)))[:n * k]
        if return_latents:
            return images, np.asarray(jax.device_get(latents))[:n * k]
        return images

    def clip_latents_of(self, images) -> jax.Array:
        """(B, N, C) ViT(+merger) latents of uint8 images (B, H, W, 3), resized (centre crop to the grid's aspect,
        bicubic) to the ViT view when they are not already at ``vision_size``."""
        images = fit_images(images, self.vision_size)
        v = self.vision.config
        grid = (1, self.vision_size[0] // v.patch_size, self.vision_size[1] // v.patch_size)
        with self._context():
            return _vision_stage(self.vision, self.vision_variables, self._put(images), grid_thw=grid)

    def reconstruct(self, images, prompts: Optional[Sequence[str]] = None, *, seed: Optional[int] = None,
                    indices: Optional[Sequence[int]] = None, flux_steps: Optional[int] = None,
                    guidance: Optional[float] = None, conditioning_scale: Optional[float] = None):
        """Paper Figure 4's reconstruction: real uint8 images (B, H, W, 3) -> the ViT's patch-level latents ->
        ControlNet + FLUX (text: ``prompts``, default the empty prompt) -> uint8 images at ``image_size``.
        Image i's noise comes from (seed, ``indices[i]``) (default i), so results do not depend on batching."""
        o = self.options
        images = np.asarray(images)
        b = images.shape[0]
        prompts = [""] * b if prompts is None else list(prompts)
        indices = np.arange(b) if indices is None else np.asarray(indices)
        if len(prompts) != b or len(indices) != b:
            raise ValueError(f"reconstruct: {b} images, {len(prompts)} prompts, {len(indices)} indices")
        pad = (-b) % self._batch_shards()
        if pad:
            images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
            prompts, indices = prompts + [prompts[-1]] * pad, np.concatenate([indices, np.repeat(indices[-1:], pad)])
        base = jax.random.PRNGKey(o.seed if seed is None else int(seed))
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))
        latents = self.clip_latents_of(images)
        embeds, pooled = self._text(prompts)
        packed = self.sample_flux(latents, embeds, pooled, self.noise(keys, 1),
                                  flux_steps=o.flux_steps if flux_steps is None else flux_steps,
                                  guidance=o.guidance if guidance is None else guidance,
                                  conditioning_scale=(o.conditioning_scale if conditioning_scale is None
                                                      else conditioning_scale))
        return np.asarray(jax.device_get(self.decode(packed)))[:b]


def fit_images(images, size: tuple[int, int]) -> np.ndarray:
    """uint8 (B, H, W, 3) -> (B, size[0], size[1], 3): the centred crop of the target aspect ratio, bicubic-resized
    with PIL (unchanged when already at ``size``)."""
    from PIL import Image

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (B, H, W, 3), got {images.dtype} {images.shape}")
    th, tw = size
    if images.shape[1:3] == (th, tw):
        return images
    out = []
    for im in images:
        h, w = im.shape[:2]
        scale = min(h / th, w / tw)
        ch, cw = th * scale, tw * scale
        top, left = (h - ch) / 2.0, (w - cw) / 2.0
        pil = Image.fromarray(im).resize((tw, th), resample=Image.Resampling.BICUBIC,
                                         box=(left, top, left + cw, top + ch))
        out.append(np.asarray(pil, np.uint8))
    return np.stack(out)


# ----------------------------------------------------------------------------------------------------------------
# building a pipeline from a config (see configs/generate_tiny.py for a complete example)

BUILD_DOC = """Config schema of ``build_pipeline`` (ml_collections; every component a sub-dict):

    config.dtype, config.param_dtype     "float32" | "bfloat16": compute and parameter dtypes
    config.seed                          seeds the "random" sources
    config.mesh                          {"data", "fsdp", "tensor"} sizes over THIS process's devices (-1 fills)
    config.sample                        SamplingOptions fields (num_images_per_prompt, seed, mar_steps (0: N),
                                         mllm_cfg, flux_steps, guidance, conditioning_scale)
    config.<component> for mllm, transformer, controlnet, vae, t5, clip, vision:
        source       "random"  module config ``model`` + seeded synthetic weights (``synthetic_variables``;
                               ``init_noise`` scales biases and zero-init tensors): tests and demos only
                     "port"    ``bifrost_jax.port.load(kind, path, **port_kwargs)`` of a PyTorch directory
                               (kinds: mllm "bifrost-1" (port_kwargs.base = the Qwen2.5-VL dir), transformer
                               "flux-transformer", controlnet "latent-controlnet", vae "flux-vae", t5 "t5-encoder",
                               clip "clip-text", vision "qwen2.5-vl")
                     "orbax"   a ``bifrost port`` output directory ``path`` (restored, then ``subtree``, a dotted
                               path into the restored tree, selects the component's variables or params, e.g.
                               "mllm", or "vl.params.visual" for the ViT of a bifrost-1 port)
                     "phase"   the trained checkpoint of phase ``phase`` under WORKDIR (strict: every variable)
                     "mllm"    vision only: the ViT of the mllm component's Qwen2.5-VL (mllm source "port")
                     ""        no such component (vision: no reconstruction; mllm: no generation)
        path, port_kwargs, subtree, init_noise     as above
        model        the component's config.json dict (diffusers / transformers fields; mllm: BifrostConfig
                     fields), used by "random", "orbax" and "phase"
        phase, phase_subtree   with any source: when WORKDIR/<phase>/checkpoints exists, the variables saved there
                     (under ``phase_subtree`` of each collection) REPLACE the loaded ones; saved entries the
                     component does not have, or with other shapes, are errors
    config.mllm.tokenizer        a tokenizer.json directory, or "word" (``build_word_tokenizer`` over
                                 ``tokenizer_words``, written to a temporary directory)
    config.mllm.max_prompt_length
    config.t5.tokenizer / config.clip.tokenizer   a transformers tokenizer directory, or "hash" (``hash_tokenizer``)
    config.t5.max_length / config.clip.max_length  512 / 77 for FLUX.1
"""


def _dtype(name: str):
    table = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(table)}")
    return table[name]


def _opt(cc, key: str, default):
    value = cc.get(key, default) if hasattr(cc, "get") else default
    return default if value is None else value


def _as_dict(x) -> dict:
    return x.to_dict() if hasattr(x, "to_dict") else dict(x or {})


def _flat(tree) -> dict:
    from flax import traverse_util
    return traverse_util.flatten_dict(tree)


def _unflat(flat: dict):
    from flax import traverse_util
    return traverse_util.unflatten_dict(flat)


def _abstract(module, init_fn, mesh):
    """(ShapeDtypeStructs with shardings, init function) of a module's variables."""
    boxed = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    shapes = nn.meta.unbox(boxed)
    if mesh is not None:
        from bifrost_jax.parallel.rules import tree_shardings
        shardings = tree_shardings(nn.get_partition_spec(boxed), mesh)
    else:
        single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: single, shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def synthetic_variables(abstract, seed: int, noise: float = 0.05):
    """Seeded random variables for the "random" source (tests, demos), drawn on the host from the shapes alone (no
    init compile): kernels and embeddings N(0, 1/fan_in) with fan_in the product of all but the last axis, norm
    scales 1 + noise * N(0, 1), every other parameter (biases, zero-init tokens) noise * N(0, 1); BatchNorm
    statistics mean 0, var 1."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        shape = tuple(leaf.shape)
        if name == "var":
            return np.ones(shape, np.float32)
        if name == "mean":
            return np.zeros(shape, np.float32)
        z = rng.standard_normal(shape).astype(np.float32)
        if name == "scale":
            return 1.0 + noise * z
        if len(shape) >= 2 and name in ("kernel", "embedding"):
            return z / np.sqrt(max(1, int(np.prod(shape[:-1]))))
        return noise * z
    return jax.tree_util.tree_map_with_path(draw, abstract)


def _check_against(tree, abstract, what: str) -> None:
    got, want = _flat(tree), _flat(abstract)
    problems = [f"missing {'.'.join(k)}" for k in want if k not in got]
    problems += [f"unexpected {'.'.join(k)}" for k in got if k not in want]
    problems += [f"{'.'.join(k)}: shape {tuple(np.shape(got[k]))}, expected {tuple(want[k].shape)}"
                 for k in want if k in got and tuple(np.shape(got[k])) != tuple(want[k].shape)]
    if problems:
        raise ValueError(f"{what} does not match the module's variables:\n  " + "\n  ".join(problems))


def _place(tree, abstract):
    return jax.tree.map(lambda x, a: jax.device_put(jnp.asarray(x, a.dtype), a.sharding), tree, abstract)


def _select(tree, dotted: str, what: str):
    for part in [p for p in dotted.split(".") if p]:
        if not isinstance(tree, dict) or part not in tree:
            raise KeyError(f"{what}: no {part!r} in {sorted(tree) if isinstance(tree, dict) else type(tree)} "
                           f"(subtree {dotted!r})")
        tree = tree[part]
    return tree


def _abstract_of(variables):
    """ShapeDtypeStructs (with the arrays' shardings) of loaded variables."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), variables)


def _overlay_phase(variables, abstract, cc, workdir: Optional[str], name: str, strict: bool):
    """Variables from ``WORKDIR/<phase>/checkpoints`` (see BUILD_DOC) replacing those of ``variables``;
    ``strict``: every variable of ``abstract`` must be in the checkpoint."""
    from bifrost_jax.train.checkpoint import (checkpoint_dir, checkpoint_param_shapes, resolve_step_dir,
                                              restore_params)
    phase = _opt(cc, "phase", "")
    if not phase or not workdir:
        if strict:
            raise ValueError(f"config.{name}: source 'phase' needs config.{name}.phase and --checkpoint WORKDIR")
        return variables
    root = checkpoint_dir(workdir, phase)
    if not os.path.isdir(root):
        if strict:
            raise FileNotFoundError(f"config.{name}: no checkpoint directory {root}")
        print(f"{name}: no checkpoint of phase {phase!r} under {workdir}; using the {cc.source} weights")
        return variables
    prefix = tuple(p for p in _opt(cc, "phase_subtree", "").split(".") if p)
    flat = {(k[0],) + prefix + k[1:]: v for k, v in _flat(abstract).items()}
    saved = checkpoint_param_shapes(resolve_step_dir(root))
    # entries outside this component's subtree belong to other components of the phase
    outside = tuple(k for k in saved if tuple(k[1:1 + len(prefix)]) != prefix) if prefix else ()
    if not strict:  # overlay: what the checkpoint holds (unexpected or wrong-shape saved entries still raise)
        flat = {k: v for k, v in flat.items() if k in saved}
    restored, _ = restore_params(root, _unflat(flat), allow_unused=outside)
    stripped = {(k[0],) + tuple(k[1 + len(prefix):]): v for k, v in restored.items()}
    merged = dict(_flat(variables)) if variables is not None else {}
    merged.update(stripped)
    print(f"{name}: {len(stripped)} variables from {root}")
    return _unflat(merged)


def _component(config, name: str, module, init_fn, port_kind: str, workdir, mesh, dtype, param_dtype):
    """(module, variables) of one component per its config (BUILD_DOC)."""
    cc = config[name]
    source = cc.source
    if source == "port":
        from bifrost_jax import port
        module, variables = port.load(port_kind, cc.path, dtype=param_dtype, mesh=mesh, compute_dtype=dtype,
                                      **_as_dict(_opt(cc, "port_kwargs", {})))
        return module, _overlay_phase(variables, _abstract_of(variables), cc, workdir, name, strict=False)
    abstract = _abstract(module, init_fn, mesh)
    if source == "random":
        seed = int(config.seed) + zlib.crc32(name.encode()) % 1000
        variables = _place(synthetic_variables(abstract, seed, float(_opt(cc, "init_noise", 0.05))), abstract)
    elif source == "orbax":
        from bifrost_jax.port.orbax_io import restore_ported
        tree = _select(restore_ported(cc.path), _opt(cc, "subtree", ""), f"config.{name}")
        if "params" not in tree:  # the subtree named a params tree
            tree = {"params": tree}
        _check_against(tree, abstract, f"{cc.path} ({name})")
        variables = _place(tree, abstract)
    elif source == "phase":
        return module, _overlay_phase(None, abstract, cc, workdir, name, strict=True)
    else:
        raise ValueError(f"config.{name}.source={source!r}: use random | port | orbax | phase")
    return module, _overlay_phase(variables, abstract, cc, workdir, name, strict=False)


def _word_tokenizer_dir(words: Sequence[str]) -> str:
    from bifrost_jax.data.prompt import build_word_tokenizer
    return build_word_tokenizer(list(words), tempfile.mkdtemp(prefix="bifrost_word_tokenizer_"))


def build_pipeline(config, workdir: Optional[str] = None, *, mesh=None) -> BifrostPipeline:
    """A ``BifrostPipeline`` from an ml_collections config (schema: ``BUILD_DOC``) and an optional training
    WORKDIR whose phase checkpoints override the configured weights."""
    from bifrost_jax.data.prompt import load_tokenizer
    from bifrost_jax.models.bifrost import BifrostConfig
    from bifrost_jax.models.flux.controlnet import FluxControlNetConfig
    from bifrost_jax.models.flux.transformer import FluxConfig
    from bifrost_jax.models.flux.vae import AutoencoderKLConfig
    from bifrost_jax.models.qwen.vision import QwenVisionConfig
    from bifrost_jax.models.text.clip import CLIPTextConfig, CLIPTextModel
    from bifrost_jax.models.text.t5 import T5EncoderConfig, T5EncoderModel

    dtype, param_dtype = _dtype(_opt(config, "dtype", "bfloat16")), _dtype(_opt(config, "param_dtype", "float32"))
    if mesh is None and _opt(config, "mesh", None) is not None:
        from bifrost_jax.parallel.mesh import make_mesh
        mesh = make_mesh(_as_dict(config.mesh), devices=jax.local_devices())
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    common = dict(workdir=workdir, mesh=mesh, dtype=dtype, param_dtype=param_dtype)

    def model_dict(name):
        return _as_dict(_opt(config[name], "model", {}))

    transformer = FluxTransformer2DModel(FluxConfig.from_hf_config(model_dict("transformer")), **kw)
    transformer, transformer_vars = _component(config, "transformer", transformer,
                                               lambda r: transformer.init(r, **transformer.dummy_inputs()),
                                               "flux-transformer", **common)
    controlnet = LatentControlNet(FluxControlNetConfig.from_hf_config(model_dict("controlnet")), **kw)
    controlnet, controlnet_vars = _component(config, "controlnet", controlnet,
                                             lambda r: controlnet.init(r, **controlnet.dummy_inputs()),
                                             "latent-controlnet", **common)
    vae = AutoencoderKL(AutoencoderKLConfig.from_hf_config(model_dict("vae")), **kw)
    f = vae.config.downsample_factor
    vae, vae_vars = _component(config, "vae", vae, lambda r: vae.init(r, jnp.zeros((1, 2 * f, 2 * f, 3))),
                               "flux-vae", **common)

    t5 = T5EncoderModel(T5EncoderConfig.from_hf_config(model_dict("t5")), **kw)
    t5, t5_vars = _component(config, "t5", t5, lambda r: t5.init(r, jnp.zeros((1, 4), jnp.int32)), "t5-encoder",
                             **common)
    clip = CLIPTextModel(CLIPTextConfig.from_hf_config(model_dict("clip")), **kw)
    clip, clip_vars = _component(config, "clip", clip, lambda r: clip.init(r, jnp.zeros((1, 4), jnp.int32)),
                                 "clip-text", **common)

    def text_tokenizer(name, module_cfg, eos, pad, bos=None):
        cc = config[name]
        spec, length = cc.tokenizer, int(cc.max_length)
        if spec == "hash":
            return hash_tokenizer(module_cfg.vocab_size, length, eos_token_id=eos, pad_token_id=pad,
                                  bos_token_id=bos)
        return hf_tokenizer(spec, length)

    t5_cfg, clip_cfg = t5.config, clip.config
    encode_text = FluxTextEncoder(
        t5, t5_vars, text_tokenizer("t5", t5_cfg, t5_cfg.eos_token_id, t5_cfg.pad_token_id or 0),
        clip, clip_vars, text_tokenizer("clip", clip_cfg, clip_cfg.eos_token_id, clip_cfg.pad_token_id or 0,
                                        clip_cfg.bos_token_id))

    mllm = mllm_vars = tokenizer = None
    vl_module = vl_vars = None
    mc = config.mllm
    if mc.source:
        if mc.source == "port":
            from bifrost_jax import port
            pair, both = port.load("bifrost-1", mc.path, dtype=param_dtype, mesh=mesh, compute_dtype=dtype,
                                   **_as_dict(_opt(mc, "port_kwargs", {})))
            mllm, mllm_vars, vl_module, vl_vars = pair.mllm, both["mllm"], pair.vl, both["vl"]
            mllm_vars = _overlay_phase(mllm_vars, _abstract_of(mllm_vars), mc, workdir, "mllm", strict=False)
        else:
            bcfg = BifrostConfig.from_dict(model_dict("mllm"))
            mllm = BifrostMLLM(bcfg, **kw)
            n = bcfg.num_image_tokens
            mllm, mllm_vars = _component(
                config, "mllm", mllm, lambda r: mllm.init(r, jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32),
                                                          jnp.zeros((1, n, bcfg.clip_dim)), jnp.ones((1, n), bool)),
                "bifrost-1", **common)
        spec = mc.tokenizer
        tokenizer = load_tokenizer(_word_tokenizer_dir(list(_opt(mc, "tokenizer_words", ())))
                                   if spec == "word" else spec)
        if tokenizer.vocab_size > mllm.config.text.vocab_size:
            raise ValueError(f"the MLLM tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                             f"{mllm.config.text.vocab_size}")

    vision = vision_vars = None
    vc = config.get("vision", None)
    if vc is not None and vc.source:
        if vc.source == "mllm":
            if vl_module is None:
                raise ValueError("config.vision.source='mllm' needs config.mllm.source='port' (the Qwen2.5-VL ViT)")
            vision = QwenVisionTransformer(vl_module.config.vision, **kw)
            vision_vars = {"params": vl_vars["params"]["visual"]}
        elif vc.source == "port":
            from bifrost_jax import port
            vl, vars_ = port.load("qwen2.5-vl", vc.path, dtype=param_dtype, mesh=mesh, compute_dtype=dtype,
                                  **_as_dict(_opt(vc, "port_kwargs", {})))
            vision, vision_vars = QwenVisionTransformer(vl.config.vision, **kw), {"params": vars_["params"]["visual"]}
        else:
            vcfg = QwenVisionConfig.from_hf_config(model_dict("vision"))
            vision = QwenVisionTransformer(vcfg, **kw)
            unit = vcfg.patch_size * vcfg.spatial_merge_size
            dummy = jnp.zeros((1, (unit // vcfg.patch_size) ** 2, vcfg.patch_dim))
            grid = (1, unit // vcfg.patch_size, unit // vcfg.patch_size)
            vision, vision_vars = _component(config, "vision", vision, lambda r: vision.init(r, dummy, grid),
                                             "qwen2.5-vl", **common)

    s = config.sample
    options = SamplingOptions(num_images_per_prompt=int(s.num_images_per_prompt), seed=int(s.seed),
                              mar_steps=int(s.mar_steps) or None, mllm_cfg=float(s.mllm_cfg),
                              flux_steps=int(s.flux_steps), guidance=float(s.guidance),
                              conditioning_scale=float(s.conditioning_scale))
    return BifrostPipeline(transformer=transformer, transformer_variables=transformer_vars, controlnet=controlnet,
                           controlnet_variables=controlnet_vars, vae=vae, vae_variables=vae_vars,
                           encode_text=encode_text, mllm=mllm, mllm_variables=mllm_vars, tokenizer=tokenizer,
                           max_prompt_length=int(_opt(mc, "max_prompt_length", 300)), vision=vision,
                           vision_variables=vision_vars, mesh=mesh, options=options)


# ----------------------------------------------------------------------------------------------------------------
# image files

def save_png(path: str, image: np.ndarray) -> None:
    """Write a uint8 (H, W, 3) PNG atomically (temporary file in the same directory, then rename)."""
    from PIL import Image

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".png", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            Image.fromarray(np.asarray(image, np.uint8)).save(fh, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def make_grid(images: np.ndarray, cols: Optional[int] = None, pad: int = 2) -> np.ndarray:
    """uint8 (B, H, W, 3) -> one (rows*H + ..., cols*W + ..., 3) grid image, white padding between cells."""
    images = np.asarray(images)
    b, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(b)))
    rows = int(np.ceil(b / cols))
    grid = np.full((rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad, c), 255, np.uint8)
    for i, im in enumerate(images):
        r, col = divmod(i, cols)
        grid[r * (h + pad):r * (h + pad) + h, col * (w + pad):col * (w + pad) + w] = im
    return grid


# ----------------------------------------------------------------------------------------------------------------
# bifrost generate

def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="bifrost generate", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate images with Bifrost-1 (MLLM MAR decoding -> latent ControlNet + FLUX).\n"
                    "Also takes --config FILE and --config.KEY=VALUE overrides.\n\n" + BUILD_DOC)
    parser.add_argument("--checkpoint", default=None, help="training WORKDIR whose phase checkpoints are used")
    parser.add_argument("--random-weights", action="store_true",
                        help="allow components without trained weights (random source, missing phase checkpoint)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    parser.add_argument("--num-images", type=positive_int, default=None, help="images per prompt (default: config)")
    parser.add_argument("--seed", type=int, default=None, help="seed, re-used for every prompt (default: config)")
    parser.add_argument("--mar-steps", type=positive_int, default=None, help="MAR decoding steps (default: config / N)")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="prompts per generation call")
    parser.add_argument("--out", required=True, help="output directory")
    args, rest = parser.parse_known_args(argv)
    if not args.prompt:
        parser.error("give at least one --prompt")
    from tqdm import tqdm

    from bifrost_jax.configs import parse_config_flags
    config, _ = parse_config_flags(rest)
    try:
        check_weight_sources(config, args.checkpoint, random_weights=args.random_weights)
    except WeightsError as e:
        parser.error(str(e))
    pipe = build_pipeline(config, args.checkpoint)
    k = pipe.options.num_images_per_prompt if args.num_images is None else args.num_images
    seed = pipe.options.seed if args.seed is None else args.seed
    os.makedirs(args.out, exist_ok=True)
    files, all_images = [], []
    batches = [args.prompt[i:i + args.batch_size] for i in range(0, len(args.prompt), args.batch_size)]
    for b, batch in enumerate(tqdm(batches, desc="generate", unit="batch")):
        images = pipe.generate(batch, num_images_per_prompt=k, seed=seed, mar_steps=args.mar_steps)
        for i, prompt in enumerate(batch):
            p = b * args.batch_size + i
            for j in range(k):
                name = f"{p:03d}_{j:02d}.png"
                save_png(os.path.join(args.out, name), images[i * k + j])
                files.append({"file": name, "prompt": prompt, "index": j})
        all_images.append(images)
    save_png(os.path.join(args.out, "grid.png"), make_grid(np.concatenate(all_images), cols=k))
    record = {"prompts": args.prompt, "seed": seed, "num_images_per_prompt": k,
              "sampling": dataclasses.asdict(pipe.options) | {"seed": seed, "num_images_per_prompt": k,
                                                               **({"mar_steps": args.mar_steps}
                                                                  if args.mar_steps else {})},
              "checkpoint": args.checkpoint, "files": files, "config": json.loads(config.to_json())}
    with open(os.path.join(args.out, "config.json"), "w") as fh:
        json.dump(record, fh, indent=2)
    with open(os.path.join(args.out, "seed.txt"), "w") as fh:
        fh.write(f"{seed}\n")
    print(f"wrote {len(files)} images and grid.png to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
