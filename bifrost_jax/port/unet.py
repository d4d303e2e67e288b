"""Stable Diffusion family UNet checkpoints (diffusers directories) <-> Flax variables.

Kinds (see ``bifrost_jax.port.load``/``save``):
- "unet": a diffusers ``UNet2DConditionModel`` directory (``config.json`` + ``diffusion_pytorch_model*.safetensors``,
  sharded or not), e.g. ``stable-diffusion-v1-5/unet`` or ``stable-diffusion-xl-base-1.0/unet``; a pipeline root with
  a ``unet/`` folder works too.
- "unet-controlnet": a diffusers ``ControlNetModel`` directory (the SD/SDXL ControlNet).
- "latent-unet-controlnet": Bifrost-1's latent ControlNet for a UNet: ``ControlNetModel`` keys whose
  ``controlnet_cond_embedding`` is the latent one, plus ``up_sampling_block.{upconv,bn1,conv,bn2}.*`` (the FLUX
  latent ControlNet's upsampler layout, running statistics included), and a config.json with ``clip_latent_dim`` and
  ``clip_grid``. ``diffusers`` cannot load this kind (its conditioning embedding differs); it round-trips here.

The Flax modules carry diffusers' names, so the key map is a rule applied to every expected Flax leaf: ``name_{i}``
of a diffusers ModuleList is ``name.{i}``, "kernel" is "weight" (conv OIHW <-> HWIO, Linear transposed), norm
"scale" is "weight". A scanned ``transformer_blocks`` maps to the per-layer keys ``transformer_blocks.{i}`` stacked.
Load options: ``dtype`` (parameter dtype), ``compute_dtype`` (defaults to ``dtype``), ``scan_layers``,
``remat_policy``, ``attention_impl``, ``mesh``, ``subfolder``.
"""
from __future__ import annotations

import os
import re
from typing import Optional

import jax.numpy as jnp
import numpy as np

from bifrost_jax.models.flux.upsampler import LatentUpsampler
from bifrost_jax.models.unet.config import UNet2DConditionConfig
from bifrost_jax.models.unet.controlnet import (LatentUNetControlNet, UNetControlNetConfig, UNetControlNetModel,
                                                controlnet_module)
from bifrost_jax.models.unet.unet import UNet2DConditionModel
from bifrost_jax.port.base import (CONV2D, IDENTITY, LINEAR, KeyMap, PortError, SafetensorsReader, Source,
                                   abstract_params, export_mapped, flatten, load_mapped, mesh_shardings, read_json,
                                   save_directory, write_json, write_safetensors)
from bifrost_jax.port.vae import load_upsampler, upsampler_key_map

WEIGHTS_PREFIX = "diffusion_pytorch_model"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# diffusers ModuleLists in the UNet family: Flax "name_{i}" <-> torch "name.{i}"
_MODULE_LISTS = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
                 "transformer_blocks", "to_out", "net", "controlnet_down_blocks", "blocks")
_LIST_ITEM = re.compile(r"^(" + "|".join(_MODULE_LISTS) + r")_(\d+)$")
SCANNED = "transformer_blocks"  # the one scanned module (stacked layers) of the family


def _torch_module(part: str) -> str:
    m = _LIST_ITEM.match(part)
    return f"{m.group(1)}.{m.group(2)}" if m else part


def rule_key_map(expected_params, what: str, prefix: str = "") -> KeyMap:
    """Map every Flax leaf of ``expected_params`` (shapes) to its diffusers key by the naming rule (see the module
    docstring). ``prefix`` is prepended to every PyTorch key."""
    out: KeyMap = {}
    for path, leaf in flatten(expected_params).items():
        *modules, name = path
        shape = tuple(leaf.shape)
        stacked = SCANNED in modules
        per_layer_ndim = len(shape) - 1 if stacked else len(shape)
        if name == "kernel":
            transform, suffix = (CONV2D if per_layer_ndim == 4 else LINEAR), "weight"
        elif name in ("scale", "embedding"):
            transform, suffix = IDENTITY, "weight"
        elif name == "bias":
            transform, suffix = IDENTITY, "bias"
        else:
            raise PortError(f"{what} port: no rule for Flax parameter {'/'.join(path)}")
        parts = [_torch_module(p) for p in modules]
        if stacked:
            i = modules.index(SCANNED)
            keys = tuple(prefix + ".".join(parts[:i] + [f"{SCANNED}.{j}"] + parts[i + 1:] + [suffix])
                         for j in range(shape[0]))
            out[path] = Source(keys, transform, True)
        else:
            out[path] = Source((prefix + ".".join(parts + [suffix]),), transform, False)
    return out


