"""A precomputed CLIP-latent cache: the frozen vision tower's patch-level latents of every source element.

The ``controlnet`` and ``mllm`` phases compute their conditioning / targets from the frozen Qwen2.5-VL vision
tower on the fly (``components.clip_latents_from_pixels`` of the ViT view of the crop). With centre crops that
is the same tensor every epoch, so it can be computed once:

    bifrost cache-latents --config configs/controlnet.py --out data/clip_latents.npy [--config.key=value ...]
    bifrost train --config configs/controlnet.py --workdir W \\
        --config.data.precomputed_clip_latents=data/clip_latents.npy

``build_clip_cache`` runs exactly what the phase would run: the phase built from the same config (with the cache
switched off), its vision tower with the weights the phase would load (``vision.port_dir`` / ``init_from``, the
mllm phase's default of ``mllm.port_dir``, or the fixed-key random init), the phase's own preprocessing (ViT view of
the centre crop, ``make_image_preprocess``) and ``clip_latents_from_pixels``, jitted, data-parallel over this host's
devices, in fixed-size batches (the last one padded). Random crops cannot use a cache (one latent per image):
``data.random_crop=True`` is an error.

Output: ``FILE`` (``.npy``, shape (source_len, N, D), row i = source element i; rows of corrupt elements, which
training skips anyway, are zero) written atomically (``FILE.partial.npy``, then renamed), and the sidecar
``FILE.json`` recording what it was built from (``cache_fields``: vision weights source and config, ViT
resolution, crop, source and its length, N, D). The phases check the sidecar on load (``check_cache``) and fail
naming the field that differs; a cache without a sidecar is only checked for its shape (with a warning).

Multi-host: every process runs the command (``BIFROST_COORDINATOR`` / ``BIFROST_DISTRIBUTED`` as for
``bifrost train``). Process 0 creates the output file; each process computes the rows of its slice of every
global batch (``make_eval_iterator``) on its OWN devices (no cross-host collectives; the vision tower is
replicated per device) and writes them into the file in place; after a barrier process 0 renames it and writes
the sidecar. ``FILE`` must therefore be on a file system all hosts share (as the workdir already is).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence


from bifrost_jax.configs import config_dict
from bifrost_jax.checkpoint import resolve_step_dir

log = logging.getLogger(__name__)

FORMAT = 1
# The sidecar fields a phase compares with its own setup (an error names the first-level field, or field.sub).
CHECKED_FIELDS = ("format", "source", "source_len", "vit_resolution", "crop", "num_tokens", "clip_dim",
                  "vision_weights", "vision_config")
DTYPES = ("float32", "float16")


def sidecar_path(path: str) -> str:
    return f"{path}.json"


def _jsonable(x):
    return json.loads(json.dumps(x))


def vision_weights_source(comp) -> dict:
    """Where the vision tower's weights come from (what ``components.load_component`` would load)."""
    s = comp.section
    if s.get("init_from", ""):
        step = int(s.get("init_step", -1))
        try:
            where = str(resolve_step_dir(s.init_from, step))
        except FileNotFoundError:
            where = f"{os.path.abspath(s.init_from)} (step {step}, not found)"
        return {"init_from": os.path.abspath(where) if os.path.exists(where) else where}
    if s.get("port_dir", ""):
        return {"port_dir": os.path.abspath(s.port_dir)}
    return {"random_init": "fixed key of 'vision'"}


def source_fields(data) -> dict:
    """The identity of the data source (``config.data``); ``data_dir`` is recorded but not compared."""
    out: dict[str, Any] = {"kind": data.source}
    if data.source == "shapes":
        out.update(image_resolution=int(data.image_resolution), train_size=int(data.train_size),
                   shapes_seed=int(data.shapes_seed))
        for k in ("shapes_layout", "shapes_jitter"):  # generation options, where the config has them
            if k in data:
                out[k] = data[k]
    elif data.source == "captions":
        out["captions_source"] = os.path.abspath(data.captions_source) if data.captions_source else ""
    return out


def cache_fields(config, vision_comp, source_len: int) -> dict:
    """What a cache for ``config`` must have been built from (the checked sidecar fields)."""
    vcfg = vision_comp.module.config
    r = int(config.vision.resolution)
    side = r // (vcfg.patch_size * vcfg.spatial_merge_size)
    return _jsonable({
        "format": FORMAT,
        "source": source_fields(config.data),
        "source_len": int(source_len),
        "vit_resolution": r,
        "crop": "centre",
        "num_tokens": side * side,
        "clip_dim": int(vcfg.out_hidden_size),
        "vision_weights": vision_weights_source(vision_comp),
        "vision_config": config_dict(vision_comp.section.config),
    })


def _differences(built, now, name: str) -> list[str]:
    if isinstance(built, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(built) | set(now)):
            out += _differences(built.get(k, "<absent>"), now.get(k, "<absent>"), f"{name}.{k}")
        return out
    return [] if built == now else [f"{name}: cache built with {built!r}, this run has {now!r}"]


def check_cache(path: str, shape: Sequence[int], expected: dict) -> dict | None:
    """Compare the sidecar of the cache at ``path`` (array ``shape``) with ``expected`` (``cache_fields``).
    Raises ``ValueError`` naming the file and every differing field; returns the sidecar (None without one)."""
    side = sidecar_path(path)
    where = f"config.data.precomputed_clip_latents={path}"
    if not os.path.isfile(side):
        log.warning("%s has no sidecar %s: only its shape is checked (build caches with `bifrost cache-latents`)",
                    where, side)
        return None
    with open(side) as fh:
        info = json.load(fh)
    problems = []
    if list(info.get("shape", [])) != list(shape):
        problems.append(f"shape: sidecar says {info.get('shape')}, the file is {list(shape)} (file replaced?)")
    for field in CHECKED_FIELDS:
        problems += _differences(info.get(field, "<absent>"), expected.get(field, "<absent>"), field)
    if problems:
        raise ValueError(f"{where} does not match this run (sidecar {side}):\n  " + "\n  ".join(problems)
                         + "\nrebuild it with `bifrost cache-latents` for this config")
    return info
