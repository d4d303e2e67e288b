"""A component's model config: the section's ``config``, completed and checked by its checkpoint's own config.json.

When a component's ``port_dir`` is a diffusers/transformers directory (or a ``bifrost port`` output, which records
its source's config.json), that config.json says the model's sizes (docs/design.md §12.2):

* a section whose ``config`` is EMPTY takes the checkpoint's (a config file then states no sizes at all: training
  from a Qwen2.5-VL-3B or another FLUX-family directory needs only its ``port_dir``);
* a field the section states and the checkpoint also has must agree: a disagreement is an error naming both
  values (never a silent resize, never a late shape error);
* fields the checkpoint does not have keep the section's value (our own additions, e.g. ``clip_grid``).

Without a checkpoint config the section's ``config`` is the model (it must not be empty).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from bifrost_jax.configs import config_dict
from bifrost_jax.models.qwen.decoder import QwenTextConfig
from bifrost_jax.port.base import read_json
from bifrost_jax.port.orbax_io import read_port_info
from bifrost_jax.port.unet import model_dir
from bifrost_jax.port.vae import vae_dir


def _plain(x: Any) -> Any:
    """JSON-comparable form: tuples as lists, nested mappings as dicts."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# component kind -> the ``bifrost port`` kinds whose recorded config.json describes it
PORT_KINDS = {"flux": ("flux-transformer",), "controlnet": ("latent-controlnet", "flux-controlnet"),
              "vae": ("flux-vae",), "t5": ("t5-encoder",), "clip": ("clip-text", "clip-text-projection"),
              "vision": ("qwen2.5-vl", "bifrost-1"), "qwen_text": ("qwen2.5-vl", "bifrost-1"), "unet": ("unet",),
              "unet_controlnet": ("latent-unet-controlnet",)}


def _source_config(port_dir: str, kind: str) -> tuple[Optional[dict], str]:
    """(the config.json dict of a port directory or of the source a ``bifrost port`` output came from, where).
    A ``bifrost port`` output of another kind is an error naming both kinds."""
    if os.path.isfile(os.path.join(port_dir, "port.json")):
        info = read_port_info(port_dir)
        if info.get("kind") not in PORT_KINDS[kind]:
            raise ValueError(f"{port_dir} is a {info.get('kind')!r} port; expected one of {PORT_KINDS[kind]}")
        return info.get("hf_config"), os.path.join(port_dir, "port.json")
    directory = vae_dir(port_dir) if kind == "vae" else model_dir(port_dir, None, "unet") if kind == "unet" else port_dir
    path = os.path.join(directory, "config.json")
    return (read_json(path), path) if os.path.isfile(path) else (None, path)


def checkpoint_model_config(kind: str, port_dir: str) -> tuple[Optional[dict], str]:
    """(the fields of component ``kind`` in ``port_dir``'s config.json, or None; the file). Kinds: ``flux``,
    ``vae``, ``t5``, ``clip``, ``vision`` (the ``vision_config`` of a Qwen2.5-VL directory), ``qwen_text`` (its
    language model as ``QwenTextConfig`` fields, from ``text_config`` or the top-level fields)."""
    hf, where = _source_config(port_dir, kind)
    if not hf:
        return None, where
    if kind == "clip":
        return hf.get("text_config", hf), where
    if kind == "vision":
        return hf.get("vision_config"), where
    if kind == "qwen_text":  # in QwenTextConfig's own field names (the section's), whatever the nesting
        if not (hf.get("text_config") or "hidden_size" in hf):
            return None, where
        return dataclasses.asdict(QwenTextConfig.from_hf_config({k: v for k, v in hf.items()
                                                                 if k != "vision_config"})), where
    return hf, where


def resolve_model_config(stated_config, *, key: str, kind: str, port_dir: str = "") -> dict:
    """The model config dict of a component: ``stated_config`` (the section's ``config``, at config key ``key``)
    merged with and checked against ``port_dir``'s config.json (see the module docstring)."""
    stated = _plain(config_dict(stated_config or {}))
    checkpoint, where = checkpoint_model_config(kind, port_dir) if port_dir else (None, "")
    if checkpoint is None:
        if not stated:
            raise ValueError(f"{key} is empty and there is no checkpoint config.json to take the model from "
                             f"({'port_dir ' + repr(port_dir) + ' has none' if port_dir else 'no port_dir'})")
        return stated
    checkpoint = _plain(checkpoint)
    wrong = [f"{key}.{k}={stated[k]!r} but {where} has {k}={checkpoint[k]!r}"
             for k in sorted(stated) if k in checkpoint and stated[k] != checkpoint[k]]
    if wrong:
        raise ValueError("the config disagrees with the checkpoint it loads (leave the config's model fields out "
                         "to take the checkpoint's):\n  " + "\n  ".join(wrong))
    return {**checkpoint, **stated}