def model_dir(path: str, subfolder: Optional[str], default_subfolder: str) -> str:
    """``path/subfolder``, or ``path/default_subfolder`` for a pipeline root without a config.json."""
    if subfolder:
        return os.path.join(path, subfolder)
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, default_subfolder)):
        return os.path.join(path, default_subfolder)
    return path


def module_options(dtype, compute_dtype, scan_layers, remat_policy, attention_impl) -> dict:
    # the compute dtype defaults to the parameter dtype: a float32 load computes in float32
    return dict(dtype=compute_dtype or dtype, param_dtype=dtype, scan_layers=scan_layers, remat_policy=remat_policy,
                attention_impl=attention_impl)


def load_rule_mapped(module, path: str, what: str, *, dtype, mesh, reader=None, skip=(), ignore_unused=None,
                     **init_kwargs):
    """``{"params": ...}`` of ``module`` from the diffusers directory ``path`` under the naming rule; top-level
    params named in ``skip`` are left out (loaded by their own port)."""
    collections = ("params", "batch_stats") if skip else ("params",)
    shapes, specs = abstract_params(module, collections=collections, **init_kwargs)
    shardings = mesh_shardings(specs, mesh)
    reader = reader or SafetensorsReader(path, prefix=WEIGHTS_PREFIX)
    expected = {k: v for k, v in shapes["params"].items() if k not in skip}
    key_map = rule_key_map(expected, what)
    params = load_mapped(reader, key_map, expected, dtype=dtype, what=f"{what} {path}", ignore_unused=ignore_unused,
                         shardings=shardings and {k: v for k, v in shardings["params"].items() if k not in skip})
    return {"params": params}


def load_unet(path: str, *, dtype=jnp.float32, mesh=None, compute_dtype=None, scan_layers: bool = False,
              remat_policy: str = "none", attention_impl: Optional[str] = None, subfolder: Optional[str] = None):
    """(UNet2DConditionModel, {"params": ...}) from a diffusers UNet directory."""
    path = model_dir(path, subfolder, "unet")
    config = UNet2DConditionConfig.from_hf_config(read_json(os.path.join(path, "config.json")))
    module = UNet2DConditionModel(config, **module_options(dtype, compute_dtype, scan_layers, remat_policy,
                                                           attention_impl))
    return module, load_rule_mapped(module, path, "unet", dtype=dtype, mesh=mesh, **module.dummy_inputs())


def save_unet(module: UNet2DConditionModel, variables, path: str) -> None:
    """A directory ``UNet2DConditionModel.from_pretrained`` loads (float32 weights)."""
    params = variables["params"]
    save_directory(path, module.config.to_hf_config(), export_mapped(params, rule_key_map(params, "unet")),
                   WEIGHTS_NAME)


# ----------------------------------------------------------------------------------------------------------------
# ControlNets

UPSAMPLER = "up_sampling_block"


def load_unet_controlnet(path: str, *, dtype=jnp.float32, mesh=None, compute_dtype=None, scan_layers: bool = False,
                         remat_policy: str = "none", attention_impl: Optional[str] = None,
                         subfolder: Optional[str] = None):
    """(UNetControlNetModel, {"params": ...}) from a diffusers ``ControlNetModel`` directory."""
    path = model_dir(path, subfolder, "controlnet")
    config = UNetControlNetConfig.from_hf_config(read_json(os.path.join(path, "config.json")))
    if config.is_latent:
        raise PortError(f"{path}: config has clip_latent_dim/clip_grid: load it as kind 'latent-unet-controlnet'")
    module = UNetControlNetModel(config, **module_options(dtype, compute_dtype, scan_layers, remat_policy,
                                                          attention_impl))
    return module, load_rule_mapped(module, path, "unet-controlnet", dtype=dtype, mesh=mesh, **module.dummy_inputs())


