"""Fault injection: every fault of "What happens when things go wrong" (README) reproduced on the tiny phases, with
the behaviour wanted. In process (8 simulated CPU devices), on the toy phase unless a fault lives elsewhere:

1. non-finite steps (too high a learning rate; NaN batches): not applied, counted, the run stops naming them;
2. damaged checkpoints (flipped bytes, a lost item, a lost manifest): named, the newest intact step resumed, and
   the recovered run ends bit-identical to the uninterrupted one;
3. a failing asynchronous save (an injected writer error): surfaces at the next step, retried once;
4. ``checkpoint.keep``: >= 1 or ``keep_all``;
5. concurrent runs (the workdir lock, stale-lock takeover) and a resumed config that changed;
6. unused weights of a params-only ``init_from``;
7. a stale prepared captions dataset;
8. ports: integer tensors where weights are expected, truncated safetensors files;
9. ``generate``/``eval``: a missing checkpoint, random weights without asking, a geneval folder of other settings,
   a truncated finished sample;
10. out-of-range config values and ``--help``.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from bifrost_jax import cli
from bifrost_jax.configs import load_config_file
from bifrost_jax.data.captions import CaptionsOptions, prepare_captions
from bifrost_jax.eval import geneval
from bifrost_jax.parallel.mesh import make_mesh
from bifrost_jax.parallel.rules import axis_rules
from bifrost_jax.port.base import PortError, SafetensorsReader, load_mapped, src, write_safetensors
from bifrost_jax import checkpoint as ckpt
from bifrost_jax.checkpoint import integrity
from bifrost_jax.train import guard, loop
from bifrost_jax.checkpoint.integrity import CheckpointDamagedError, flat_arrays
from bifrost_jax.train.registry import get_phase
from bifrost_jax.train.resume import ConfigChangedError
from bifrost_jax.train.save_tracker import CheckpointSaveError
from bifrost_jax.train.state import StateBuilder, global_batch, jit_train_step, make_optimizer, make_train_step
from bifrost_jax.train.validate import ConfigError, validate_train_config
from bifrost_jax.train.workdir_lock import WorkdirLock, WorkdirLockedError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(REPO, "configs", "toy.py")
TINY_GENERATE = os.path.join(REPO, "configs", "generate_tiny.py")
# a schedule that does not depend on train.steps, so that runs of different lengths share a trajectory
BASE = ["train.log_every=1", "train.tensorboard=False", "optim.decay_steps=50", "checkpoint.every=1"]


def toy_config(*overrides):
    return load_config_file(TOY, [*BASE, *overrides])


def run(config, workdir):
    return loop.train(config, str(workdir), progress_bar=False)


def committed(workdir):
    d = ckpt.checkpoint_dir(str(workdir), "toy")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def flat_numpy(tree):
    return {k: np.asarray(v) for k, v in flat_arrays(jax.device_get(tree)).items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 6-step toy run, every step kept (``keep_all`` with ``keep=0``)."""
    workdir = tmp_path_factory.mktemp("reference")
    result = run(toy_config("train.steps=6", "checkpoint.keep=0", "checkpoint.keep_all=True"), workdir)
    return workdir, result


# ----------------------------------------------------------------------------------------------------------------
# 1. non-finite loss / gradients

