"""``bifrost eval geneval | dpg | reconstruction | shapes | understanding``: sharded evaluation of a Bifrost-1 pipeline
(``understanding``: of its understanding model, ``eval/understanding.py``).

Every mode builds the pipeline on each host from a trained workdir (``--checkpoint WORKDIR``: the configs its
phases recorded) or a generation config (``--config CFG``; its ``config.mesh`` spans that host's local devices)
and splits the work over hosts (``jax.process_index/count``);
multi-host runs start ``jax.distributed`` from the environment as ``bifrost train`` does (BIFROST_COORDINATOR, ...;
see ``launch/local_multiprocess.py``). The only cross-host communication is the final all-reduce of the metric sums
(and a barrier), so hosts never wait on each other while generating.

    bifrost eval geneval (--checkpoint WORKDIR | --config CFG [--random-weights]) --prompts evaluation_metadata.jsonl
        --out DIR [--num-images 4] [--batch-size 4] [--limit N] [--seed S]
    bifrost eval dpg (--checkpoint WORKDIR | --config CFG [--random-weights]) --prompts DPG_PROMPTS_DIR --out DIR
        [--batch-size 4] [--limit N] [--seed S]          (eval/dpg.py: <name>.png 2x2 grids without padding)
    bifrost eval understanding --checkpoint CKPT --data BENCH.tsv [--data ...] --out DIR   (its own --help)
    bifrost eval reconstruction (--checkpoint WORKDIR | --config CFG [--random-weights]) --dataset shapes|folder
        --data-dir DIR [--split validation] [--limit N] [--batch-size 4] [--use-captions] [--inception WEIGHTS]
        --out DIR
    bifrost eval shapes (--checkpoint WORKDIR | --config CFG [--random-weights]) --out DIR [--num-prompts 200]
        [--num-images 4]

FID: ``eval reconstruction --inception WEIGHTS`` also reports the FID between the reconstructions and the originals
(at the output size), with pytorch-fid's Inception-v3: WEIGHTS is the user's pytorch-fid weights file
(``pt_inception-2015-12-05-6726825d.pth``; reading a .pth needs torch, a .safetensors with the same keys does not).
Nothing is downloaded; without --inception only PSNR and SSIM are reported.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from bifrost_jax.data.pipeline import make_eval_iterator
from bifrost_jax.data.shapes import HELD_OUT_PAIRS, SceneSpec, ShapesOptions, load_shapes, make_example
from bifrost_jax.eval import dpg, understanding
from bifrost_jax.configs import positive_int
from bifrost_jax.eval.geneval import barrier, file_sha256, missing_prompts, read_prompts, run_geneval
from bifrost_jax.eval import reconstruction
from bifrost_jax.eval.reconstruction import all_reduce_sum, evaluate_reconstruction, folder_source, make_preprocess
from bifrost_jax.parallel.mesh import maybe_initialize_distributed
from bifrost_jax.sample.images import save_png
from bifrost_jax.sample.schedulers import SCHEDULERS
from bifrost_jax.train.export import WeightsError, load_pipeline
from bifrost_jax.eval.shapes_checker import (ATTRIBUTES, CheckerConfig, ShapesReport, chance_levels, check_image)

MODES = ("geneval", "dpg", "reconstruction", "shapes", "understanding")


# ----------------------------------------------------------------------------------------------------------------
# shapes

def shapes_examples(num_prompts: int, options=None, split: str = "test") -> list[dict]:
    """The first ``num_prompts`` examples of a shapes split (``test`` = the held-out colour-shape pairs), exactly
    the scenes the TFDS build holds (no build needed)."""
    options = options or ShapesOptions()
    return [make_example(options, split, i) for i in range(num_prompts)]


def shapes_prompts(num_prompts: int, options=None, split: str = "test"):
    """(captions, SceneSpecs) of ``shapes_examples``."""
    examples = shapes_examples(num_prompts, options, split)
    return [e["caption"] for e in examples], [SceneSpec.from_features(e) for e in examples]


def evaluate_shapes(generate_fn: Callable[[Sequence[str], int, int], np.ndarray], captions: Sequence[str], specs,
                    *, num_images: int, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1,
                    checker: CheckerConfig = CheckerConfig(), image_dir: Optional[str] = None,
                    progress: bool = True) -> ShapesReport:
    """Generate ``num_images`` per prompt (prompts dealt round-robin to the hosts, batches padded to one static
    shape), score every image with the checker, all-reduce the per-attribute counts; chance levels from ``specs``."""

    mine = list(range(process_index, len(captions), process_count))
    totals = np.zeros((len(ATTRIBUTES), 2), np.int64)  # hits, applicable
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc=f"shapes[{process_index}]", unit="batch")
    for batch in batches:
        padded = batch + [batch[-1]] * (batch_size - len(batch))
        images = np.asarray(generate_fn([captions[i] for i in padded], num_images, seed))
        for j, index in enumerate(batch):
            for k in range(num_images):
                image = images[j * num_images + k]
                if image_dir:
                    save_png(os.path.join(image_dir, f"{index:05d}_{k:02d}.png"), image)
                for attr, ok in check_image(image, specs[index], checker).items():
                    a = ATTRIBUTES.index(attr)
                    totals[a] += (int(ok), 1)
    totals = all_reduce_sum(totals)
    accuracy = {a: (float(totals[i, 0] / totals[i, 1]) if totals[i, 1] else float("nan"))
                for i, a in enumerate(ATTRIBUTES)}
    counts = {a: int(totals[i, 1]) for i, a in enumerate(ATTRIBUTES)}
    return ShapesReport(accuracy, chance_levels(list(specs)), counts)


# ----------------------------------------------------------------------------------------------------------------
# command line

def _parser(mode: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"bifrost eval {mode}", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0] + " Also takes --config FILE and "
                                            "--config.KEY=VALUE overrides (schema: bifrost generate --help).")
    p.add_argument("--checkpoint", default=None, help="a trained WORKDIR (without --config: its recorded configs)")
    p.add_argument("--random-weights", action="store_true",
                   help="allow config components with no weight source (port_dir / init_from): random weights")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--batch-size", type=positive_int, default=4, help="prompts (images) per host per generation call")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: config.sample.seed)")
    p.add_argument("--sampler", default=None, choices=sorted(SCHEDULERS),
                   help="a UNet decoder's sampling scheduler with --checkpoint WORKDIR (default: "
                        "DPMSolverMultistepScheduler)")
    if mode == "geneval":
        p.add_argument("--prompts", required=True, help="GenEval evaluation_metadata.jsonl")
        p.add_argument("--num-images", type=positive_int, default=None, help="samples per prompt (default: config)")
        p.add_argument("--limit", type=positive_int, default=None, help="only the first N prompts")
        p.add_argument("--no-grid", action="store_true", help="do not write grid.png per prompt")
    elif mode == "dpg":
        p.add_argument("--prompts", required=True, help="folder of DPG-Bench <name>.txt prompt files")
        p.add_argument("--limit", type=int, default=None, help="only the first N prompts (by name)")
    elif mode == "reconstruction":
        p.add_argument("--dataset", choices=("shapes", "folder"), default="shapes")
        p.add_argument("--data-dir", required=True, help="TFDS data_dir (shapes) or a directory of images (folder)")
        p.add_argument("--split", default="validation", help="shapes split (train | validation | test)")
        p.add_argument("--shapes-options", default="{}", help="JSON of data.shapes.ShapesOptions fields")
        p.add_argument("--limit", type=positive_int, default=None, help="only the first N images")
        p.add_argument("--use-captions", action="store_true", help="FLUX text = the captions (default: empty)")
        p.add_argument("--inception", default=None,
                       help="pytorch-fid's Inception-v3 weights (pt_inception-2015-12-05-6726825d.pth or a "
                            ".safetensors with its keys): also compute FID")
    else:
        p.add_argument("--num-prompts", type=positive_int, default=200, help="held-out (test split) prompts to score")
        p.add_argument("--num-images", type=positive_int, default=None, help="samples per prompt (default: config)")
        p.add_argument("--shapes-options", default="{}", help="JSON of data.shapes.ShapesOptions fields")
        p.add_argument("--save-images", action="store_true", help="also write the generated images")
    return p


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
    os.replace(tmp, path)


class _Limited:
    def __init__(self, source, n):
        self.source, self.n = source, min(len(source), n)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.source[i]


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in MODES:
        print(f"usage: bifrost eval {{{'|'.join(MODES)}}} ... (bifrost eval MODE --help: that mode's options)\n")
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"bifrost eval: unknown mode {argv[0]!r}; modes: {', '.join(MODES)}", file=sys.stderr)
            return 2
        return 0
    mode = argv[0]
    if mode == "understanding":  # no image pipeline: its own flags
        return understanding.main(argv[1:])
    parser = _parser(mode)
    args, rest = parser.parse_known_args(argv[1:])
    if mode == "reconstruction" and args.inception and not os.path.exists(args.inception):
        raise SystemExit(f"bifrost eval reconstruction: --inception {args.inception}: no such file (pytorch-fid's "
                         "pt_inception-2015-12-05-6726825d.pth, or a .safetensors with the same keys)")

    maybe_initialize_distributed()
    try:
        pipe, config = load_pipeline(rest, args.checkpoint, random_weights=args.random_weights,
                                     sampler=args.sampler)
    except (WeightsError, FileNotFoundError) as e:
        parser.error(str(e))
    seed = pipe.options.seed if args.seed is None else args.seed
    pi, pc = jax.process_index(), jax.process_count()

    def generate(prompts, k, s):
        return pipe.generate(list(prompts), num_images_per_prompt=k, seed=s)

    if mode == "geneval":
        prompts = read_prompts(args.prompts, args.limit)
        k = pipe.options.num_images_per_prompt if args.num_images is None else args.num_images
        settings = {"prompts_sha256": file_sha256(args.prompts), "checkpoint": os.path.abspath(args.checkpoint)
                    if args.checkpoint else None, "random_weights": args.random_weights,
                    "config": ({k_: v for k_, v in json.loads(config.to_json()).items() if k_ != "mesh"}
                               if config is not None else None)}
        done = run_geneval(generate, prompts, args.out, num_images=k, batch_size=args.batch_size, seed=seed,
                           process_index=pi, process_count=pc, grid=not args.no_grid, settings=settings)
        print(f"geneval: process {pi} generated {len(done)} prompts")
        barrier("bifrost_eval_geneval_done")
        missing = missing_prompts(args.out, len(prompts), k)
        if missing:
            print(f"geneval: {len(missing)} prompts unfinished: {missing[:20]}", file=sys.stderr)
            return 1
        if pi == 0:
            print(f"geneval: all {len(prompts)} prompts x {k} images in {args.out}")
        return 0

    if mode == "dpg":
        prompts = dpg.read_prompts(args.prompts, args.limit)
        dpg.run_dpg(generate, prompts, args.out, seed=seed, batch_size=args.batch_size, process_index=pi,
                process_count=pc)
        barrier("bifrost_eval_dpg_done")
        missing = dpg.missing_prompts(args.out, prompts)
        if missing:
            print(f"dpg: {len(missing)} prompts unfinished: {missing[:20]}", file=sys.stderr)
            return 1
        return 0

    if mode == "reconstruction":
        # load the Inception weights before any reconstruction, so a bad file fails at once
        feature_fn = reconstruction.inception_feature_fn(args.inception, mesh=pipe.mesh) if args.inception else None
        if args.dataset == "folder":
            source = folder_source(args.data_dir)
        else:
            source = load_shapes(args.data_dir, args.split, ShapesOptions(**json.loads(args.shapes_options)))
        if args.limit is not None:
            source = _Limited(source, args.limit)
        batches = make_eval_iterator(source, args.batch_size * pc, preprocess_fn=make_preprocess(
            pipe.vision_size, pipe.image_size), num_threads=1)

        def reconstruct(vit_images, prompts, indices):
            return pipe.reconstruct(vit_images, prompts, seed=seed, indices=indices)

        result = evaluate_reconstruction(reconstruct, batches, feature_fn=feature_fn, use_captions=args.use_captions)
        if feature_fn is None:
            result.update(fid=None, fid_note="skipped: no --inception weights given")
        result.update(inception=args.inception, dataset=args.dataset, split=args.split, data_dir=args.data_dir,
                      seed=seed, vision_size=list(pipe.vision_size), image_size=list(pipe.image_size))
        fid = (f"FID {result['fid']:.3f}" if result.get("fid") is not None
               else f"FID {result.get('fid_note', 'not computed')}")
        print(f"reconstruction: {result['num_images']} images  PSNR {result['psnr']:.3f} dB  "
              f"SSIM {result['ssim']:.4f}  {fid}")
        if pi == 0:
            _write_json(os.path.join(args.out, "reconstruction.json"), result)
        return 0

    # shapes
    options = ShapesOptions(**json.loads(args.shapes_options))
    captions, specs = shapes_prompts(args.num_prompts, options)
    k = pipe.options.num_images_per_prompt if args.num_images is None else args.num_images
    report = evaluate_shapes(generate, captions, specs, num_images=k, batch_size=args.batch_size, seed=seed,
                             process_index=pi, process_count=pc,
                             image_dir=os.path.join(args.out, "images") if args.save_images else None)
    print(report.format())
    if pi == 0:
        _write_json(os.path.join(args.out, "shapes_report.json"), {
            "accuracy": report.accuracy, "chance": report.chance, "counts": report.counts,
            "num_prompts": len(captions), "num_images_per_prompt": k, "seed": seed, "split": "test",
            "held_out_pairs": [list(p) for p in HELD_OUT_PAIRS], "shapes_options": json.loads(args.shapes_options),
            "table": report.format()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
