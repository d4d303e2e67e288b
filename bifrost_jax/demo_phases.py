"""The demo's training orchestration (``bifrost demo`` step 1): which phases start from which, reuse of finished
phases, ``--force`` closures, the CLIP-latent cache build, and phases that do not start from each other trained at
once on threads (``run_phases(concurrency=...)``; docs/design.md §9.3)."""
from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import threading
import time
from typing import Sequence

import numpy as np

from bifrost_jax.train.cache_latents import build_clip_cache
from bifrost_jax.train.loop import train

PHASE_ORDER = ("understanding", "vae", "flux", "controlnet", "mllm")
# --config.decoder=unet: a Stable Diffusion-architecture UNet in place of FLUX (docs/unet.md)
UNET_PHASE_ORDER = ("understanding", "vae", "unet", "controlnet", "mllm")
# phase -> the phases whose checkpoints it starts from (a forced phase forces its dependents)
DEPENDS_ON = {"understanding": (), "vae": (), "flux": ("vae",), "unet": ("vae",),
              "controlnet": ("flux", "unet", "vae", "understanding"), "mllm": ("understanding",)}


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_demo_clip_cache(config) -> None:
    """(Re)build the CLIP-latent cache of ``config`` (a phase config that reads it) with ``bifrost cache-latents``'
    code. Run once per demo run before the first phase that trains on it, so it always comes from the ViT weights
    of this run's configs (a retrained vision tower never meets a stale cache)."""
    path = config.data.precomputed_clip_latents
    log(f"caching the frozen ViT's latents of the training images in {path}")
    t0 = time.perf_counter()
    build_clip_cache(config, path, batch_size=int(config.train.batch_size), log_every=0)
    log(f"cache built in {time.perf_counter() - t0:.0f} s")


def latest_step(workdir: str, name: str) -> int | None:
    root = os.path.join(os.path.abspath(workdir), name, "checkpoints")
    if not os.path.isdir(root):
        return None
    steps = [int(d) for d in os.listdir(root) if d.isdigit() and os.path.isdir(os.path.join(root, d, "params"))]
    return max(steps) if steps else None


def fingerprint(config) -> dict:
    """The phase config minus the paths derived from the workdir (a moved workdir stays reusable)."""
    d = json.loads(config.to_json())
    d.get("data", {}).pop("data_dir", None)
    if d.get("data", {}).get("precomputed_clip_latents"):
        d["data"]["precomputed_clip_latents"] = ""  # the cache holds what the ViT computes on the fly
    for section in d.values():
        if isinstance(section, dict):
            section.pop("init_from", None)
            section.pop("base_init_from", None)
    return d


def phases_to_force(force: Sequence[str], order: Sequence[str] = PHASE_ORDER) -> set[str]:
    """``force`` and every phase of ``order`` (the run's phases, dependencies first) that starts (transitively)
    from one of them."""
    forced = set()
    for name in order:
        if name in force or any(d in forced for d in DEPENDS_ON[name]):
            forced.add(name)
    return forced


