"""A precomputed CLIP-latent cache: the frozen vision tower's patch-level latents of every source element.

The ``controlnet`` and ``mllm`` phases compute their conditioning / targets from the frozen Qwen2.5-VL vision
tower on the fly (``bifrost_phases.clip_latents_from_pixels`` of the ViT view of the crop). With centre crops that
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
import sys
import time
from typing import Any, Sequence

import numpy as np

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
    """Where the vision tower's weights come from (what ``bifrost_phases.load_component`` would load)."""
    s = comp.section
    if s.get("init_from", ""):
        from bifrost_jax.train.checkpoint import resolve_step_dir
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
    from bifrost_jax.train.bifrost_phases import _cfg_dict

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
        "vision_config": _cfg_dict(vision_comp.section.config),
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


# ----------------------------------------------------------------------------------------------------------------
# building

def _barrier(name: str) -> None:
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _vision_params(phase, mesh):
    """The phase's frozen vision-tower params, replicated over ``mesh`` (this host's devices)."""
    import flax.linen as nn
    import jax

    from bifrost_jax.parallel.rules import axis_rules, tree_shardings
    from bifrost_jax.train.bifrost_phases import load_component

    comp = phase.vision
    with axis_rules(mesh):
        boxed = jax.eval_shape(comp.init, jax.random.PRNGKey(0))
    shardings = tree_shardings(nn.get_partition_spec(boxed), mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.meta.unbox(boxed),
                            shardings)
    if comp.has_source:
        got = load_component(comp, {"params": {"vision": abstract["params"]}},
                             {"params": {"vision": shardings["params"]}})
        return got["params"]["vision"], shardings["params"]
    # the fixed-key init every phase uses for a vision tower without weights (Component.init ignores the key)
    init = jax.jit(lambda: nn.meta.unbox(comp.init(None))["params"], out_shardings=shardings["params"])
    with axis_rules(mesh):
        return init(), shardings["params"]


def build_clip_cache(config, out: str, *, batch_size: int = 0, dtype: str = "float32", log_every: int = 20,
                     devices=None) -> dict:
    """Write the CLIP-latent cache of ``config``'s phase and data source to ``out`` (+ ``out.json``); returns the
    sidecar dict. ``batch_size``: global batch (default ``train.batch_size``); each process's share must divide
    over its devices. ``dtype``: float32 (exact) or float16 (half the disk)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from bifrost_jax.data.pipeline import INDEX_KEY, VALID_KEY, make_eval_iterator
    from bifrost_jax.parallel.mesh import make_mesh
    from bifrost_jax.parallel.rules import axis_rules
    from bifrost_jax.train.bifrost_phases import clip_latents_from_pixels, image_source, make_image_preprocess
    from bifrost_jax.train.phases import get_phase

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
                         f"must divide over its {len(devices)} devices (set --batch_size)")
    params, param_shardings = _vision_params(phase, mesh)
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
        from jax.experimental import multihost_utils
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
    """``bifrost cache-latents --config FILE --out FILE.npy [--batch_size N] [--dtype float32|float16]
    [--config.key=value ...]``."""
    from bifrost_jax.configs import parse_config_flags
    from bifrost_jax.train.loop import maybe_initialize_distributed

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        usage = main.__doc__.split("cache-latents", 1)[1].rstrip().rstrip("`.")
        print(f"usage: bifrost cache-latents{usage}\n\n{__doc__}")
        return 0
    config, extra = parse_config_flags(argv, extra_string_flags=("out", "batch_size", "dtype"))
    if not extra["out"]:
        raise ValueError("missing --out FILE.npy (the cache; its sidecar goes to FILE.npy.json)")
    maybe_initialize_distributed()
    build_clip_cache(config, extra["out"], batch_size=int(extra["batch_size"] or 0),
                     dtype=extra["dtype"] or "float32")
    return 0
