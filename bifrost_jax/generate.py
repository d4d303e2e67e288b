"""``bifrost generate``: images for prompts, from a trained workdir (``--checkpoint WORKDIR``: the configs its
phases recorded) or a generation config (``--config FILE``, optionally with a workdir's phase checkpoints)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm

from bifrost_jax.sample.build import BUILD_DOC
from bifrost_jax.sample.images import make_grid, save_png
from bifrost_jax.sample.schedulers import SCHEDULERS
from bifrost_jax.configs import positive_int
from bifrost_jax.train.export import WeightsError, load_pipeline


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="bifrost generate", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate images with Bifrost-1 (MLLM MAR decoding -> latent ControlNet + FLUX).\n\n"
                    "  bifrost generate --checkpoint WORKDIR --prompt '...' --out DIR      (a trained workdir)\n"
                    "  bifrost generate --config FILE [--config.KEY=VALUE ...] --prompt '...' --out DIR\n\n"
                    "With --checkpoint the workdir's controlnet and mllm phases rebuild the pipeline from the "
                    "configs their checkpoints recorded; a --config names every component's weights itself.\n\n"
                    + BUILD_DOC)
    parser.add_argument("--checkpoint", default=None, help="a training WORKDIR (its phase checkpoints)")
    parser.add_argument("--random-weights", action="store_true",
                        help="allow config components with no weight source (port_dir / init_from): random weights")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    parser.add_argument("--num-images", type=positive_int, default=None, help="images per prompt (default: config)")
    parser.add_argument("--seed", type=int, default=None, help="seed, re-used for every prompt (default: config)")
    parser.add_argument("--mar-steps", type=positive_int, default=None, help="MAR decoding steps (default: config / N)")
    parser.add_argument("--mllm-cfg", type=float, default=None, help="MLLM classifier-free guidance weight")
    parser.add_argument("--flux-steps", type=positive_int, default=None,
                        help="diffusion decoder steps (FLUX Euler; a UNet decoder's scheduler)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="FLUX distilled guidance (a UNet decoder: the text CFG scale)")
    parser.add_argument("--sampler", default=None, choices=sorted(SCHEDULERS),
                        help="a UNet decoder's sampling scheduler with --checkpoint WORKDIR (default: "
                             "DPMSolverMultistepScheduler); FLUX always samples with its flow-matching Euler")
    parser.add_argument("--conditioning-scale", type=float, default=None, help="latent ControlNet residual scale")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="prompts per generation call")
    parser.add_argument("--out", required=True, help="output directory")
    args, rest = parser.parse_known_args(argv)
    if not args.prompt:
        parser.error("give at least one --prompt")

    try:
        pipe, config = load_pipeline(rest, args.checkpoint, random_weights=args.random_weights,
                                     sampler=args.sampler)
    except (WeightsError, FileNotFoundError) as e:
        parser.error(str(e))
    given = {"num_images_per_prompt": args.num_images, "seed": args.seed, "mar_steps": args.mar_steps,
             "mllm_cfg": args.mllm_cfg, "flux_steps": args.flux_steps, "guidance": args.guidance,
             "conditioning_scale": args.conditioning_scale}
    pipe.options = dataclasses.replace(pipe.options, **{k: v for k, v in given.items() if v is not None})
    k, seed = pipe.options.num_images_per_prompt, pipe.options.seed
    os.makedirs(args.out, exist_ok=True)
    files, all_images = [], []
    batches = [args.prompt[i:i + args.batch_size] for i in range(0, len(args.prompt), args.batch_size)]
    for b, batch in enumerate(tqdm(batches, desc="generate", unit="batch")):
        images = pipe.generate(batch)
        for i, prompt in enumerate(batch):
            p = b * args.batch_size + i
            for j in range(k):
                name = f"{p:03d}_{j:02d}.png"
                save_png(os.path.join(args.out, name), images[i * k + j])
                files.append({"file": name, "prompt": prompt, "index": j})
        all_images.append(images)
    save_png(os.path.join(args.out, "grid.png"), make_grid(np.concatenate(all_images), cols=k))
    record = {"prompts": args.prompt, "seed": seed, "num_images_per_prompt": k,
              "sampling": dataclasses.asdict(pipe.options),
              "checkpoint": args.checkpoint, "files": files,
              "config": json.loads(config.to_json()) if config is not None else None}
    with open(os.path.join(args.out, "config.json"), "w") as fh:
        json.dump(record, fh, indent=2)
    with open(os.path.join(args.out, "seed.txt"), "w") as fh:
        fh.write(f"{seed}\n")
    print(f"wrote {len(files)} images and grid.png to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
