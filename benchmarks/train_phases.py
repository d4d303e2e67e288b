"""Issue 4: training throughput of the TINY phases on this CPU, and per-device memory of the FULL-SIZE phases.

Two tables, both through the real code path of ``bifrost train`` (``train/state.py``: StateBuilder, optimizer,
frozen/trainable split, donated state, gradient accumulation):

* ``--tiny``: for each tiny phase (``configs/{vae,flux,controlnet,mllm}.py``) the jitted train step is built on the
  config's mesh over simulated CPU devices, the state is initialised (random init, no ports), a synthetic batch of
  the phase's ``batch_spec`` is made (uint8 pixels, token ids inside the vocabulary: the data pipeline is not
  timed), ``--warmup`` steps run (the first compiles), then ``--steps`` timed steps (each blocked on). Reports
  steps/s and examples/s (global batch x steps/s) and the compile time.
* ``--full``: for each full-size phase (``configs/full/{controlnet,mllm,flux}.py``) the same step is lowered with
  ABSTRACT state (``jax.ShapeDtypeStruct``s carrying their shardings: no weight is ever allocated) on the config's
  mesh over ``--devices`` simulated CPU devices, compiled, and ``compiled.memory_analysis()`` gives arguments,
  outputs, aliased (donated) bytes, temporaries and the per-device total (``bifrost_jax.aot.compile_target`` with
  topology ``cpu:N``: the same report as ``bifrost aot``). Frozen weights are stored in the config's
  ``train.frozen_param_dtype`` (column "frozen dtype"; ``--override train.frozen_param_dtype=`` gives the modules'
  own param_dtype).

The simulated device count must be set before jax is imported, so this script sets
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` itself (``--devices``, default 64 = the chips of one v5p-128 / v6e-64 pod,
so the full-size memory is per device of that mesh). CPU memory analysis is an estimate of the buffer assignment
of the CPU compiler (no TPU layouts / padding, different fusion), a sanity check next to ``benchmarks/aot_table.py``.

    .venv/bin/python benchmarks/train_phases.py --tiny --devices 8 --markdown /tmp/tiny.md
    .venv/bin/python benchmarks/train_phases.py --full --devices 64 --phases mllm,controlnet --markdown /tmp/full.md
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TINY_PHASES = ("vae", "flux", "controlnet", "mllm")
FULL_PHASES = ("controlnet", "mllm", "flux")


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="time the tiny phases")
    p.add_argument("--full", action="store_true", help="memory of the full-size phases (abstract state)")
    p.add_argument("--demo", action="store_true",
                   help="time the phases at the embedded default's sizes (configs/demo.py, its mesh; random init)")
    p.add_argument("--demo-override", action="append", default=[],
                   help="demo config override KEY=VALUE (e.g. phases.vae.batch_size=16; repeatable)")
    p.add_argument("--phases", default="", help="comma-separated subset (default: all of the chosen table)")
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices (set before importing jax)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--override", action="append", default=[],
                   help="config override key=value applied to every phase (repeatable)")
    p.add_argument("--markdown", default="", help="also write the table(s) to this file")
    return p.parse_args(argv)


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
    # Must precede the first jax import (also keeps any earlier XLA_FLAGS the caller set).
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={ARGS.devices}"])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

GIB = 1024 ** 3


def load_config(path: str, overrides=()):
    from bifrost_jax.configs import load_config_file

    return load_config_file(os.path.join(ROOT, path), list(overrides))


def synthetic_batch(phase, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A host batch of ``phase.batch_spec``: uint8 pixels, int ids below the smallest vocabulary of the phase,
    an all-ones (int) attention mask (left padding does not change the cost), floats N(0, 1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, spec in phase.batch_spec(batch_size).items():
        dt = np.dtype(spec.dtype)
        if dt == np.uint8:
            out[name] = rng.integers(0, 256, spec.shape, dtype=np.uint8)
        elif "mask" in name:
            out[name] = np.ones(spec.shape, dt)
        elif np.issubdtype(dt, np.integer):
            out[name] = rng.integers(1, 100, spec.shape).astype(dt)  # every tiny vocabulary has >= 128 ids
        else:
            out[name] = rng.standard_normal(spec.shape).astype(dt)
    return out


def demo_phase_config(name: str, args):
    """The phase config ``bifrost demo`` trains (``demo.phase_configs``), with its ``init_from`` sources dropped:
    the step costs the same from random weights."""
    from bifrost_jax import demo

    cfg = demo.load_demo_config([f"--config.{o}" for o in args.demo_override])
    config = demo.phase_configs(cfg, os.path.join(ROOT, "runs", "bench_demo"))[name]
    for section in config.values():
        if isinstance(section, dict) and "init_from" in section:
            with section.unlocked():
                section["init_from"] = ""
    return config


def time_tiny_phase(name: str, args) -> dict:
    """Build, initialise and time the real jitted train step of ``configs/<name>.py`` (or of the demo's phase).
    Besides wall time, the process CPU time per step (``time.process_time``: all threads) is reported: on a shared
    machine it moves less with the load than wall time."""
    from bifrost_jax.parallel.multislice import mesh_from_config
    from bifrost_jax.parallel.rules import axis_rules
    from bifrost_jax.train.registry import get_phase
    from bifrost_jax.train.state import StateBuilder, global_batch, jit_train_step, make_optimizer, make_train_step
    import bifrost_jax.train.phase_configs  # noqa: F401  (registers the real phases)

    config = demo_phase_config(name, args) if args.demo else load_config(f"configs/{name}.py", args.override)
    mesh = mesh_from_config(dict(config.mesh), jax.devices())
    phase = get_phase(config)
    batch_size, accum = int(config.train.batch_size), int(config.train.grad_accum_steps)
    tx, schedule = make_optimizer(config.optim, int(config.train.steps))
    ema = float(config.optim.ema_decay)
    t0 = time.perf_counter()
    builder = StateBuilder(phase, tx, mesh, seed=int(config.seed), ema=ema > 0)
    state, frozen = builder.init()
    step = jit_train_step(make_train_step(phase, tx, schedule, grad_accum_steps=accum, ema_decay=ema), builder,
                          batch_size)
    abstract = builder.abstract_batch(batch_size)
    batches = [global_batch(synthetic_batch(phase, batch_size, seed=i), abstract) for i in range(2)]
    init_s = time.perf_counter() - t0
    times, cpu = [], []
    with axis_rules(mesh):
        t0 = time.perf_counter()
        state, metrics = step(state, frozen, batches[0])
        jax.block_until_ready((state, metrics))
        first_s = time.perf_counter() - t0
        for i in range(1, args.warmup):
            state, metrics = step(state, frozen, batches[i % 2])
        jax.block_until_ready(state)
        for i in range(args.steps):
            t0, c0 = time.perf_counter(), time.process_time()
            state, metrics = step(state, frozen, batches[i % 2])
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise RuntimeError(f"phase {name}: non-finite loss {loss}")
    n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen))
    med = float(np.median(times))
    return dict(phase=name, batch=batch_size, accum=accum, mesh=dict(mesh.shape), trainable=n_train,
                frozen=n_frozen, init_s=init_s, first_step_s=first_s, median_s=med, min_s=float(np.min(times)),
                steps_per_s=1.0 / med, examples_per_s=batch_size / med, loss=loss,
                cpu_s=float(np.median(cpu)))


def full_phase_memory(name: str, args) -> dict:
    """Per-device memory of the full-size phase's train step (abstract state, config's mesh, cpu:N)."""
    from bifrost_jax.aot import compile_target
    import bifrost_jax.train.phase_configs  # noqa: F401

    config = load_config(f"configs/full/{name}.py", args.override)
    report = compile_target(None, config, f"cpu:{args.devices}")
    d = report.to_dict()
    d.update(phase=name, batch=int(config.train.batch_size), accum=int(config.train.grad_accum_steps),
             frozen_dtype=config.train.get("frozen_param_dtype", "") or "param_dtype")
    return d


def _gib(n) -> str:
    return f"{n / GIB:.2f}"


def tiny_table(rows) -> str:
    out = ["| phase | mesh | global batch | trainable / frozen params | first step (compile) s | "
           "median step s (min) | steps/s | examples/s | CPU s/step | loss |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mesh = "x".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1) or "1"
        out.append(f"| {r['phase']} | {mesh} | {r['batch']} | {r['trainable'] / 1e3:.1f}k / {r['frozen'] / 1e3:.1f}k "
                   f"| {r['first_step_s']:.1f} | {r['median_s']:.3f} ({r['min_s']:.3f}) | {r['steps_per_s']:.2f} | "
                   f"{r['examples_per_s']:.1f} | {r['cpu_s']:.3f} | {r['loss']:.4f} |")
    return "\n".join(out)


def full_table(rows) -> str:
    out = ["| phase | devices / mesh | global batch | frozen dtype | arguments | outputs | aliased (-) | temporaries | "
           "total per device (GiB) | compile s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mesh = ", ".join(f"{k}={v}" for k, v in r["mesh_shape"].items() if v > 1)
        if r.get("error"):
            out.append(f"| {r['phase']} | {r['num_devices']}: {mesh} | {r['batch']} | {r['frozen_dtype']} | "
                       f"FAILED: {r['error'][:200]} | | | | | |")
            continue
        out.append(f"| {r['phase']} | {r['num_devices']}: {mesh} | {r['batch']} | {r['frozen_dtype']} | "
                   f"{_gib(r['argument_bytes'])} | "
                   f"{_gib(r['output_bytes'])} | {_gib(r['alias_bytes'])} | {_gib(r['temp_bytes'])} | "
                   f"**{_gib(r['total_bytes'])}** | {r['compile_seconds']:.0f} |")
    return "\n".join(out)


def main(args) -> int:
    if args.demo:
        args.tiny = True
    if not (args.tiny or args.full):
        print("choose --tiny, --demo and/or --full", file=sys.stderr)
        return 2
    header = (f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores, jax {jax.__version__}, "
              f"{len(jax.devices())} simulated CPU devices, load average {os.getloadavg()[0]:.1f} at the start")
    print(header, flush=True)
    parts = [header]
    chosen = [p for p in args.phases.split(",") if p]
    if args.tiny:
        rows = []
        for name in chosen or TINY_PHASES:
            r = time_tiny_phase(name, args)
            print(r, flush=True)
            rows.append(r)
        parts.append(tiny_table(rows))
        print(parts[-1], flush=True)
    if args.full:
        rows = []
        for name in chosen or FULL_PHASES:
            r = full_phase_memory(name, args)
            print({k: r[k] for k in ("phase", "mesh_shape", "argument_bytes", "output_bytes", "alias_bytes",
                                     "temp_bytes", "total_bytes", "compile_seconds", "error")}, flush=True)
            rows.append(r)
        parts.append(full_table(rows))
        print(parts[-1], flush=True)
    parts.append(f"load average {os.getloadavg()[0]:.1f} at the end")
    print(parts[-1])
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n\n".join(parts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
