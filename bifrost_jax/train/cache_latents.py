"""``bifrost cache-latents``: precompute a phase's CLIP latents with its own frozen vision tower.

The cache's format, its sidecar and the checks a phase runs on load are in ``bifrost_jax/data/latent_cache.py``
(whose docstring explains the command). This module builds it: the phase built from the same config (with the
cache switched off), its vision tower with the weights the phase would load, the phase's own preprocessing and
``clip_latents_from_pixels``, jitted, data-parallel over this host's devices.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from bifrost_jax.components import clip_latents_from_pixels, load_component
from bifrost_jax.configs import parse_config_flags
from bifrost_jax.data.latent_cache import DTYPES, cache_fields, sidecar_path
from bifrost_jax.data.latent_cache import __doc__ as CACHE_DOC
from bifrost_jax.data.pipeline import INDEX_KEY, VALID_KEY, make_eval_iterator
from bifrost_jax.data.sources import image_source, make_image_preprocess
from bifrost_jax.parallel.mesh import make_mesh
from bifrost_jax.parallel.rules import axis_rules, tree_shardings
from bifrost_jax.parallel.mesh import maybe_initialize_distributed
from bifrost_jax.train.registry import get_phase


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def component_params(comp, mesh):
    """A phase's frozen component's params (the weights the phase would load, or its fixed-key init), replicated
    over ``mesh`` (this host's devices); returns ``(params, shardings)``."""

    with axis_rules(mesh):
        boxed = jax.eval_shape(comp.init, jax.random.PRNGKey(0))
    shardings = tree_shardings(nn.get_partition_spec(boxed), mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.meta.unbox(boxed),
                            shardings)
    if comp.has_source:
        got = load_component(comp, {"params": {comp.name: abstract["params"]}},
                             {"params": {comp.name: shardings["params"]}})
        return got["params"][comp.name], shardings["params"]
    # the fixed-key init every phase uses for a vision tower without weights (Component.init ignores the key)
    init = jax.jit(lambda: nn.meta.unbox(comp.init(None))["params"], out_shardings=shardings["params"])
    with axis_rules(mesh):
        return init(), shardings["params"]


def build_clip_cache(config, out: str, *, batch_size: int = 0, dtype: str = "float32", log_every: int = 20,
                     devices=None) -> dict:
    """Write the CLIP-latent cache of ``config``'s phase and data source to ``out`` (+ ``out.json``); returns the
    sidecar dict. ``batch_size``: global batch (default ``train.batch_size``); each process's share must divide
    over its devices. ``dtype``: float32 (exact) or float16 (half the disk)."""


    if dtype not in DTYPES:
        raise ValueError(f"cache dtype {dtype!r}: use one of {DTYPES}")
    if config.data.random_crop:
        raise ValueError("config.data.random_crop=True: random crops cannot use a CLIP-latent cache (it holds one "
                         "latent per image, of its centre crop); set --config.data.random_crop=False")
    cfg = config.copy_and_resolve_references()
    cfg.data.precomputed_clip_latents = ""  # the phase as it runs on the fly
    phase = get_phase(cfg)
    if getattr(phase, "vision", None) is None or not hasattr(phase, "grid_thw"):
        raise ValueError(f"phase {phase.name!r} has no frozen vision tower: nothing to cache")
    source = image_source(cfg.data)
    n = len(source)
    fields = cache_fields(cfg, phase.vision, n)
    rows, dim = fields["num_tokens"], fields["clip_dim"]

    pi, pc = jax.process_index(), jax.process_count()
    devices = list(devices if devices is not None else jax.local_devices())
    mesh = make_mesh({"data": len(devices), "fsdp": 1, "tensor": 1}, devices=devices)
    gb = int(batch_size or cfg.train.batch_size)
    if gb <= 0 or gb % pc or (gb // pc) % len(devices):
        raise ValueError(f"cache-latents batch size {gb}: each of the {pc} processes takes batch/{pc} rows, which "
                         f"must divide over its {len(devices)} devices (set --batch-size)")
    params, param_shardings = component_params(phase.vision, mesh)
    r = int(cfg.vision.resolution)
    pix_sharding = NamedSharding(mesh, PartitionSpec("data"))
    vision, grid = phase.vision.module, phase.grid_thw
    run = jax.jit(lambda p, x: clip_latents_from_pixels(vision, p, x, grid),
                  in_shardings=(param_shardings, pix_sharding), out_shardings=pix_sharding)

    d = cfg.data
    it = make_eval_iterator(source, gb, process_index=pi, process_count=pc,
                            preprocess_fn=make_image_preprocess(vit_resolution=r), worker_count=d.worker_count,
                            num_threads=d.num_threads, prefetch_buffer_size=d.prefetch_buffer_size)

    out = os.path.abspath(out)
    tmp = out + ".partial.npy"
    if pi == 0:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(n, rows, dim))
        del mm  # zero-filled (corrupt elements keep zero rows)
    _barrier("cache-latents:created")
    mm = np.lib.format.open_memmap(tmp, mode="r+")
    corrupt, done, t0 = 0, 0, time.time()
    with axis_rules(mesh):
        for b, batch in enumerate(it):
            pixels = jax.device_put(np.asarray(batch["vit_pixels"], np.uint8), pix_sharding)
            latents = np.asarray(jax.device_get(run(params, pixels)))
            idx, valid = np.asarray(batch[INDEX_KEY]), np.asarray(batch[VALID_KEY], bool)
            if valid.any():
                mm[idx[valid]] = latents[valid].astype(dtype)
            corrupt += int(np.sum(~valid & (idx >= 0)))
            done += int(np.sum(idx >= 0))
            if pi == 0 and log_every and (b + 1) % log_every == 0:
                print(f"cache-latents: {done * pc}/{n} images, {done / max(time.time() - t0, 1e-9):.1f} img/s "
                      "on this host", flush=True)
    mm.flush()
    del mm
    if pc > 1:
        corrupt = int(np.sum(multihost_utils.process_allgather(np.asarray(corrupt))))
    _barrier("cache-latents:written")
    info = dict(fields, shape=[n, rows, dim], dtype=dtype, phase=phase.name,
                data_dir=os.path.abspath(d.data_dir), corrupt_elements=corrupt,
                built=time.strftime("%Y-%m-%d %H:%M:%S"), vision_dtype=str(jnp.dtype(vision.dtype)))
    if pi == 0:
        side = sidecar_path(out)
        if os.path.exists(side):
            os.remove(side)  # never leave an old sidecar beside a new array
        os.replace(tmp, out)
        with open(side + ".tmp", "w") as fh:
            json.dump(info, fh, indent=1, sort_keys=True)
        os.replace(side + ".tmp", side)
        print(f"cache-latents: wrote {out} {tuple(info['shape'])} {dtype} ({corrupt} corrupt elements left zero) "
              f"and {side} in {time.time() - t0:.1f}s", flush=True)
    _barrier("cache-latents:done")
    return info


def main(argv: Sequence[str] | None = None) -> int:
    """``bifrost cache-latents --config FILE --out FILE.npy [--batch-size N] [--dtype float32|float16]
    [--config.key=value ...]``."""

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        usage = main.__doc__.split("cache-latents", 1)[1].rstrip().rstrip("`.")
        print(f"usage: bifrost cache-latents{usage}\n\n{CACHE_DOC}")
        return 0
    config, extra = parse_config_flags(argv, extra_string_flags=("out", "batch-size", "dtype"))
    if not extra["out"]:
        raise ValueError("missing --out FILE.npy (the cache; its sidecar goes to FILE.npy.json)")
    maybe_initialize_distributed()
    build_clip_cache(config, extra["out"], batch_size=int(extra["batch-size"] or 0),
                     dtype=extra["dtype"] or "float32")
    return 0
