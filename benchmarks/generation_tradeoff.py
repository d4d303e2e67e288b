"""Speed / quality trade-off of generation on CPU for the demo config: per-image time of the MLLM stage (MAR
decoding of the N = 16 CLIP latents) and of the diffusion stage (T5/CLIP text, ControlNet + FLUX Euler steps, VAE
decode), at several MAR step counts, each with the shapes checker's scores on held-out prompts.

Needs the demo's checkpoints (``make demo`` or ``bifrost demo --workdir runs/demo``):

    python benchmarks/generation_tradeoff.py --workdir runs/demo [--mar-steps 1,2,4,8,16] [--prompts 64]
        [--append benchmarks/RESULTS.md]

Every configuration is compiled and warmed up on one batch first; the times are the mean over all prompts of the
steady-state calls (batches of ``config.generate.batch`` prompts, one image each, ``block_until_ready`` between
stages). The score is the shapes checker's per-attribute accuracy (chance levels in the last row).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ATTRS = ("color", "shape", "count", "relation", "overall")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--mar-steps", default="1,2,4,8,16")
    p.add_argument("--prompts", type=int, default=0, help="held-out prompts (default: config.generate.num_prompts)")
    p.add_argument("--append", default="", help="append the markdown table to this file (e.g. benchmarks/RESULTS.md)")
    args, rest = p.parse_known_args(argv)

    import jax

    from bifrost_jax import demo as demo_mod

    cfg = demo_mod.load_demo_config(rest)
    g = cfg.generate
    for name in demo_mod.PHASE_ORDER:
        if demo_mod.latest_step(args.workdir, name) is None:
            raise SystemExit(f"no {name} checkpoint under {args.workdir}: run `bifrost demo --workdir "
                             f"{args.workdir}` first")

    pipe = demo_mod.load_pipeline(args.workdir, g)
    n = args.prompts or int(g.num_prompts)
    held = demo_mod.held_out_prompts(cfg, n, out_resolution=pipe.image_size[0], vit_resolution=pipe.vision_size[0])
    batch = min(int(g.batch), n)
    rows = []
    for steps in [int(s) for s in args.mar_steps.split(",")]:
        kw = dict(seed=int(g.seed), flux_steps=int(g.flux_steps), mar_steps=steps)
        t0 = time.perf_counter()
        demo_mod.staged_generate(pipe, held.captions[:batch], **kw)  # compile + warm up
        compile_s = time.perf_counter() - t0
        images, t_mllm, t_diff = demo_mod.generate_batched(pipe, held.captions, batch, **kw)
        report = demo_mod.score(images, held.specs)
        rows.append(dict(steps=steps, mllm_ms=1e3 * t_mllm / n, diff_ms=1e3 * t_diff / n, compile_s=compile_s,
                         acc=report.accuracy, chance=report.chance))
        print(f"MAR {steps:>3} steps: MLLM {rows[-1]['mllm_ms']:.1f} ms/image, diffusion "
              f"{rows[-1]['diff_ms']:.1f} ms/image, " + ", ".join(f"{a} {report.accuracy[a]:.3f}" for a in ATTRS),
              flush=True)

    load = os.getloadavg()
    lines = [
        "",
        f"## Generation speed / quality trade-off (demo config, CPU) — {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"`python benchmarks/generation_tradeoff.py --workdir {args.workdir} --mar-steps {args.mar_steps}"
        + (f" --prompts {args.prompts}" if args.prompts else "") + "`",
        "",
        f"Checkpoints of `bifrost demo` in `{args.workdir}`; {n} held-out prompts (shapes test split, one image "
        f"each, seed {g.seed}), {pipe.image_size[0]}x{pipe.image_size[1]} px, N = "
        f"{pipe.mllm.config.num_image_tokens} CLIP latents, FLUX {g.flux_steps} Euler steps, guidance {g.guidance}, "
        f"ControlNet scale {g.conditioning_scale}, batches of {batch} prompts. Per-image times are steady-state means "
        f"(compilation excluded) on {jax.devices()[0].platform.upper()} ({os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}), load average during the run "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min): shared machine, times inflated.",
        "",
        "| MAR steps | MLLM ms/image | diffusion ms/image | total ms/image | "
        + " | ".join(ATTRS) + " |",
        "|---:|---:|---:|---:|" + "---:|" * len(ATTRS),
    ]
    for r in rows:
        lines.append(f"| {r['steps']} | {r['mllm_ms']:.1f} | {r['diff_ms']:.1f} | {r['mllm_ms'] + r['diff_ms']:.1f} | "
                     + " | ".join(f"{r['acc'][a]:.3f}" for a in ATTRS) + " |")
    lines.append("| chance | | | | " + " | ".join(f"{rows[0]['chance'][a]:.3f}" for a in ATTRS) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append:
        with open(args.append, "a") as fh:
            fh.write(text)
        print(f"appended to {args.append}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
