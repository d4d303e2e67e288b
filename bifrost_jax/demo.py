"""``bifrost demo``: the embedded default, end to end on CPU (what ``make demo`` runs).

    bifrost demo --workdir runs/demo [--fast] [--force PHASE ...] [--config FILE] [--config.KEY=VALUE ...]

1. Trains the five tiny phases on the built-in shapes data (generated into ``WORKDIR/data`` on first use), in
   order ``understanding -> vae -> flux -> controlnet -> mllm``, each through the generic loop
   (``train.loop.train``) with the config of ``configs/<phase>.py`` overridden by the ONE demo config (``configs/demo.py``: shared model sizes,
   per-phase steps / batch / lr). A phase whose final checkpoint exists is reused, not retrained; an interrupted
   one resumes. ``--force PHASE`` retrains it and every phase that depends on it. The ``controlnet`` and ``mllm``
   phases read the frozen ViT's latents from ``WORKDIR/demo/clip_latents.npy`` (``config.cache_clip_latents``),
   built with ``bifrost cache-latents``' code before the first of them trains in a run. Phases that do not start
   from each other train at once (``config.concurrent_phases``: ``understanding -> mllm`` beside ``vae -> flux``).
   The ``understanding`` phase trains a Qwen2.5-VL-architecture model (ViT + merger + language model) as a VLM
   on questions about the shapes images; the controlnet and mllm phases take its ViT (``vision.init_from``) and
   the mllm phase its language model as the frozen base, the generation branch a copy of it
   (``mllm.base_init_from``).
2. Asks questions about held-out images (colour, shape, count, position) of the understanding model (before) and
   of the trained MLLM's frozen base (after): accuracy per attribute, the answers bit-identical
   (``eval/shapes_understanding.py``).
3. Builds the Bifrost pipeline from the checkpoints (frozen weights are rebuilt as the phases got them: the
   understanding checkpoint, the fixed-key random T5 / CLIP; checkpoints hold only trained weights) and generates
   one image per held-out prompt (shapes ``test`` split: every prompt holds a colour-shape pair never seen in training).
4. Scores the images with the pixel-level shapes checker, beside the chance levels, and for reference scores
   FLUX alone (text only, ControlNet off), reconstruction (GT image -> ViT latents -> ControlNet + FLUX) and the
   ground-truth images at the same resolution (the checker's ceiling).
5. Writes ``WORKDIR/demo/grid.png`` (rows: prompts, each written beside its row with the questions answered about
   its image; columns, named in a header line: ground truth, Bifrost, FLUX alone, reconstruction),
   ``WORKDIR/demo/report.json`` and ``WORKDIR/demo/summary.txt``, and prints the summary.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bifrost_jax.configs import load_config_file
from bifrost_jax.configs import parse_config_flags
from bifrost_jax.data.preprocess import crop_box, decode_image, resize_crop
from bifrost_jax.data.shapes import ShapesOptions, parse_caption
from bifrost_jax.demo_phases import DEPENDS_ON, PHASE_ORDER, UNET_PHASE_ORDER, log, run_phases, write_json
from bifrost_jax.demo_summary import accuracy_words, format_summary, understanding_notes
from bifrost_jax.eval.run import shapes_examples
from bifrost_jax.eval.shapes_understanding import before_after
from bifrost_jax.eval.shapes_checker import evaluate
from bifrost_jax.sample.pipeline import BifrostPipeline, SamplingOptions
from bifrost_jax.sample.images import make_labelled_grid, save_png
from bifrost_jax.train.export import pipeline_from_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "demo.py")


# ----------------------------------------------------------------------------------------------------------------
# phase configs from the demo config

def _set(cfg, dotted: str, value) -> None:
    """Set an EXISTING key of a phase config (a key the phase config lacks means the two drifted apart)."""

    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    if leaf not in node:
        raise KeyError(f"demo: the {cfg.phase!r} phase config has no key {dotted!r} (configs/{cfg.phase}.py changed?)")
    if isinstance(value, dict):
        value = ml_collections.ConfigDict(value)
    with node.unlocked():
        node[leaf] = value


def phase_order(demo) -> tuple[str, ...]:
    """The phases of the demo config's ``decoder`` ("flux" or "unet"), in training order."""
    decoder = demo.get("decoder", "flux")
    if decoder not in ("flux", "unet"):
        raise ValueError(f"demo config: decoder={decoder!r}; use 'flux' or 'unet'")
    return UNET_PHASE_ORDER if decoder == "unet" else PHASE_ORDER


