"""Smoke run of the demo orchestration (``bifrost demo``): every phase (understanding included) a couple of steps,
generation for 2 held-out prompts, understanding before/after on held-out images, the report written; a second
run reuses every finished phase (no retraining), ``--force`` retrains a phase and its dependents, and a changed
config is refused instead of silently mixing checkpoints.

Numbers here mean nothing (2 steps); the demo's real scores are in its summary / benchmarks/RESULTS.md.
"""
import json
import logging
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from bifrost_jax import cli, demo, demo_phases
from bifrost_jax.train.flux_phases import ControlNetPhase
from bifrost_jax.train.mllm_phase import MllmPhase

GENERATE_TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                             "generate_tiny.py")
SMOKE = ["--fast", "--no-progress", "--config.fast_fraction=0.0001",  # -> 2 steps per phase
         "--config.data.train_size=32", "--config.generate.num_prompts=2", "--config.generate.batch=2",
         "--config.generate.grid_prompts=2", "--config.generate.flux_steps=2", "--config.generate.mar_steps=2",
         "--config.log_every=1", "--config.eval.understanding_images=2"]
for _phase in demo.PHASE_ORDER:  # 8 simulated devices: one row each
    SMOKE.append(f"--config.phases.{_phase}.batch_size=8")


def _checkpoint_steps(workdir):
    out = {}
    for name in demo.PHASE_ORDER:
        root = os.path.join(workdir, name, "checkpoints")
        out[name] = sorted((d, os.stat(os.path.join(root, d)).st_mtime_ns) for d in os.listdir(root) if d.isdigit())
    return out


def _metrics_lines(workdir, name):
    with open(os.path.join(workdir, name, "metrics.jsonl")) as fh:
        return fh.read().splitlines()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def first_run_logs(tmp_path_factory):
    """The first smoke run, and the WARNING+ log records it emitted (library warnings reach the console)."""
    workdir = str(tmp_path_factory.mktemp("demo") / "run")
    handler = _Records()
    logging.getLogger().addHandler(handler)
    try:
        assert demo.main(["--workdir", workdir] + SMOKE) == 0
    finally:
        logging.getLogger().removeHandler(handler)
    return workdir, handler.records


@pytest.fixture(scope="module")
def first_run(first_run_logs):
    return first_run_logs[0]


