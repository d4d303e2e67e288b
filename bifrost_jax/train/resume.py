"""Resuming a run: the newest intact checkpoint, damaged newer steps moved aside, and the config compared with the
one saved in the checkpoint.

* ``checkpoint.restore_latest_intact`` verifies each step (manifest, items, checksums) from the newest down;
  ``resume`` then moves the damaged steps newer than the one restored to ``WORKDIR/<phase>/damaged_checkpoints/``
  (kept for inspection; the run saves those step numbers again).
* Exact resumption needs the same seed, batch, data and model: a resumed config that differs from the saved one in
  such keys (``BREAKING``: the phase, seed, batch size, micro-batches, frozen dtype, ``data``, ``model`` and every
  model section of the Bifrost phases) is refused with ``ConfigChangedError`` naming each key with both values,
  unless ``checkpoint.resume_allow_changes`` lists it (dotted prefixes). Other differences (optimizer, steps,
  logging, mesh: a restore reshards) are allowed and printed.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Mapping

import jax
import ml_collections
from jax.experimental import multihost_utils

from bifrost_jax.configs import flatten_dotted
from bifrost_jax import checkpoint as ckpt

# The sections of base_config whose keys may change on resume except those listed in BREAKING; every other
# top-level key (data, model, the model sections flux / vae / t5 / clip / vision / controlnet / mllm) breaks it.
RUN_SECTIONS = ("mesh", "train", "optim", "checkpoint")
BREAKING = ("phase", "seed", "train.batch_size", "train.grad_accum_steps", "train.frozen_param_dtype")
# input-pipeline settings that do not change which examples come in which order
HARMLESS_DATA = ("data.num_threads", "data.prefetch_buffer_size", "data.delay_s")


class ConfigChangedError(ckpt.CheckpointMismatchError):
    """The resumed run's config differs from the checkpoint's in keys that break exact resumption."""


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes if p)


def breaks_resumption(key: str) -> bool:
    if _under(key, HARMLESS_DATA):
        return False
    return _under(key, BREAKING) or key.split(".")[0] not in RUN_SECTIONS


def config_differences(saved: Mapping, current: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, current value)}`` for every key that differs (JSON-normalised)."""
    a, b = flatten_dotted(saved), flatten_dotted(json.loads(current.to_json()))
    missing = object()
    return {k: (a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)}


def check_config(saved: Mapping | None, config: ml_collections.ConfigDict, where: str, report=print) -> None:
    if saved is None:
        report(f"{where} holds no config: cannot check that this run's config matches it")
        return
    allowed = tuple(config.checkpoint.get("resume_allow_changes", ()))
    diffs = config_differences(saved, config)
    shown = {k: (("<absent>" if a.__class__ is object else a), ("<absent>" if b.__class__ is object else b))
             for k, (a, b) in diffs.items()}
    refused = [k for k in diffs if breaks_resumption(k) and not _under(k, allowed)]
    if refused:
        raise ConfigChangedError(
            f"the config does not match the one saved in {where} in keys that break exact resumption:\n  "
            + "\n  ".join(f"{k}: saved {shown[k][0]!r}, now {shown[k][1]!r}" for k in refused)
            + f"\nRun with the saved values, use another --workdir, or allow the change explicitly with "
              f"--config.checkpoint.resume_allow_changes=\"{tuple(refused)!r}\"")
    if diffs:
        report("resuming with config changes: "
               + "; ".join(f"{k}: {shown[k][0]!r} -> {shown[k][1]!r}" for k in diffs))


def move_damaged(manager, damaged: Mapping[int, str], restored_step: int, run_dir: str, report=print) -> None:
    """Move the damaged steps newer than ``restored_step`` out of the manager's directory (process 0; every
    process waits), so that the run can save those step numbers again."""
    newer = sorted(s for s in damaged if s > restored_step)
    if not newer:
        return
    target = os.path.join(run_dir, "damaged_checkpoints")
    if jax.process_index() == 0:
        os.makedirs(target, exist_ok=True)
        for step in newer:
            dest = os.path.join(target, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.move(os.path.join(str(manager.directory), str(step)), dest)
            report(f"moved damaged checkpoint step {step} to {dest}")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("bifrost_move_damaged_checkpoints")
    manager.reload()


def resume(manager, abstract_state, config: ml_collections.ConfigDict, run_dir: str, report=print):
    """(state, data_state or None, step) from the newest intact checkpoint, after the config check."""
    state, data_state, _, step, damaged = ckpt.restore_latest_intact(
        manager, abstract_state, report=report,
        check_config=lambda saved, where: check_config(saved, config, where, report))
    move_damaged(manager, damaged, step, run_dir, report)
    return state, data_state, step
