"""One-call accelerator check: attention paths, full-width training steps, and a FLUX-size denoising step beside
diffusers, written as JSON + markdown.

    python benchmarks/device_check.py --out "$OUT"              # full size, one GPU (H100/H200), <= 8 minutes
    python benchmarks/device_check.py --dry-run --out dc_dry    # tiny, CPU, under a minute (tests/test_device_check.py)

Sections (each runs on its own; a failure is recorded in the report with its traceback and the next section runs):

1. ``attention``: ``nn.attention.dot_product_attention`` with ``implementation="xla"`` and ``"cudnn"`` on the shapes of
   the full-size models -- FLUX joint attention (4096 image + 512 text tokens, 24 heads x 128), the Qwen2.5-VL decoder
   over the MLLM training sequence (300 left-padded text tokens + 256 image slots, 28 query / 4 KV heads, causal text
   + bidirectional image block + padding: an ``AttentionMask``), and the ViT's windowed attention (8x8-patch windows,
   16 heads x 80) -- in bf16: forward and forward+backward time, and the max relative error of each path's output
   (valid rows) against ``jax.nn.dot_product_attention(implementation="xla")`` in float32, and of cuDNN's gradients
   against the XLA path's.
2. ``generate``: one denoising step (latent ControlNet + FLUX.1-dev-size transformer, guidance embedding, 512 T5
   tokens) at 1024x1024 and 512x512, batch 1, bf16, in JAX (scanned blocks, attention "auto" = cuDNN on GPU) and in
   diffusers (``FluxTransformer2DModel`` + ``FluxControlNetModel``, torch bf16, SDPA) on the same GPU with the SAME
   weights (diffusers' random init, read into the JAX modules through the port key maps). Both start from the
   upsampled CLIP latents, as their pipelines do in the loop (JAX applies the ControlNet's input Linear once per image,
   diffusers inside every step). Reports ms per step and the max relative difference of the velocities.
3. ``train_controlnet``: the ``controlnet`` phase's step (frozen FLUX.1-dev in bf16 under the ControlNet's residuals,
   remat "dots_no_batch"; latent ControlNet 4 double + 1 single blocks trained in fp32 master weights with bf16
   compute, remat "full", BatchNorm batch statistics; flow-matching loss; AdamW) at 512x512 (1024 image tokens, 512
   text tokens) on random inputs standing in for the frozen encoders' outputs; step time, examples and tokens per
   second, MFU from ``models/flops.py``'s analytic count of the parts that run (FLUX + ControlNet; the frozen text
   encoders, ViT and VAE of the full phase are not run here), peak memory.
4. ``train_mllm``: the ``mllm`` phase's step at Qwen2.5-VL-7B width with a few layers (scanned, remat
   "dots_no_batch", frozen weights bf16, the generation branch trained in fp32 master weights, MAR masking, MSE loss,
   AdamW) over 300 text tokens + 256 image slots; same figures.

Imports: jax, flax, optax, numpy, safetensors (all on the device image), and torch + diffusers for the PyTorch half of
``generate`` (absent: that half is skipped with the reason; see benchmarks/RESULTS.md for the wheel to carry).
Nothing from the data/train/config layers (no ml_collections, grain, tensorflow-datasets).
"""
import os

# torch shares the GPU in "generate": JAX allocates on demand (up to 90% of HBM) instead of taking 75% up front
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from device_check_sections import (FULL, SECTIONS, TINY, device_info, run_attention, run_generate,  # noqa: E402
                                   run_train_controlnet, run_train_mllm)


# ----------------------------------------------------------------------------------------------------------------
# the report