def test_nonfinite_step_is_not_applied_and_counted():
    config = toy_config()
    phase = get_phase(config)
    tx, schedule = make_optimizer(config.optim, config.train.steps)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    builder = StateBuilder(phase, tx, mesh, seed=0, ema=True)
    state, frozen = builder.init()
    step = jit_train_step(make_train_step(phase, tx, schedule, ema_decay=0.5, max_bad_steps=2), builder, 16)
    batches = phase.dataset(global_batch_size=16, seed=0, process_index=0, process_count=1)
    good = next(batches)
    bad = dict(good, x=np.where(np.arange(16)[:, None] == 3, np.nan, good["x"]))  # one NaN example
    abstract = builder.abstract_batch(16)
    with axis_rules(mesh):
        after_good, _ = step(state, frozen, global_batch(good, abstract))
        kept = flat_numpy((after_good.params, after_good.opt_state, after_good.mutable, after_good.ema_params))
        after_bad, m = step(after_good, frozen, global_batch(bad, abstract))
        assert float(m["skipped"]) == 1.0 and not np.isfinite(float(m["loss"]))
        # nothing of the update was applied: weights, Adam moments, BatchNorm statistics, EMA
        got = flat_numpy((after_bad.params, after_bad.opt_state, after_bad.mutable, after_bad.ema_params))
        assert all(np.array_equal(got[k], kept[k]) for k in kept)
        assert (int(after_bad.step), int(after_bad.bad_steps), int(after_bad.bad_since)) == (2, 1, 2)
        again, m = step(after_bad, frozen, global_batch(good, abstract))  # a finite step resets the streak
        assert float(m["skipped"]) == 0.0 and int(again.bad_steps) == 0
        s = again
        for _ in range(3):  # the counters freeze once max_bad_steps is reached
            s, _ = step(s, frozen, global_batch(bad, abstract))
        assert (int(s.bad_steps), int(s.bad_since)) == (2, 4)
    assert guard.tripped(s, 2)[0]


def test_diverging_run_stops_naming_the_steps_and_last_good_checkpoint(tmp_path, capsys):
    argv = ["--config", TOY, "--workdir", str(tmp_path), *[f"--config.{o}" for o in BASE],
            "--config.optim.lr=1e30", "--config.optim.warmup_steps=0", "--config.train.steps=8",
            "--config.train.max_bad_steps=2", "--config.checkpoint.keep=2"]
    assert loop.main(argv) == guard.EXIT_NON_FINITE
    err = capsys.readouterr().err
    # step 1 sends the weights to ~1e30, so steps 2 and 3 overflow; the run stops at the second one
    assert "training stopped at step 3: 2 consecutive steps (2..3)" in err
    assert "Last good checkpoint: step 2 (" in err
    assert committed(tmp_path) == [1, 2]  # nothing saved after the trip; rotation kept the newest
    manager = ckpt.make_manager(ckpt.checkpoint_dir(str(tmp_path), "toy"))
    for step in (1, 2):
        assert ckpt.read_manifest(manager, step)["finite"] is True
    manager.close()
    metrics = [json.loads(x) for x in open(tmp_path / "toy" / "metrics.jsonl")]
    assert [m["skipped"] for m in metrics] == [0.0, 1.0, 1.0]


def test_a_nonfinite_state_is_never_saved(reference, tmp_path):
    _, result = reference
    state = result.state.replace(params=jax.tree.map(lambda x: x.at[0].set(jnp.nan) if x.ndim else x,
                                                     result.state.params))
    manager = ckpt.make_manager(str(tmp_path / "ckpt"))
    with pytest.raises(guard.NonFiniteError, match=r"non-finite values in \[.*params\.block_0\.fc1\.bias"):
        ckpt.save_state(manager, state)
    manager.close()
    assert not [n for n in os.listdir(tmp_path / "ckpt") if n.isdigit()]


# ----------------------------------------------------------------------------------------------------------------
# 2. damaged checkpoints: named, the newest intact step resumed, the result bit-identical

