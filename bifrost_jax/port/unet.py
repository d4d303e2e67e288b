"""Stable Diffusion family UNet checkpoints (diffusers directories) <-> Flax variables.

Kinds (see ``bifrost_jax.port.load``/``save``):
- "unet": a diffusers ``UNet2DConditionModel`` directory (``config.json`` + ``diffusion_pytorch_model*.safetensors``,
  sharded or not), e.g. ``stable-diffusion-v1-5/unet`` or ``stable-diffusion-xl-base-1.0/unet``; a pipeline root with
  a ``unet/`` folder works too.

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

from bifrost_jax.models.unet.config import UNet2DConditionConfig
from bifrost_jax.models.unet.unet import UNet2DConditionModel
from bifrost_jax.port.base import (CONV2D, IDENTITY, LINEAR, KeyMap, PortError, SafetensorsReader, Source,
                                   abstract_params, export_mapped, flatten, load_mapped, mesh_shardings, read_json,
                                   save_directory)

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


def load_rule_mapped(module, path: str, what: str, *, dtype, mesh, collections=("params",), **init_kwargs):
    """``{"params": ...}`` of ``module`` from the diffusers directory ``path`` under the naming rule."""
    shapes, specs = abstract_params(module, collections=collections, **init_kwargs)
    shardings = mesh_shardings(specs, mesh)
    reader = SafetensorsReader(path, prefix=WEIGHTS_PREFIX)
    key_map = rule_key_map(shapes["params"], what)
    params = load_mapped(reader, key_map, shapes["params"], dtype=dtype,
                         shardings=shardings and shardings["params"], what=f"{what} {path}")
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


PORTS = {"unet": (load_unet, save_unet)}
