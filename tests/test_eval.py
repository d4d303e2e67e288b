"""Evaluation (eval/): GenEval layout, resume and a 2-process sharded run; PSNR/SSIM against formulas written out
here; FID maths; the shapes eval (report with chance levels, a perfect generator scores 1)."""
import importlib.util
import io
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image
from reference_loops import reference_reconstruct

from bifrost_jax.data.shapes import parse_caption, render, sample_placement
from bifrost_jax.eval import geneval, reconstruction, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "generate_tiny.py")


def _geneval_metadata():
    """The shared GenEval prompt set, ``../shared/data/geneval`` beside the repository (never copied into it)."""
    candidates = [os.path.join(REPO, "..", "shared", "data", "geneval", "evaluation_metadata.jsonl"),
                  os.path.join(REPO, "shared", "data", "geneval", "evaluation_metadata.jsonl")]
    for path in candidates:
        if os.path.isfile(path):
            return os.path.realpath(path)
    pytest.skip(f"GenEval prompts not found (looked for {candidates})")


def _read_png(path):
    return np.asarray(Image.open(path))


# ----------------------------------------------------------------------------------------------------------------
# GenEval

@pytest.fixture(scope="module")
def geneval_single(tmp_path_factory):
    """A single-process run on the first 3 prompts (2 samples each), through ``bifrost eval geneval``."""
    out = tmp_path_factory.mktemp("geneval_single")
    code = run.main(["geneval", "--config", TINY, "--random-weights", "--prompts", _geneval_metadata(), "--out",
                     str(out), "--limit", "3",
                     "--num-images", "2", "--batch-size", "2"])
    assert code == 0
    return out


def test_geneval_layout(geneval_single):
    out = geneval_single
    lines = open(_geneval_metadata()).read().splitlines()
    for index in range(3):
        d = out / f"{index:05d}"
        assert (d / "metadata.jsonl").read_text() == lines[index] + "\n"  # the prompt's line, unchanged
        samples = sorted(os.listdir(d / "samples"))
        assert samples == ["0000.png", "0001.png"]
        im = _read_png(d / "samples" / "0000.png")
        assert im.shape == (32, 48, 3) and im.dtype == np.uint8
        assert (d / "grid.png").exists()
    assert not (out / "00003").exists()
    assert not [f for f in os.listdir(out / "00000" / "samples") if f.startswith(".tmp")]
    logged = [json.loads(x)["index"] for x in (out / geneval.LOG_DIR / "process_0.jsonl").read_text().splitlines()]
    assert logged == [0, 1, 2]


def test_geneval_resume(geneval_single, tmp_path):
    import shutil
    out = tmp_path / "resume"
    shutil.copytree(geneval_single, out)
    log = out / geneval.LOG_DIR / "process_0.jsonl"
    log.unlink()
    # interrupted runs: prompt 1 lost its metadata (written last), prompt 2 has only one sample
    os.remove(out / "00001" / "metadata.jsonl")
    os.remove(out / "00002" / "samples" / "0001.png")
    kept = {p: os.stat(p).st_mtime_ns for p in (out / "00000").rglob("*") if p.is_file()}
    before = _read_png(out / "00001" / "samples" / "0000.png")
    os.utime(out / "00001" / "samples" / "0000.png", ns=(1, 1))
    code = run.main(["geneval", "--config", TINY, "--random-weights", "--prompts", _geneval_metadata(), "--out",
                     str(out), "--limit", "3",
                     "--num-images", "2", "--batch-size", "2"])
    assert code == 0
    assert [json.loads(x)["index"] for x in log.read_text().splitlines()] == [1, 2]  # only the unfinished ones
    assert {p: os.stat(p).st_mtime_ns for p in kept} == kept  # finished prompt 0 untouched
    assert os.stat(out / "00001" / "samples" / "0000.png").st_mtime_ns > 1  # rewritten
    assert (out / "00001" / "metadata.jsonl").exists() and (out / "00002" / "samples" / "0001.png").exists()
    # the same images again (seeding is per prompt)
    assert np.abs(_read_png(out / "00001" / "samples" / "0000.png").astype(int) - before).max() <= 1


