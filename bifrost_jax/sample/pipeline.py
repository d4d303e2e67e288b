"""The Bifrost-1 generation pipeline (docs/design.md §8) and reconstruction mode (§10.3).

    pipe = build_pipeline(config)                   # sample/build.py; or pipeline_from_workdir(WORKDIR), or
                                                    # BifrostPipeline(...) from modules + variables
    images = pipe.generate(["a red circle"], num_images_per_prompt=4, seed=42)      # uint8 (B, H, W, 3)
    recon = pipe.reconstruct(real_images_uint8)     # ViT latents of real images -> ControlNet + FLUX

``generate`` runs four jitted, static-shape stages, each also a public method:

1. ``decode_latents``: MAR decoding of the N patch-level CLIP latents (``sample.mar.mar_decode``) from the
   chat-formatted prompt (``data.prompt.build_t2i_prompt``); the unconditional prompt "" is built and run only when
   ``mllm_cfg != 1``.
2. ``encode_prompts``: FLUX's text encoders on the RAW user prompt (§8.2): any ``encode_text(prompts) ->
   (prompt_embeds (B, L, D), pooled (B, P))``; ``FluxTextEncoder`` is the T5 + CLIP one.
3. ``sample_flux``: flow-matching Euler sampling (``sample.flow``: FLUX.1-dev's dynamic shift from the packed-token
   count) of FLUX with the latent ControlNet. The ControlNet's condition embedding (2x upsampler + zero-init
   Linear) does not depend on the timestep and is computed ONCE per image before the loop (§7.5); each step the
   ControlNet turns it into residuals (times ``conditioning_scale``), injected into FLUX. The distilled guidance
   value goes to both models (when their config has ``guidance_embeds``).
4. ``decode``: unpack, VAE decode of ``latents / scaling + shift``, [-1, 1] -> uint8 (or float).

What a seed reproduces (§8.2): every prompt re-seeds with ``seed`` (or its own entry of a list of seeds), as the
official script re-seeds its torch generator per prompt, so the images of a prompt depend on (prompt, seed) only,
never on the other prompts of the batch, the batch size, or the hosts/devices it was sharded over (sharded
evaluation is reproducible). A prompt's JAX key gives the MAR orders of its ``num_images_per_prompt`` rows and their
FLUX noise, drawn in packed layout. The same seed therefore does NOT reproduce the official images: the official
loop draws its orders from numpy's unseeded global generator, and its FLUX noise from torch's generator in the
unpacked layout. To reproduce an official run, pass its ``orders`` and (packed) ``noise`` to ``generate``.

The latent grid sets the image size: CLIP grid (h, w) -> FLUX packed grid (2h, 2w) -> VAE latent (4h, 4w) -> pixels
(4h * f, 4w * f) with f the VAE downsampling (8 for FLUX: 16x16 -> 512x512).

With a ``mesh``, batches are sharded on the "batch" logical axis (rows padded up to a multiple of the batch shards);
the variables keep whatever sharding they were loaded with.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bifrost_jax.data.prompt import build_t2i_prompt, build_uncond_prompt
from bifrost_jax.data.qwen_image import patchify
from bifrost_jax.models.bifrost import BifrostMLLM, random_orders
from bifrost_jax.models.flux.controlnet import LatentControlNet
from bifrost_jax.models.flux.transformer import FluxTransformer2DModel
from bifrost_jax.models.flux.vae import AutoencoderKL, latent_image_ids, unpack_latents
from bifrost_jax.models.qwen.vision import QwenVisionTransformer
from bifrost_jax.parallel.rules import axis_rules, batch_shards, logical_to_mesh_spec
from bifrost_jax.sample.flow import euler_sample, flux_sigmas
from bifrost_jax.sample.images import fit_images
from bifrost_jax.sample.mar import mar_decode

Variables = Any
TextEncodeFn = Callable[[Sequence[str]], tuple[Any, Any]]


# ----------------------------------------------------------------------------------------------------------------
# jitted stages (modules are static: hashable frozen dataclasses)

@functools.partial(jax.jit, static_argnames=("model", "num_steps", "cfg_weight"))
def _mar_stage(model, variables, input_ids, attention_mask, uncond_input_ids, uncond_attention_mask, orders, *,
               num_steps: int, cfg_weight: float):
    """(P, K, N, C): ``mar_decode`` per prompt (vmapped), each prompt with its own (K, N) orders."""
    def one(ids, am, uids, uam, prompt_orders):
        return mar_decode(model, variables, ids, am, num_steps=num_steps, cfg_weight=cfg_weight,
                          uncond_input_ids=uids, uncond_attention_mask=uam, orders=prompt_orders)
    return jax.vmap(one)(input_ids, attention_mask, uncond_input_ids, uncond_attention_mask, orders)


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


@functools.partial(jax.jit, static_argnames=("vae", "latent_hw", "output_type"))
def _decode_stage(vae, vae_variables, packed, *, latent_hw, output_type):
    z = vae.config.diffusion_to_latents(unpack_latents(packed.astype(jnp.float32), *latent_hw))
    images = vae.apply(vae_variables, z, method=vae.decode)
    return to_uint8(images) if output_type == "uint8" else images.astype(jnp.float32)


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
    """Defaults of the released evaluation (docs/design.md §8): 256 MAR steps (one slot per step), no MLLM CFG, 28 FLUX steps,
    guidance 3.5, ControlNet scale 0.7, 4 images per prompt, seed 42."""
    num_images_per_prompt: int = 4
    seed: int = 42
    mar_steps: Optional[int] = None       # None: one slot per step (num_image_tokens)
    mllm_cfg: float = 1.0
    flux_steps: int = 28
    guidance: float = 3.5
    conditioning_scale: float = 0.7


@dataclasses.dataclass
class Generation:
    """What ``BifrostPipeline.generate(..., return_latents=True)`` returns (rows as the images)."""
    images: np.ndarray          # uint8 (B, H, W, 3), or float32 in [-1, 1] with output_type="float"
    clip_latents: np.ndarray    # float32 (B, N, C_clip): the MAR-decoded patch-level CLIP latents
    flux_latents: np.ndarray    # float32 (B, S_img, C): FLUX's packed latents after sampling, before the VAE


def _check_rows(x, rows: int, what: str, trailing: tuple | None = None):
    shape = tuple(np.shape(x))
    if not shape or shape[0] != rows or (trailing is not None and shape[1:] != tuple(trailing)):
        want = (rows,) + (tuple(trailing) if trailing is not None else ("...",))
        raise ValueError(f"generate: {what} of shape {shape}, expected {want} (prompts x images per prompt first)")
    return x


def _pad_rows(x, pad: int):
    x = jnp.asarray(x)
    return jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]) if pad else x


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
        self._check_condition_sources()

    def _check_condition_sources(self):
        """The MLLM and the vision tower make the CLIP latents the ControlNet expects."""
        cn = self.controlnet.config
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
        return batch_shards(self.mesh)

    def _put(self, x):
        """Shard the leading axis of ``x`` on "batch" (rows are padded to a multiple of the shards beforehand)."""
        if self.mesh is None or x is None:
            return x if x is None else jnp.asarray(x)
        from jax.sharding import NamedSharding
        spec = logical_to_mesh_spec(("batch",) + (None,) * (np.ndim(x) - 1))
        return jax.device_put(x, NamedSharding(self.mesh, spec))

    def _context(self):
        return axis_rules(self.mesh)

    # -- stages --------------------------------------------------------------------------------------------------
    def decode_latents(self, prompts: Sequence[str], keys=None, *, num_images_per_prompt: int,
                       mar_steps: Optional[int], mllm_cfg: float, orders=None):
        """(P, K, N, C) float32 CLIP latents by MAR decoding. The decoding orders come from ``keys`` (P, 2), one
        PRNG key per prompt drawing its K rows' orders (``models.bifrost.random_orders``), or are given as
        ``orders`` (P, K, N)."""
        if self.mllm is None or self.tokenizer is None:
            raise ValueError("generate needs the MLLM and its tokenizer")
        p, k = len(prompts), num_images_per_prompt
        ids, am = build_t2i_prompt(self.tokenizer, list(prompts), max_length=self.max_prompt_length)
        rep = lambda a: np.repeat(a[:, None], k, axis=1)  # noqa: E731  (P, K, T)
        uids = uam = None
        if float(mllm_cfg) != 1.0:  # the uncond prompt "" is neither built nor run without CFG
            u_ids, u_am = build_uncond_prompt(self.tokenizer, 1, max_length=self.max_prompt_length)
            uids, uam = np.broadcast_to(u_ids, (p, k, ids.shape[1])), np.broadcast_to(u_am, (p, k, ids.shape[1]))
        n_tok = self.mllm.config.num_image_tokens
        steps = n_tok if mar_steps is None else int(mar_steps)
        if orders is None:
            if keys is None:
                raise ValueError("decode_latents: give keys (to draw the orders) or orders")
            orders = jax.vmap(lambda key: random_orders(key, k, n_tok))(jnp.asarray(keys))
        orders = jnp.asarray(orders, jnp.int32)
        if orders.shape != (p, k, n_tok):
            raise ValueError(f"decode_latents: orders of shape {orders.shape}, expected (prompts, images per prompt, "
                             f"num_image_tokens) = {(p, k, n_tok)}")
        # no logical-axis rules here: under the vmap over prompts the model's "batch" constraints would name the
        # rows of ONE prompt; the prompt axis carries the input sharding instead
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            return _mar_stage(self.mllm, self.mllm_variables, self._put(rep(ids)), self._put(rep(am)),
                              self._put(uids), self._put(uam), self._put(orders), num_steps=steps,
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

    def decode(self, packed, *, output_type: str = "uint8"):
        """Images (B, H, W, 3) from packed FLUX latents: uint8 (``output_type="uint8"``, as diffusers' image
        processor rounds them) or the VAE's float32 output in [-1, 1] (``"float"``)."""
        if output_type not in ("uint8", "float"):
            raise ValueError(f"output_type={output_type!r}: use 'uint8' or 'float'")
        with self._context():
            return _decode_stage(self.vae, self.vae_variables, packed, latent_hw=self.latent_hw,
                                 output_type=output_type)

    def noise(self, keys, num_images: int):
        """(len(keys) * num_images, S_img, C) float32: the FLUX starting noise, ``num_images`` rows per key."""
        h, w = self.packed_grid
        shape = (num_images, h * w, self.transformer.config.in_channels)
        return jax.vmap(lambda key: jax.random.normal(key, shape, jnp.float32))(keys).reshape((-1,) + shape[1:])

    def encode_prompts(self, prompts: Sequence[str]):
        """FLUX's text conditioning of the raw prompts: (prompt_embeds (B, L, D), pooled (B, P)) float32."""
        embeds, pooled = self.encode_text(list(prompts))
        return jnp.asarray(embeds, jnp.float32), jnp.asarray(pooled, jnp.float32)

    # -- public API ----------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str] | str, *, num_images_per_prompt: Optional[int] = None,
                 seed: int | Sequence[int] | None = None, mar_steps: Optional[int] = None,
                 mllm_cfg: Optional[float] = None, flux_steps: Optional[int] = None, guidance: Optional[float] = None,
                 conditioning_scale: Optional[float] = None, orders=None, noise=None, output_type: str = "uint8",
                 return_latents: bool = False):
        """Images (P * K, H, W, 3), the K images of prompt p at rows p*K .. p*K+K-1: uint8, or float32 in [-1, 1]
        with ``output_type="float"``. Unset options come from ``self.options``.

        Randomness: ``seed`` (one for every prompt, the official re-seeding, or one per prompt) gives each prompt a
        key, split into its MAR key (the K rows' decoding orders) and its FLUX key (their starting noise). Either
        can be given instead: ``orders`` int (P * K, N) and ``noise`` float (P * K, S_img, C) in packed layout.
        ``return_latents=True`` returns a :class:`Generation` with the CLIP latents and FLUX latents too."""
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
        if orders is not None:
            orders = _pad_rows(_check_rows(orders, n * k, "orders"), pad * k).reshape(n + pad, k, -1)
        latents = self.decode_latents(prompts_p, mar_keys, num_images_per_prompt=k,
                                      mar_steps=o.mar_steps if mar_steps is None else mar_steps,
                                      mllm_cfg=o.mllm_cfg if mllm_cfg is None else mllm_cfg, orders=orders)
        latents = latents.reshape((-1,) + latents.shape[2:])
        embeds, pooled = self.encode_prompts(prompts_p)
        embeds, pooled = jnp.repeat(embeds, k, axis=0), jnp.repeat(pooled, k, axis=0)
        if noise is None:
            noise = self.noise(noise_keys, k)
        else:
            h, w = self.packed_grid
            noise = _check_rows(noise, n * k, "noise", (h * w, self.transformer.config.in_channels))
            noise = _pad_rows(jnp.asarray(noise, jnp.float32), pad * k)
        packed = self.sample_flux(latents, embeds, pooled, noise,
                                  flux_steps=o.flux_steps if flux_steps is None else flux_steps,
                                  guidance=o.guidance if guidance is None else guidance,
                                  conditioning_scale=(o.conditioning_scale if conditioning_scale is None
                                                      else conditioning_scale))
        images = np.asarray(jax.device_get(self.decode(packed, output_type=output_type)))[:n * k]
        if return_latents:
            return Generation(images=images, clip_latents=np.asarray(jax.device_get(latents))[:n * k],
                              flux_latents=np.asarray(jax.device_get(packed))[:n * k])
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
        embeds, pooled = self.encode_prompts(prompts)
        packed = self.sample_flux(latents, embeds, pooled, self.noise(keys, 1),
                                  flux_steps=o.flux_steps if flux_steps is None else flux_steps,
                                  guidance=o.guidance if guidance is None else guidance,
                                  conditioning_scale=(o.conditioning_scale if conditioning_scale is None
                                                      else conditioning_scale))
        return np.asarray(jax.device_get(self.decode(packed)))[:b]
