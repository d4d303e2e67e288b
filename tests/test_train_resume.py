"""Preemption and crash recovery, in subprocesses: a run stopped by SIGTERM saves a checkpoint and exits 0; a run
killed by SIGKILL resumes from its last committed checkpoint; the resumed loss trajectory equals the uninterrupted
run's EXACTLY (same data order through the iterator state, same step RNG, same BatchNorm statistics)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(REPO, "configs", "toy.py")
STEPS = 16
COMMON = [f"--config.train.steps={STEPS}", "--config.train.log_every=1", "--config.checkpoint.every=3",
          "--config.checkpoint.keep=2", "--config.mesh.tensor=1", "--config.model.input_noise=0.1",
          "--config.train.tensorboard=False"]


def child_env(cache_dir):
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env.update(XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=2"]), JAX_PLATFORMS="cpu",
               JAX_DEFAULT_MATMUL_PRECISION="highest", PYTHONUNBUFFERED="1",
               # Children share compiled executables (the same programs), which keeps this test fast.
               JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.pop("BIFROST_COORDINATOR", None)
    return env


def start(workdir, env, delay=0.0):
    cmd = [sys.executable, "-m", "bifrost_jax.train.loop", "--config", TOY, "--workdir", str(workdir), *COMMON,
           f"--config.data.delay_s={delay}"]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def logged(workdir):
    """[(step, loss)] in the order written (a resumed run appends the steps it recomputes)."""
    path = os.path.join(workdir, "toy", "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            if line.endswith("\n"):
                rec = json.loads(line)
                out.append((rec["step"], rec["loss"]))
    return out


def wait_for_step(proc, workdir, step, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc {proc.returncode}) before step {step}:\n{proc.stdout.read()[-3000:]}")
        done = [s for s, _ in logged(workdir)]
        if done and max(done) >= step:
            return max(done)
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no step {step} within {timeout}s")


def finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def committed_steps(workdir):
    d = os.path.join(workdir, "toy", "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()
                  and os.path.exists(os.path.join(d, n, "commit_success.txt")))


def test_sigterm_and_sigkill_resume_reproduce_the_uninterrupted_run(tmp_path):
    env = child_env(tmp_path / "jax_cache")
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "interrupted"

    rc, out = finish(start(ref_dir, env))
    assert rc == 0, out[-3000:]
    reference = dict(logged(ref_dir))
    assert sorted(reference) == list(range(1, STEPS + 1))

    # SIGTERM (preemption): a checkpoint at the current step, then a clean exit.
    proc = start(run_dir, env, delay=0.15)
    wait_for_step(proc, run_dir, 4)
    proc.send_signal(signal.SIGTERM)
    rc, out = finish(proc)
    assert rc == 0, out[-3000:]
    assert "preempted: checkpoint saved at step" in out
    stopped_at = max(s for s, _ in logged(run_dir))
    assert committed_steps(run_dir)[-1] == stopped_at

    # SIGKILL (crash), between two checkpoints of the resumed run.
    proc = start(run_dir, env, delay=0.15)
    killed_at = wait_for_step(proc, run_dir, stopped_at + 4)
    proc.send_signal(signal.SIGKILL)
    rc, out = finish(proc)
    assert rc == -signal.SIGKILL
    assert "resumed from step" in out
    last_ckpt = committed_steps(run_dir)[-1]
    assert last_ckpt < killed_at, "the kill should land after the last checkpoint (steps get recomputed)"

    # Resume to the end.
    rc, out = finish(start(run_dir, env))
    assert rc == 0, out[-3000:]
    assert f"resumed from step {last_ckpt}" in out
    history = logged(run_dir)
    final = dict(history)  # the last value logged for each step
    assert sorted(final) == list(range(1, STEPS + 1))
    mismatched = {s: (final[s], reference[s]) for s in final if final[s] != reference[s]}
    assert not mismatched, f"resumed losses differ from the uninterrupted run: {mismatched}"
    # Steps computed twice (before the kill and after the resume) agree bit for bit as well.
    recomputed = [(s, l) for s, l in history if s > last_ckpt and s <= killed_at]
    assert len(recomputed) >= 2 * (killed_at - last_ckpt)
    assert all(l == reference[s] for s, l in recomputed)
