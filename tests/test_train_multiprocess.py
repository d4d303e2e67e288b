"""A 2-process run on 127.0.0.1 (jax.distributed on CPU, gloo collectives, 4 simulated devices per process, one
mesh data=2 x fsdp=2 x tensor=2 over both) trains the real ``mllm`` phase (tiny config; frozen Qwen text model and
ViT stored in bf16 by ``train.frozen_param_dtype``), saves checkpoints from both processes (each its own
data-iterator state), and a second 2-process run resumes from the mid-run checkpoint: its losses and final weights
equal the uninterrupted run's exactly, and both processes report the same loss. The checkpoint also restores in a
single process onto another mesh."""
import importlib.util
import io
import os
import re
import shutil
import sys

import jax
import numpy as np
from flax import traverse_util

from bifrost_jax.configs import load_config_file
from bifrost_jax.parallel.mesh import make_mesh
from bifrost_jax import checkpoint as ckpt
from bifrost_jax.train.registry import get_phase
from bifrost_jax.train.state import StateBuilder, make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_spec = importlib.util.spec_from_file_location("local_multiprocess", os.path.join(REPO, "launch",
                                                                                  "local_multiprocess.py"))
local_multiprocess = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local_multiprocess)


MLLM = os.path.join(REPO, "configs", "mllm.py")
MLLM_STEPS = 4


def mllm_overrides(data_dir):
    return [f"train.steps={MLLM_STEPS}", "train.log_every=1", "checkpoint.every=2", "checkpoint.keep=3",
            "train.tensorboard=False", f"data.data_dir={data_dir}", "data.train_size=32",
            "train.frozen_param_dtype=bfloat16"]


def run_mllm_job(workdir, overrides, env):
    cmd = [sys.executable, "-m", "bifrost_jax.train.loop", "--config", MLLM, "--workdir", str(workdir),
           *[f"--config.{o}" for o in overrides]]
    out = io.StringIO()
    code = local_multiprocess.run(cmd, num_processes=2, devices_per_process=4, timeout=400, env=env, cwd=REPO,
                                  out=out)
    return code, out.getvalue()


def reported_losses(out):
    """{process: (step, loss)} from each process's closing line."""
    found = re.findall(r"^\[(\d)\] process (\d)/2: step (\d+) loss (\S+)$", out, re.M)
    return {int(p): (int(step), float(loss)) for prefix, p, step, loss in found if prefix == p}


def test_two_processes_train_the_mllm_phase_and_resume_exactly(tmp_path):
    from test_train_resume import logged, saved_variables

    env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    overrides = mllm_overrides(tmp_path / "data")
    config = load_config_file(MLLM, overrides)
    # Build the shapes data and the word tokenizer once here: two processes must not race to write them.
    get_phase(config).dataset(global_batch_size=config.train.batch_size, seed=0, process_index=0, process_count=1)

    # Uninterrupted 2-process run: checkpoints at steps 2 and 4.
    ref = tmp_path / "reference"
    code, out = run_mllm_job(ref, overrides, env)
    assert code == 0, out[-4000:]
    assert "fresh start" in out and "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in out
    reference = dict(logged(ref, "mllm"))
    assert sorted(reference) == list(range(1, MLLM_STEPS + 1))
    assert reported_losses(out) == {0: (MLLM_STEPS, reference[MLLM_STEPS]), 1: (MLLM_STEPS, reference[MLLM_STEPS])}
    step2 = ref / "mllm" / "checkpoints" / "2"
    assert sorted(os.listdir(step2 / "data")) == ["commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]

    # A second 2-process run resumes from the step-2 checkpoint the first one saved mid-run.
    run = tmp_path / "resumed"
    shutil.copytree(ref, run, ignore=lambda d, names: [n for n in names if d.endswith("checkpoints") and n == "4"])
    with open(run / "mllm" / "metrics.jsonl", "w") as f:  # the resumed run appends steps 3 and 4
        f.write("")
    code, out = run_mllm_job(run, overrides, env)
    assert code == 0, out[-4000:]
    assert "resumed from step 2" in out
    resumed = dict(logged(run, "mllm"))
    assert resumed == {s: reference[s] for s in (3, 4)}, (resumed, reference)
    assert reported_losses(out) == {0: (MLLM_STEPS, reference[MLLM_STEPS]), 1: (MLLM_STEPS, reference[MLLM_STEPS])}
    got, want = saved_variables(run, "mllm", MLLM_STEPS), saved_variables(ref, "mllm", MLLM_STEPS)
    assert got.keys() == want.keys()
    differ = [k for k in want if not np.array_equal(got[k], want[k])]
    assert not differ, f"final weights differ from the uninterrupted run: {differ}"

    # The 2-process checkpoint restores in this single process onto another mesh (fsdp=8), without data state.
    phase = get_phase(config)
    tx, _ = make_optimizer(config.optim, config.train.steps)
    builder = StateBuilder(phase, tx, make_mesh({"fsdp": 8}), seed=config.seed, ema=False)
    assert {x.dtype for x in jax.tree.leaves(builder.abstract_frozen)} == {np.dtype(jax.numpy.bfloat16)}
    manager = ckpt.make_manager(ckpt.checkpoint_dir(str(run), "mllm"))
    assert manager.all_steps() == [2, 4]
    state, _ = ckpt.restore_state(manager, builder.abstract_state, with_data=False)
    manager.close()
    assert int(state.step) == MLLM_STEPS
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype(np.float32)}
    flat_state = {".".join(map(str, k)): v for k, v in traverse_util.flatten_dict(state.params).items()}
    for k, v in flat_state.items():
        assert np.array_equal(np.asarray(jax.device_get(v)), want["params." + k]), k
    leaf = next(iter(flat_state))
    expected_sharding = traverse_util.flatten_dict(builder.state_shardings.params, sep=".")[leaf]
    assert flat_state[leaf].sharding == expected_sharding