def _flip_bytes(item_dir):
    """16 bytes flipped in the middle of the item's array data (OCDBT keeps it in ``d/`` files; a merged copy
    and the per-process one may both exist: flip both)."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(item_dir) for f in fs if os.path.basename(r) == "d"]
    for path in [f for f in files if os.path.getsize(f) > 4096]:
        with open(path, "r+b") as fh:
            fh.seek(os.path.getsize(path) // 2)
            chunk = fh.read(16)
            fh.seek(os.path.getsize(path) // 2)
            fh.write(bytes(b ^ 0xFF for b in chunk))


def test_damaged_steps_fall_back_to_the_newest_intact_one_bit_identically(reference, tmp_path, capsys):
    ref_dir, ref = reference
    assert committed(ref_dir) == [1, 2, 3, 4, 5, 6]  # keep_all kept every step
    run(toy_config("train.steps=4", "checkpoint.keep=10"), tmp_path)
    root = ckpt.checkpoint_dir(str(tmp_path), "toy")
    shutil.rmtree(os.path.join(root, "4", "data"))        # a lost item
    shutil.rmtree(os.path.join(root, "3", "integrity"))   # a lost manifest
    _flip_bytes(os.path.join(root, "2", "params"))         # 16 flipped bytes in the weights
    capsys.readouterr()
    result = run(toy_config("train.steps=6", "checkpoint.keep=10"), tmp_path)
    out = capsys.readouterr().out
    assert "checkpoint step 4 is damaged" in out and "['data'] listed in the manifest are missing" in out
    assert "checkpoint step 3 is damaged" in out and "no integrity manifest" in out
    step2 = [line for line in out.splitlines() if line.startswith("checkpoint step 2 is damaged")]
    assert step2 and "/2/params" in step2[0]  # the item is named (here the reader's own check caught it)
    assert "resuming from step 1, the newest intact checkpoint" in out
    assert sorted(n.split("-")[0] for n in os.listdir(tmp_path / "toy" / "damaged_checkpoints")) == ["2", "3", "4"]
    want, got = flat_numpy(ref.state), flat_numpy(result.state)
    assert got.keys() == want.keys()
    assert [k for k in want if not np.array_equal(got[k], want[k])] == []
    # no intact step at all: an error listing each, never a fresh start
    for step in committed(tmp_path):
        shutil.rmtree(os.path.join(root, str(step), "opt"))
    with pytest.raises(CheckpointDamagedError, match=r"no intact checkpoint(.|\n)*6: .*\['opt'\]"):
        run(toy_config("train.steps=8"), tmp_path)


def test_changed_values_are_caught_by_the_checksums(reference, tmp_path):
    """Bytes that still read (the reader's own checks passed) but hold other values than those saved: the
    manifest's checksum names the array, and the restore falls back."""
    ref_dir, _ = reference
    workdir = tmp_path / "copy"
    shutil.copytree(ref_dir, workdir)
    manager = ckpt.make_manager(ckpt.checkpoint_dir(str(workdir), "toy"))
    manifest = ckpt.read_manifest(manager, 6)
    manifest["arrays"]["params"]["params.head.kernel"]["checksum"] = "00000000-00000000"  # what was saved "before"
    manifest["digest"] = integrity._digest(manifest)
    with open(os.path.join(manager.directory, "6", integrity.MANIFEST_ITEM, "metadata"), "w") as fh:
        json.dump(manifest, fh)
    config = toy_config("train.steps=6")
    phase = get_phase(config)
    tx, _ = make_optimizer(config.optim, 6)
    builder = StateBuilder(phase, tx, make_mesh({"fsdp": 8}), seed=0, ema=False)
    reports = []
    state, _, _, step, damaged = ckpt.restore_latest_intact(manager, builder.abstract_state, report=reports.append)
    manager.close()
    assert step == 5 and int(state.step) == 5 and list(damaged) == [6]
    assert "item 'params' has changed since it was saved" in damaged[6]
    assert "params.head.kernel: checksum" in damaged[6] and "saved 00000000-00000000" in damaged[6]


# ----------------------------------------------------------------------------------------------------------------
# 3. a failing asynchronous save

def _failing_writer(monkeypatch, failures, workdir):
    """The array writer of Orbax's background thread fails ``failures`` times once the first checkpoint (step 4) is
    committed (a disk that fills up after it). Keyed on the committed step, not on a count of writes: one save
    writes several arrays concurrently, and which of them finishes first depends on the machine's load."""
    from orbax.checkpoint._src.serialization import serialization

    original = serialization.async_serialize_from_host
    first = os.path.join(ckpt.checkpoint_dir(str(workdir), "toy"), "4")
    calls = {"failed": 0}

    async def writer(*args, **kwargs):
        if os.path.isdir(first) and calls["failed"] < failures:
            calls["failed"] += 1
            raise OSError(28, "No space left on device")
        return await original(*args, **kwargs)

    monkeypatch.setattr(serialization, "async_serialize_from_host", writer)
    return calls


def test_failed_async_save_surfaces_at_the_next_step(tmp_path, monkeypatch):
    _failing_writer(monkeypatch, failures=10**6, workdir=tmp_path)
    config = toy_config("train.steps=12", "checkpoint.every=4", "data.delay_s=0.2")
    with pytest.raises(CheckpointSaveError) as e:
        run(config, tmp_path)
    msg = str(e.value)
    assert "saving the checkpoint of step 8 failed (OSError: [Errno 28] No space left on device)" in msg
    retried_at = int(msg.split("retry at step ")[1].split()[0])
    assert 8 < retried_at < 12  # before the next save, not at it
    assert "Last committed checkpoint: step 4" in msg
    assert committed(tmp_path) == [4]  # nothing later is reported or kept as saved


def test_failed_async_save_is_retried(tmp_path, monkeypatch, capsys):
    _failing_writer(monkeypatch, failures=1, workdir=tmp_path)
    result = run(toy_config("train.steps=12", "checkpoint.every=4", "checkpoint.keep=10", "data.delay_s=0.2"),
                 tmp_path)
    assert result.step == 12
    assert "saving the checkpoint of step 8 FAILED" in capsys.readouterr().out
    steps = committed(tmp_path)
    assert 8 not in steps and steps[0] == 4 and steps[-1] == 12 and len(steps) == 3  # the retry's step in between


# ----------------------------------------------------------------------------------------------------------------
# 4 and 10. config values

@pytest.mark.parametrize("override, key", [
    ("checkpoint.every=0", "checkpoint.every=0"), ("train.log_every=0", "train.log_every=0"),
    ("train.steps=-1", "train.steps=-1"), ("checkpoint.keep=0", "checkpoint.keep=0"),
    ("checkpoint.keep=-1", "checkpoint.keep=-1"), ("train.batch_size=0", "train.batch_size=0"),
    ("model.dtype=float33", "model.dtype='float33'"), ("train.frozen_param_dtype=int8", "frozen_param_dtype='int8'"),
    ("optim.lr=-1.0", "optim.lr=-1.0"), ("optim.name=adam", "optim.name='adam'"),
    ("train.max_bad_steps=0", "train.max_bad_steps=0"),
])
def test_bad_config_values_are_named_at_start_up(override, key):
    with pytest.raises(ConfigError) as e:
        validate_train_config(toy_config(override))
    msg = str(e.value)
    assert key in msg and ("must be" in msg or "not a floating dtype name" in msg), msg


def test_keep_all_is_explicit_and_the_cli_reports_bad_values(tmp_path, capsys):
    validate_train_config(toy_config("checkpoint.keep=0", "checkpoint.keep_all=True"))
    code = loop.main(["--config", TOY, "--workdir", str(tmp_path), "--config.checkpoint.every=0"])
    assert code == 2
    assert "checkpoint.every=0: must be an integer >= 1" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "toy")  # nothing started