def _fmt(x, spec=".3g") -> str:
    if x is None:
        return "-"
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def markdown(report: dict) -> str:
    d = report["device"]
    lines = [f"## Device check ({report['size']} size)", "",
             f"Device: {d['device_kind']} x{d['device_count']} ({d['backend']}), jax {d['jax']}, peak bf16 "
             f"{_fmt(d['peak_bf16_flops'])} FLOP/s; command `{report['command']}`; total {report['total_s']:.0f} s.",
             ""]
    att = report["sections"].get("attention", {})
    if "error" in att:
        lines += [f"attention: ERROR {att['error'].splitlines()[-1]}", ""]
    elif att:
        lines += ["| attention case | q / kv | impl | fwd ms | fwd+bwd ms | max rel err vs f32 ref | grad err vs xla |",
                  "|---|---|---|---|---|---|---|"]
        for name, case in att.items():
            for impl, r in case["implementations"].items():
                shape = f"{case['q']} / {case['kv']}"
                if "skipped" in r or "error" in r:
                    lines.append(f"| {name} | {shape} | {impl} | {r.get('skipped') or r.get('error')[:120]} | | | |")
                else:
                    lines.append(f"| {name} | {shape} | {impl} | {_fmt(r['fwd_ms'])} | {_fmt(r['fwd_bwd_ms'])} | "
                                 f"{_fmt(r['max_rel_err_vs_reference'], '.2e')} | "
                                 f"{_fmt(r.get('grad_max_rel_err_vs_xla'), '.2e')} |")
        lines.append("")
    gen = report["sections"].get("generate", {})
    if "error" in gen:
        lines += [f"generate: ERROR {gen['error'].splitlines()[-1]}", ""]
    elif gen:
        lines += ["| denoising step (FLUX + latent ControlNet, batch 1) | JAX ms | diffusers ms | diffusers / JAX | "
                  "velocity max rel diff | JAX compile s |", "|---|---|---|---|---|---|"]
        for res_name, r in gen["resolutions"].items():
            t = r.get("torch", {})
            lines.append(f"| {res_name} ({r['image_tokens']} image tokens) | {_fmt(r['jax']['ms_per_step'])} | "
                         f"{_fmt(t.get('ms_per_step'))} | {_fmt(r.get('torch_over_jax'))} | "
                         f"{_fmt(r.get('velocity_max_rel_diff'), '.2e')} | {_fmt(r['jax']['compile_and_first_s'])} |")
        if "torch" in gen and isinstance(gen["torch"], str):
            lines.append(f"\n{gen['torch']}")
        lines.append("")
    for name in ("train_controlnet", "train_mllm"):
        r = report["sections"].get(name)
        if r is None:
            continue
        if "error" in r:
            lines += [f"{name}: ERROR {r['error'].splitlines()[-1]}", ""]
            continue
        lines += [f"{name}: batch {r['batch']}, step {_fmt(r['step_ms'])} ms (compile+first "
                  f"{_fmt(r['compile_and_first_s'])}"
                  f" s), {_fmt(r['examples_per_s'])} examples/s, {_fmt(r['tokens_per_s'])} tokens/s, analytic "
                  f"{_fmt(r['analytic_flops_per_step'])} FLOP/step = {_fmt(r['achieved_tflops'])} TFLOP/s, MFU "
                  f"{_fmt(None if r['mfu'] is None else 100 * r['mfu'], '.1f')}%, peak memory "
                  f"{_fmt(r['peak_memory_gib'])} GiB, loss {_fmt(r['loss'], '.4f')}", ""]
    for name, why in report.get("skipped", {}).items():
        lines.append(f"{name}: skipped ({why})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "device_check_out"), help="folder for the report")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes (CPU): checks the script, not the device")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="skip sections not yet started once this many seconds have passed")
    p.add_argument("--controlnet-batch", type=int, default=None,
                   help="default: 4 where JAX may use >= 100 GiB (H200), else 2 (tiny: 2)")
    p.add_argument("--mllm-batch", type=int, default=None, help="default 8 (tiny: 2)")
    p.add_argument("--mllm-layers", type=int, default=None, help="Qwen2.5-VL-7B layers in the mllm step (default 4)")
    p.add_argument("--flux-blocks", default=None, help="double,single FLUX blocks (default: FLUX.1-dev's 19,38)")
    args = p.parse_args(argv)
    s = TINY if args.dry_run else FULL
    if args.mllm_layers:
        s = dataclasses.replace(s, qwen={**s.qwen, "num_hidden_layers": args.mllm_layers})
    if args.flux_blocks:
        d, sg = (int(x) for x in args.flux_blocks.split(","))
        s = dataclasses.replace(s, flux={**s.flux, "num_layers": d, "num_single_layers": sg})
    sections = [x for x in args.sections.split(",") if x]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"device_check: unknown section(s) {unknown}; choose from {SECTIONS}")
    stats = jax.devices()[0].memory_stats() or {}
    hbm = stats.get("bytes_limit", 0) / 2 ** 30
    cn_batch = args.controlnet_batch or (2 if s is TINY or hbm < 100 else 4)
    mllm_batch = args.mllm_batch or (2 if s is TINY else 8)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    report = dict(size=s.name, command=" ".join(["python benchmarks/device_check.py"] + list(argv or sys.argv[1:])),
                  device=device_info(), sections={}, skipped={}, timings_s={})
    runners = {"attention": lambda: run_attention(s), "generate": lambda: run_generate(s),
               "train_controlnet": lambda: run_train_controlnet(s, cn_batch),
               "train_mllm": lambda: run_train_mllm(s, mllm_batch)}
    for name in sections:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            report["skipped"][name] = f"time budget: {elapsed:.0f} s > {args.budget_s:.0f} s"
            continue
        t0 = time.perf_counter()
        try:
            report["sections"][name] = runners[name]()
        except Exception:  # noqa: BLE001  (record and go on: one failing section must not cost the others)
            report["sections"][name] = dict(error=traceback.format_exc()[-4000:])
        report["timings_s"][name] = time.perf_counter() - t0
        print(f"[device_check] {name}: {report['timings_s'][name]:.1f} s", flush=True)
        _write(args.out, report, start)  # partial results survive a timeout
    _write(args.out, report, start)
    print(markdown(report))
    return report


def _write(out: str, report: dict, start: float) -> None:
    report["total_s"] = time.perf_counter() - start
    with open(os.path.join(out, "device_check.json"), "w") as fh:
        json.dump(report, fh, indent=1, default=str)
    with open(os.path.join(out, "device_check.md"), "w") as fh:
        fh.write(markdown(report))


if __name__ == "__main__":
    main()
