"""The paper's claim at toy scale: does it matter WHICH latents Bifrost predicts and the ControlNet reads?

The embedded demo (``bifrost demo``, ``configs/demo.py``) run three times, the generation target of the mllm phase
and the condition of the controlnet phase taken from:

  pretrained_vit  (a) the understanding phase's ViT (+ merger): the demo as it is, latents "natively aligned" with
                      an MLLM that understands the images;
  random_vit      (b) a ViT of the same shape at its fixed-key random init (no ``vision.init_from``);
  vae_latents     (c) the VAE's own latents on the same grid: the posterior mean of the VAE view (the same tensor,
                      in the flow-matching space, that FLUX learns to generate; demo sizes: 16x16x4) cut into the
                      N = 4x4 cells of the CLIP grid, each cell's 4x4x4 values flattened (space-to-depth) into one
                      token of C = 64 channels. No projection and nothing learned: the N x C grid of the ViT
                      latents is matched exactly, so the ControlNet, the MLLM and every shape stay as in (a). The
                      sizes must match (cells x latent channels = C), or the script says which do not.

Everything else is shared: the understanding, vae and flux phases are trained once (in ``WORKDIR/pretrained_vit``)
and linked into the other two workdirs; the mllm phase's frozen base and its generation branch start from the
understanding phase's language model in all three. Only controlnet and mllm are trained per variant. The latents
reach both phases through the demo's CLIP-latent cache (``data.precomputed_clip_latents``, no phase code
changes): (a) and (b) cache their ViT's latents with ``bifrost cache-latents``' code, (c) writes the VAE grid into
the same file, with the phases' sidecar fields plus ``latent_source`` saying what it holds (the ViT it records is
the random one that only gives the grid its shape). Generation scores come from the demo's own evaluation
(``bifrost_jax.demo.evaluate_demo``: held-out colour-shape pairs, the pixel-level shapes checker); the
reconstruction row conditions on the ground-truth image's latents of the variant's own kind (its ViT, or for (c)
the VAE grid of the ground-truth VAE view).

    python benchmarks/aligned_latents.py --workdir runs/aligned_latents [--fast] [--variants a,b,c]
        [--config.KEY=VALUE ...]   # the demo's overrides, e.g. --config.phases.mllm.steps=1000

Output: one table (variant; Bifrost's generation scores; reconstruction scores; final controlnet / mllm losses;
the RMS of the latents) printed and written to ``WORKDIR/aligned_latents.json``, with FLUX alone and the
ground-truth images as reference rows.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bifrost_jax import demo as demo_lib  # noqa: E402
from bifrost_jax import demo_phases  # noqa: E402
from bifrost_jax.data.latent_cache import cache_fields, sidecar_path  # noqa: E402
from bifrost_jax.data.pipeline import INDEX_KEY, VALID_KEY, make_eval_iterator  # noqa: E402
from bifrost_jax.data.sources import image_source, make_image_preprocess, pixels_to_unit  # noqa: E402
from bifrost_jax.parallel.mesh import make_mesh  # noqa: E402
from bifrost_jax.parallel.rules import axis_rules  # noqa: E402
from bifrost_jax.train.cache_latents import component_params  # noqa: E402
from bifrost_jax.train.registry import get_phase  # noqa: E402

VARIANTS = {"a": "pretrained_vit", "b": "random_vit", "c": "vae_latents"}
SHARED_PHASES = ("understanding", "vae", "flux")
ATTRS = ("color", "shape", "count", "relation", "overall")
VAE_SOURCE = ("VAE posterior mean of the VAE view, flow-matching space, space-to-depth onto the CLIP grid "
              "(benchmarks/aligned_latents.py)")


def _log(msg: str) -> None:
    print(f"[aligned_latents {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _read(path: str):
    with open(path) as fh:
        return json.load(fh)


def _write(path: str, obj) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2)


# ----------------------------------------------------------------------------------------------------------------
# variant (c): the VAE's latents on the CLIP grid

def vae_grid_latents(vae, vae_variables, pixels_uint8, grid: tuple[int, int]):
    """(B, gh * gw, kh * kw * c): the VAE posterior mean (flow-matching space) of uint8 VAE views (B, R, R, 3), its
    (h, w) latent map cut into ``grid`` cells of kh x kw positions, each cell flattened (row-major, channels last)."""
    mean, _ = vae.apply(vae_variables, pixels_to_unit(pixels_uint8), method=vae.encode)
    z = vae.config.latents_to_diffusion(mean.astype(jnp.float32))
    b, h, w, c = z.shape
    gh, gw = grid
    if h % gh or w % gw:
        raise ValueError(f"VAE latents {h}x{w} do not divide into the CLIP grid {gh}x{gw}")
    kh, kw = h // gh, w // gw
    return z.reshape(b, gh, kh, gw, kw, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, kh * kw * c)


def check_vae_grid(vae_config, resolution: int, grid: tuple[int, int], clip_dim: int) -> None:
    """The VAE grid has the CLIP latents' N x C shape (else the sizes that differ are named)."""
    h = resolution // vae_config.downsample_factor
    cells = (h // grid[0]) * (h // grid[1])
    if h % grid[0] or h % grid[1] or cells * vae_config.latent_channels != clip_dim:
        raise ValueError(f"variant vae_latents: the VAE view {resolution} px gives {h}x{h}x"
                         f"{vae_config.latent_channels} latents; on the {grid[0]}x{grid[1]} CLIP grid that is "
                         f"{cells} x {vae_config.latent_channels} channels per token, the ViT latents have {clip_dim} "
                         f"(change models.vae / data.vae_resolution / models.vision together)")


def build_vae_grid_cache(config, controlnet_config) -> dict:
    """Write the VAE-grid latents of every training image to ``config.data.precomputed_clip_latents`` (the file and
    sidecar the controlnet and mllm phases read), the VAE from ``controlnet_config`` (the vae phase's checkpoint)."""
    path = os.path.abspath(config.data.precomputed_clip_latents)
    cfg = controlnet_config.copy_and_resolve_references()
    cfg.data.precomputed_clip_latents = ""
    phase = get_phase(cfg)
    grid, r = tuple(phase.clip_grid), int(phase.resolution)
    check_vae_grid(phase.vae.module.config, r, grid, phase.clip_latent_dim)
    source = image_source(cfg.data)
    n = len(source)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
    params, _ = component_params(phase.vae, mesh)
    vae = phase.vae.module
    run = jax.jit(lambda p, x: vae_grid_latents(vae, {"params": p}, x, grid))
    out = np.zeros((n, grid[0] * grid[1], phase.clip_latent_dim), np.float32)
    d, t0 = cfg.data, time.perf_counter()
    it = make_eval_iterator(source, int(cfg.train.batch_size), process_index=0, process_count=1,
                            preprocess_fn=make_image_preprocess(vae_resolution=r), worker_count=d.worker_count,
                            num_threads=d.num_threads, prefetch_buffer_size=d.prefetch_buffer_size)
    with axis_rules(mesh):
        for batch in it:
            latents = np.asarray(jax.device_get(run(params, np.asarray(batch["vae_pixels"], np.uint8))))
            idx, valid = np.asarray(batch[INDEX_KEY]), np.asarray(batch[VALID_KEY], bool)
            out[idx[valid]] = latents[valid]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path + ".partial.npy", out)
    os.replace(path + ".partial.npy", path)
    info = dict(cache_fields(config, phase.vision, n), shape=list(out.shape),
                dtype="float32", phase=str(config.phase), latent_source=VAE_SOURCE)
    _write(sidecar_path(path), info)
    _log(f"cached the VAE-grid latents {out.shape} in {path} ({time.perf_counter() - t0:.0f} s)")
    return info