def save_unet_controlnet(module: UNetControlNetModel, variables, path: str) -> None:
    """A directory ``ControlNetModel.from_pretrained`` loads (float32 weights)."""
    params = variables["params"]
    save_directory(path, module.config.to_hf_config(),
                   export_mapped(params, rule_key_map(params, "unet-controlnet")), WEIGHTS_NAME)


def load_latent_unet_controlnet(path: str, *, dtype=jnp.float32, mesh=None, compute_dtype=None,
                                scan_layers: bool = False, remat_policy: str = "none",
                                attention_impl: Optional[str] = None, subfolder: Optional[str] = None,
                                clip_grid: Optional[tuple[int, int]] = None):
    """(LatentUNetControlNet, {"params", "batch_stats"}) from a directory written by ``save_latent_unet_controlnet``.
    ``clip_grid`` overrides the config's (h, w) (the weights do not depend on it, the latent size does)."""
    path = model_dir(path, subfolder, "controlnet")
    hf = read_json(os.path.join(path, "config.json"))
    config = UNetControlNetConfig.from_hf_config(hf, clip_grid=tuple(clip_grid) if clip_grid else None)
    if not config.is_latent:
        raise PortError(f"{path}: config has no clip_latent_dim/clip_grid: a stock ControlNet is kind "
                        "'unet-controlnet'")
    module = controlnet_module(config, **module_options(dtype, compute_dtype, scan_layers, remat_policy,
                                                        attention_impl))
    reader = SafetensorsReader(path, prefix=WEIGHTS_PREFIX)
    variables = load_rule_mapped(module, path, "latent-unet-controlnet", dtype=dtype, mesh=mesh, reader=reader,
                                 skip=(UPSAMPLER,), ignore_unused=lambda k: k.startswith(UPSAMPLER + "."),
                                 **module.dummy_inputs())
    up = load_upsampler(reader, module_upsampler(module), prefix=UPSAMPLER + ".", dtype=dtype, mesh=mesh)
    variables["params"][UPSAMPLER] = up["params"]
    return module, {"params": variables["params"], "batch_stats": {UPSAMPLER: up["batch_stats"]}}


def module_upsampler(module: LatentUNetControlNet) -> LatentUpsampler:
    """A standalone copy of the ControlNet's ``up_sampling_block`` (same fields), for its own port."""
    cfg = module.config
    return LatentUpsampler(cfg.clip_latent_dim, cfg.clip_grid, dtype=module.dtype, param_dtype=module.param_dtype)


def save_latent_unet_controlnet(module: LatentUNetControlNet, variables, path: str) -> None:
    """``ControlNetModel`` keys (latent conditioning embedding) + ``up_sampling_block.*`` and a config.json with
    ``clip_latent_dim``/``clip_grid``; ``load_latent_unet_controlnet`` reads it back."""
    params = {k: v for k, v in variables["params"].items() if k != UPSAMPLER}
    state = export_mapped(params, rule_key_map(params, "latent-unet-controlnet"))
    up_params, up_stats = upsampler_key_map(UPSAMPLER + ".")
    state.update(export_mapped(variables["params"][UPSAMPLER], up_params))
    state.update(export_mapped(variables["batch_stats"][UPSAMPLER], up_stats))
    # torch keeps BatchNorm's counter as an int64 scalar; everything else is written as float32
    tensors = {k: np.asarray(v).astype(np.int64 if k.endswith("num_batches_tracked") else np.float32)
               for k, v in state.items()}
    os.makedirs(path, exist_ok=True)
    write_safetensors(os.path.join(path, WEIGHTS_NAME), tensors)
    write_json(os.path.join(path, "config.json"), module.config.to_hf_config())


PORTS = {
    "unet": (load_unet, save_unet),
    "unet-controlnet": (load_unet_controlnet, save_unet_controlnet),
    "latent-unet-controlnet": (load_latent_unet_controlnet, save_latent_unet_controlnet),
}
