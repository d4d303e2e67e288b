"""Orbax checkpoints of training runs, and params-only restores with explicit accounting.

One ``CheckpointManager`` per phase, rooted at ``WORKDIR/<phase>/checkpoints``. A step directory holds the items

* ``params``: ``{"params": trainable, <collection>: ...}`` (the trainable weights and the non-param collections
  such as ``batch_stats``: what another phase or the sampler restores);
* ``ema``: the EMA of the trainable weights (only when EMA is on);
* ``opt``: ``{"step", "opt_state", "rng", "bad_steps", "bad_since"}`` (the last two: ``train/guard.py``);
* ``data``: each process's data-iterator state as JSON (``process_<i>-of-<n>.json``, with its SHA-256);
* ``config``: the run's config as JSON (a resume compares it with its own: ``resume.py``);
* ``integrity``: the step's manifest (``integrity.py``): every item it must hold, a checksum of every array, the
  config's digest. A state with a non-finite value is never saved.

Saves are asynchronous and atomic (Orbax writes to a temporary directory and commits it). A restore checks the
manifest, the items and every array's checksum: a damaged step is named (item, array, problem) and the run falls
back to the newest intact step (``restore_latest_intact``); a step that does not fit the run's state (another
model or optimizer) is an error. ``save_tracker.py`` watches the asynchronous saves and keeps the newest
``checkpoint.keep``. Restores go straight into the target shardings, so a checkpoint restores onto a different
mesh. Frozen weights are not saved: a resumed run rebuilds them exactly as the first run did (deterministic init,
ports, ``init_from``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from bifrost_jax.checkpoint.integrity import (MANIFEST_ITEM, CheckpointDamagedError, build_manifest, canonical_json,
                                         check_manifest, flat_arrays, manifest_shapes, text_sha256, verify_arrays,
                                         verify_json)

PathT = tuple[str, ...]


class CheckpointMismatchError(ValueError):
    """A checkpoint does not match the parameters expected (missing, unused or wrong-shape entries)."""


# --------------------------------------------------------------------------------------------------------------
# Per-process JSON (data-iterator state)
# --------------------------------------------------------------------------------------------------------------
class ProcessJsonHandler(ocp.CheckpointHandler):
    """Each process writes and reads its own JSON file: data iterators are per host. The file carries the SHA-256
    of its state, checked on restore."""

    def save(self, directory: epath.Path, args: "ProcessJsonSave"):
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        text = canonical_json(args.state)
        (epath.Path(directory) / name).write_text(json.dumps({"sha256": text_sha256(text), "state": args.state}))

    def restore(self, directory: epath.Path, args: "ProcessJsonRestore | None" = None):
        directory = epath.Path(directory)
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        path = directory / name
        if not path.exists():
            found = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
            raise CheckpointMismatchError(
                f"{path} does not exist (found {found}): the data-iterator state was saved by a different number "
                f"of processes than the {jax.process_count()} restoring it")
        try:
            record = json.loads(path.read_text())
            state = record["state"]
            intact = record["sha256"] == text_sha256(canonical_json(state))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointDamagedError(f"{path}: unreadable data-iterator state ({e})") from None
        if not intact:
            raise CheckpointDamagedError(f"{path}: the data-iterator state has changed since it was saved "
                                         f"(SHA-256 differs)")
        return state

    def metadata(self, directory: epath.Path):
        return None

    def finalize(self, directory: epath.Path):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
    pass


# --------------------------------------------------------------------------------------------------------------
# The run's checkpoint manager
# --------------------------------------------------------------------------------------------------------------
def checkpoint_dir(workdir: str, phase_name: str) -> str:
    return os.path.join(os.path.abspath(workdir), phase_name, "checkpoints")


def make_manager(directory: str, *, async_save: bool = True) -> ocp.CheckpointManager:
    """The phase's manager. Orbax's own rotation is off: it would delete old steps even when the new save failed;
    ``save_tracker.SaveTracker`` deletes old steps only after the new one is committed and verified."""
    options = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(directory, options=options)


def _variables_item(state) -> dict:
    return {"params": state.params, **state.mutable}


def _opt_item(state) -> dict:
    return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng, "bad_steps": state.bad_steps,
            "bad_since": state.bad_since}


def _array_items(state) -> dict:
    items = {"params": _variables_item(state), "opt": _opt_item(state)}
    if state.ema_params is not None:
        items["ema"] = state.ema_params
    return items


def save_state(manager: ocp.CheckpointManager, state, *, data_state: Any = None,
               config: ml_collections.ConfigDict | None = None, force: bool = True) -> int:
    """Start an (async) save of ``state`` at its step, with its integrity manifest (``integrity.py``); returns the
    step. ``data_state`` is this process's iterator state. Raises ``stops.NonFiniteError`` (nothing saved) if any
    value of the state is non-finite."""
    step = int(jax.device_get(state.step))
    arrays = _array_items(state)
    others: dict[str, Any] = {}
    items = {name: ocp.args.StandardSave(tree) for name, tree in arrays.items()}
    if data_state is not None:
        items["data"] = ProcessJsonSave(data_state)
        others["data"] = None  # per process, self-verifying
    if config is not None:
        config_json = json.loads(config.to_json())
        items["config"] = ocp.args.JsonSave(config_json)
        others["config"] = config_json
    items[MANIFEST_ITEM] = ocp.args.JsonSave(build_manifest(step, arrays, others))
    manager.save(step, args=ocp.args.Composite(**items), force=force)
    return step


def step_items(manager: ocp.CheckpointManager, step: int) -> set[str]:
    step_dir = epath.Path(manager.directory) / str(step)
    return {p.name for p in step_dir.iterdir() if p.is_dir()} if step_dir.exists() else set()


def read_manifest(manager: ocp.CheckpointManager, step: int) -> dict:
    """The verified manifest of ``step``, after checking that every item it lists exists."""
    where = f"checkpoint {manager.directory}/{step}"
    saved = step_items(manager, step)
    if MANIFEST_ITEM not in saved:
        raise CheckpointDamagedError(f"{where}: no integrity manifest (item {MANIFEST_ITEM!r}; has {sorted(saved)})")
    try:
        raw = manager.restore(step, args=ocp.args.Composite(**{MANIFEST_ITEM: ocp.args.JsonRestore()}))
    except Exception as e:  # an unreadable manifest is damage, whatever the reader raises
        raise CheckpointDamagedError(f"{where}: unreadable integrity manifest ({type(e).__name__}: {e})") from None
    manifest = check_manifest(raw[MANIFEST_ITEM], where)
    missing = sorted(set(manifest["items"]) - saved)
    if missing:
        raise CheckpointDamagedError(f"{where}: item(s) {missing} listed in the manifest are missing "
                                     f"(has {sorted(saved)})")
    return manifest


def _check_structure(manifest: dict, abstract_items: dict, where: str) -> None:
    """A mismatch between the saved arrays and this run's state is a config change, not damage: raise
    ``CheckpointMismatchError`` (no fallback to an older step, which would not match either)."""
    problems = []
    absent = sorted(set(abstract_items) - set(manifest["items"]))
    if absent:
        problems.append(f"item(s) {absent} are not in the checkpoint (has {manifest['items']}); "
                        f"was EMA on when it was saved?")
    for item, tree in abstract_items.items():
        if item in absent:
            continue
        saved = manifest_shapes(manifest, item)
        expected = {p: (list(a.shape), str(a.dtype)) for p, a in flat_arrays(tree).items()}
        missing, unused, wrong = shape_mismatches({(k,): v for k, v in saved.items()},
                                                  {(k,): v for k, v in expected.items()})
        problems += [f"{item}.{k[0]}: in this run's state, not in the checkpoint" for k in missing]
        problems += [f"{item}.{k[0]}: in the checkpoint, not in this run's state" for k in unused]
        problems += [f"{item}.{w} (shape, dtype)" for w in wrong]
    if problems:
        raise CheckpointMismatchError(f"{where} does not match this run's train state (model or optimizer config "
                                      f"changed?):\n  " + "\n  ".join(problems[:40])
                                      + (f"\n  ... {len(problems) - 40} more" if len(problems) > 40 else ""))


def _read_config(manager: ocp.CheckpointManager, step: int, manifest: dict, where: str):
    if "config" not in manifest["items"]:
        return None
    try:
        config_json = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    except Exception as e:  # unreadable: damage
        raise CheckpointDamagedError(f"{where}: unreadable config item ({type(e).__name__}: {e})") from None
    verify_json(manifest, "config", config_json, where)
    return config_json


def restore_step(manager: ocp.CheckpointManager, abstract_state, step: int, *, with_data: bool = True,
                 check_config=None):
    """(state, data_state or None, config JSON or None) of one step, verified against its manifest. Raises
    ``CheckpointDamagedError`` naming the item, array and problem, or ``CheckpointMismatchError`` when the step
    does not fit this run's state. ``check_config(saved config JSON or None, where)`` runs before any array is
    read (it may raise)."""
    where = f"checkpoint {manager.directory}/{step}"
    manifest = read_manifest(manager, step)
    config_json = _read_config(manager, step, manifest, where)
    if check_config is not None:
        check_config(config_json, where)
    abstract_items = _array_items(abstract_state)
    _check_structure(manifest, abstract_items, where)
    items = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()}
    if with_data:
        if "data" not in manifest["items"]:
            raise CheckpointDamagedError(f"{where}: no data-iterator state (item 'data'); resuming would restart "
                                         f"the data order")
        items["data"] = ProcessJsonRestore()
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except (CheckpointMismatchError, CheckpointDamagedError):
        raise
    except Exception as e:  # a missing or unreadable array file: report it as damage of this step
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointDamagedError(f"{where}: cannot read it ({type(e).__name__}: {first[:300]})") from e
    for name in abstract_items:
        verify_arrays(manifest, name, restored[name], where)
    variables = dict(restored["params"])
    params = variables.pop("params")
    opt = restored["opt"]
    state = abstract_state.replace(step=opt["step"], params=params, opt_state=opt["opt_state"], mutable=variables,
                                   ema_params=restored.get("ema"), rng=opt["rng"], bad_steps=opt["bad_steps"],
                                   bad_since=opt["bad_since"])
    return state, restored.get("data"), config_json


def committed_steps(manager: ocp.CheckpointManager) -> list[int]:
    manager.reload()
    return sorted(manager.all_steps())


def restore_latest_intact(manager: ocp.CheckpointManager, abstract_state, *, with_data: bool = True,
                          report=print, check_config=None):
    """(state, data_state, config JSON, step, {damaged step: reason}) from the newest step that passes its
    integrity check; every step skipped is reported by name with the reason. Raises ``FileNotFoundError``
    without steps and ``CheckpointDamagedError`` listing every step when none is intact. With several processes
    a step is intact only if it is on every process (each checks its own data-iterator file)."""
    steps = committed_steps(manager)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    damaged: dict[int, str] = {}
    for step in reversed(steps):
        try:
            state, data_state, config_json = restore_step(manager, abstract_state, step, with_data=with_data,
                                                          check_config=check_config)
            reason = None
        except CheckpointDamagedError as e:
            reason = str(e)
        if jax.process_count() > 1:
            intact_everywhere = bool(np.all(multihost_utils.process_allgather(np.int32(reason is None))))
            if reason is None and not intact_everywhere:
                reason = f"checkpoint {manager.directory}/{step}: damaged on another process"
        if reason is not None:
            damaged[step] = reason
            report(f"checkpoint step {step} is damaged, not resuming from it: {reason}")
            continue
        if damaged:
            report(f"resuming from step {step}, the newest intact checkpoint (damaged: {sorted(damaged)})")
        return state, data_state, config_json, step, damaged
    raise CheckpointDamagedError(
        f"no intact checkpoint in {manager.directory}: every step failed its integrity check:\n  "
        + "\n  ".join(f"{s}: {r}" for s, r in sorted(damaged.items()))
        + "\nMove the damaged steps away (or the whole directory, to start afresh) and rerun.")


def restore_state(manager: ocp.CheckpointManager, abstract_state, *, step: int | None = None,
                  with_data: bool = True):
    """(state, data_state or None) restored into the shardings carried by ``abstract_state`` (a ``TrainState`` of
    ``jax.ShapeDtypeStruct``s with ``sharding``), from ``step`` or the newest intact one, verified."""
    if step is not None:
        state, data_state, _ = restore_step(manager, abstract_state, step, with_data=with_data)
        return state, data_state
    state, data_state, _, _, _ = restore_latest_intact(manager, abstract_state, with_data=with_data)
    return state, data_state


# --------------------------------------------------------------------------------------------------------------
# Params-only restore with accounting (across phases, from other runs)
# --------------------------------------------------------------------------------------------------------------
def shape_mismatches(saved: Mapping[PathT, tuple], expected: Mapping[PathT, tuple], *,
                     allow_missing: Iterable[PathT] = (), allow_unused: Iterable[PathT] = ()):
    """``(missing, unused, wrong)`` between flat ``{path: shape}`` maps: expected paths absent from ``saved``
    (outside ``allow_missing``), saved paths not expected (outside ``allow_unused``), and
    ``"dotted.path: saved shape, expected shape"`` for every shape that differs."""
    allow_missing, allow_unused = tuple(allow_missing), tuple(allow_unused)
    missing = sorted(k for k in expected if k not in saved and not _under(k, allow_missing))
    unused = sorted(k for k in saved if k not in expected and not _under(k, allow_unused))
    wrong = sorted(f"{_dotted(k)}: checkpoint {tuple(saved[k])}, expected {tuple(expected[k])}"
                   for k in expected if k in saved and tuple(saved[k]) != tuple(expected[k]))
    return missing, unused, wrong


def _dotted(path: PathT) -> str:
    return ".".join(path)


def _under(path: PathT, prefixes: Iterable[PathT]) -> bool:
    return any(path[:len(p)] == tuple(p) for p in prefixes)


def parse_prefixes(dotted: Iterable[str]) -> tuple[PathT, ...]:
    """``"params.vision_head"`` -> ``("params", "vision_head")``."""
    return tuple(tuple(s.split(".")) for s in dotted if s)


def resolve_step_dir(path: str, step: int | None = None) -> epath.Path:
    """A step directory from a manager root (latest step, or ``step``) or a step directory itself."""
    p = epath.Path(path)
    if (p / "params").exists():
        return p
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path {p} does not exist")
    steps = sorted(int(c.name) for c in p.iterdir() if c.name.isdigit() and (c / "params").exists())
    if not steps:
        raise FileNotFoundError(f"{p} holds no checkpoint step (a directory with a 'params' item)")
    if step is None or step < 0:
        return p / str(steps[-1])
    if step not in steps:
        raise FileNotFoundError(f"{p} has no step {step}; steps: {steps}")
    return p / str(step)


def item_tree_metadata(item_dir) -> dict:
    """The saved tree (array metadata: shape, dtype) of one PyTree item directory. Read through the item's handler:
    ``PyTreeCheckpointer().metadata`` would also look for step-level metadata, which a ``CheckpointManager``
    keeps in the step directory, not in each item's, and log a warning for every item it reads."""
    return ocp.PyTreeCheckpointHandler().metadata(epath.Path(item_dir)).tree