def test_help_works_on_every_command(capsys):
    for command in ("train", "generate", "eval", "port", "cache-latents", "aot", "demo"):
        try:
            code = cli.main([command, "--help"])
        except SystemExit as e:  # argparse's --help
            code = e.code
        assert code == 0, command
        assert "usage" in capsys.readouterr().out.lower(), command
    assert cli.main(["train", "--config", TOY, "--help"]) == 0
    assert "checkpoint:" in capsys.readouterr().out  # the config's keys


# ----------------------------------------------------------------------------------------------------------------
# 5. concurrent runs and config changes

def test_workdir_lock_refuses_a_second_run_and_recovers_a_stale_lock(tmp_path):
    run_dir = str(tmp_path / "toy")
    holder = WorkdirLock(run_dir, 0).acquire()
    with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):
        run(toy_config("train.steps=1"), tmp_path)
    assert not os.path.exists(os.path.join(run_dir, "checkpoints"))  # refused before anything was written
    # the heartbeat notices a takeover by another run, and the loop's per-step check stops this one
    with open(holder.path, "w") as fh:
        json.dump({"host": "elsewhere", "pid": 1, "token": "other", "heartbeat": 1e12}, fh)
    assert holder._beat_once() is False  # what the heartbeat thread runs every HEARTBEAT_S seconds
    with pytest.raises(WorkdirLockedError, match="taken over by another run"):
        holder.check()
    holder.release()
    assert os.path.exists(holder.path)  # not ours any more: left alone
    # a run killed without releasing: its pid is gone on this host
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for record, why in (({"host": socket.gethostname(), "pid": int(gone.stdout), "heartbeat": 1e12}, "is gone"),
                        ({"host": "elsewhere", "pid": 1, "heartbeat": 0.0}, "no heartbeat for")):
        with open(holder.path, "w") as fh:
            json.dump(dict(record, token="x"), fh)
        messages = []
        lock = WorkdirLock(run_dir, 0).acquire(report=messages.append)
        assert "taking over the stale lock" in messages[0] and why in messages[0]
        lock.release()
        assert not os.path.exists(holder.path)


