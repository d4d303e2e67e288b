"""Where the time of the JAX FLUX training step goes on CPU: ``jax.profiler`` trace of the compiled step of
``benchmarks/flux_train_step.py`` (same model, weights and batch), events grouped by the HLO instruction they run and
by kind: YNNPACK dot fusions, plain XLA (Eigen) dots, copies/transposes, the AdamW update, other elementwise work.
Also times a few plain matmuls in JAX and PyTorch (one thread) to tell the matmul library from the rest.

    taskset -c 1 .venv/bin/python benchmarks/flux_step_profile.py        # one core, XLA single-threaded

Shares are of the summed op time (ops of the two XLA pool threads overlap on one core; the shares, not the sums,
are the figure).
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flux_train_step  # noqa: E402
from bifrost_jax import port  # noqa: E402


def instruction_kinds(hlo: str) -> tuple[dict, dict]:
    """HLO instruction name -> kind (opcode, fusion kind, custom-call target) and -> its op_name metadata."""
    kinds, op_names = {}, {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(", line)
        if not m:
            continue
        name, op = m.groups()
        if op == "fusion":
            kind = re.search(r"kind=(\w+)", line)
            op = "fusion:" + (kind.group(1) if kind else "?")
        kinds[name] = op
        meta = re.search(r'op_name="([^"]+)"', line)
        op_names[name] = (meta.group(1) if meta else "") + (" opt_state" if "opt_state" in line else "")
    return kinds, op_names


def category(name: str, kind: str, op_name: str) -> str:
    if kind == "fusion:kCustom" and name.startswith("ynn"):
        return "YNNPACK dot fusions"
    if kind == "dot":
        return "plain XLA dots (Eigen)"
    if kind == "fusion:kLoop":
        if "FluxTransformer2DModel" not in op_name:  # outside the model's forward and backward
            return "AdamW update (+ loss)"
        if name.startswith("copy") or "transpose" in op_name:
            return "copies / transposes"
        return "other elementwise"
    return kind


def profile_step(repeats: int = 3) -> collections.Counter:
    args = argparse.Namespace(double=2, single=4, heads=4, grid=16, text=64, text_dim=512, batch=1)
    torch.manual_seed(0)
    cfg = flux_train_step.build_config(args)
    from diffusers import FluxTransformer2DModel
    with tempfile.TemporaryDirectory() as d:
        FluxTransformer2DModel(**cfg).save_pretrained(d)
        module, variables = port.load("flux-transformer", d, compute_dtype=jnp.float32)
    batch, target = flux_train_step.make_batch(cfg, args)
    tx = optax.adamw(1e-5, weight_decay=1e-4)
    params = variables["params"]
    opt_state = tx.init(params)
    jb, jt = {k: jnp.asarray(v) for k, v in batch.items()}, jnp.asarray(target)

    compiled = jax.jit(flux_train_step.train_step_of(module, tx)).lower(params, opt_state, jb, jt).compile()
    kinds, op_names = instruction_kinds(compiled.as_text())
    for _ in range(2):
        jax.block_until_ready(compiled(params, opt_state, jb, jt))
    shares = collections.Counter()
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(repeats):
                jax.block_until_ready(compiled(params, opt_state, jb, jt))
        data = jax.profiler.ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
        for plane in data.planes:
            for line in plane.lines:
                for event in line.events:
                    name = event.name.split(":")[0]
                    if name in kinds:
                        shares[category(name, kinds[name], op_names[name])] += event.duration_ns
    return shares


def matmul_rates(shapes=((320, 512, 2048), (320, 2048, 512), (320, 512, 1536), (512, 320, 2048)), n=30):
    torch.set_num_threads(1)

    def cpu_ms(fn):
        fn()
        t = time.process_time()
        for _ in range(n):
            fn()
        return (time.process_time() - t) / n * 1e3
    rows = []
    for m, k, nn in shapes:
        a, b = np.random.randn(m, k).astype(np.float32), np.random.randn(k, nn).astype(np.float32)
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        f = jax.jit(lambda x, y: x @ y)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        flops = 2 * m * k * nn
        rows.append((f"{m}x{k}x{nn}", flops / cpu_ms(lambda: f(ja, jb).block_until_ready()) / 1e6,
                     flops / cpu_ms(lambda: ta @ tb) / 1e6))
    return rows


def main():
    shares = profile_step()
    total = sum(shares.values())
    print("JAX FLUX train step: share of op time by kind")
    for kind, t in shares.most_common():
        print(f"  {kind:<28} {100 * t / total:5.1f}%")
    print("plain matmul, one thread (GFLOP/s): shape, jax, torch")
    for row in matmul_rates():
        print(f"  {row[0]:<14} {row[1]:7.1f} {row[2]:7.1f}")


if __name__ == "__main__":
    main()