def _local_multiprocess():
    spec = importlib.util.spec_from_file_location("local_multiprocess",
                                                  os.path.join(REPO, "launch", "local_multiprocess.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_geneval_two_processes(geneval_single, tmp_path):
    out = tmp_path / "mp"
    n = 5
    cmd = [sys.executable, "-m", "bifrost_jax.eval.run", "geneval", "--config", TINY, "--random-weights", "--prompts",
           _geneval_metadata(), "--out", str(out), "--limit", str(n), "--num-images", "2", "--batch-size", "2"]
    env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    log = io.StringIO()
    code = _local_multiprocess().run(cmd, num_processes=2, devices_per_process=2, timeout=400, env=env, cwd=REPO,
                                     out=log)
    assert code == 0, log.getvalue()[-4000:]
    assert "process 1/2" in log.getvalue()
    per_process = []
    for i in range(2):
        lines = (out / geneval.LOG_DIR / f"process_{i}.jsonl").read_text().splitlines()
        per_process.append([json.loads(x)["index"] for x in lines])
    assert per_process[0] and per_process[1]
    everything = per_process[0] + per_process[1]
    assert sorted(everything) == list(range(n))  # every prompt exactly once, over both processes
    assert geneval.missing_prompts(str(out), n, 2) == []
    # independent of the sharding: the same images as the single-process run
    for index in range(3):
        for s in range(2):
            a = _read_png(out / f"{index:05d}" / "samples" / f"{s:04d}.png").astype(int)
            b = _read_png(geneval_single / f"{index:05d}" / "samples" / f"{s:04d}.png").astype(int)
            assert np.abs(a - b).max() <= 1


# ----------------------------------------------------------------------------------------------------------------
# reconstruction metrics

def _reference_ssim_channel(x, y, data_range=255.0):
    """Wang et al. SSIM written out per pixel: an explicit 11x11 Gaussian window (sigma 1.5, normalised) over every
    interior position, population (co)variances, K1 0.01, K2 0.03, mean over the interior."""
    r = 5
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / 1.5) ** 2)
    w = np.outer(g, g)
    w /= w.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for i in range(r, x.shape[0] - r):
        for j in range(r, x.shape[1] - r):
            px, py = x[i - r:i + r + 1, j - r:j + r + 1], y[i - r:i + r + 1, j - r:j + r + 1]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return np.mean(vals)


def test_psnr_ssim_against_reference():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 20, 24, 3)).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-30, 31, a.shape), 0, 255).astype(np.uint8)
    b[1, :10] = 255 - b[1, :10]  # a badly wrong half in image 1
    mse = ((a.astype(float) - b) ** 2).reshape(2, -1).mean(1)
    np.testing.assert_allclose(reconstruction.psnr(a, b), 10 * np.log10(255.0 ** 2 / mse), rtol=1e-12)
    assert reconstruction.psnr(a, a)[0] == np.inf
    got = reconstruction.ssim(a, b)
    want = [np.mean([_reference_ssim_channel(a[i, ..., c].astype(float), b[i, ..., c].astype(float))
                     for c in range(3)]) for i in range(2)]
    np.testing.assert_allclose(got, want, rtol=1e-10)
    assert got[0] > got[1] and reconstruction.ssim(a, a)[0] == pytest.approx(1.0)


def test_fid_from_streamed_stats():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((200, 4)), rng.standard_normal((150, 4)) * 1.5 + 0.3
    sx, sy = reconstruction.FeatureStats(4), reconstruction.FeatureStats(4)
    for part in np.array_split(x, 3):
        sx.add(part)
    sy.add(y)
    mx, cx = reconstruction.FeatureStats.mean_cov(sx.packed(), 4)
    my, cy = reconstruction.FeatureStats.mean_cov(sy.packed(), 4)
    np.testing.assert_allclose(cx, np.cov(x, rowvar=False), atol=1e-10)
    from scipy.linalg import sqrtm
    want = np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(np.cov(x, rowvar=False) + np.cov(y, rowvar=False)
                                                            - 2 * np.real(sqrtm(np.cov(x, rowvar=False)
                                                                               @ np.cov(y, rowvar=False))))
    assert reconstruction.frechet_distance(mx, cx, my, cy) == pytest.approx(want, rel=1e-8)
    assert reconstruction.frechet_distance(mx, cx, mx, cx) == pytest.approx(0.0, abs=1e-6)


