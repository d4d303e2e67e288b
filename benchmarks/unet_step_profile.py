"""Where the time of the JAX SDXL-architecture UNet training step goes on CPU, beside PyTorch's: a ``jax.profiler``
trace of the compiled step of ``benchmarks/unet_train_step.py`` (same model, weights and batch), op time grouped by
kind and pass (forward / backward), and ``torch.profiler``'s self CPU time of the same diffusers step grouped the same
way. One thread each.

    .venv/bin/python benchmarks/unet_step_profile.py

Shares are of the summed op time; the trace adds a fixed cost per op, so the many small JAX ops are over-weighted
(the "step" lines are the untraced CPU seconds of one step).
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

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                           "intra_op_parallelism_threads=1").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flux_train_step  # noqa: E402
import unet_train_step  # noqa: E402
from flux_step_profile import instruction_kinds  # noqa: E402
from bifrost_jax import port  # noqa: E402

ARGS = argparse.Namespace(width=128, latent=32, text=77, text_dim=256, pooled_dim=128, batch=2)


def jax_category(name: str, kind: str, op_name: str) -> str:
    if "UNet2DConditionModel" not in op_name or op_name.endswith("opt_state"):
        if name.startswith("transpose_copy") or name.startswith("copy"):
            return "kernel/activation transposes (copies)"
        return "AdamW update (+ loss)" if kind == "fusion:kLoop" else f"other ({kind})"
    part = "backward" if "transpose(jvp" in op_name else "forward"
    if "conv_general_dilated" in op_name and kind in ("fusion:kCustom", "convolution"):
        what = "convolutions"
    elif kind == "dot" or ("dot_general" in op_name and kind == "fusion:kCustom"):
        what = "matmuls (Linear, attention)"
    elif re.search(r"/norm\d?/|/norm/|conv_norm_out|/norm\d?_", op_name):
        what = "norms (GroupNorm, LayerNorm)"
    elif name.startswith("copy") or name.startswith("transpose"):
        what = "copies / transposes"
    else:
        what = "other elementwise / reductions"
    return f"{what}, {part}"


def profile_jax(module, params, batch, target):
    tx = optax.adamw(1e-5, weight_decay=1e-4)
    opt_state = tx.init(params)
    jb, jt = jax.tree.map(jnp.asarray, batch), jnp.asarray(target)
    compiled = jax.jit(flux_train_step.train_step_of(module, tx)).lower(params, opt_state, jb, jt).compile()
    kinds, op_names = instruction_kinds(compiled.as_text())
    for _ in range(2):
        jax.block_until_ready(compiled(params, opt_state, jb, jt))
    t = time.process_time()
    jax.block_until_ready(compiled(params, opt_state, jb, jt))
    step = time.process_time() - t
    shares = collections.Counter()
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            jax.block_until_ready(compiled(params, opt_state, jb, jt))
        data = jax.profiler.ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
        for plane in data.planes:
            for line in plane.lines:
                for event in line.events:
                    name = event.name.split(":")[0]
                    if name in kinds:
                        shares[jax_category(name, kinds[name], op_names[name])] += event.duration_ns / 1e6
    return step, shares


TORCH_KINDS = (("convolution", "convolutions"), ("conv2d", "convolutions"), ("mm", "matmuls (Linear, attention)"),
               ("addmm", "matmuls (Linear, attention)"), ("bmm", "matmuls (Linear, attention)"),
               ("scaled_dot_product", "matmuls (Linear, attention)"), ("norm", "norms (GroupNorm, LayerNorm)"))


def profile_torch(ref, batch, target):
    from torch.profiler import ProfilerActivity, profile
    step_fn = flux_train_step.torch_step_fn(ref, batch, target, 1e-5, 1)
    for _ in range(2):
        step_fn()
    t = time.process_time()
    step_fn()
    step = time.process_time() - t
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step_fn()
    shares = collections.Counter()
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::"):
            continue
        op = ev.key[len("aten::"):]
        # the optimizer's ops are the in-place foreach-free AdamW kernels
        if op in ("lerp_", "addcdiv_", "addcmul_", "sqrt", "mul_", "div", "add_"):
            what = "AdamW update and other in-place elementwise"
        else:
            what = next((w for k, w in TORCH_KINDS if k in op), "other elementwise / reductions / copies")
        shares[what] += ev.self_cpu_time_total / 1e3
    return step, shares


def report(title, step, shares):
    total = sum(shares.values())
    print(f"{title}: {step:.3f} CPU s per step (untraced); traced op time {total / 1e3:.3f} s")
    for kind, ms in shares.most_common():
        print(f"  {kind:<52} {ms:8.1f} ms {100 * ms / total:5.1f}%")


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = unet_train_step.build_config(ARGS)
    from diffusers import UNet2DConditionModel
    ref = UNet2DConditionModel(**cfg)
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        module, variables = port.load("unet", d, compute_dtype=jnp.float32)
    torch_batch, jax_batch, torch_target, jax_target = unet_train_step.make_batches(cfg, ARGS)
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    report("jax", *profile_jax(module, variables["params"], jax_batch, jax_target))
    report("torch", *profile_torch(ref, torch_batch, torch_target))
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