# ----------------------------------------------------------------------------------------------------------------
# the variants

def variant_configs(demo, workdir: str, variant: str, *, fast: bool) -> dict:
    """The demo's phase configs for one variant (``VARIANTS`` value) in ``workdir``: (a) unchanged; (b) and (c)
    without ``vision.init_from`` in the controlnet and mllm phases (the fixed-key random tower); (c) always reads
    the CLIP-latent cache (which then holds the VAE grid)."""
    if variant not in VARIANTS.values():
        raise ValueError(f"variant {variant!r}: use one of {sorted(VARIANTS.values())}")
    if variant == "vae_latents" and not demo.get("cache_clip_latents", False):
        demo = demo.copy_and_resolve_references()
        demo.cache_clip_latents = True
    configs = demo_lib.phase_configs(demo, workdir, fast=fast)
    if variant != "pretrained_vit":
        for name in ("controlnet", "mllm"):
            configs[name].vision.init_from = ""
    return configs


def link_shared(shared_workdir: str, workdir: str) -> None:
    """``workdir`` reuses the shapes data and the understanding / vae / flux phases of ``shared_workdir``
    (symbolic links), and their phase records (final losses)."""
    os.makedirs(os.path.join(workdir, "demo"), exist_ok=True)
    for name in ("data",) + SHARED_PHASES:
        src, dst = os.path.join(shared_workdir, name), os.path.join(workdir, name)
        if not os.path.lexists(dst):
            os.symlink(src, dst, target_is_directory=True)
    records = os.path.join(shared_workdir, "demo", "phases.json")
    mine = os.path.join(workdir, "demo", "phases.json")
    if os.path.isfile(records):
        shared = {k: v for k, v in _read(records).items() if k in SHARED_PHASES}
        own = _read(mine) if os.path.isfile(mine) else {}
        _write(mine, dict(own, **shared))