def checkpoint_param_shapes(step_dir: epath.Path, use_ema: bool = False) -> dict[PathT, tuple[int, ...]]:
    """Flat ``{path: shape}`` of the variables saved in a step directory (``ema`` replaces ``params``)."""
    def flat_shapes(item_dir):
        tree = item_tree_metadata(item_dir)
        return {tuple(str(k) for k in path): tuple(m.shape)
                for path, m in traverse_util.flatten_dict(tree).items()}
    shapes = flat_shapes(step_dir / "params")
    if use_ema:
        if not (step_dir / "ema").exists():
            raise FileNotFoundError(f"{step_dir} has no 'ema' item (EMA was off in that run)")
        shapes = {k: v for k, v in shapes.items() if k[0] != "params"}
        shapes.update({("params",) + k: v for k, v in flat_shapes(step_dir / "ema").items()})
    return shapes


@dataclasses.dataclass
class RestoreReport:
    restored: list[str]
    left_at_init: list[str]   # expected, absent from the source, allowed (new subtrees)
    unused: list[str]         # in the source, not expected, allowed


def restore_params(path: str, abstract_variables: Mapping[str, Any], *, step: int | None = None,
                   allow_missing: Iterable[PathT] = (), allow_unused: Iterable[PathT] = (),
                   use_ema: bool = False, only_under: Iterable[PathT] | None = None
                   ) -> tuple[dict[PathT, jax.Array], RestoreReport]:
    """Restore the saved variables of another run or phase that this model expects.

    ``abstract_variables``: the expected variables (``{"params": ..., "batch_stats": ...}``) as
    ``jax.ShapeDtypeStruct``s with shardings; entries may be a subset of the model (the caller decides which).
    Returns ``({path: array}, report)``. Raises ``CheckpointMismatchError`` listing every expected entry absent
    from the checkpoint (outside ``allow_missing``), every checkpoint entry not expected (outside
    ``allow_unused``) and every shape mismatch. Nothing falls back silently to the random init. ``only_under``:
    the subtrees this restore is about (e.g. one component of another phase's checkpoint); saved entries outside
    them belong to others and are not reported as unused. Arrays are verified against the step's integrity
    manifest when it has one (``CheckpointDamagedError`` naming the array).
    """
    step_dir = resolve_step_dir(path, step)
    saved = checkpoint_param_shapes(step_dir, use_ema)
    if only_under is not None:
        only_under = tuple(tuple(p) for p in only_under)
        allow_unused = tuple(allow_unused) + tuple(k for k in saved if not _under(k, only_under))
    expected = {tuple(str(p) for p in k): v for k, v in traverse_util.flatten_dict(dict(abstract_variables)).items()}
    missing, unused, wrong = shape_mismatches(saved, {k: v.shape for k, v in expected.items()},
                                              allow_missing=allow_missing, allow_unused=allow_unused)
    if missing or unused or wrong:
        parts = [f"checkpoint {step_dir} does not match the expected variables:"]
        if missing:
            parts.append(f"{len(missing)} expected but not in the checkpoint (allow new subtrees with "
                         f"checkpoint.init_allow_missing):\n    " + "\n    ".join(map(_dotted, sorted(missing))))
        if unused:
            parts.append(f"{len(unused)} in the checkpoint but not expected:\n    "
                         + "\n    ".join(map(_dotted, sorted(unused))))
        if wrong:
            parts.append(f"{len(wrong)} with the wrong shape:\n    " + "\n    ".join(sorted(wrong)))
        raise CheckpointMismatchError("\n  ".join(parts))

    take = {k: v for k, v in expected.items() if k in saved}
    out: dict[PathT, jax.Array] = {}
    ckpt = ocp.PyTreeCheckpointer()
    manifest = None
    if (step_dir / MANIFEST_ITEM).exists():
        raw = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / MANIFEST_ITEM)
        manifest = check_manifest(raw, f"checkpoint {step_dir}")

    def restore_item(item: str, flat_target: dict[PathT, Any]):
        if not flat_target:
            return {}
        target = traverse_util.unflatten_dict(flat_target)
        got = ckpt.restore(step_dir / item, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
        if manifest is not None:
            verify_arrays(manifest, item, got, f"checkpoint {step_dir}")
        return {tuple(str(p) for p in k): v for k, v in traverse_util.flatten_dict(got).items()}

    if use_ema:
        out.update({("params",) + k: v for k, v in restore_item(
            "ema", {k[1:]: v for k, v in take.items() if k[0] == "params"}).items()})
        out.update(restore_item("params", {k: v for k, v in take.items() if k[0] != "params"}))
    else:
        out.update(restore_item("params", take))
    report = RestoreReport(restored=sorted(map(_dotted, take)),
                           left_at_init=sorted(_dotted(k) for k in expected if k not in saved),
                           unused=sorted(_dotted(k) for k in saved if k not in expected))
    return out, report


def account_sources(expected: Mapping[PathT, Any], sources: Mapping[str, Mapping[PathT, Any]],
                    allow_missing: Iterable[PathT]) -> list[PathT]:
    """Check that pretrained ``sources`` (name -> flat {path: array}) cover every expected entry outside
    ``allow_missing`` with the right shapes; returns the paths left at their random init. Raises listing every
    uncovered or wrong-shape entry, and every source entry that is not expected."""
    allow_missing = tuple(allow_missing)
    covered: dict[PathT, str] = {}
    problems = []
    for name, flat in sources.items():
        for k, v in flat.items():
            if k not in expected:
                problems.append(f"{name}: {_dotted(k)} is not a variable of the model")
            elif tuple(v.shape) != tuple(expected[k].shape):
                problems.append(f"{name}: {_dotted(k)} has shape {tuple(v.shape)}, expected {expected[k].shape}")
            covered[k] = name
    missing = [k for k in expected if k not in covered and not _under(k, allow_missing)]
    if missing:
        problems.append(f"{len(missing)} expected weights restored from no source {sorted(sources)} and not in the "
                        f"new-subtree allow-list:\n    " + "\n    ".join(map(_dotted, sorted(missing))))
    if problems:
        raise CheckpointMismatchError("initial weights do not match the model:\n  " + "\n  ".join(problems))
    return [k for k in expected if k not in covered]