def run_phases(configs: dict, workdir: str, *, force: Sequence[str] = (), progress_bar: bool = True,
               clip_cache_builder=build_demo_clip_cache, concurrency: int = 1) -> dict:
    """Train every phase not yet finished; returns ``{phase: {"status", "seconds", "steps", "last_metrics"}}``.
    ``clip_cache_builder(config)`` writes ``config.data.precomputed_clip_latents`` before the first phase that
    trains on it (default: the frozen ViT's latents).

    ``concurrency`` > 1: up to that many phases train at once, each as soon as the phases it starts from
    (``DEPENDS_ON``) are done, in ``configs`` order otherwise (the demo: ``understanding -> mllm`` beside
    ``vae -> flux``, then ``controlnet``). Each phase's result is the same either way: a phase's steps depend on
    its own config, data and initial weights only. Every config is checked against its workdir before any
    phase trains."""

    forced = phases_to_force(force, tuple(configs))
    records_path = os.path.join(os.path.abspath(workdir), "demo", "phases.json")
    records = read_json(records_path, {})
    out, todo = {}, []
    for name, config in configs.items():
        phase_dir = os.path.join(os.path.abspath(workdir), name)
        stamp = os.path.join(phase_dir, "demo_phase_config.json")
        if name in forced and os.path.isdir(phase_dir):
            log(f"phase {name}: --force: removing {phase_dir}")
            shutil.rmtree(phase_dir)
            records.pop(name, None)
        if os.path.isfile(stamp) and read_json(stamp, None) != fingerprint(config):
            raise RuntimeError(f"{phase_dir} was trained with another config than this demo config (sizes, steps "
                               f"or --fast differ): rerun with --force {name}, or use another --workdir")
        done = latest_step(workdir, name)
        if done is not None and done >= int(config.train.steps):
            prev = records.get(name, {})
            log(f"phase {name}: reusing the finished checkpoint (step {done}) in {phase_dir}/checkpoints")
            out[name] = {"status": "reused", "seconds": 0.0, "steps": done,
                         "trained_seconds": prev.get("seconds"), "last_metrics": prev.get("last_metrics", {})}
        else:
            todo.append(name)

    lock = threading.Lock()  # the records file and the one CLIP-latent cache build
    cache = {"built": False}

    def run_one(name: str) -> dict:
        config = configs[name]
        phase_dir = os.path.join(os.path.abspath(workdir), name)
        steps, done = int(config.train.steps), latest_step(workdir, name)
        if config.data.get("precomputed_clip_latents"):
            with lock:
                if not cache["built"]:
                    clip_cache_builder(config)
                    cache["built"] = True
        os.makedirs(phase_dir, exist_ok=True)
        with open(os.path.join(phase_dir, "demo_phase_config.json"), "w") as fh:
            json.dump(fingerprint(config), fh, indent=1)
        log(f"phase {name}: start ({steps} steps, batch {config.train.batch_size}, lr {config.optim.lr:g})"
             + (f", resuming from step {done}" if done is not None else ""))
        t0 = time.perf_counter()
        result = train(config, workdir, progress_bar=progress_bar)
        seconds = time.perf_counter() - t0
        if result.preempted:
            raise SystemExit(f"phase {name} was interrupted at step {result.step}; rerun to resume")
        metrics = {k: float(v) for k, v in (result.last_metrics or {}).items() if np.ndim(v) == 0}
        log(f"phase {name}: done in {seconds:.0f} s, "
             + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in ("loss", "mse", "recon", "mse_masked")))
        with lock:
            records[name] = {"seconds": seconds, "steps": int(result.step), "last_metrics": metrics}
            write_json(records_path, records)
        return {"status": "trained", "seconds": seconds, "steps": int(result.step), "last_metrics": metrics}

    if concurrency <= 1:
        out.update((name, run_one(name)) for name in todo)
    else:
        deps = {name: [d for d in DEPENDS_ON[name] if d in todo] for name in todo}
        out.update(run_dag(todo, deps, run_one, concurrency))
    return {name: out[name] for name in configs}


def run_dag(names: Sequence[str], deps: dict, fn, workers: int) -> dict:
    """``{name: fn(name)}``, up to ``workers`` at once on threads, each name started once its ``deps`` are done,
    in ``names`` order otherwise. The first error is raised once the running calls have finished (a phase that
    is training completes and saves its checkpoint)."""
    results, pending, running = {}, list(names), {}
    error = None
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="phase") as pool:
        while running or (pending and error is None):
            for name in list(pending):
                if error is not None or len(running) >= workers:
                    break
                if all(d in results for d in deps[name]):
                    pending.remove(name)
                    running[pool.submit(fn, name)] = name
            if not running:
                raise RuntimeError(f"phases {pending} wait on each other: {deps}")
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                try:
                    results[name] = future.result()
                except BaseException as e:  # noqa: BLE001 - re-raised below, after the others finish
                    if error is None:
                        error = e
                        if running:
                            log(f"phase {name} failed ({type(e).__name__}); waiting for "
                                 f"{sorted(running.values())} to finish")
    if error is not None:
        raise error
    return results


def read_json(path, default):
    if not os.path.isfile(path):
        return default
    with open(path) as fh:
        return json.load(fh)


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
    os.replace(tmp, path)
