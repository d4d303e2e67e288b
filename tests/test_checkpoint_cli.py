"""A training checkpoint named by a generation config (``config.controlnet.init_from``) through ``bifrost generate``
and ``bifrost eval``: a phase checkpoint written by the training checkpointer (``checkpoint.save_state``:
params + BatchNorm statistics, optimizer state, config) replaces the configured ControlNet; the command's images
equal those of the pipeline built in Python from the same config, and differ from the random weights' images.
(``--checkpoint WORKDIR`` alone, the workdir's own configs, is tested on the demo's workdir in test_demo.py.)"""
import json
import os

import jax
import ml_collections
import numpy as np
import optax
import pytest
from PIL import Image

from bifrost_jax import cli
from bifrost_jax.configs import load_config_file
from bifrost_jax.eval import run
from bifrost_jax.sample.build import build_pipeline, synthetic_variables
from bifrost_jax import checkpoint as ckpt
from bifrost_jax.train.state import TrainState
from test_pipeline import TINY



@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """WORKDIR with a ``controlnet`` phase checkpoint at step 3 whose ControlNet differs from the configured one."""
    random_pipe = build_pipeline(load_config_file(TINY))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), random_pipe.controlnet_variables)
    trained = jax.tree.map(lambda x, a: np.asarray(x).astype(a.dtype),
                           synthetic_variables(abstract, seed=99, noise=0.2), abstract)
    params = {"controlnet": trained["params"]}
    state = TrainState(step=np.int32(3), params=params, opt_state=optax.adam(1e-3).init(params),
                       mutable={"batch_stats": {"controlnet": trained["batch_stats"]}}, ema_params=None,
                       rng=jax.random.PRNGKey(0), bad_steps=np.int32(0), bad_since=np.int32(0))
    path = str(tmp_path_factory.mktemp("work"))
    manager = ckpt.make_manager(ckpt.checkpoint_dir(path, "controlnet"), async_save=False)
    ckpt.save_state(manager, state, config=ml_collections.ConfigDict({"phase": "controlnet"}))
    manager.wait_until_finished()
    manager.close()
    return path, trained, random_pipe


def _overrides(path):
    return [f"controlnet.init_from={ckpt.checkpoint_dir(path, 'controlnet')}"]


@pytest.fixture(scope="module")
def from_checkpoint(workdir):
    path, _, _ = workdir
    return build_pipeline(load_config_file(TINY, _overrides(path)))


def _pngs(directory, names):
    return np.stack([np.asarray(Image.open(os.path.join(directory, n))) for n in names])


def test_pipeline_takes_the_checkpointed_controlnet(workdir, from_checkpoint):
    _, trained, random_pipe = workdir
    got = jax.tree_util.tree_leaves_with_path(from_checkpoint.controlnet_variables)
    want = jax.tree_util.tree_leaves_with_path(trained)
    assert [p for p, _ in got] == [p for p, _ in want]
    for (path, g), (_, w) in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=str(path))
    # the other components stay as configured
    for a, b in zip(jax.tree.leaves(from_checkpoint.transformer_variables),
                    jax.tree.leaves(random_pipe.transformer_variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_generate_command_with_checkpoint(workdir, from_checkpoint, tmp_path):
    path, _, random_pipe = workdir
    out = tmp_path / "gen"
    flags = [f"--config.{o}" for o in _overrides(path)]
    assert cli.main(["generate", "--config", TINY, "--random-weights", "--prompt", "two blue squares", "--num-images", "2", "--seed", "4",
                     "--out", str(out)] + flags) == 0
    images = _pngs(out, ["000_00.png", "000_01.png"])
    want = from_checkpoint.generate(["two blue squares"], num_images_per_prompt=2, seed=4)
    assert np.abs(images.astype(int) - want).max() <= 1
    plain = random_pipe.generate(["two blue squares"], num_images_per_prompt=2, seed=4)
    assert np.abs(images.astype(int) - plain).mean() > 2.0  # the checkpoint's weights were used
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["controlnet"]["init_from"] == ckpt.checkpoint_dir(path, "controlnet")


def test_eval_command_with_checkpoint(workdir, from_checkpoint, tmp_path):
    path, _, random_pipe = workdir
    out = tmp_path / "eval"
    flags = [f"--config.{o}" for o in _overrides(path)]
    assert cli.main(["eval", "shapes", "--config", TINY, "--random-weights", "--num-prompts", "2", "--num-images", "2", "--batch-size",
                     "1", "--save-images", "--out", str(out)] + flags) == 0
    captions, _ = run.shapes_prompts(2)
    seed = from_checkpoint.options.seed
    for i, caption in enumerate(captions):
        images = _pngs(out / "images", [f"{i:05d}_00.png", f"{i:05d}_01.png"])
        want = from_checkpoint.generate([caption], num_images_per_prompt=2, seed=seed)
        assert np.abs(images.astype(int) - want).max() <= 1
        plain = random_pipe.generate([caption], num_images_per_prompt=2, seed=seed)
        assert np.abs(images.astype(int) - plain).mean() > 2.0
