"""Issue 6: which mesh, per-chip batch and remat policy fit and run fastest for the FULL-SIZE phases on TPU pods,
and the smallest slice each phase fits on, from ``bifrost aot`` compiles (compile-only, on this CPU machine).

Each candidate is one ``bifrost aot`` run (the real train step of ``configs/full/<phase>.py`` with config
overrides for the mesh, global batch and remat policy) in a SEPARATE process of the libtpu venv, one after the
other (a full-size compile takes minutes and GBs of RAM). Its JSON report is kept under ``--out``; a candidate whose
JSON exists is not compiled again (re-running the script resumes the list and rebuilds the table). A crash, a
timeout or an out-of-memory compile is recorded as such in the table.

The candidates are not a grid: they are chosen from a memory estimate by parameter counts (``--estimate`` prints
it): per-chip state = (frozen weights + trainable weights, Adam moments and gradients) / chips, plus activations.

    # the memory estimate (main venv, abstract shapes only)
    .venv/bin/python benchmarks/aot_table.py --estimate
    .venv/bin/python benchmarks/aot_table.py --estimate --phases sdxl_controlnet,sd15_controlnet
    # the compiles (in a venv with the .[tpu] extra, i.e. libtpu), then the markdown table
    PYTHONPATH=. python benchmarks/aot_table.py --run --out out/aot --markdown out/aot/table.md
    PYTHONPATH=. python benchmarks/aot_table.py --run --only mllm-v5p64-fsdp-b512-dots --out /tmp/M_aot
    PYTHONPATH=. python benchmarks/aot_table.py --table --out /tmp/M_aot --markdown /tmp/t.md

Ranking: "fastest" is the highest throughput at the compiler's estimated step time (examples/s = global batch /
estimated step seconds, with scanned loops scaled by their trip counts: see ``bifrost_jax/aot/``); MFU is shown
beside it, computed by this script from the ANALYTIC model FLOPs (``bifrost_jax/models/flops.py``, recomputed from
each candidate's config, so rows compiled before the analytic count existed get it too): analytic FLOPs per chip /
(estimated step s + the attention FLOPs of uncounted splash kernels at peak) / peak. "counted / analytic" compares
the compiled program's matmul FLOPs (scans x length) with it: above 1 by remat recomputation, below 1 where splash
attention kernels (no cost estimate) hide attention from the count. The compiler's estimate is a cost model, not a measurement (on v6e with its
-1 s sentinels removed: ``bifrost_jax/aot/compile.py:corrected_optimal_seconds``). A row without an estimate shows the
compute floor (FLOPs / peak, i.e. the step time at 100% MFU) and the throughput bound it implies.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# the Python of an environment with libtpu (`pip install -e '.[tpu]'`); default: this one
TPU_PYTHON = os.environ.get("BIFROST_TPU_PYTHON", sys.executable)
GIB = 1024 ** 3

# chips and HBM per chip of the slices used below (v5p: 95 GiB, v6e: 32 GiB; as bifrost_jax/parallel/devices.py)
HBM_GIB = {"v5p": 95, "v6e": 32}


@dataclasses.dataclass
class Candidate:
    name: str
    phase: str                 # configs/full/<phase>.py
    topology: str              # libtpu topology name
    mesh: dict                 # config.mesh overrides (data, fsdp, tensor)
    batch: int                 # global batch (per-chip batch = batch / chips)
    remat: dict                # {config section: remat policy}
    accum: int = 1             # train.grad_accum_steps
    why: str = ""
    # "generate": `bifrost aot --phase generate` on configs/full/generate_aot.py (one MAR step + one Euler step,
    # batch = images); otherwise the train step of configs/full/<phase>.py

    @property
    def chips(self) -> int:
        dims = self.topology.split(":")[1].split("x")
        return math.prod(int(d) for d in dims)

    @property
    def slice_name(self) -> str:
        """The Cloud TPU accelerator type: v4/v5p count TensorCores (2 per chip), v5e/v6e count chips."""
        gen = self.topology.split(":")[0]
        return f"{gen}-{self.chips * (2 if gen in ('v4', 'v5p') else 1)}"

    @property
    def config_file(self) -> str:
        return "configs/full/generate_aot.py" if self.phase == "generate" else f"configs/full/{self.phase}.py"

    def overrides(self) -> list[str]:
        out = [f"--config.mesh.{k}={v}" for k, v in self.mesh.items()]
        if self.phase == "generate":
            return out + [f"--config.generate_batch={self.batch}"]
        out += [f"--config.train.batch_size={self.batch}", f"--config.train.grad_accum_steps={self.accum}"]
        out += [f"--config.{section}.remat_policy={policy}" for section, policy in self.remat.items()]
        return out

    def command(self, json_path: str) -> list[str]:
        phase = ["--phase", "generate"] if self.phase == "generate" else []
        return [TPU_PYTHON, "-m", "bifrost_jax.cli", "aot", "--config", self.config_file,
                "--topology", self.topology] + phase + ["--json", json_path] + self.overrides()


# Chosen by reasoning from the parameter counts (see --estimate and RESULTS.md), in the order they are compiled:
# pod candidates first (default mesh, then pure FSDP), then the smallest slices.
CANDIDATES = [
    # ---- mllm (Qwen2.5-VL-7B generation branch): 6.5B trainable fp32 (+Adam) + 7.1B frozen fp32 + ViT bf16.
    # Only the 256 image tokens run through the trained branch (the frozen text rows need no backward), so
    # activations are small: the state dominates and remat can go.
    Candidate("mllm-v5p128-default", "mllm", "v5p:4x4x4", dict(data=1, fsdp=-1, tensor=4), 128, {"mllm": "full"},
              why="configs/full/mllm.py as shipped: 2 per chip"),
    Candidate("mllm-v5p128-fsdp-noremat", "mllm", "v5p:4x4x4", dict(data=1, fsdp=-1, tensor=1), 128,
              {"mllm": "none"}, why="pure FSDP (no tensor all-reduces for 7B), no recomputation: 3.8 GiB used"),
    Candidate("mllm-v5p8", "mllm", "v5p:2x2x1", dict(data=1, fsdp=-1, tensor=1), 8, {"mllm": "full"},
              why="smallest v5p slice (4 chips): ~33 GiB state+grads per chip by the estimate"),
    Candidate("mllm-v6e64-fsdp-noremat", "mllm", "v6e:8x8", dict(data=1, fsdp=-1, tensor=1), 128,
              {"mllm": "none"}, why="v6e pod, the v5p layout"),
    Candidate("mllm-v6e8", "mllm", "v6e:2x4", dict(data=1, fsdp=-1, tensor=1), 8, {"mllm": "full"},
              why="~17 GiB state+grads per chip of 32 GiB: smallest v6e slice by the estimate"),
    Candidate("mllm-v5p128-fsdp-b512", "mllm", "v5p:4x4x4", dict(data=1, fsdp=-1, tensor=1), 512,
              {"mllm": "none"}, why="8 per chip: amortise the per-layer weight all-gathers"),
    # ---- controlnet (stage A): 17.5B frozen bf16 (FLUX, T5-XXL, ViT, CLIP, VAE) + 1.77B trainable ControlNet.
    # The backward runs through the frozen FLUX (activation gradients): its remat decides the activations.
    Candidate("controlnet-v5p128-default", "controlnet", "v5p:4x4x4", dict(data=1, fsdp=-1, tensor=4), 64,
              {"controlnet": "full", "flux": "none"}, why="configs/full/controlnet.py as shipped: 1 per chip"),
    Candidate("controlnet-v6e64-default", "controlnet", "v6e:8x8", dict(data=1, fsdp=-1, tensor=4), 64,
              {"controlnet": "full", "flux": "none"}, why="v6e pod, as shipped"),
    Candidate("controlnet-v5p128-fsdp", "controlnet", "v5p:4x4x4", dict(data=1, fsdp=-1, tensor=1), 64,
              {"controlnet": "full", "flux": "none"}, why="pure FSDP"),
    Candidate("controlnet-v5p8", "controlnet", "v5p:2x2x1", dict(data=1, fsdp=-1, tensor=1), 4,
              {"controlnet": "full", "flux": "full"}, why="smallest v5p slice (4 chips): ~13 GiB state per chip"),
    Candidate("controlnet-v6e4", "controlnet", "v6e:2x2", dict(data=1, fsdp=-1, tensor=1), 4,
              {"controlnet": "full", "flux": "full"}, why="~13 GiB state per chip of 32 GiB"),
    # ---- v6e-64 layouts the first pass could not compile or did not try
    Candidate("controlnet-v6e64-fsdp-fluxremat", "controlnet", "v6e:8x8", dict(data=1, fsdp=-1, tensor=1), 64,
              {"controlnet": "full", "flux": "full"},
              why="pure FSDP (v5p-128: 4% faster than fsdp x tensor) with the frozen FLUX rematerialised: its "
                  "activations (50.7 GiB/chip on v5p without remat) cannot fit 32 GiB"),
    Candidate("mllm-v6e64-fsdp-b256", "mllm", "v6e:8x8", dict(data=1, fsdp=-1, tensor=1), 256,
              {"mllm": "none"}, why="4 per chip: the v5p-128 b512 gain (all-gathers amortised) within 32 GiB"),
    # remat "none" keeps every layer's GATHERED weight for the backward (12.6 GiB/chip of bf16 branch weights,
    # tests/test_remat_weights.py); "dots_no_batch" saves the projections' outputs and re-gathers the weights
    Candidate("mllm-v6e64-fsdp-b256-dots", "mllm", "v6e:8x8", dict(data=1, fsdp=-1, tensor=1), 256,
              {"mllm": "dots_no_batch"}, why="b256 without the gathered weights kept for the backward"),
    Candidate("mllm-v6e64-fsdp-b512-dots", "mllm", "v6e:8x8", dict(data=1, fsdp=-1, tensor=1), 512,
              {"mllm": "dots_no_batch"}, why="8 per chip, fits 32 GiB once the weights are re-gathered?"),
    Candidate("mllm-v6e64-fsdp-b1024-dots", "mllm", "v6e:8x8", dict(data=1, fsdp=-1, tensor=1), 1024,
              {"mllm": "dots_no_batch"}, why="16 per chip: 8 per chip used 8.8 GiB of 32"),
    Candidate("mllm-v6e8-dots", "mllm", "v6e:2x4", dict(data=1, fsdp=-1, tensor=1), 8, {"mllm": "dots_no_batch"},
              why="smallest v6e slice without the full-remat recomputation"),
    Candidate("mllm-v6e4", "mllm", "v6e:2x2", dict(data=1, fsdp=-1, tensor=1), 4, {"mllm": "full"},
              why="4 chips: ~28 GiB of state per chip with the frozen LM in bf16: does it still fit 32?"),
    Candidate("mllm-v5p128-fsdp-b512-dots", "mllm", "v5p:4x4x4", dict(data=1, fsdp=-1, tensor=1), 512,
              {"mllm": "dots_no_batch"}, why="the fastest v5p-128 layout without the gathered weights kept"),
    Candidate("mllm-v5p128-fsdp-b1024-dots", "mllm", "v5p:4x4x4", dict(data=1, fsdp=-1, tensor=1), 1024,
              {"mllm": "dots_no_batch"}, why="16 per chip: amortise the all-gathers further"),
    Candidate("controlnet-v6e64-fsdp-fluxremat-b128", "controlnet", "v6e:8x8", dict(data=1, fsdp=-1, tensor=1),
              128, {"controlnet": "full", "flux": "full"},
              why="2 per chip: the b64 row uses 7.8 GiB of 32; amortise the weight all-gathers"),
    # the frozen FLUX with "dots_no_batch": its projections' outputs saved (no FLUX forward recomputed), its
    # weights re-gathered in the backward instead of kept (policy "none" keeps all 12B gathered on every chip)
    Candidate("controlnet-v6e64-fsdp-fluxdots", "controlnet", "v6e:8x8", dict(data=1, fsdp=-1, tensor=1), 64,
              {"controlnet": "full", "flux": "dots_no_batch"}, why="pure FSDP, frozen FLUX re-gathered, not recomputed"),
    Candidate("controlnet-v6e64-fsdp-fluxdots-b256", "controlnet", "v6e:8x8", dict(data=1, fsdp=-1, tensor=1), 256,
              {"controlnet": "full", "flux": "dots_no_batch"}, why="4 per chip: 1 per chip used 8.9 GiB of 32"),
    # fsdp x tensor=4 with remat full was the fastest layout at 2 per chip once the frozen LM was bf16
    # (mllm-v5p128-default recompiled with the bf16 frozen LM): does it hold with dots_no_batch, and at 8 per chip?
    Candidate("mllm-v5p128-fsdp-dots", "mllm", "v5p:4x4x4", dict(data=1, fsdp=-1, tensor=1), 128,
              {"mllm": "dots_no_batch"}, why="the shipped config on v5p-128: 2 per chip"),
    Candidate("mllm-v5p128-tensor4-b512-dots", "mllm", "v5p:4x4x4", dict(data=1, fsdp=-1, tensor=4), 512,
              {"mllm": "dots_no_batch"}, why="fsdp=16 x tensor=4 at 8 per chip"),
    Candidate("mllm-v5p128-tensor4-dots", "mllm", "v5p:4x4x4", dict(data=1, fsdp=-1, tensor=4), 128,
              {"mllm": "dots_no_batch"}, why="fsdp=16 x tensor=4 at 2 per chip, activations saved"),
    Candidate("mllm-v6e64-tensor4-dots", "mllm", "v6e:8x8", dict(data=1, fsdp=-1, tensor=4), 128,
              {"mllm": "dots_no_batch"}, why="fsdp=16 x tensor=4 at 2 per chip, activations saved"),
    Candidate("mllm-v5p64-tensor4-b512-dots", "mllm", "v5p:4x4x2", dict(data=1, fsdp=-1, tensor=4), 512,
              {"mllm": "dots_no_batch"}, why="fsdp=8 x tensor=4 at 16 per chip"),
    Candidate("mllm-v6e64-tensor4-full", "mllm", "v6e:8x8", dict(data=1, fsdp=-1, tensor=4), 128,
              {"mllm": "full"}, why="the first mllm layout on v6e-64: 2 per chip"),
    Candidate("mllm-v6e64-tensor4-b1024-dots", "mllm", "v6e:8x8", dict(data=1, fsdp=-1, tensor=4), 1024,
              {"mllm": "dots_no_batch"}, why="fsdp=16 x tensor=4 at 16 per chip"),
    # ---- v5p-64 proper: Cloud TPU names v5p slices by TensorCores (2 per chip), so v5p-64 = 32 chips = v5p:4x4x2
    # (v5p:4x4x4 above is a v5p-128); the best layouts of the 64-chip rows, on 32 chips
    Candidate("mllm-v5p64-fsdp-b256-dots", "mllm", "v5p:4x4x2", dict(data=1, fsdp=-1, tensor=1), 256,
              {"mllm": "dots_no_batch"}, why="8 per chip"),
    Candidate("mllm-v5p64-fsdp-b512-dots", "mllm", "v5p:4x4x2", dict(data=1, fsdp=-1, tensor=1), 512,
              {"mllm": "dots_no_batch"}, why="16 per chip: the fastest per-chip batch on v5p-128"),
    Candidate("controlnet-v5p64-fsdp-fluxdots", "controlnet", "v5p:4x4x2", dict(data=1, fsdp=-1, tensor=1), 64,
              {"controlnet": "full", "flux": "dots_no_batch"}, why="2 per chip, frozen FLUX re-gathered"),
    Candidate("controlnet-v5p64-fsdp-fluxdots-b128", "controlnet", "v5p:4x4x2", dict(data=1, fsdp=-1, tensor=1),
              128, {"controlnet": "full", "flux": "dots_no_batch"}, why="4 per chip"),
    Candidate("generate-v5p64-data8", "generate", "v5p:4x4x2", dict(data=8, fsdp=4, tensor=1), 32, {},
              why="8 replicas of the smallest slice"),
    # ---- generation (one MAR step + one Euler step; batch = images, one per chip)
    Candidate("generate-v5p8", "generate", "v5p:2x2x1", dict(data=1, fsdp=-1, tensor=1), 4, {},
              why="smallest v5p slice: 18 GiB of bf16 weights"),
    Candidate("generate-v6e4", "generate", "v6e:2x2", dict(data=1, fsdp=-1, tensor=1), 4, {},
              why="smallest v6e slice: 18 GiB of bf16 weights over 4 x 32 GiB"),
    Candidate("generate-v6e64-data16", "generate", "v6e:8x8", dict(data=16, fsdp=4, tensor=1), 64, {},
              why="pod as 16 replicas of the smallest slice"),
    Candidate("generate-v6e64-fsdp", "generate", "v6e:8x8", dict(data=1, fsdp=-1, tensor=1), 64, {},
              why="pod, weights sharded 64 ways"),
]


# ------------------------------------------------------------------------------------------------------------
# memory estimate from parameter counts (abstract shapes only)
# ------------------------------------------------------------------------------------------------------------
def estimate(phases=("mllm", "controlnet")) -> str:
    """Per-component parameter counts (trainable / frozen, dtype) and the state bytes that must be sharded."""
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    sys.path.insert(0, ROOT)
    import flax.linen as nn
    import jax
    import numpy as np
    from flax import traverse_util

    import bifrost_jax.train.phase_configs  # noqa: F401  (registers the phases)
    from bifrost_jax.configs import load_config_file
    from bifrost_jax.train.registry import get_phase

    lines = ["| phase | component | trainable | dtype | params (B) | bytes per param | GiB |",
             "|---|---|---|---|---|---|---|"]
    summary = []
    for name in phases:
        config = load_config_file(os.path.join(ROOT, f"configs/full/{name}.py"))
        phase = get_phase(config)
        shapes = jax.eval_shape(lambda: nn.meta.unbox(phase.init_variables(jax.random.PRNGKey(0))))
        groups: dict = {}
        frozen_dtype = config.train.get("frozen_param_dtype", "") or ""   # as train/state.StateBuilder stores them
        for k, v in traverse_util.flatten_dict(shapes["params"]).items():
            trainable = phase.is_trainable(tuple(str(p) for p in k))
            dtype = str(v.dtype)
            if not trainable and frozen_dtype and np.issubdtype(v.dtype, np.floating):
                dtype = frozen_dtype
            key = (str(k[0]), trainable, dtype)
            groups[key] = groups.get(key, 0) + int(np.prod(v.shape))
        total = 0.0
        for (comp, trainable, dtype), n in sorted(groups.items()):
            width = np.dtype(dtype).itemsize
            # trainable: weights + Adam mu/nu (same dtype as the weights in optax) + gradients
            per = 4 * width if trainable else width
            total += n * per
            lines.append(f"| {name} | {comp} | {'yes' if trainable else 'no'} | {dtype} | {n / 1e9:.3f} | {per} | "
                         f"{n * per / GIB:.1f} |")
        summary.append((name, total))
    lines.append("")
    lines.append("| phase | state+grads GiB | per chip: 4 chips | 8 | 16 | 64 |")
    lines.append("|---|---|---|---|---|---|")
    for name, total in summary:
        lines.append(f"| {name} | {total / GIB:.1f} | " + " | ".join(f"{total / GIB / n:.1f}" for n in (4, 8, 16, 64))
                     + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# running the compiles
# ------------------------------------------------------------------------------------------------------------
def run_candidate(c: Candidate, out_dir: str, timeout: float) -> dict:
    json_path = os.path.join(out_dir, f"{c.name}.json")
    log_path = os.path.join(out_dir, f"{c.name}.log")
    meta_path = os.path.join(out_dir, f"{c.name}.meta.json")
    cmd = c.command(json_path)
    env = dict(os.environ, PYTHONPATH=ROOT)
    start = time.time()
    status = "ok"
    rc, max_rss_gib = None, None
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        while True:   # os.wait4, not Popen.wait: its rusage gives the compile's peak RSS on this host
            pid, wait_status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = rc = os.waitstatus_to_exitcode(wait_status)
                max_rss_gib = usage.ru_maxrss * 1024 / GIB   # Linux: kilobytes
                break
            if time.time() - start > timeout:
                proc.kill()
                proc.wait()
                status = f"timeout after {timeout:.0f} s"
                break
            time.sleep(1.0)
    if status == "ok" and not os.path.exists(json_path):
        status = f"crashed (exit {rc}): see {log_path}"
    meta = dict(candidate=dataclasses.asdict(c), command=" ".join(cmd[1:]), rc=rc, status=status,
                wall_seconds=time.time() - start, host_max_rss_gib=max_rss_gib)
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def load_result(c: Candidate, out_dir: str) -> tuple[dict | None, dict | None]:
    rep, meta = None, None
    p = os.path.join(out_dir, f"{c.name}.json")
    if os.path.exists(p):
        with open(p) as f:
            rep = json.load(f)
    p = os.path.join(out_dir, f"{c.name}.meta.json")
    if os.path.exists(p):
        with open(p) as f:
            meta = json.load(f)
    return rep, meta


_ANALYTIC_CACHE: dict = {}


def analytic_flops(c: Candidate):
    """The analytic FLOPs (``FlopsBreakdown``, global per step) of a candidate's train step, from its config."""
    if c.name not in _ANALYTIC_CACHE:
        sys.path.insert(0, ROOT)
        import bifrost_jax.train.phase_configs  # noqa: F401  (registers the phases)
        from bifrost_jax.configs import load_config_file
        from bifrost_jax.train.registry import get_phase

        overrides = [o[len("--config."):] for o in c.overrides()]
        config = load_config_file(os.path.join(ROOT, c.config_file), overrides)
        _ANALYTIC_CACHE[c.name] = get_phase(config).analytic_flops(c.batch)
    return _ANALYTIC_CACHE[c.name]


