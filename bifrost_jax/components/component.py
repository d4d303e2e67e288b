"""A component: one model of a phase or pipeline, its config section, dummy init inputs and weight sources.

Each component kind (FLUX transformer, VAE, T5, CLIP, Qwen vision tower; the latent ControlNet and the Bifrost
MLLM are built by their phases from these) is built from ONE config section of the same shape everywhere:
``config`` (the model's HF-style config dict), ``dtype`` / ``param_dtype``, optional ``scan_layers`` /
``remat_policy``, and the weight source: ``port_dir`` (a diffusers/transformers directory or a ``bifrost port``
Orbax directory) and/or ``init_from`` (another phase's checkpoint); neither means a random init. Weights are
loaded by :func:`bifrost_jax.components.loading.load_component`.

FROZEN components are randomly initialised from a fixed key derived from their name (not from ``config.seed``),
so every phase that builds a random frozen T5 / CLIP / vision tower / VAE gets the same one.
"""
from __future__ import annotations

import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from bifrost_jax.components.model_config import resolve_model_config
from bifrost_jax.components.trees import dtype_of
from bifrost_jax.data.qwen_image import patchify
from bifrost_jax.models.flux.transformer import FluxConfig, FluxTransformer2DModel
from bifrost_jax.models.flux.vae import AutoencoderKL, AutoencoderKLConfig
from bifrost_jax.models.qwen.vision import QwenVisionConfig, QwenVisionTransformer
from bifrost_jax.models.text.clip import CLIPTextConfig, CLIPTextModel
from bifrost_jax.models.text.t5 import T5EncoderConfig, T5EncoderModel


def fixed_key(name: str) -> jax.Array:
    """The init key of a FROZEN component: a function of its name only (see the module docstring)."""
    return jax.random.fold_in(jax.random.PRNGKey(0), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def component_key(rng, name: str) -> jax.Array:
    return jax.random.fold_in(rng, zlib.crc32(name.encode()) & 0x7FFFFFFF)



class Component:
    """One model of a phase: its module, dummy init inputs and where its pretrained weights come from."""

    def __init__(self, name: str, module: nn.Module, init_args: tuple, init_kwargs: dict, section,
                 port_kinds: tuple[str, ...] = (), trainable: bool = False):
        self.name, self.module, self.init_args, self.init_kwargs = name, module, init_args, init_kwargs
        self.section, self.port_kinds, self.trainable = section, port_kinds, trainable

    def init(self, rng):
        key = component_key(rng, self.name) if self.trainable else fixed_key(self.name)
        return self.module.init(key, *self.init_args, **self.init_kwargs)

    @property
    def port_dir(self) -> str:
        return self.section.get("port_dir", "") or ""

    @property
    def init_from(self) -> str:
        return self.section.get("init_from", "") or ""

    @property
    def has_source(self) -> bool:
        return bool(self.port_dir or self.init_from)


def module_kwargs(section) -> dict:
    kw = dict(dtype=dtype_of(section.dtype), param_dtype=dtype_of(section.param_dtype))
    for k in ("scan_layers", "remat_policy"):
        if k in section:
            kw[k] = section[k]
    return kw


def section_model_config(section, name: str, kind: str) -> dict:
    """The model config of the component in ``config.<name>`` (its checkpoint's config.json completes and checks it:
    ``components/model_config.py``)."""
    return resolve_model_config(section.config, key=f"config.{name}.config", kind=kind,
                                port_dir=section.get("port_dir", "") or "")


def flux_component(section, trainable: bool) -> Component:
    cfg = FluxConfig.from_hf_config(section_model_config(section, "flux", "flux"))
    module = FluxTransformer2DModel(cfg, **module_kwargs(section))
    return Component("transformer", module, (), module.dummy_inputs(), section, ("flux-transformer",), trainable)


def vae_component(section, trainable: bool) -> Component:
    cfg = AutoencoderKLConfig.from_hf_config(section_model_config(section, "vae", "vae"),
                                             remat_policy=section.remat_policy)
    module = AutoencoderKL(cfg, dtype=dtype_of(section.dtype), param_dtype=dtype_of(section.param_dtype))
    f = cfg.downsample_factor
    # an EMPTY batch: the parameters are the same, and XLA compiles the init's forward convolutions much faster
    x = jnp.zeros((0, 2 * f, 2 * f, cfg.in_channels), jnp.float32)
    return Component("vae", module, (x,), {}, section, ("flux-vae",), trainable)


def t5_component(section) -> Component:
    module = T5EncoderModel(T5EncoderConfig.from_hf_config(section_model_config(section, "t5", "t5")),
                            **module_kwargs(section))
    return Component("t5", module, (jnp.zeros((1, 2), jnp.int32),), {}, section, ("t5-encoder",))


def clip_component(section) -> Component:
    module = CLIPTextModel(CLIPTextConfig.from_hf_config(section_model_config(section, "clip", "clip")),
                           **module_kwargs(section))
    return Component("clip", module, (jnp.zeros((1, 2), jnp.int32),), {}, section, ("clip-text",))


def vision_component(section) -> Component:
    cfg = QwenVisionConfig.from_hf_config(section_model_config(section, "vision", "vision"))
    module = QwenVisionTransformer(cfg, **module_kwargs(section))
    m = cfg.spatial_merge_size
    x = jnp.zeros((1, m * m, cfg.patch_dim), jnp.float32)
    return Component("vision", module, (x, (1, m, m)), {}, section, ("qwen2.5-vl",))


def vision_grid(cfg: QwenVisionConfig, resolution: int) -> tuple[int, int, int]:
    """(t, h, w) patch grid of the square ViT view of side ``config.vision.resolution``."""
    r = int(resolution)
    unit = cfg.patch_size * cfg.spatial_merge_size
    if r % unit:
        raise ValueError(f"config.vision.resolution={r} must be a multiple of patch_size*spatial_merge_size={unit}")
    return (1, r // cfg.patch_size, r // cfg.patch_size)


def clip_latents_from_pixels(vision: nn.Module, vision_params, vit_pixels, grid_thw):
    """uint8 (B, R, R, 3) ViT views -> (B, (R/28)^2, C) patch-level CLIP latents of the frozen vision tower."""

    cfg = vision.config
    pixels = patchify(jnp.asarray(vit_pixels).astype(jnp.float32), value_range=(0.0, 255.0),
                      patch_size=cfg.patch_size, temporal_patch_size=cfg.temporal_patch_size,
                      merge_size=cfg.spatial_merge_size)
    out = vision.apply({"params": vision_params}, pixels, grid_thw)
    return jax.lax.stop_gradient(out.astype(jnp.float32))

