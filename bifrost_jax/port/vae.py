"""Ports for the FLUX VAE (diffusers ``AutoencoderKL`` directories) and the key map of Bifrost-1's latent
upsampler (``up_sampling_block.*`` inside the official latent ControlNet checkpoint).
"""
from __future__ import annotations

import os
import re

import jax.numpy as jnp

from bifrost_jax.models.flux.vae import AutoencoderKL, AutoencoderKLConfig
from bifrost_jax.port.base import (CONV2D, IDENTITY, LINEAR, KeyMap, PortError, SafetensorsReader, Transform,
                                   abstract_params, export_mapped, flatten, load_mapped, mesh_shardings, read_json,
                                   save_directory, src)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# Mid-block attention projections: current diffusers names (Linear) -> pre-0.14 names (``AttentionBlock``).
_OLD_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
# Some converted checkpoints stored them as 1x1 convs (C, C, 1, 1).
CONV1X1_AS_LINEAR = Transform("conv1x1 (out,in,1,1)->(in,out)", lambda a: a[:, :, 0, 0].T,
                              lambda a: a.T[:, :, None, None], lambda s: (s[1], s[0], 1, 1))


def _torch_name(flax_name: str) -> str:
    # Flax "down_blocks_0" / "resnets_1" / "to_out_0" are torch "down_blocks.0" / "resnets.1" / "to_out.0".
    return re.sub(r"_(\d+)$", r".\1", flax_name)


def vae_key_map(expected_params, available_shapes=None) -> KeyMap:
    """Map every Flax leaf of ``AutoencoderKL`` to its diffusers key: module names by the naming rule, "kernel"
    -> "weight" (conv OIHW -> HWIO, linear transposed), norm "scale" -> "weight".

    ``available_shapes`` (key -> shape of the checkpoint being loaded): where it has the old mid-block attention
    names (``query``/``key``/``value``/``proj_attn``) and not the new ones, map to those, as Linear (C, C) or 1x1
    conv (C, C, 1, 1) by the stored shape. Without it (export) the current names are used."""
    available_shapes = available_shapes or {}
    out: KeyMap = {}
    for path, leaf in flatten(expected_params).items():
        module = ".".join(_torch_name(p) for p in path[:-1])
        name = path[-1]
        if name == "kernel":
            transform = CONV2D if len(leaf.shape) == 4 else LINEAR
            key = f"{module}.weight"
        elif name == "scale":
            transform, key = IDENTITY, f"{module}.weight"
        elif name == "bias":
            transform, key = IDENTITY, f"{module}.bias"
        else:
            raise PortError(f"flux-vae port: no rule for Flax parameter {'/'.join(path)}")
        for new, old in _OLD_ATTENTION_NAMES.items():
            suffix = f".{new}.{key.rsplit('.', 1)[1]}"
            if ".attentions." in key and key.endswith(suffix) and key not in available_shapes:
                old_key = key[: -len(suffix)] + f".{old}.{key.rsplit('.', 1)[1]}"
                if old_key in available_shapes:
                    key = old_key
                    if name == "kernel" and len(available_shapes[old_key]) == 4:
                        transform = CONV1X1_AS_LINEAR
        out[path] = src(key, transform)
    return out


def vae_dir(path: str) -> str:
    # Accept the VAE folder itself or a pipeline root holding "vae/" (e.g. FLUX.1-dev).
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "vae")):
        return os.path.join(path, "vae")
    return path


def _abstract(module):
    f = module.config.downsample_factor
    x = jnp.zeros((1, 2 * f, 2 * f, module.config.in_channels), jnp.float32)
    return abstract_params(module, x)


def load_fn(path: str, *, dtype=jnp.float32, mesh=None, compute_dtype=None, **config_overrides):
    """(AutoencoderKL, {"params": ...}) from a diffusers ``AutoencoderKL`` directory (config.json +
    diffusion_pytorch_model*.safetensors), or a pipeline root with a ``vae/`` folder. ``dtype``: parameters;
    ``compute_dtype`` (default ``dtype``); ``config_overrides``: e.g. ``remat_policy="full"``."""
    path = vae_dir(path)
    config = AutoencoderKLConfig.from_hf_config(read_json(os.path.join(path, "config.json")), **config_overrides)
    module = AutoencoderKL(config, dtype=compute_dtype or dtype, param_dtype=dtype)
    shapes, specs = _abstract(module)
    reader = SafetensorsReader(path, prefix="diffusion_pytorch_model")
    key_map = vae_key_map(shapes["params"], {k: reader.shape(k) for k in reader.keys()})
    shardings = mesh_shardings(specs, mesh)
    params = load_mapped(reader, key_map, shapes["params"], dtype=dtype,
                         shardings=shardings and shardings["params"], what=f"flux-vae {path}")
    return module, {"params": params}