def _set_unet_sections(c, m, ckpt, name: str) -> None:
    """The UNet decoder's sections of the ``unet`` and ``controlnet`` (``configs/unet_controlnet.py``) phases."""
    _set(c, "unet.config", m.unet.to_dict())
    _set(c, "clip.config", m.clip.to_dict())
    _set(c, "clip.max_length", int(m.text_max_length))
    _set(c, "vae.init_from", ckpt("vae"))
    if name == "controlnet":
        _set(c, "unet.init_from", ckpt("unet"))
        _set(c, "controlnet.conditioning_embedding_out_channels", tuple(m.unet_controlnet_channels))


def phase_configs(demo, workdir: str, *, fast: bool = False) -> dict[str, Any]:
    """``{phase: config}``: ``configs/<phase>.py`` with the demo's sizes, schedule, data and mesh."""

    workdir = os.path.abspath(workdir)
    m = demo.models
    ckpt = lambda name: os.path.join(workdir, name, "checkpoints")  # noqa: E731
    unet = demo.get("decoder", "flux") == "unet"
    out = {}
    for name in phase_order(demo):
        file = "unet_controlnet" if unet and name == "controlnet" else name
        c = load_config_file(os.path.join(ROOT, "configs", f"{file}.py"))
        p = demo.phases[name]
        steps = max(2, int(round(p.steps * demo.fast_fraction))) if fast else int(p.steps)
        _set(c, "seed", int(demo.seed))
        _set(c, "mesh", demo.mesh.to_dict())
        for k, v in (("steps", steps), ("batch_size", int(p.batch_size)), ("log_every", min(demo.log_every, steps)),
                     ("tensorboard", False)):
            _set(c, f"train.{k}", v)
        _set(c, "optim.lr", float(p.lr))
        if "weight_decay" in p:
            _set(c, "optim.weight_decay", float(p.weight_decay))
        _set(c, "optim.warmup_steps", min(int(p.warmup_steps), steps // 4))
        _set(c, "checkpoint.every", steps)  # the final step only (a resumable save costs seconds on CPU)
        _set(c, "checkpoint.keep", 1)
        _set(c, "data.data_dir", os.path.join(workdir, "data", "shapes"))
        _set(c, "data.image_resolution", int(demo.data.image_resolution))
        _set(c, "data.vae_resolution", int(demo.data.vae_resolution))
        _set(c, "data.train_size", int(demo.data.train_size))
        _set(c, "data.shapes_seed", int(demo.data.shapes_seed))
        layout = p.get("layout", "") or str(demo.data.layout)  # a phase may see another layout than the rest
        _set(c, "data.shapes_layout", layout)
        _set(c, "data.shapes_jitter", float(demo.data.jitter) if layout == "fixed" else 0.0)
        if "text_dropout" in p:
            _set(c, "data.text_dropout", float(p.text_dropout))
        if name == "mllm":
            _set(c, "mllm.config.text", m.mllm_text.to_dict())
            _set(c, "mllm.max_prompt_length", int(m.mllm_max_prompt_length))
        elif name != "understanding":
            _set(c, "vae.config", m.vae.to_dict())
        if unet and name in ("unet", "controlnet"):
            _set_unet_sections(c, m, ckpt, name)
        elif name in ("flux", "controlnet"):
            _set(c, "flux.config", m.flux.to_dict())
            _set(c, "t5.config", m.t5.to_dict())
            _set(c, "clip.config", m.clip.to_dict())
            _set(c, "t5.max_length", int(m.text_max_length))
            _set(c, "clip.max_length", int(m.text_max_length))
            _set(c, "vae.init_from", ckpt("vae"))
        if name in ("understanding", "controlnet", "mllm"):
            _set(c, "vision.config", m.vision.to_dict())
            _set(c, "vision.resolution", int(m.vision_resolution))
        _understanding_links(c, name, demo, ckpt("understanding"))
        if name == "controlnet" and not unet:
            _set(c, "flux.init_from", ckpt("flux"))
            _set(c, "controlnet.num_layers", int(m.controlnet.num_layers))
            _set(c, "controlnet.num_single_layers", int(m.controlnet.num_single_layers))
        if name == "mllm":
            merge = m.vision.spatial_merge_size * m.vision.patch_size
            g = int(m.vision_resolution) // merge
            _set(c, "mllm.config.num_image_tokens", g * g)
            _set(c, "mllm.config.image_grid", (g, g))
        out[name] = c
    if demo.get("cache_clip_latents", False):
        use_clip_cache(out, workdir)
    return out


def clip_cache_path(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "demo", "clip_latents.npy")


def use_clip_cache(configs: dict, workdir: str) -> None:
    """The ``controlnet`` and ``mllm`` phases read the frozen ViT's latents (centre crops: the same tensor every
    epoch) from one cache under the workdir instead of running the ViT every step (``run_phases`` builds it)."""
    for name in ("controlnet", "mllm"):
        _set(configs[name], "data.precomputed_clip_latents", clip_cache_path(workdir))


def _understanding_links(c, name: str, demo, understanding_ckpt: str) -> None:
    """The understanding phase's sizes, and the phases that start from it: the controlnet and mllm phases take its
    ViT (``vision.init_from``), the mllm phase its language model as the frozen base (``mllm.base_init_from``, the
    generation branch a copy of it)."""
    if name == "understanding":
        _set(c, "language.config", demo.models.mllm_text.to_dict())
        _set(c, "language.max_length", int(demo.models.understanding_max_length))
        _set(c, "language.questions_per_image", int(demo.models.understanding_questions_per_image))
    if name in ("controlnet", "mllm"):
        _set(c, "vision.init_from", understanding_ckpt)
    if name == "mllm":
        _set(c, "mllm.base_init_from", understanding_ckpt)


# ----------------------------------------------------------------------------------------------------------------
# the trained pipeline

def load_pipeline(workdir: str, generate=None) -> BifrostPipeline:
    """The trained demo's pipeline, built the way ``bifrost generate --checkpoint WORKDIR`` builds it
    (``train/export.pipeline_from_workdir``), with the demo's sampling settings."""
    g = generate
    options = SamplingOptions() if g is None else SamplingOptions(
        num_images_per_prompt=int(g.images_per_prompt), seed=int(g.seed), mar_steps=int(g.mar_steps) or None,
        mllm_cfg=float(g.mllm_cfg), flux_steps=int(g.flux_steps), guidance=float(g.guidance),
        conditioning_scale=float(g.conditioning_scale))
    return pipeline_from_workdir(workdir, options=options)


# ----------------------------------------------------------------------------------------------------------------
# held-out prompts, generation, scoring

@dataclasses.dataclass
class HeldOut:
    captions: list[str]
    specs: list[Any]
    gt: np.ndarray          # uint8 (P, R, R, 3) at the generated resolution (the VAE view)
    vit_views: np.ndarray   # uint8 (P, V, V, 3): the ViT view of the same crop (for reconstruction)


def held_out_prompts(demo, num_prompts: int, *, out_resolution: int, vit_resolution: int) -> HeldOut:
    """The first ``num_prompts`` scenes of the shapes ``test`` split (a pure function of the options: no build),
    with their ground-truth images cut exactly like the training views."""

    options = ShapesOptions(resolution=int(demo.data.image_resolution), train_size=int(demo.data.train_size),
                            validation_size=0, test_size=num_prompts, seed=int(demo.data.shapes_seed),
                            layout=str(demo.data.layout), jitter=float(demo.data.jitter))
    captions, specs, gt, vit = [], [], [], []
    for ex in shapes_examples(num_prompts, options):
        image = decode_image(ex["image"])
        box = crop_box(image.width, image.height)
        captions.append(ex["caption"])
        specs.append(parse_caption(ex["caption"]))
        gt.append(resize_crop(image, box, out_resolution))
        vit.append(resize_crop(image, box, vit_resolution))
    return HeldOut(captions, specs, np.stack(gt), np.stack(vit))


def _block(x):
    return jax.block_until_ready(x)


def staged_generate(pipe, prompts: Sequence[str], *, seed: int, mar_steps: int | None, flux_steps: int,
                    conditioning_scale: float | None = None, clip_latents=None):
    """``pipe.generate`` (one image per prompt, every prompt re-seeded with ``seed``) split into its two stages
    and timed: returns ``(images uint8, seconds_mllm, seconds_diffusion)``. ``clip_latents`` (P, N, C) skips the
    MLLM stage (FLUX alone passes zeros with ``conditioning_scale=0``)."""

    o = pipe.options
    keys = jnp.stack([jax.random.PRNGKey(int(seed))] * len(prompts))
    split = jax.vmap(jax.random.split)(keys)
    t0 = time.perf_counter()
    if clip_latents is None:
        latents = _block(pipe.decode_latents(list(prompts), split[:, 0], num_images_per_prompt=1,
                                             mar_steps=mar_steps, mllm_cfg=o.mllm_cfg))
        latents = latents.reshape((-1,) + latents.shape[2:])
    else:
        latents = jnp.asarray(clip_latents, jnp.float32)
    t1 = time.perf_counter()
    embeds, pooled = pipe.encode_prompts(list(prompts))
    packed = pipe.sample_flux(latents, embeds, pooled, pipe.noise(split[:, 1], 1), flux_steps=flux_steps,
                              guidance=o.guidance,
                              conditioning_scale=o.conditioning_scale if conditioning_scale is None
                              else conditioning_scale)
    images = np.asarray(jax.device_get(pipe.decode(packed)))
    t2 = time.perf_counter()
    return images, t1 - t0, t2 - t1


def generate_batched(pipe, prompts, batch: int, **kw):
    """``staged_generate`` over chunks of ``batch`` prompts (same shapes every chunk but the last)."""
    images, t_m, t_d = [], 0.0, 0.0
    latents = kw.pop("clip_latents", None)
    for i in range(0, len(prompts), batch):
        chunk = dict(kw)
        if latents is not None:
            chunk["clip_latents"] = latents[i:i + batch]
        im, a, b = staged_generate(pipe, prompts[i:i + batch], **chunk)
        images.append(im)
        t_m, t_d = t_m + a, t_d + b
    return np.concatenate(images), t_m, t_d


def score(images, specs):
    return evaluate(list(images), specs)


def _upscale(images: np.ndarray, factor: int) -> np.ndarray:
    return images.repeat(factor, axis=1).repeat(factor, axis=2) if factor > 1 else images


GRID_COLUMNS = {"ground_truth": "ground truth", "bifrost": "Bifrost", "flux_alone": "FLUX alone",
                "reconstruction": "reconstruction"}


def write_grid(out_dir: str, held: HeldOut, variants: dict, rows: int, row_notes: Sequence[str] = ()) -> str:
    """``out_dir/grid.png``: one row per held-out prompt (the prompt written to its left, then its ``row_notes``
    line, e.g. questions answered about its image), one column per variant (named in a header line), cells upscaled
    to about 96 px; the row labels also go to ``grid_prompts.txt``."""
    names = ["ground_truth"] + [k for k in ("bifrost", "flux_alone", "reconstruction") if k in variants]
    cols = [held.gt[:rows]] + [variants[k][:rows] for k in names[1:]]
    cells = np.stack(cols, axis=1).reshape((-1,) + held.gt.shape[1:])
    labels = [c + (f"  |  {row_notes[i]}" if i < len(row_notes) else "") for i, c in enumerate(held.captions[:rows])]
    grid_path = os.path.join(out_dir, "grid.png")
    grid = make_labelled_grid(_upscale(cells, max(1, 96 // held.gt.shape[1])), [GRID_COLUMNS[k] for k in names],
                              labels)
    save_png(grid_path, grid)
    with open(os.path.join(out_dir, "grid_prompts.txt"), "w") as fh:
        fh.write("columns: " + ", ".join(GRID_COLUMNS[k] for k in names) + "\n")
        fh.writelines(f"row {i}: {c}\n" for i, c in enumerate(labels))
    return grid_path


def evaluate_demo(demo, configs: dict, workdir: str, *, num_prompts: int | None = None,
                  row_notes: Sequence[str] = (), reconstruction_latents=None) -> dict:
    """Generate for held-out prompts, score every variant, write the grid (``row_notes``: a line of text per grid
    row, e.g. questions answered about its image); returns the report dict. ``reconstruction_latents(pipe, held)``:
    the (P, N, C) condition of the reconstruction row (default: the pipeline's ViT latents of the ViT views)."""

    g = demo.generate
    out_dir = os.path.join(os.path.abspath(workdir), "demo")
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    pipe = load_pipeline(workdir, g)
    t_load = time.perf_counter() - t0
    n = int(num_prompts or g.num_prompts)
    res = pipe.image_size[0]
    held = held_out_prompts(demo, n, out_resolution=res, vit_resolution=pipe.vision_size[0])
    kw = dict(seed=int(g.seed), flux_steps=int(g.flux_steps))
    batch = int(g.batch)
    # warm-up (compilation) on one batch-shaped call, so the timings below are per-image generation time
    t0 = time.perf_counter()
    staged_generate(pipe, held.captions[:min(batch, n)], mar_steps=int(g.mar_steps) or None, **kw)
    t_compile = time.perf_counter() - t0
    images, t_mllm, t_diff = generate_batched(pipe, held.captions, batch, mar_steps=int(g.mar_steps) or None, **kw)
    variants = {"bifrost": images}
    reports = {"bifrost": score(images, held.specs)}
    if g.images_per_prompt != 1:
        log("generate.images_per_prompt is fixed to 1 in the demo's scoring")
    if demo.eval.flux_alone:
        n_tok = pipe.controlnet.config.clip_grid[0] * pipe.controlnet.config.clip_grid[1]
        zeros = np.zeros((n, n_tok, pipe.controlnet.config.clip_latent_dim), np.float32)
        variants["flux_alone"], _, _ = generate_batched(pipe, held.captions, batch, mar_steps=None,
                                                        conditioning_scale=0.0, clip_latents=zeros, **kw)
        reports["flux_alone"] = score(variants["flux_alone"], held.specs)
    if demo.eval.reconstruction:
        latents = np.asarray(pipe.clip_latents_of(held.vit_views) if reconstruction_latents is None
                             else reconstruction_latents(pipe, held))
        variants["reconstruction"], _, _ = generate_batched(pipe, held.captions, batch, mar_steps=None,
                                                            clip_latents=latents, **kw)
        reports["reconstruction"] = score(variants["reconstruction"], held.specs)
    reports["ground_truth"] = score(held.gt, held.specs)

    grid_path = write_grid(out_dir, held, variants, min(int(g.grid_prompts), n), row_notes)
    for name, ims in variants.items():
        np.save(os.path.join(out_dir, f"images_{name}.npy"), ims)
    return {
        "num_prompts": n, "image_size": list(pipe.image_size), "seconds_load": t_load, "seconds_compile": t_compile,
        "data_layout": f"{demo.data.layout} (jitter {float(demo.data.jitter):g})",
        "seconds_per_image": {"mllm": t_mllm / n, "diffusion": t_diff / n, "total": (t_mllm + t_diff) / n},
        "sampling": {"mar_steps": int(g.mar_steps) or None, "flux_steps": int(g.flux_steps),
                     "guidance": float(g.guidance), "conditioning_scale": float(g.conditioning_scale),
                     "mllm_cfg": float(g.mllm_cfg), "seed": int(g.seed)},
        "scores": {k: {"accuracy": r.accuracy, "chance": r.chance, "counts": r.counts} for k, r in reports.items()},
        "score_tables": {k: r.format() for k, r in reports.items()},
        "grid": grid_path, "prompts": held.captions,
    }


# ----------------------------------------------------------------------------------------------------------------
# understanding, before and after the generation branch was trained

def evaluate_understanding(demo, workdir: str, *, fast: bool = False) -> dict:
    """Questions about held-out images (shapes ``test`` split, the ViT view) answered by the understanding phase's
    model (BEFORE) and by the mllm phase's frozen Qwen2.5-VL (AFTER): accuracy per attribute, the bit-identity
    check, and the answers about the first images (the grid's rows)."""
    n = int(demo.eval.understanding_images)
    n = min(n, 16) if fast else n
    held = held_out_prompts(demo, n, out_resolution=int(demo.data.vae_resolution),
                            vit_resolution=int(demo.models.vision_resolution))
    t0 = time.perf_counter()
    r = before_after(workdir, held.vit_views, held.specs, seed=int(demo.seed))
    seconds = time.perf_counter() - t0
    rows = int(demo.generate.grid_prompts)
    examples = [dict(row, answer_after=after["answer"]) for row, after in zip(r["before"].rows, r["after"].rows)
                if row["image"] < rows]
    log(f"understanding on {n} held-out images: before {accuracy_words(r['before'].accuracy)}; after "
         f"{accuracy_words(r['after'].accuracy)}; {r['answers_identical']}/{r['answers']} answers and "
         f"{r['weights'] - len(r['weights_differing'])}/{r['weights']} weights identical ({seconds:.0f} s)")
    return {"num_images": n, "before": r["before"].to_json(), "after": r["after"].to_json(),
            "identical": bool(r["identical"]), "answers_identical": r["answers_identical"], "answers": r["answers"],
            "weights": r["weights"], "weights_differing": r["weights_differing"], "seconds": seconds,
            "examples": examples}


# ----------------------------------------------------------------------------------------------------------------
# command line

def load_demo_config(argv_config: Sequence[str]):

    args = list(argv_config)
    if not any(a == "--config" or a.startswith("--config=") for a in args):
        args = ["--config", DEFAULT_CONFIG] + args
    config, _ = parse_config_flags(args)
    return config


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="bifrost demo", allow_abbrev=False,
        description="The embedded default: train the tiny phases on the shapes data on CPU, generate for held-out "
                    "prompts, score them. Also takes --config FILE (default configs/demo.py) and "
                    "--config.KEY=VALUE overrides.")
    parser.add_argument("--workdir", required=True, help="where data, checkpoints, logs and results go")
    parser.add_argument("--fast", action="store_true",
                        help="train a fraction (config.fast_fraction) of every phase's steps, score fewer prompts")
    parser.add_argument("--force", action="append", default=[], choices=tuple(DEPENDS_ON),
                        help="retrain PHASE and the phases that start from it (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args, rest = parser.parse_known_args(argv)
    demo = load_demo_config(rest)
    t_start = time.perf_counter()
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    log(f"workdir {workdir}" + (" (--fast)" if args.fast else ""))
    configs = phase_configs(demo, workdir, fast=args.fast)
    phases = run_phases(configs, workdir, force=args.force, progress_bar=not args.no_progress,
                        concurrency=int(demo.get("concurrent_phases", 1)))
    log("generating for held-out prompts and scoring")
    t0 = time.perf_counter()
    n = min(int(demo.generate.num_prompts), 16) if args.fast else None
    understanding = evaluate_understanding(demo, workdir, fast=args.fast)
    report = evaluate_demo(demo, configs, workdir, num_prompts=n,
                           row_notes=understanding_notes(understanding, int(demo.generate.grid_prompts)))
    report["seconds_generate_and_score"] = time.perf_counter() - t0
    report["understanding"] = understanding
    total = time.perf_counter() - t_start
    report.update(phases=phases, total_seconds=total, fast=bool(args.fast), workdir=workdir,
                  demo_config=json.loads(demo.to_json()))
    summary = format_summary(report, phases, workdir, total_seconds=total, fast=args.fast)
    write_json(os.path.join(workdir, "demo", "report.json"), report)
    with open(os.path.join(workdir, "demo", "summary.txt"), "w") as fh:
        fh.write(summary + "\n")
    print(summary, flush=True)
    if not understanding["identical"]:
        raise SystemExit("the mllm phase changed the understanding path (see 'understanding' in report.json): "
                         "its text tokens must use the frozen base weights only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
