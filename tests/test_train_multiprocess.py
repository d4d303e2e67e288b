"""A 2-process run on 127.0.0.1 (jax.distributed on CPU, gloo collectives, 4 simulated devices per process, one
mesh data=2 x fsdp=2 x tensor=2 over both) trains, saves a checkpoint from both processes, and a second 2-process
run resumes from it; the checkpoint also restores in a single process onto another mesh."""
import importlib.util
import io
import os
import sys

import jax
import numpy as np

from bifrost_jax.configs import load_config_file
from bifrost_jax.parallel.mesh import make_mesh
from bifrost_jax.train import checkpoint as ckpt
from bifrost_jax.train.phases import get_phase
from bifrost_jax.train.state import StateBuilder, make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(REPO, "configs", "toy.py")

_spec = importlib.util.spec_from_file_location("local_multiprocess", os.path.join(REPO, "launch",
                                                                                  "local_multiprocess.py"))
local_multiprocess = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local_multiprocess)


def run_job(workdir, steps, env):
    cmd = [sys.executable, "-m", "bifrost_jax.train.loop", "--config", TOY, "--workdir", str(workdir),
           f"--config.train.steps={steps}", "--config.train.log_every=1", "--config.checkpoint.every=2",
           "--config.train.tensorboard=False"]
    out = io.StringIO()
    code = local_multiprocess.run(cmd, num_processes=2, devices_per_process=4, timeout=300, env=env, cwd=REPO,
                                  out=out)
    return code, out.getvalue()


def test_two_processes_train_save_and_resume(tmp_path):
    env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    workdir = tmp_path / "run"
    code, out = run_job(workdir, 2, env)
    assert code == 0, out[-4000:]
    assert "fresh start" in out and "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in out
    step_dir = workdir / "toy" / "checkpoints" / "2"
    # Each process saved its own data-iterator state; the commit marker makes the step valid.
    assert sorted(os.listdir(step_dir / "data")) == ["commit_success.txt", "process_0-of-2.json",
                                                     "process_1-of-2.json"]
    assert (step_dir / "commit_success.txt").exists()

    code, out = run_job(workdir, 4, env)
    assert code == 0, out[-4000:]
    assert "resumed from step 2" in out

    # Restore both checkpoints in this (single) process onto an fsdp=8 mesh, without the per-process data state.
    config = load_config_file(TOY)
    phase = get_phase(config)
    tx, _ = make_optimizer(config.optim, config.train.steps)
    builder = StateBuilder(phase, tx, make_mesh({"fsdp": 8}), seed=config.seed, ema=False)
    manager = ckpt.make_manager(ckpt.checkpoint_dir(str(workdir), "toy"), keep=2)
    assert manager.all_steps() == [2, 4]
    s2, _ = ckpt.restore_state(manager, builder.abstract_state, step=2, with_data=False)
    s4, _ = ckpt.restore_state(manager, builder.abstract_state, step=4, with_data=False)
    manager.close()
    assert int(s2.step) == 2 and int(s4.step) == 4
    k2 = np.asarray(jax.device_get(s2.params["block_0"]["fc1"]["kernel"]))
    k4 = np.asarray(jax.device_get(s4.params["block_0"]["fc1"]["kernel"]))
    assert np.isfinite(k4).all() and not np.array_equal(k2, k4)
    assert s4.params["block_0"]["fc1"]["kernel"].sharding == builder.state_shardings.params["block_0"]["fc1"]["kernel"]