def test_resume_refuses_config_changes_that_break_exactness(reference, tmp_path):
    ref_dir, _ = reference
    workdir = tmp_path / "copy"
    shutil.copytree(ref_dir, workdir)
    with pytest.raises(ConfigChangedError) as e:
        run(toy_config("train.steps=7", "seed=3", "data.num_examples=128", "checkpoint.keep=10"), workdir)
    msg = str(e.value)
    assert "seed: saved 0, now 3" in msg and "data.num_examples: saved 256, now 128" in msg
    assert committed(workdir) == [1, 2, 3, 4, 5, 6]
    config = toy_config("train.steps=7", "seed=3", "checkpoint.keep=10")
    config.checkpoint.resume_allow_changes = ("seed",)
    assert run(config, workdir).step == 7


# ----------------------------------------------------------------------------------------------------------------
# 6. params-only init_from: unused weights

def test_component_init_from_names_unused_weights(reference):
    from bifrost_jax.components import restore_phase_checkpoint as _restore_phase_checkpoint

    ref_dir, result = reference
    path = ckpt.checkpoint_dir(str(ref_dir), "toy")
    mesh = make_mesh({"fsdp": 8})
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    fc1 = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in result.state.params["block_0"]["fc1"].items()}
    abstract = {"params": {"block_0": {"fc1": fc1}}}  # the saved block_0 also has fc2; other "components" too
    shardings = jax.tree.map(lambda _: replicated, abstract)
    with pytest.raises(ckpt.CheckpointMismatchError) as e:
        _restore_phase_checkpoint(path, -1, {"params": ("block_0",)}, abstract, shardings)
    assert "params.block_0.fc2.kernel" in str(e.value) and "params.block_0.fc2.bias" in str(e.value)
    assert "block_1" not in str(e.value) and "head" not in str(e.value)  # other components are not this one's
    got = _restore_phase_checkpoint(path, -1, {"params": ("block_0",)}, abstract, shardings,
                                    ("params.block_0.fc2",))
    np.testing.assert_array_equal(got["params"]["block_0"]["fc1"]["kernel"],
                                  result.state.params["block_0"]["fc1"]["kernel"])


# ----------------------------------------------------------------------------------------------------------------
# 7. stale prepared data

def test_captions_dataset_is_rebuilt_when_its_source_changes(tmp_path):
    source = tmp_path / "images"
    source.mkdir()

    def add(name, colour):
        Image.new("RGB", (8, 8), colour).save(source / f"{name}.png")
        (source / f"{name}.txt").write_text(f"a {name} square")

    add("red", (255, 0, 0))
    add("blue", (0, 0, 255))
    messages = []
    options = CaptionsOptions(str(source))
    assert len(prepare_captions(str(tmp_path / "data"), options, report=messages.append).as_data_source("train")) == 2
    assert messages == []
    add("green", (0, 255, 0))
    built = prepare_captions(str(tmp_path / "data"), options, report=messages.append)
    assert len(built.as_data_source("train")) == 3
    assert "stale" in messages[0] and "2 added (green.png, green.txt)" in messages[0] and "rebuilding" in messages[0]
    (source / "red.txt").write_text("a crimson square")
    os.utime(source / "red.txt", ns=(1, 1))
    with pytest.raises(ValueError, match=r"stale: .*1 changed \(red.txt\)"):
        prepare_captions(str(tmp_path / "data"), options, on_stale="error")