def test_reconstruction_eval_on_a_folder(tmp_path):
    rng = np.random.default_rng(2)
    data = tmp_path / "images"
    data.mkdir()
    for i in range(5):  # 5 images, batches of 4: the second batch is padded (invalid slots must not count)
        Image.fromarray(rng.integers(0, 256, (60 + 4 * i, 80, 3), dtype=np.uint8)).save(data / f"{i}.png")
    out = tmp_path / "out"
    code = run.main(["reconstruction", "--config", TINY, "--random-weights", "--dataset", "folder", "--data-dir",
                     str(data), "--out",
                     str(out), "--batch-size", "4"])
    assert code == 0
    result = json.loads((out / "reconstruction.json").read_text())
    assert result["num_images"] == 5 and result["fid"] is None and "skipped" in result["fid_note"]
    # the aggregate equals the per-image metrics of reconstructions written out step by step (ViT -> ControlNet +
    # FLUX Euler loop -> VAE) from the same weights, each image with the noise of its index
    from bifrost_jax.configs import load_config_file
    from bifrost_jax.sample.build import build_pipeline
    pipe = build_pipeline(load_config_file(TINY))
    o = pipe.options
    prep = reconstruction.make_preprocess(pipe.vision_size, pipe.image_size)
    items = [prep(e, None) for e in reconstruction.folder_source(str(data))]
    vit = np.stack([it["vit_pixels"] for it in items])
    target = np.stack([it["target"] for it in items])
    recon = reference_reconstruct(pipe, vit, seed=o.seed, indices=range(5), steps=o.flux_steps, guidance=o.guidance,
                                  scale=o.conditioning_scale)
    # (a pixel off by one here and there moves PSNR by ~1e-5 dB; reconstructions that ignore the image by ~1e-2)
    assert result["psnr"] == pytest.approx(reconstruction.psnr(recon, target).mean(), abs=1e-3)
    assert result["ssim"] == pytest.approx(reconstruction.ssim(recon, target).mean(), abs=2e-4)


def test_reconstruction_eval_on_shapes_with_options(tmp_path):
    """``--dataset shapes`` with its options: the split, the build options, ``--limit``, ``--use-captions`` (the
    captions reach FLUX's text encoders) and ``--seed``; the metrics are those of the written-out reconstruction of
    the first images of that split (as built under --data-dir) with those captions and that seed."""
    from bifrost_jax.configs import load_config_file
    from bifrost_jax.data.shapes import ShapesOptions, load_shapes
    from bifrost_jax.sample.build import build_pipeline

    opts = dict(resolution=64, train_size=4, validation_size=4, test_size=5, seed=3)
    out = tmp_path / "out"
    code = run.main(["reconstruction", "--config", TINY, "--random-weights", "--dataset", "shapes", "--data-dir", str(tmp_path / "tfds"),
                     "--split", "test", "--shapes-options", json.dumps(opts), "--limit", "3", "--batch-size", "2",
                     "--use-captions", "--seed", "7", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "reconstruction.json").read_text())
    assert result["num_images"] == 3 and result["dataset"] == "shapes" and result["split"] == "test"
    assert result["seed"] == 7
    pipe = build_pipeline(load_config_file(TINY))
    o = pipe.options
    prep = reconstruction.make_preprocess(pipe.vision_size, pipe.image_size)
    source = load_shapes(str(tmp_path / "tfds"), "test", ShapesOptions(**opts))  # the build the command made
    assert len(source) == 5
    items = [prep(source[i], None) for i in range(3)]
    vit = np.stack([it["vit_pixels"] for it in items])
    target = np.stack([it["target"] for it in items])
    captions = [it["caption"] for it in items]
    assert all(captions)

    # (empty prompts instead of the captions move the PSNR by ~0.05 dB, the default seed by ~0.01 dB)
    recon = reference_reconstruct(pipe, vit, seed=7, indices=range(3), steps=o.flux_steps, guidance=o.guidance,
                                  scale=o.conditioning_scale, prompts=captions)
    assert result["psnr"] == pytest.approx(reconstruction.psnr(recon, target).mean(), abs=1e-3)
    assert result["ssim"] == pytest.approx(reconstruction.ssim(recon, target).mean(), abs=2e-4)


# ----------------------------------------------------------------------------------------------------------------
# shapes

def _renderer(shuffle: bool):
    """A 'generator' that draws the prompt (or, with ``shuffle``, the next prompt of the batch) perfectly."""
    def generate(prompts, k, seed):
        order = list(prompts[1:]) + list(prompts[:1]) if shuffle else list(prompts)
        out = []
        for p in order:
            spec = parse_caption(p)
            rng = np.random.default_rng(seed)
            for _ in range(k):
                out.append(render(spec, sample_placement(spec, 96, rng), 96))
        return np.stack(out)
    return generate