def run_variant(demo, workdir: str, variant: str, *, fast: bool, num_prompts, progress_bar: bool) -> dict:
    configs = variant_configs(demo, workdir, variant, fast=fast)
    builder = demo_phases.build_demo_clip_cache
    recon = None
    if variant == "vae_latents":
        builder = lambda config: build_vae_grid_cache(config, configs["controlnet"])  # noqa: E731
        recon = _vae_reconstruction_latents
    _log(f"variant {variant}: {workdir}")
    phases = demo_phases.run_phases(configs, workdir, progress_bar=progress_bar, clip_cache_builder=builder,
                                 concurrency=int(demo.get("concurrent_phases", 1)))
    ev_demo = demo.copy_and_resolve_references()
    ev_demo.eval.flux_alone = bool(variant == "pretrained_vit" and demo.eval.flux_alone)  # the same FLUX in all
    report = demo_lib.evaluate_demo(ev_demo, configs, workdir, num_prompts=num_prompts,
                                    reconstruction_latents=recon)
    cache = configs["mllm"].data.precomputed_clip_latents
    rms = float(np.sqrt(np.mean(np.square(np.load(cache, mmap_mode="r"))))) if cache else None
    ours = report["scores"]["bifrost"]
    return {"variant": variant, "workdir": workdir, "phases": phases, "latent_rms": rms,
            "scores": {k: v["accuracy"] for k, v in report["scores"].items()}, "chance": ours["chance"],
            "counts": ours["counts"], "num_prompts": report["num_prompts"], "grid": report["grid"]}


def _vae_reconstruction_latents(pipe, held):
    grid = tuple(pipe.clip_grid)
    return np.asarray(jax.jit(lambda v, x: vae_grid_latents(pipe.vae, v, x, grid))(pipe.vae_variables, held.gt))


# ----------------------------------------------------------------------------------------------------------------
# the table

def format_table(rows: list[dict]) -> str:
    """Accuracy per attribute ("-": no held-out prompt tests it), final losses, latent RMS; reference rows last."""
    counts = rows[0]["counts"]

    def cells(acc, width):
        return "".join(f"{acc[a]:>{width}.3f}" if acc and counts.get(a) else f"{'-':>{width}}" for a in ATTRS)

    def loss(r, phase):
        v = (r["phases"].get(phase, {}).get("last_metrics") or {}).get("loss")
        return f"{v:.4g}" if v is not None else "-"
    head = (f"{'variant':<15}" + "".join(f"{'gen ' + a:>13}" for a in ATTRS)
            + "".join(f"{'recon ' + a:>15}" for a in ATTRS) + f"{'cn loss':>10}{'mllm loss':>11}{'rms':>8}")
    lines = [head]
    for r in rows:
        g, rec = r["scores"]["bifrost"], r["scores"].get("reconstruction", {})
        lines.append(f"{r['variant']:<15}" + cells(g, 13) + cells(rec, 15)
                     + f"{loss(r, 'controlnet'):>10}{loss(r, 'mllm'):>11}"
                     + (f"{r['latent_rms']:>8.3f}" if r["latent_rms"] is not None else f"{'-':>8}"))
    refs = {"chance": rows[0]["chance"]}
    for r in rows:
        refs.update({k: v for k, v in r["scores"].items() if k in ("flux_alone", "ground_truth")})
    for k, acc in refs.items():
        lines.append(f"{k:<15}" + cells(acc, 13) + "   (reference)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/aligned_latents")
    p.add_argument("--fast", action="store_true", help="the demo's --fast (config.fast_fraction of every phase)")
    p.add_argument("--variants", default="a,b,c", help="comma-separated subset of a (pretrained_vit), b "
                   "(random_vit), c (vae_latents); a is always trained first (it holds the shared phases)")
    p.add_argument("--no-progress", action="store_true")
    args, rest = p.parse_known_args(argv)
    letters = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not letters or any(v not in VARIANTS for v in letters):
        raise SystemExit(f"--variants {args.variants!r}: use letters from {sorted(VARIANTS)}")
    demo = demo_lib.load_demo_config(rest)
    root = os.path.abspath(args.workdir)
    shared = os.path.join(root, VARIANTS["a"])
    n = min(int(demo.generate.num_prompts), 16) if args.fast else None
    t0 = time.perf_counter()
    rows = []
    # (a) first: it trains the shared phases; its own controlnet / mllm are only scored when asked for
    demo_phases.run_phases({k: v for k, v in variant_configs(demo, shared, VARIANTS["a"], fast=args.fast).items()
                         if k in SHARED_PHASES}, shared, progress_bar=not args.no_progress,
                        concurrency=int(demo.get("concurrent_phases", 1)))
    for letter in letters:
        variant = VARIANTS[letter]
        w = os.path.join(root, variant)
        if variant != VARIANTS["a"]:
            link_shared(shared, w)
        rows.append(run_variant(demo, w, variant, fast=args.fast, num_prompts=n,
                                progress_bar=not args.no_progress))
    table = format_table(rows)
    result = {"rows": rows, "table": table, "fast": bool(args.fast), "overrides": rest,
              "seconds": time.perf_counter() - t0, "demo_config": json.loads(demo.to_json())}
    _write(os.path.join(root, "aligned_latents.json"), result)
    print(("[--fast: a quick look, not the claim]\n" if args.fast else "") + table, flush=True)
    print(f"written {os.path.join(root, 'aligned_latents.json')} ({result['seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