def test_first_run_trains_every_phase_and_reports(first_run):
    w = first_run
    with open(os.path.join(w, "demo", "report.json")) as fh:
        report = json.load(fh)
    assert [report["phases"][p]["status"] for p in demo.PHASE_ORDER] == ["trained"] * 5
    for name in demo.PHASE_ORDER:
        assert report["phases"][name]["steps"] == 2
        assert demo_phases.latest_step(w, name) == 2
        assert np.isfinite(report["phases"][name]["last_metrics"]["loss"])
    # two held-out prompts (the test split: each holds a colour-shape pair never seen in training)
    from bifrost_jax.data.shapes import HELD_OUT_PAIRS, parse_caption
    assert report["num_prompts"] == 2 and len(report["prompts"]) == 2
    assert all(set(parse_caption(p).objects) & set(HELD_OUT_PAIRS) for p in report["prompts"])
    h, wd = report["image_size"]
    # every variant scored beside its chance level; the ground truth is what the checker reads back perfectly
    for variant in ("bifrost", "flux_alone", "reconstruction", "ground_truth"):
        s = report["scores"][variant]
        assert 0.0 <= s["accuracy"]["color"] <= 1.0 and 0.0 <= s["chance"]["color"] < 1.0
        images = np.load(os.path.join(w, "demo", f"images_{variant}.npy")) if variant != "ground_truth" else None
        if images is not None:
            assert images.shape == (2, h, wd, 3) and images.dtype == np.uint8
    assert report["scores"]["ground_truth"]["accuracy"]["color"] == 1.0
    # the grid: 2 prompt rows x 4 columns (GT, Bifrost, FLUX alone, reconstruction), upscaled cells, a header
    # line naming the columns above them and each row's prompt written to their left (tests/test_images.py)
    grid = np.asarray(Image.open(report["grid"]))
    cell = h * max(1, 96 // h)
    plain_h, plain_w = 2 * cell + 2, 4 * cell + 3 * 2
    assert grid.shape[0] > plain_h and grid.shape[1] > plain_w
    ink = np.all(grid < 64, axis=-1)
    assert ink[:grid.shape[0] - plain_h, -plain_w:].sum() > 40  # column headers
    assert ink[-plain_h:, :grid.shape[1] - plain_w].sum() > 40  # row prompts
    assert report["seconds_per_image"]["mllm"] > 0 and report["seconds_per_image"]["diffusion"] > 0
    with open(os.path.join(w, "demo", "summary.txt")) as fh:
        summary = fh.read()
    assert "chance" in summary and report["grid"] in summary and "understanding phase's" in summary
    # understanding before/after: per attribute beside chance, every answer and weight bit-identical
    und = report["understanding"]
    assert und["num_images"] == 2 and und["identical"] and und["answers_identical"] == und["answers"] > 0
    assert und["weights"] > 0 and und["weights_differing"] == []
    for name in ("before", "after"):
        assert set(und[name]["accuracy"]) >= {"color", "shape", "count"}
        assert all(0.0 <= v <= 1.0 for v in und[name]["accuracy"].values())
    assert und["before"] == und["after"] and und["before"]["chance"]["color"] == pytest.approx(1 / 6)
    assert "bit-identical" in summary and und["examples"] and all(e["answer"] == e["answer_after"]
                                                                  for e in und["examples"])
    with open(os.path.join(w, "demo", "grid_prompts.txt")) as fh:
        assert "what color" in fh.read()


def test_controlnet_and_mllm_trained_on_the_cached_vit_latents(first_run):
    """The demo builds the frozen ViT's latent cache once and both phases that need those latents read it."""
    cache = demo.clip_cache_path(first_run)
    latents = np.load(cache)
    with open(cache + ".json") as fh:
        side = json.load(fh)
    assert latents.shape == (32, 16, 64) and side["shape"] == [32, 16, 64]  # train_size 32, 4x4 grid, width 64
    assert np.all(np.isfinite(latents)) and np.abs(latents).sum(axis=(1, 2)).min() > 0  # no zero (corrupt) row
    configs = demo.phase_configs(demo.load_demo_config(SMOKE[2:]), first_run, fast=True)
    for name in ("controlnet", "mllm"):
        assert configs[name].data.precomputed_clip_latents == cache
        with open(os.path.join(first_run, name, "demo_phase_config.json")) as fh:
            assert json.load(fh) == demo_phases.fingerprint(configs[name])  # the run that trained used this config


def test_no_library_warnings_on_the_console(first_run_logs):
    """The demo's console shows its own lines: restoring the phase checkpoints logs no Orbax (absl) warning."""
    _, records = first_run_logs
    assert not [r.getMessage() for r in records if r.name == "absl"]


def test_second_run_reuses_finished_phases(first_run):
    w = first_run
    before = _checkpoint_steps(w)
    lines = {n: _metrics_lines(w, n) for n in demo.PHASE_ORDER}
    assert demo.main(["--workdir", w] + SMOKE) == 0
    with open(os.path.join(w, "demo", "report.json")) as fh:
        report = json.load(fh)
    assert [report["phases"][p]["status"] for p in demo.PHASE_ORDER] == ["reused"] * 5
    assert _checkpoint_steps(w) == before  # no checkpoint rewritten
    assert {n: _metrics_lines(w, n) for n in demo.PHASE_ORDER} == lines  # no training step logged


def test_generate_from_the_demo_workdir_with_no_config(first_run, tmp_path):
    """The README's command on a trained workdir: no --config; the pipeline comes from the configs the phase
    checkpoints recorded, and it is the demo's own (its Bifrost images are reproduced), not random weights."""
    w = first_run
    with open(os.path.join(w, "demo", "report.json")) as fh:
        report = json.load(fh)
    g = demo.load_demo_config(SMOKE[2:]).generate
    out = tmp_path / "gen"
    prompt = report["prompts"][0]
    rc = cli.main(["generate", "--checkpoint", w, "--prompt", prompt, "--num-images", "1", "--seed", str(g.seed),
                   "--mar-steps", str(g.mar_steps), "--mllm-cfg", str(g.mllm_cfg), "--flux-steps",
                   str(g.flux_steps), "--guidance", str(g.guidance), "--conditioning-scale",
                   str(g.conditioning_scale), "--out", str(out)])
    assert rc == 0
    image = np.asarray(Image.open(out / "000_00.png"))
    demo_images = np.load(os.path.join(w, "demo", "images_bifrost.npy"))
    assert np.abs(image.astype(int) - demo_images[0]).max() <= 1
    with open(out / "config.json") as fh:
        assert json.load(fh)["config"] is None  # built from the workdir alone
    # a named checkpoint that does not exist is an error; a config names its weights itself
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--checkpoint", str(tmp_path / "nowhere"), "--prompt", "x", "--out", str(out)])
    assert exit_info.value.code == 2
    with pytest.raises(ValueError, match="FLUX decoder"):  # --sampler is for UNet decoders; refused before loading
        cli.main(["generate", "--checkpoint", w, "--prompt", "x", "--out", str(out), "--sampler", "DDIMScheduler"])
    with pytest.raises(ValueError, match="names its weights itself"):
        cli.main(["generate", "--config", GENERATE_TINY, "--checkpoint", w, "--prompt", "x", "--out", str(out)])


def test_force_closure():
    assert demo_phases.phases_to_force(["understanding"]) == {"understanding", "controlnet", "mllm"}
    assert demo_phases.phases_to_force(["vae"]) == {"vae", "flux", "controlnet"}
    assert demo_phases.phases_to_force(["flux"]) == {"flux", "controlnet"}
    assert demo_phases.phases_to_force(["mllm"]) == {"mllm"}
    assert demo_phases.phases_to_force([]) == set()


def _dag_trace(fail=None, workers=2):
    names = list(demo.PHASE_ORDER)
    deps = {n: [d for d in demo_phases.DEPENDS_ON[n] if d in names] for n in names}
    events, lock = [], threading.Lock()

    def fn(name):
        with lock:
            events.append(("start", name))
        time.sleep(0.2 if name in ("understanding", "vae") else 0.05)
        with lock:
            events.append(("end", name))
        if name == fail:
            raise ValueError(f"{name} broke")
        return name.upper()
    return names, deps, events, fn


def test_concurrent_phases_start_after_what_they_start_from():
    names, deps, events, fn = _dag_trace()
    assert demo_phases.run_dag(names, deps, fn, 2) == {n: n.upper() for n in names}
    for name in names:
        for d in deps[name]:
            assert events.index(("end", d)) < events.index(("start", name)), (name, d, events)
    running, most = 0, 0
    for kind, _ in events:
        running += 1 if kind == "start" else -1
        most = max(most, running)
    assert most == 2  # understanding beside vae: never more than the workers
    assert events[:2] == [("start", "understanding"), ("start", "vae")]


def test_a_failing_phase_stops_the_ones_that_wait_and_is_raised():
    names, deps, events, fn = _dag_trace(fail="vae")
    with pytest.raises(ValueError, match="vae broke"):
        demo_phases.run_dag(names, deps, fn, 2)
    started = {n for kind, n in events if kind == "start"}
    assert "flux" not in started and "controlnet" not in started  # they start from the vae
    assert ("end", "understanding") in events  # the phase beside it finished (its checkpoint is not lost)


def test_force_retrains_only_the_forced_phases(first_run):
    w = first_run
    configs = demo.phase_configs(demo.load_demo_config(SMOKE[2:]), w, fast=True)
    before = _checkpoint_steps(w)
    trained_beside = _losses(w, "mllm")  # the first run trained it beside the vae / flux phases
    out = demo_phases.run_phases(configs, w, force=["mllm"], progress_bar=False)  # the cheapest phase to retrain
    assert {n: out[n]["status"] for n in demo.PHASE_ORDER} == {"understanding": "reused", "vae": "reused",
                                                               "flux": "reused",
                                                               "controlnet": "reused", "mllm": "trained"}
    after = _checkpoint_steps(w)
    kept = ("understanding", "vae", "flux", "controlnet")
    assert {n: after[n] for n in kept} == {n: before[n] for n in kept}
    assert after["mllm"] != before["mllm"]
    # alone now (concurrency 1): the same steps bit for bit, whatever trained beside it before
    assert _losses(w, "mllm") == trained_beside and len(trained_beside) >= 2


def _losses(workdir, name):
    return [(d["step"], d["loss"], d["grad_norm"]) for d in map(json.loads, _metrics_lines(workdir, name))]


def test_changed_config_is_refused(first_run):
    w = first_run
    configs = demo.phase_configs(demo.load_demo_config(SMOKE[2:] + ["--config.phases.vae.lr=0.5"]), w, fast=True)
    with pytest.raises(RuntimeError, match="--force vae"):
        demo_phases.run_phases(configs, w, progress_bar=False)


def test_phase_configs_align_the_grids():
    """The demo config's sizes chain: ViT grid -> upsampled = FLUX token grid, MLLM grid = ViT grid."""
    configs = demo.phase_configs(demo.load_demo_config([]), "/nonexistent-demo-workdir")
    cn, mllm = ControlNetPhase(configs["controlnet"]), MllmPhase(configs["mllm"])
    assert (2 * cn.clip_grid[0]) * (2 * cn.clip_grid[1]) == cn.num_img_tokens
    assert tuple(mllm.mllm_config.image_grid) == cn.clip_grid
    assert configs["controlnet"].flux.init_from.endswith(os.path.join("flux", "checkpoints"))
    # the ViT the controlnet and mllm phases read, and the MLLM's frozen base, are the understanding phase's
    und = os.path.join("understanding", "checkpoints")
    assert configs["controlnet"].vision.init_from.endswith(und) and configs["mllm"].vision.init_from.endswith(und)
    assert configs["mllm"].mllm.base_init_from.endswith(und)
    assert configs["flux"].vae.init_from.endswith(os.path.join("vae", "checkpoints"))



def test_the_latent_cache_does_not_change_a_phase_fingerprint():
    """A workdir trained with the ViT on the fly stays reusable with the cache (same latents) and vice versa."""
    on = demo.phase_configs(demo.load_demo_config([]), "/nonexistent-demo-workdir")
    off = demo.phase_configs(demo.load_demo_config(["--config.cache_clip_latents=False"]), "/nonexistent-demo-workdir")
    assert on["mllm"].data.precomputed_clip_latents and not off["mllm"].data.precomputed_clip_latents
    assert all(demo_phases.fingerprint(on[n]) == demo_phases.fingerprint(off[n]) for n in demo.PHASE_ORDER)
