"""``bifrost eval dpg`` on the tiny pipeline: DPG-Bench's layout (``<name>.png``, a 2x2 grid of four images with no
padding, so the scorer's crops at multiples of the image size are exactly the images), per-prompt seeds (the
quadrants equal a direct ``generate`` with that seed, whatever the batch) and resume (only a missing grid is
redone)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from bifrost_jax.configs import load_config_file
from bifrost_jax.eval import dpg, run
from bifrost_jax.sample.build import build_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "generate_tiny.py")


def _prompts_dir():
    """The shared DPG-Bench prompts, ``../shared/data/dpgbench/prompts`` beside the repository (never copied)."""
    for path in (os.path.join(REPO, "..", "shared", "data", "dpgbench", "prompts"),
                 os.path.join(REPO, "shared", "data", "dpgbench", "prompts")):
        if os.path.isdir(path):
            return os.path.realpath(path)
    pytest.skip("DPG-Bench prompts not found beside the repository")


def test_dpg_grids_seeds_and_resume(tmp_path):
    prompts_dir = _prompts_dir()
    prompts = dpg.read_prompts(prompts_dir, limit=3)
    out = tmp_path / "dpg"
    argv = ["dpg", "--config", TINY, "--random-weights", "--prompts", prompts_dir, "--out", str(out), "--limit", "3", "--batch-size",
            "2", "--seed", "7"]
    assert run.main(argv) == 0
    grids = {name: np.asarray(Image.open(out / f"{name}.png")) for name, _ in prompts}

    pipe = build_pipeline(load_config_file(TINY))
    h, w = pipe.image_size
    name, text = prompts[2]  # generated alone in the second (padded) batch of the run
    direct = pipe.generate([text, prompts[0][1]], num_images_per_prompt=4,
                           seed=[dpg.prompt_seed(7, name), dpg.prompt_seed(7, prompts[0][0])])
    grid = grids[name]
    assert grid.shape == (2 * h, 2 * w, 3)  # no padding
    crops = [grid[r * h:(r + 1) * h, c * w:(c + 1) * w] for r in range(2) for c in range(2)]
    for k in range(4):
        assert np.abs(crops[k].astype(int) - direct[k].astype(int)).max() <= 1
    assert not np.array_equal(crops[0], crops[1])  # four different samples

    # resume (same loop as the command, one pipeline here): one grid lost; only it is generated again, the same
    log = out / dpg.LOG_DIR / "process_0.jsonl"
    log.unlink()
    os.remove(out / f"{prompts[1][0]}.png")
    done = dpg.run_dpg(lambda p, k, s: pipe.generate(list(p), num_images_per_prompt=k, seed=list(s)), prompts,
                       str(out), seed=7, batch_size=2, progress=False)
    assert done == [prompts[1][0]] and dpg.missing_prompts(str(out), prompts) == []
    assert [json.loads(x)["name"] for x in log.read_text().splitlines()] == [prompts[1][0]]
    again = np.asarray(Image.open(out / f"{prompts[1][0]}.png"))
    assert np.abs(again.astype(int) - grids[prompts[1][0]].astype(int)).max() <= 1


def test_dpg_prompt_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        dpg.read_prompts(str(tmp_path / "nope"))
    (tmp_path / "a.txt").write_text("  \n")
    with pytest.raises(ValueError, match="a.txt is empty"):
        dpg.read_prompts(str(tmp_path))
