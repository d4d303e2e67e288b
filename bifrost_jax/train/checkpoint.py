"""Orbax checkpoints of training runs, and params-only restores with explicit accounting.

One ``CheckpointManager`` per phase, rooted at ``WORKDIR/<phase>/checkpoints``. A step directory holds the items

* ``params``: ``{"params": trainable, <collection>: ...}`` (the trainable weights and the non-param collections
  such as ``batch_stats``: what another phase or the sampler restores);
* ``ema``: the EMA of the trainable weights (only when EMA is on);
* ``opt``: ``{"step", "opt_state", "rng"}``;
* ``data``: each process's data-iterator state as JSON (``process_<i>-of-<n>.json``);
* ``config``: the run's config as JSON (for the record).

Saves are asynchronous and atomic (Orbax writes to a temporary directory and commits it), the newest
``checkpoint.keep`` are kept, and a run resumes from the latest committed step. Restores go straight into the
target shardings, so a checkpoint restores onto a different mesh. Frozen weights are not saved: a resumed run
rebuilds them exactly as the first run did (deterministic init, ports, ``init_from``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Mapping

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

PathT = tuple[str, ...]


class CheckpointMismatchError(ValueError):
    """A checkpoint does not match the parameters expected (missing, unused or wrong-shape entries)."""


# --------------------------------------------------------------------------------------------------------------
# Per-process JSON (data-iterator state)
# --------------------------------------------------------------------------------------------------------------
class ProcessJsonHandler(ocp.CheckpointHandler):
    """Each process writes and reads its own JSON file: data iterators are per host."""

    def save(self, directory: epath.Path, args: "ProcessJsonSave"):
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (epath.Path(directory) / name).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: "ProcessJsonRestore | None" = None):
        directory = epath.Path(directory)
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        path = directory / name
        if not path.exists():
            found = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
            raise CheckpointMismatchError(
                f"{path} does not exist (found {found}): the data-iterator state was saved by a different number "
                f"of processes than the {jax.process_count()} restoring it")
        return json.loads(path.read_text())

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


def make_manager(directory: str, *, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(directory, options=options)


def _variables_item(state) -> dict:
    return {"params": state.params, **state.mutable}


def save_state(manager: ocp.CheckpointManager, state, *, data_state: Any = None,
               config: ml_collections.ConfigDict | None = None, force: bool = True) -> bool:
    """Start an (async) save of ``state`` at its step. ``data_state`` is this process's iterator state."""
    step = int(jax.device_get(state.step))
    items = {"params": ocp.args.StandardSave(_variables_item(state)),
             "opt": ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state, "rng": state.rng})}
    if state.ema_params is not None:
        items["ema"] = ocp.args.StandardSave(state.ema_params)
    if data_state is not None:
        items["data"] = ProcessJsonSave(data_state)
    if config is not None:
        items["config"] = ocp.args.JsonSave(json.loads(config.to_json()))
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore_state(manager: ocp.CheckpointManager, abstract_state, *, step: int | None = None,
                  with_data: bool = True):
    """(state, data_state or None) restored into the shardings carried by ``abstract_state`` (a ``TrainState`` of
    ``jax.ShapeDtypeStruct``s with ``sharding``), from ``step`` or the latest one."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    items = {"params": ocp.args.StandardRestore(_variables_item(abstract_state)),
             "opt": ocp.args.StandardRestore({"step": abstract_state.step, "opt_state": abstract_state.opt_state,
                                              "rng": abstract_state.rng})}
    if abstract_state.ema_params is not None:
        items["ema"] = ocp.args.StandardRestore(abstract_state.ema_params)
    step_dir = epath.Path(manager.directory) / str(step)
    saved = {p.name for p in step_dir.iterdir() if p.is_dir()}
    if with_data and "data" in saved:
        items["data"] = ProcessJsonRestore()
    missing = set(items) - saved
    if missing:
        raise CheckpointMismatchError(f"checkpoint {manager.directory}/{step} lacks item(s) {sorted(missing)} "
                                      f"(has {sorted(saved)}); was EMA on when it was saved?")
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except CheckpointMismatchError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointMismatchError(f"checkpoint {manager.directory}/{step} does not match this run's train "
                                      f"state (model or optimizer config changed?): {e}") from e
    variables = dict(restored["params"])
    params = variables.pop("params")
    opt = restored["opt"]
    state = abstract_state.replace(step=opt["step"], params=params, opt_state=opt["opt_state"], mutable=variables,
                                   ema_params=restored["ema"] if "ema" in items else None, rng=opt["rng"])
    _check_shapes(state, abstract_state, f"{manager.directory}/{step}")
    return state, restored.get("data")


def _check_shapes(restored, expected, where: str):
    bad = []
    for (path, r), e in zip(jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(expected)):
        if r.shape != e.shape:
            bad.append(f"{jax.tree_util.keystr(path)}: checkpoint {r.shape}, expected {e.shape}")
    if bad:
        raise CheckpointMismatchError(f"{where}: wrong shapes:\n  " + "\n  ".join(bad))


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


def checkpoint_param_shapes(step_dir: epath.Path, use_ema: bool = False) -> dict[PathT, tuple[int, ...]]:
    """Flat ``{path: shape}`` of the variables saved in a step directory (``ema`` replaces ``params``)."""
    def flat_shapes(item_dir):
        tree = ocp.PyTreeCheckpointer().metadata(item_dir).item_metadata.tree
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
                   use_ema: bool = False) -> tuple[dict[PathT, jax.Array], RestoreReport]:
    """Restore the saved variables of another run or phase that this model expects.

    ``abstract_variables``: the expected variables (``{"params": ..., "batch_stats": ...}``) as
    ``jax.ShapeDtypeStruct``s with shardings; entries may be a subset of the model (the caller decides which).
    Returns ``({path: array}, report)``. Raises ``CheckpointMismatchError`` listing every expected entry absent
    from the checkpoint (outside ``allow_missing``), every checkpoint entry not expected (outside
    ``allow_unused``) and every shape mismatch. Nothing falls back silently to the random init.
    """
    step_dir = resolve_step_dir(path, step)
    saved = checkpoint_param_shapes(step_dir, use_ema)
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

    def restore_item(item: str, flat_target: dict[PathT, Any]):
        if not flat_target:
            return {}
        target = traverse_util.unflatten_dict(flat_target)
        got = ckpt.restore(step_dir / item, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
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