def analytic_mfu(c: Candidate, rep: dict) -> tuple[float | None, float | None, float]:
    """(MFU from analytic FLOPs at the estimated step time, counted / analytic, analytic TFLOP per chip). Reports
    carry the target's analytic count; for those compiled before it existed it is recomputed from the config."""
    if rep.get("analytic_flops"):
        per_chip, attention = rep["analytic_flops"], rep["analytic_attention_flops"]
    else:
        a = analytic_flops(c)
        per_chip, attention = a.total / c.chips, a.attention / c.chips
    counted = rep.get("counted_flops")
    ratio = counted / per_chip if counted else None
    est, peak = rep.get("estimated_seconds"), rep.get("peak_flops")
    kernels = rep.get("uncounted_kernels") or any("Pallas kernel" in n for n in rep.get("notes", []))
    if not (est and peak):
        return None, ratio, per_chip
    step = est + (attention / peak if kernels else 0.0)
    return per_chip / step / peak, ratio, per_chip


def table(candidates, out_dir: str) -> str:
    rows = ["| phase | slice = topology (chips) | mesh | global batch (per chip) | remat | per-chip memory GiB (of HBM) | "
            "fits | est. step s | examples/s | MFU | analytic TFLOP/step/chip (counted / analytic) | compile s | "
            "candidate |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    best: dict = {}
    phases = ["mllm", "controlnet", "generate"]
    order = lambda c: (phases.index(c.phase) if c.phase in phases else len(phases), c.topology.split(":")[0],  # noqa: E731
                       -c.chips)
    for c in sorted(candidates, key=order):
        rep, meta = load_result(c, out_dir)
        mesh = ", ".join(f"{k}={v}" for k, v in c.mesh.items())
        if rep is not None:
            mesh = ", ".join(f"{k}={v}" for k, v in rep["mesh_shape"].items() if v > 1)
        remat = ", ".join(f"{k}:{v}" for k, v in c.remat.items())
        head = (f"| {c.phase} | {c.slice_name} = {c.topology} ({c.chips}) | {mesh} | {c.batch} ({c.batch / c.chips:g})"
                + (f" x{c.accum} accum" if c.accum > 1 else "") + f" | {remat} | ")
        if rep is None:
            status = meta["status"] if meta else "not compiled (yet)"
            wall = f"{meta['wall_seconds']:.0f}" if meta else "-"
            rows.append(head + f"- | {status} | - | - | - | - | {wall} | {c.name} |")
            continue
        hbm = rep.get("hbm_bytes")
        mem = f"{rep['total_bytes'] / GIB:.1f}" + (f" ({hbm / GIB:.0f})" if hbm else "")
        if rep.get("error"):
            rows.append(head + f"{mem} | NO: {rep['error'][:120]} | - | - | - | - | {rep['compile_seconds']:.0f} | "
                        f"{c.name} |")
            continue
        est = rep.get("estimated_seconds")
        eps = c.batch / est if est else None
        mfu, ratio, per_chip = analytic_mfu(c, rep)
        fits = {True: "yes", False: "NO", None: "?"}[rep.get("fits")]
        if est and mfu is not None:
            timing = f"{est:.3f} | {eps:.1f} | {100 * mfu:.1f}%"
        else:
            # no compiler estimate: the compute floor, analytic FLOPs / peak (the step time at 100% MFU)
            floor = per_chip / rep["peak_flops"] if rep.get("peak_flops") else None
            timing = ("n/a (floor " + f"{floor:.3f})" if floor else "n/a") + " | " + (
                f"<= {c.batch / floor:.0f}" if floor else "-") + " | n/a"
        flops_cell = f"{per_chip / 1e12:.1f}" + (f" ({ratio:.2f})" if ratio else "")
        rows.append(head + f"{mem} | {fits} | {timing} | {flops_cell} | {rep['compile_seconds']:.0f} | {c.name} |")
        if rep.get("fits") and eps:
            key = (c.phase, c.slice_name)
            if key not in best or eps > best[key][0]:
                best[key] = (eps, c.name)
    out = "\n".join(rows)
    if best:
        out += "\n\nFastest that fits, per phase and topology (compiler estimate): " + "; ".join(
            f"{p} on {t}: `{n}` ({e:.1f} examples/s)" for (p, t), (e, n) in sorted(best.items()))
    return out


def commands(candidates, out_dir: str) -> str:
    return "\n".join("PYTHONPATH=. " + " ".join(c.command(os.path.join(out_dir, f"{c.name}.json"))) for c in candidates)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--estimate", action="store_true", help="print the memory estimate from parameter counts")
    p.add_argument("--phases", default="mllm,controlnet",
                   help="configs/full/<name>.py files of --estimate (e.g. sdxl_controlnet,sd15_controlnet)")
    p.add_argument("--run", action="store_true", help="compile the candidates not compiled yet, in sequence")
    p.add_argument("--table", action="store_true", help="print the table of the results in --out")
    p.add_argument("--commands", action="store_true", help="print the exact bifrost aot commands")
    p.add_argument("--only", default="", help="comma-separated candidate names (default: all)")
    p.add_argument("--out", default="/tmp/bifrost_aot_table")
    p.add_argument("--timeout", type=float, default=2400.0, help="seconds per compile before it counts as hung")
    p.add_argument("--markdown", default="", help="write the table here")
    args = p.parse_args(argv)
    chosen = [c for c in CANDIDATES if not args.only or c.name in args.only.split(",")]
    if args.only and len(chosen) != len(args.only.split(",")):
        known = [c.name for c in CANDIDATES]
        raise SystemExit(f"unknown candidate in --only={args.only}; known: {known}")
    os.makedirs(args.out, exist_ok=True)
    if args.estimate:
        print(estimate(tuple(args.phases.split(","))))
    if args.commands:
        print(commands(chosen, args.out))
    if args.run:
        for c in chosen:
            rep, _ = load_result(c, args.out)
            if rep is not None:
                print(f"{c.name}: already compiled", flush=True)
                continue
            print(f"{c.name}: compiling ({time.strftime('%H:%M:%S')}) ...", flush=True)
            meta = run_candidate(c, args.out, args.timeout)
            print(f"{c.name}: {meta['status']} in {meta['wall_seconds']:.0f} s", flush=True)
    if args.run or args.table:
        text = table(chosen, args.out)
        print(text)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