def test_shapes_eval_perfect_and_wrong_generators():
    captions, specs = run.shapes_prompts(12)
    assert all(parse_caption(c) == s for c, s in zip(captions, specs))
    perfect = run.evaluate_shapes(_renderer(False), captions, specs, num_images=2, batch_size=4, seed=0,
                                  progress=False)
    for attr in ("color", "shape", "count", "overall"):
        assert perfect.accuracy[attr] == 1.0, (attr, perfect.format())
        assert perfect.counts[attr] == 24
    wrong = run.evaluate_shapes(_renderer(True), captions, specs, num_images=1, batch_size=4, seed=0,
                                progress=False)
    assert wrong.accuracy["overall"] < 0.5
    assert 0.0 <= wrong.chance["color"] < 1.0


@pytest.fixture(scope="module")
def shapes_cli_tiny(tmp_path_factory):
    """``bifrost eval shapes`` on the tiny random pipeline: 5 prompts in batches of 2 (the last one padded), 2 images
    each, images saved."""
    out = tmp_path_factory.mktemp("shapes_cli")
    code = run.main(["shapes", "--config", TINY, "--random-weights", "--out", str(out), "--num-prompts", "5", "--num-images", "2",
                     "--batch-size", "2", "--save-images"])
    assert code == 0
    return out


def test_shapes_eval_command(shapes_cli_tiny):
    """The report is exactly the checker's verdicts on the written images, counted once each (padding excluded),
    with the chance levels of the scored prompts."""
    from bifrost_jax.eval.shapes_checker import ATTRIBUTES, chance_levels, check_image

    report = json.loads((shapes_cli_tiny / "shapes_report.json").read_text())
    assert report["num_prompts"] == 5 and report["split"] == "test" and report["num_images_per_prompt"] == 2
    captions, specs = run.shapes_prompts(5)
    files = sorted(os.listdir(shapes_cli_tiny / "images"))
    assert files == [f"{i:05d}_{k:02d}.png" for i in range(5) for k in range(2)]
    hits = {a: [0, 0] for a in ATTRIBUTES}
    for name in files:
        verdict = check_image(_read_png(shapes_cli_tiny / "images" / name), specs[int(name[:5])])
        for attr, ok in verdict.items():
            hits[attr][0] += int(ok)
            hits[attr][1] += 1
    for attr in ATTRIBUTES:
        assert report["counts"][attr] == hits[attr][1], attr
        if hits[attr][1]:
            assert report["accuracy"][attr] == hits[attr][0] / hits[attr][1], attr
    assert report["counts"]["overall"] == 10
    assert report["chance"] == pytest.approx(chance_levels(specs), nan_ok=True)
    assert "chance" in report["table"]


def test_shapes_eval_command_known_answers(tmp_path, monkeypatch):
    """Through the command with a generator whose score is known from the prompts alone: image 0 of every prompt
    a perfect drawing, image 1 blank. Colour, shape, count, relation and overall are then exactly 1/2; position
    (scored only where both objects are found) exactly 1 over the relation prompts."""
    from bifrost_jax.eval.shapes_checker import detect_objects
    from bifrost_jax.sample.pipeline import BifrostPipeline

    draw = _renderer(False)

    def half_blank(self, prompts, *, num_images_per_prompt, seed, **kw):
        assert num_images_per_prompt == 2
        images = draw(prompts, 2, seed)
        images[1::2] = images[0, 0, 0]  # the background colour everywhere
        return images
    monkeypatch.setattr(BifrostPipeline, "generate", half_blank)
    blank = np.broadcast_to(draw(["a red circle"], 1, 0)[0, 0, 0], (96, 96, 3)).copy()
    assert detect_objects(blank) == []
    n = 7
    code = run.main(["shapes", "--config", TINY, "--random-weights", "--out", str(tmp_path), "--num-prompts", str(n), "--num-images",
                     "2", "--batch-size", "3"])
    assert code == 0
    report = json.loads((tmp_path / "shapes_report.json").read_text())
    _, specs = run.shapes_prompts(n)
    n_rel = sum(s.relation is not None for s in specs)
    assert 0 < n_rel < n  # both kinds of prompt among the first 7
    want_counts = {"color": 2 * n, "shape": 2 * n, "count": 2 * n, "overall": 2 * n, "relation": 2 * n_rel,
                   "position": n_rel}
    assert report["counts"] == want_counts
    assert report["accuracy"] == {"color": 0.5, "shape": 0.5, "count": 0.5, "overall": 0.5, "relation": 0.5,
                                  "position": 1.0}