# ----------------------------------------------------------------------------------------------------------------
# 8. ports

def test_ports_refuse_integer_weights_and_name_truncated_files(tmp_path):
    path = str(tmp_path / "model.safetensors")
    write_safetensors(path, {"w": np.arange(4, dtype=np.int32).reshape(2, 2), "b": np.ones(2, np.float32)})
    expected = {"w": jax.ShapeDtypeStruct((2, 2), jnp.float32), "b": jax.ShapeDtypeStruct((2,), jnp.float32)}
    key_map = {("w",): src("w"), ("b",): src("b")}
    with pytest.raises(PortError, match=r"w in .*model.safetensors: dtype int32, but w is a floating-point weight"):
        load_mapped(SafetensorsReader(path), key_map, expected)
    write_safetensors(path, {"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)})
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) - 4)
    with pytest.raises(PortError, match=r"model.safetensors: damaged safetensors file(.|\n)*truncated.*\['w'\]"):
        SafetensorsReader(str(tmp_path))


# ----------------------------------------------------------------------------------------------------------------
# 9. generation and evaluation

def test_generate_refuses_a_missing_checkpoint_and_unasked_random_weights(tmp_path, capsys):
    from bifrost_jax import generate

    out = ["--prompt", "a red circle", "--out", str(tmp_path / "out")]
    config = ["--config", TINY_GENERATE]
    for argv, expected in ((["--checkpoint", str(tmp_path / "nonexistent")], "nonexistent: no such directory"),
                           (config, "pass --random-weights"), (config + ["--num-images", "0"],
                                                               "must be an integer >= 1")):
        with pytest.raises(SystemExit) as e:
            generate.main(argv + out)
        assert e.value.code == 2 and expected in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(SystemExit):  # the same checks in bifrost eval
        cli.main(["eval", "geneval", "--config", TINY_GENERATE, "--prompts", "p.jsonl", "--out", str(tmp_path / "e")])
    assert "pass --random-weights" in capsys.readouterr().err


def test_geneval_resume_checks_settings_and_finished_samples(tmp_path):
    prompts = [(json.dumps({"prompt": p}), {"prompt": p}) for p in ("a cat", "a dog", "a cow")]
    generated = []

    def generate(batch, k, seed):
        generated.extend(batch)
        return np.full((len(batch) * k, 8, 8, 3), seed % 256, np.uint8)

    out = str(tmp_path / "geneval")
    settings = {"prompts_sha256": "abc", "checkpoint": None}
    geneval.run_geneval(generate, prompts, out, num_images=2, batch_size=3, seed=1, progress=False,
                        settings=settings)
    for changed, key in (({"seed": 2}, "seed: folder 1, now 2"), ({"num_images": 3}, "num_images: folder 2, now 3"),
                         ({"settings": {"prompts_sha256": "def", "checkpoint": None}}, "prompts_sha256")):
        kwargs = dict(num_images=2, batch_size=3, seed=1, progress=False, settings=settings) | changed
        with pytest.raises(ValueError, match=key):
            geneval.run_geneval(generate, prompts, out, **kwargs)
    # a truncated sample of a finished prompt is regenerated, the intact ones are skipped
    sample = geneval.sample_path(out, 1, 1)
    with open(sample, "r+b") as fh:
        fh.truncate(os.path.getsize(sample) // 2)
    generated.clear()
    done = geneval.run_geneval(generate, prompts, out, num_images=2, batch_size=3, seed=1, progress=False,
                               settings=settings)
    assert done == [1] and generated == ["a dog"] * 3  # one prompt, padded to the batch
    assert geneval.decodable(sample) and geneval.missing_prompts(out, 3, 2) == []