def save_fn(module, variables, path: str) -> None:
    """Write a directory that diffusers ``AutoencoderKL.from_pretrained`` loads (fp32 weights)."""
    params = variables["params"] if "params" in variables else variables
    key_map = vae_key_map(params)
    save_directory(path, module.config.to_hf_config(), export_mapped(params, key_map), WEIGHTS_NAME)


PORTS = {"flux-vae": (load_fn, save_fn)}


# ----------------------------------------------------------------------------------------------------------------
# Bifrost-1 latent upsampler (``NHWCUpsampleBlock``): used by the latent-ControlNet port

def upsampler_key_map(prefix: str = "up_sampling_block.", num_batches_tracked: bool = True
                      ) -> tuple[KeyMap, KeyMap]:
    """(params map, batch_stats map) for ``models.flux.upsampler.LatentUpsampler``; Flax paths are relative to the
    upsampler module (prefix them with ``port.base.prefixed``), PyTorch keys start with ``prefix``.

    The ConvTranspose2d weight keeps its PyTorch layout (in, out, 2, 2); the Conv2d weight is OIHW -> HWIO.
    Load the batch_stats map with ``dtype=jnp.float32`` (running statistics are accumulated in fp32).
    ``num_batches_tracked=False`` for checkpoints saved without it (torch's ``track_running_stats`` buffers always
    include it, so the default is True)."""
    params: KeyMap = {
        ("upconv", "kernel"): src(f"{prefix}upconv.weight", IDENTITY),
        ("upconv", "bias"): src(f"{prefix}upconv.bias"),
        ("conv", "kernel"): src(f"{prefix}conv.weight", CONV2D),
        ("conv", "bias"): src(f"{prefix}conv.bias"),
    }
    stats: KeyMap = {}
    for bn in ("bn1", "bn2"):
        params[(bn, "scale")] = src(f"{prefix}{bn}.weight")
        params[(bn, "bias")] = src(f"{prefix}{bn}.bias")
        stats[(bn, "mean")] = src(f"{prefix}{bn}.running_mean")
        stats[(bn, "var")] = src(f"{prefix}{bn}.running_var")
        if num_batches_tracked:
            stats[(bn, "num_batches_tracked")] = src(f"{prefix}{bn}.num_batches_tracked")
    return params, stats


def load_upsampler(reader, module, *, prefix: str = "up_sampling_block.", dtype=None, mesh=None,
                   ignore_unused=None):
    """``{"params", "batch_stats"}`` for ``module`` (a ``LatentUpsampler``) from ``reader`` (a
    ``SafetensorsReader`` or a dict of numpy arrays, e.g. a torch state dict converted to numpy).

    Keys outside ``prefix`` are ignored (the upsampler is one part of the ControlNet checkpoint); inside it, every
    missing, unexpected or wrong-shape key raises ``PortError``. Running statistics load in float32."""
    dtype = jnp.float32 if dtype is None else dtype
    x = jnp.zeros((1, module.grid[0] * module.grid[1], module.channels), module.dtype)
    shapes, specs = abstract_params(module, x, collections=("params", "batch_stats"))
    shardings = mesh_shardings(specs, mesh)
    params_map, stats_map = upsampler_key_map(prefix)
    keys = reader.keys() if hasattr(reader, "keys") else []
    has_count = any(k.endswith("num_batches_tracked") and k.startswith(prefix) for k in keys)
    if not has_count:
        params_map, stats_map = upsampler_key_map(prefix, num_batches_tracked=False)
    params_keys = {k for s in params_map.values() for k in s.keys}
    stats_keys = {k for s in stats_map.values() for k in s.keys}

    def outside(k, other_keys):
        return not k.startswith(prefix) or k in other_keys or (ignore_unused is not None and ignore_unused(k))

    params = load_mapped(reader, params_map, shapes["params"], dtype=dtype,
                         shardings=shardings and shardings["params"], what=f"upsampler params ({prefix}*)",
                         ignore_unused=lambda k: outside(k, stats_keys))
    stats_shapes = shapes["batch_stats"]
    if not has_count:  # keep the counter in the tree (at 0) so the module's variables are complete
        stats_shapes = {bn: {n: v for n, v in d.items() if n != "num_batches_tracked"}
                        for bn, d in stats_shapes.items()}
    stats = load_mapped(reader, stats_map, stats_shapes, dtype=jnp.float32,
                        shardings=None, what=f"upsampler running statistics ({prefix}*)",
                        ignore_unused=lambda k: outside(k, params_keys))
    for bn in stats:
        count = stats[bn].get("num_batches_tracked")
        stats[bn]["num_batches_tracked"] = (jnp.zeros((), jnp.int32) if count is None
                                            else jnp.asarray(count, jnp.int32))
    return {"params": params, "batch_stats": stats}
