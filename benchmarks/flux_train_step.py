"""Time one FLUX training step (forward, backward, AdamW) in bifrost-jax (jit) and in diffusers (PyTorch eager and
``torch.compile``).

The same FLUX-architecture model (a few double and single blocks, 4 heads x 128 = width 512, 16x16 = 256 image tokens,
64 text tokens, guidance embedding) with the same weights (the PyTorch model is saved and ported) and the same
batch. The loss is the flow-matching MSE against a fixed target. Steps of the two frameworks are interleaved so
that both see the same machine load (this CPU is shared); the median of the timed repeats is reported.

    .venv/bin/python benchmarks/flux_train_step.py                 # fp32 in both (like with like)
    .venv/bin/python benchmarks/flux_train_step.py --jax-bf16      # adds a JAX row with bf16 compute
    .venv/bin/python benchmarks/flux_train_step.py --torch-threads 1 --jax-single-thread   # 1 thread each
    .venv/bin/python benchmarks/flux_train_step.py --torch-compile # adds torch.compile (inductor) rows

``--torch-compile`` adds, for every thread count, a row where the model runs under ``torch.compile`` (inductor,
default mode: forward and backward graphs compiled to C++/OpenMP on CPU) and the AdamW step is compiled too (the
PyTorch recipe for compiled optimizers); its first steps include the compiles. The ratio uses the fastest PyTorch row.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

if "--jax-single-thread" in sys.argv:  # must be set before JAX initialises its CPU client
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                               "intra_op_parallelism_threads=1").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bifrost_jax import port  # noqa: E402


def build_config(args) -> dict:
    return dict(patch_size=1, in_channels=64, out_channels=None, num_layers=args.double, num_single_layers=args.single,
                attention_head_dim=128, num_attention_heads=args.heads, joint_attention_dim=args.text_dim,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def make_batch(cfg, args, seed=0):
    rng = np.random.default_rng(seed)
    g = args.grid
    rows, cols = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    img_ids = np.stack([np.zeros(g * g), rows.ravel(), cols.ravel()], -1).astype(np.float32)
    f = np.float32
    return dict(hidden_states=rng.standard_normal((args.batch, g * g, cfg["in_channels"])).astype(f),
                encoder_hidden_states=rng.standard_normal(
                    (args.batch, args.text, cfg["joint_attention_dim"])).astype(f),
                pooled_projections=rng.standard_normal((args.batch, cfg["pooled_projection_dim"])).astype(f),
                timestep=rng.uniform(0, 1, (args.batch,)).astype(f),
                img_ids=img_ids, txt_ids=np.zeros((args.text, 3), f),
                guidance=np.full((args.batch,), 3.5, f)), rng.standard_normal(
                    (args.batch, g * g, cfg["in_channels"])).astype(f)


def torch_step_fn(model, batch, target, lr, threads, compile_model=False):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    tb = {k: (None if v is None else {kk: torch.from_numpy(vv) for kk, vv in v.items()} if isinstance(v, dict)
              else torch.from_numpy(v)) for k, v in batch.items()}
    tt = torch.from_numpy(target)
    model.train()
    forward = torch.compile(model) if compile_model else model
    opt_step = torch.compile(opt.step) if compile_model else opt.step

    def step():
        torch.set_num_threads(threads)
        opt.zero_grad(set_to_none=True)
        out = forward(**tb).sample
        loss = torch.mean((out.float() - tt) ** 2)
        loss.backward()
        opt_step()
        return float(loss.detach())
    return step


def train_step_of(module, tx):
    """``train_step(params, opt_state, batch, target) -> (params, opt_state, loss)``: forward, MSE, backward, ``tx``
    (not jitted: the timing loop and the profiler jit it their own way)."""
    def train_step(params, opt_state, batch, target):
        def loss_fn(p):
            out = module.apply({"params": p}, **batch)
            return jnp.mean(jnp.square(out.astype(jnp.float32) - target))
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    return train_step


def jax_step_fn(module, params, batch, target, lr):
    tx = optax.adamw(lr, weight_decay=1e-4)
    opt_state = tx.init(params)
    jb = jax.tree.map(jnp.asarray, batch)
    jt = jnp.asarray(target)
    train_step = jax.jit(train_step_of(module, tx), donate_argnums=(0, 1))

    state = {"params": params, "opt": opt_state}

    def step():
        state["params"], state["opt"], loss = train_step(state["params"], state["opt"], jb, jt)
        return float(loss)  # blocks until the step is done
    return step


def timed(fn):
    """(wall s, process CPU s, loss). With one thread per framework the CPU time is the work done, whatever the
    other jobs on a shared host do to the wall time."""
    t, c = time.perf_counter(), time.process_time()
    loss = fn()
    return time.perf_counter() - t, time.process_time() - c, loss


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--grid", type=int, default=16, help="image tokens = grid * grid")
    ap.add_argument("--text", type=int, default=64)
    ap.add_argument("--text-dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--scan", action="store_true", help="scanned blocks in JAX")
    ap.add_argument("--torch-threads", default=str(torch.get_num_threads()),
                    help="comma-separated intra-op thread counts, one PyTorch row each (e.g. 2,1: on a shared "
                         "CPU fewer threads can be faster); the ratio uses the fastest PyTorch row")
    ap.add_argument("--jax-single-thread", action="store_true",
                    help="XLA CPU on one thread (compare with --torch-threads 1: robust on a loaded machine)")
    ap.add_argument("--jax-bf16", action="store_true", help="also time JAX with bf16 compute (fp32 params)")
    ap.add_argument("--torch-compile", action="store_true",
                    help="also time torch.compile (inductor) rows, one per --torch-threads entry")
    args = ap.parse_args()
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    torch.manual_seed(0)
    cfg = build_config(args)
    from diffusers import FluxTransformer2DModel
    ref = FluxTransformer2DModel(**cfg)
    n_params = sum(p.numel() for p in ref.parameters())
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        module, variables = port.load("flux-transformer", d, compute_dtype=jnp.float32, scan_layers=args.scan)
        modules = {"jax fp32": (module, variables["params"])}
        if args.jax_bf16:
            m16, v16 = port.load("flux-transformer", d, compute_dtype=jnp.bfloat16, scan_layers=args.scan)
            modules["jax bf16 compute"] = (m16, v16["params"])
    batch, target = make_batch(cfg, args)
    # one model per PyTorch row (each row trains its own copy, as each JAX row does)
    import copy
    steps = {}
    for n in [int(t) for t in args.torch_threads.split(",")]:
        steps[f"torch fp32 eager, {n} thr"] = torch_step_fn(copy.deepcopy(ref), batch, target, 1e-5, n)
        if args.torch_compile:
            steps[f"torch fp32 compile, {n} thr"] = torch_step_fn(copy.deepcopy(ref), batch, target, 1e-5, n,
                                                                   compile_model=True)
    for name, (m, p) in modules.items():
        steps[name] = jax_step_fn(m, p, batch, target, 1e-5)

    title = (f"FLUX train step: {args.double} double + {args.single} single blocks, {args.heads} heads x 128 "
             f"(width {args.heads * 128}), {args.grid}x{args.grid}={args.grid ** 2} image tokens, "
             f"{args.text} text tokens, "
             f"batch {args.batch}, {n_params / 1e6:.1f}M params, AdamW; JAX scan={args.scan}, "
             f"JAX threads={'1' if args.jax_single_thread else 'all'}")
    time_and_report(steps, args, title, load_before)


def time_and_report(steps: dict, args, title: str, load_before: str) -> None:
    """Warm every step function up (``args.warmup`` calls, the JAX compile included), time ``args.repeats``
    interleaved rounds and print the markdown table with the ratio to the fastest PyTorch row."""
    first = {}
    for name, fn in steps.items():  # warm-up (includes the JAX compile)
        first[name] = timed(fn)[0]
        for _ in range(args.warmup - 1):
            fn()
    times = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    losses = {name: None for name in steps}
    for _ in range(args.repeats):  # interleaved
        for name, fn in steps.items():
            dt, dc, losses[name] = timed(fn)
            times[name].append(dt)
            cpu[name].append(dc)

    print(title)
    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, jax {jax.__version__} "
          f"({jax.default_backend()}), torch {torch.__version__}; load average before: {load_before}, after: "
          + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    torch_rows = [k for k in steps if k.startswith("torch")]
    base = min(statistics.median(times[k]) for k in torch_rows)
    best = min(torch_rows, key=lambda k: statistics.median(times[k]))
    base_cpu = min(statistics.median(cpu[k]) for k in torch_rows)
    print(f"| {'implementation':<26} | first step (s) | median step (s) | min (s) | best torch / this | "
          f"median CPU s | best torch CPU / this |")
    print(f"|{'-' * 28}|---------------:|----------------:|--------:|------------------:|-------------:|"
          f"----------------------:|")
    for name in steps:
        med, med_cpu = statistics.median(times[name]), statistics.median(cpu[name])
        print(f"| {name:<26} | {first[name]:14.3f} | {med:15.3f} | {min(times[name]):7.3f} | {base / med:17.2f} | "
              f"{med_cpu:12.3f} | {base_cpu / med_cpu:21.2f} |")
    jax_med = statistics.median(times["jax fp32"])
    jax_cpu = statistics.median(cpu["jax fp32"])
    print(f"best PyTorch row: {best}; jax fp32 time / best PyTorch time: {jax_med / base:.2f} "
          f"(ratio {base / jax_med:.2f}, >1: JAX faster); CPU time (meaningful with one thread each): "
          f"{jax_cpu / base_cpu:.2f}; load average after: " + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    print("last losses: " + ", ".join(f"{k}={v:.4f}" for k, v in losses.items()))
    print("step times (s): " + "; ".join(f"{k}: " + " ".join(f"{t:.3f}" for t in v) for k, v in times.items()))
    print("CPU times (s): " + "; ".join(f"{k}: " + " ".join(f"{t:.3f}" for t in v) for k, v in cpu.items()))


if __name__ == "__main__":
    main()
