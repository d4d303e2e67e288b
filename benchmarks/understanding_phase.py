"""The demo's ``understanding`` phase at the demo's sizes: train it, then score its answers on held-out images.

    python benchmarks/understanding_phase.py --workdir runs/und --steps 600 --lr 2e-3 [--weight-decay 0.05]
        [--images 128] [--config.models.mllm_text.rope_theta=1e6 ...]

Trains ``phase_configs(configs/demo.py)["understanding"]`` (with the demo config overrides given, the steps / lr /
weight decay given) through the generic loop, then asks every evaluation question about the first ``--images``
held-out scenes (``eval/shapes_understanding.ask``) and prints the accuracy per attribute and per scene kind, the
training time and the last logged step time. Figures: benchmarks/RESULTS.md (understanding phase).
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter

from bifrost_jax import demo as demo_lib
from bifrost_jax.eval.shapes_understanding import ask, understanding_variables
from bifrost_jax.train.loop import train


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--images", type=int, default=128)
    args, rest = parser.parse_known_args(argv)
    cfg = demo_lib.load_demo_config([f"--config.phases.understanding.steps={args.steps}",
                                     f"--config.phases.understanding.batch_size={args.batch}",
                                     f"--config.phases.understanding.lr={args.lr}"] + rest)
    config = demo_lib.phase_configs(cfg, args.workdir)["understanding"]
    config.optim.weight_decay = args.weight_decay
    t0 = time.perf_counter()
    result = train(config, args.workdir, progress_bar=False)
    seconds = time.perf_counter() - t0
    held = demo_lib.held_out_prompts(cfg, args.images, out_resolution=int(cfg.data.vae_resolution),
                                     vit_resolution=int(cfg.models.vision_resolution))
    model, variables, tokenizer = understanding_variables(args.workdir)
    scores = ask(model.module, variables, tokenizer, held.vit_views, held.specs)
    right, total = Counter(), Counter()
    for row in scores.rows:
        spec = held.specs[row["image"]]
        key = f"{row['kind']}/{'relation' if spec.relation else f'count{spec.count}'}"
        total[key] += 1
        right[key] += int(row["correct"])
    print(json.dumps({"steps": args.steps, "batch": args.batch, "lr": args.lr, "weight_decay": args.weight_decay,
                      "train_seconds": seconds, "last_step_time_s": result.last_metrics.get("step_time_s"),
                      "final_loss": result.last_metrics.get("loss"), "held_out": scores.to_json(),
                      "by_scene_kind": {k: right[k] / total[k] for k in sorted(total)}}, default=float, indent=1))


if __name__ == "__main__":
    main()
