"""Porting PyTorch checkpoints (diffusers/transformers directories, the official Bifrost-1 layout) to Flax and
back.

    module, params = bifrost_jax.port.load("flux-transformer", "/ckpt/FLUX.1-dev/transformer", dtype=jnp.bfloat16,
                                           mesh=mesh)
    bifrost_jax.port.save("flux-transformer", module, params, "/tmp/exported")   # diffusers from_pretrained loads it

Every port raises ``PortError`` listing all missing, unused and wrong-shape keys; nothing initialises at random.
"""
from __future__ import annotations

import importlib
from typing import Any

import jax.numpy as jnp

from bifrost_jax.port.base import PortError  # noqa: F401  (re-exported)

# kind -> module that defines PORTS[kind] = (load_fn, save_fn)
_KIND_MODULES = {
    "flux-transformer": "bifrost_jax.port.flux",
    "flux-controlnet": "bifrost_jax.port.flux",
    "latent-controlnet": "bifrost_jax.port.flux",
    "flux-vae": "bifrost_jax.port.vae",
    "unet": "bifrost_jax.port.unet",  # SD 1.x / 2.x / SDXL UNet2DConditionModel
    "unet-controlnet": "bifrost_jax.port.unet",
    "latent-unet-controlnet": "bifrost_jax.port.unet",
    "t5-encoder": "bifrost_jax.port.text",
    "clip-text": "bifrost_jax.port.text",
    "clip-text-projection": "bifrost_jax.port.text",  # SDXL's text_encoder_2
    "qwen2.5-vl": "bifrost_jax.port.qwen",
    "bifrost-1": "bifrost_jax.port.bifrost",
    "inception-fid": "bifrost_jax.port.inception",  # pytorch-fid's Inception-v3 weights (a file, not a directory)
}

KINDS = tuple(_KIND_MODULES)


def _port(kind: str):
    if kind not in _KIND_MODULES:
        raise ValueError(f"unknown port kind {kind!r}; known kinds: {', '.join(KINDS)}")
    module = importlib.import_module(_KIND_MODULES[kind])
    return module.PORTS[kind]


def load(kind: str, path: str, *, dtype: Any = jnp.float32, mesh=None, **kwargs):
    """(module, params) from a local PyTorch checkpoint directory. ``dtype`` is the parameter dtype; with a
    ``mesh`` every tensor is placed straight into its sharding (full weights never sit on one device)."""
    load_fn, _ = _port(kind)
    return load_fn(path, dtype=dtype, mesh=mesh, **kwargs)


def save(kind: str, module, params, path: str, **kwargs) -> None:
    """Write a directory that diffusers/transformers ``from_pretrained`` loads (config.json + safetensors)."""
    _, save_fn = _port(kind)
    return save_fn(module, params, path, **kwargs)
