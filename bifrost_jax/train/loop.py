"""The training loop: ``train(config, workdir)`` runs one phase on the device mesh, resuming from its latest
checkpoint; ``main(argv)`` is ``bifrost train --config configs/x.py --workdir DIR [--config.key=value ...]``.

Start-up: mesh from ``config.mesh`` -> the phase -> abstract state and shardings -> either a restore of the latest
checkpoint in ``WORKDIR/<phase>/checkpoints`` (train state, BatchNorm statistics, data-iterator state, RNG) or a
sharded init, optionally overwritten by the phase's pretrained weights and ``checkpoint.init_from`` (a params-only
restore with accounting). The step is compiled once ahead of time (its FLOPs feed TFLOP/s).

Preemption: SIGTERM (single process) or a JAX preemption sync point (multi-host, where JAX's own notifier catches
SIGTERM) saves a checkpoint at the current step, waits for it to commit, and returns; ``main`` then exits with
code 0 (``PREEMPTED_EXIT_CODE``). Rerunning the same command resumes.

Faults (README "What happens when things go wrong"): the config is validated first (``validate.py``), the phase
directory is locked (``workdir_lock.py``), a resume takes the newest intact checkpoint and checks the config
(``resume.py``, ``integrity.py``), non-finite steps are skipped in the step and stop the run after
``train.max_bad_steps`` (``guard.py``), and asynchronous saves are watched every step (``save_tracker.py``).
``main`` turns these stops into a message and an exit code (see ``USAGE``).

Multi-host: ``main`` calls ``jax.distributed.initialize`` when BIFROST_COORDINATOR (explicit coordinator, e.g.
``launch/local_multiprocess.py``) or BIFROST_DISTRIBUTED=1 (auto-detected TPU pod / SLURM environment) is set.
Every host reads its own shard of the data and feeds its rows of the global batch. At the end every process prints
``process i/n: step S loss L`` (its copy of the replicated loss), so a launcher or test can check the hosts agree.

Frozen weights are stored in ``config.train.frozen_param_dtype`` ("" = the modules' param_dtype; see
``train/state.py``); checkpoints never hold them, so a resumed run rebuilds them in that dtype.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from bifrost_jax.configs import parse_config_flags
from bifrost_jax.data.pipeline import iterator_state, restore_iterator
from bifrost_jax.parallel.mesh import maybe_initialize_distributed
from bifrost_jax.parallel.multislice import mesh_from_config
from bifrost_jax.parallel.rules import axis_rules
from bifrost_jax import checkpoint as ckpt
from bifrost_jax.train import guard
from bifrost_jax.checkpoint.integrity import CheckpointDamagedError, nonfinite_paths
from bifrost_jax.train.logging import MetricsLogger, step_flops
from bifrost_jax.train.registry import get_phase
from bifrost_jax.train.resume import resume
from bifrost_jax.train.save_tracker import SaveTracker
from bifrost_jax.train.state import (StateBuilder, TrainState, global_batch, jit_train_step, make_optimizer,
                                     make_train_step, merge_params)
from bifrost_jax.train.validate import ConfigError, keep_count, validate_train_config
from bifrost_jax.train.workdir_lock import WorkdirLock

PREEMPTED_EXIT_CODE = 0


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    frozen: Any
    step: int
    preempted: bool
    last_metrics: dict[str, float]


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------
def parse_train_args(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, str]:
    """``--config FILE [--config.key=value ...] --workdir DIR`` (the arguments after ``bifrost train``) ->
    ``(config, workdir)``. Unknown flags or config keys raise ``ValueError`` naming them."""
    config, extra = parse_config_flags(argv, extra_string_flags=("workdir",))
    if not extra["workdir"]:
        raise ValueError("missing --workdir DIR (checkpoints and logs go to DIR/<phase>/)")
    return config, extra["workdir"]


USAGE = """usage: bifrost train --config FILE --workdir DIR [--config.KEY=VALUE ...]

Train the phase of an ml_collections config file (configs/*.py; its docstring says what it trains). Checkpoints
and metrics go to DIR/<phase>/; rerunning the same command resumes from the newest intact checkpoint.

  --config FILE            a get_config() file, e.g. configs/toy.py
  --workdir DIR            the run directory (locked while a run uses it)
  --config.KEY=VALUE       override a config value, e.g. --config.optim.lr=1e-4 (unknown keys are errors)

With --config, --help also prints that config's keys and values. Exit codes: 0 done or preempted (saved),
2 bad config or a config that does not match the checkpoint, 3 non-finite steps, 4 a checkpoint save failed,
5 the workdir is locked by another run, 6 no intact checkpoint to resume from."""


def _help(argv: Sequence[str]) -> int:
    print(USAGE)
    if "--config" in argv or any(a.startswith("--config=") for a in argv):
        try:
            config, _ = parse_config_flags([a for a in argv if a not in ("-h", "--help")],
                                           extra_string_flags=("workdir",))
            print("\nconfig:\n" + str(config))
        except ValueError as e:
            print(f"\n(cannot show the config: {e})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        return _help(argv)
    try:
        config, workdir = parse_train_args(argv)
        validate_train_config(config)
        maybe_initialize_distributed()
        result = train(config, workdir)
    except guard.TrainingStopped as e:
        print(f"bifrost train: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except CheckpointDamagedError as e:
        print(f"bifrost train: {e}", file=sys.stderr, flush=True)
        return guard.EXIT_NO_INTACT_CHECKPOINT
    except (ConfigError, ckpt.CheckpointMismatchError) as e:
        print(f"bifrost train: {e}", file=sys.stderr, flush=True)
        return 2
    return PREEMPTED_EXIT_CODE if result.preempted else 0


# --------------------------------------------------------------------------------------------------------------
# Preemption
# --------------------------------------------------------------------------------------------------------------
class PreemptionWatcher:
    """True at the step where every process should save and stop."""

    def __init__(self):
        self._flag = threading.Event()
        self._multi = jax.process_count() > 1
        self._previous = None
        # Multi-host: JAX's preemption notifier owns SIGTERM and syncs the stop step across hosts; a Python
        # handler would replace it.
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())

    def reached(self, step: int, manager) -> bool:
        if self._multi:
            return bool(manager.reached_preemption(step))
        return self._flag.is_set()

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# --------------------------------------------------------------------------------------------------------------
# Initial weights
# --------------------------------------------------------------------------------------------------------------
def _flat(tree, prefix=()):
    return {prefix + tuple(str(p) for p in k): v for k, v in traverse_util.flatten_dict(tree).items()} if tree else {}


def _override(tree, overrides, prefix):
    """``tree`` with the leaves named in ``overrides`` replaced, cast to the leaf's dtype: a source may hold
    another dtype (e.g. a trained branch copied from a bf16-stored frozen backbone must stay fp32)."""
    if not tree:
        return tree
    flat = traverse_util.flatten_dict(tree)
    out = {}
    for k, v in flat.items():
        new = overrides.get(prefix + tuple(str(p) for p in k), v)
        out[k] = new.astype(v.dtype) if new.dtype != v.dtype else new
    return traverse_util.unflatten_dict(out)


def _subtrees(dotted_paths) -> list[str]:
    """Top-level subtrees (collection.module) of a list of weight paths, for a short log line."""
    return sorted({".".join(p.split(".")[:2]) for p in dotted_paths})


def pretrained_overrides(builder: StateBuilder, phase, config, *, frozen_only: bool) -> dict:
    """Flat ``{path: array}`` from the phase's pretrained sources and ``checkpoint.init_from``, accounted: every
    expected weight outside the new-subtree allow-list must come from a source. ``frozen_only`` (on resume) asks
    only for the frozen weights, which checkpoints do not hold."""
    a_state, a_frozen = builder.abstract_state, builder.abstract_frozen
    abstract_vars = {"params": merge_params(a_state.params, a_frozen), **a_state.mutable}
    shardings = {"params": merge_params(builder.state_shardings.params, builder.frozen_shardings),
                 **builder.state_shardings.mutable}
    expected = _flat(abstract_vars)
    if frozen_only:
        expected = _flat(a_frozen, ("params",))
    allow_missing = tuple(tuple(p) for p in phase.new_subtrees) + ckpt.parse_prefixes(
        config.checkpoint.init_allow_missing)

    sources: dict[str, dict] = {}
    pretrained = phase.load_pretrained(abstract_vars, shardings)
    if pretrained:
        sources["phase.load_pretrained"] = {k: v for k, v in _flat(pretrained).items()
                                            if k in expected or not frozen_only}
    init_from = config.checkpoint.init_from
    if init_from:
        # init_from (a finetuned checkpoint) takes precedence over the phase's pretrained weights; weights those
        # cover need not be in it.
        covered = tuple(sources.get("phase.load_pretrained", {}))
        restored, report = ckpt.restore_params(
            init_from, traverse_util.unflatten_dict(expected), step=config.checkpoint.init_step,
            # On resume only the frozen weights are wanted; the rest of the checkpoint was checked at the start.
            allow_missing=((),) if frozen_only else allow_missing + covered,
            allow_unused=((),) if frozen_only else ckpt.parse_prefixes(config.checkpoint.init_allow_unused),
            use_ema=config.checkpoint.init_use_ema)
        sources["checkpoint.init_from"] = restored
        if not frozen_only and jax.process_index() == 0:
            print(f"init_from {init_from}: restored {len(report.restored)} weights"
                  + (f"; not in it: {_subtrees(report.left_at_init)}" if report.left_at_init else "")
                  + (f"; unused: {_subtrees(report.unused)}" if report.unused else ""), flush=True)
    if not sources:
        return {}
    merged = {}
    for flat in sources.values():  # later sources win
        merged.update(flat)
    if not frozen_only:
        left = ckpt.account_sources(expected, sources, allow_missing)
        if left and jax.process_index() == 0:
            print(f"initial weights: {len(expected) - len(left)} from {sorted(sources)}, {len(left)} at their "
                  f"random init (new subtrees): {_subtrees('.'.join(k) for k in left)}", flush=True)
    return merged


def initial_state(builder: StateBuilder, phase, config) -> tuple[TrainState, Any]:
    # Account for the pretrained sources first: a mismatch fails before anything is initialised.
    overrides = pretrained_overrides(builder, phase, config, frozen_only=False)
    state, frozen = builder.init()
    if overrides:
        params = _override(state.params, overrides, ("params",))
        mutable = {c: _override(v, overrides, (c,)) for c, v in state.mutable.items()}
        ema = jax.tree.map(jnp.copy, params) if state.ema_params is not None else None
        state = state.replace(params=params, mutable=mutable, ema_params=ema)
        frozen = _override(frozen, overrides, ("params",))
    return state, frozen


def initial_frozen(builder: StateBuilder, phase, config):
    frozen = builder.init_frozen()
    overrides = pretrained_overrides(builder, phase, config, frozen_only=True)
    return _override(frozen, overrides, ("params",)) if overrides else frozen


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------
def _check_batch(config, mesh):
    b, k = config.train.batch_size, config.train.grad_accum_steps
    pc = jax.process_count()
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if b % pc:
        raise ValueError(f"train.batch_size={b} does not divide over {pc} processes")
    if k < 1 or b % k:
        raise ValueError(f"train.batch_size={b} does not divide into train.grad_accum_steps={k} micro-batches")
    if (b // k) % rows:
        raise ValueError(f"micro-batch of {b // k} rows does not shard over data*fsdp={rows} devices")


def _say(text: str) -> None:
    if jax.process_index() == 0:
        print(text, flush=True)


def train(config: ml_collections.ConfigDict, workdir: str, *, progress_bar: bool = True) -> TrainResult:
    """Train ``config.phase`` up to ``config.train.steps``, resuming from ``workdir/<phase>/checkpoints``.

    Every config value is validated first (``validate.py``); the phase directory is locked for the run
    (``workdir_lock.py``). Raises ``guard.TrainingStopped`` subclasses for the stops of ``README`` "What happens
    when things go wrong" (non-finite steps, failed saves, a locked workdir)."""
    validate_train_config(config)
    phase = get_phase(config)
    run_dir = os.path.join(os.path.abspath(workdir), phase.name)
    lock = WorkdirLock(run_dir, jax.process_index()).acquire(report=_say)
    try:
        return _train_locked(config, phase, run_dir, workdir, lock, progress_bar)
    finally:
        lock.release()


def _train_locked(config, phase, run_dir: str, workdir: str, lock: WorkdirLock, progress_bar: bool) -> TrainResult:
    mesh = mesh_from_config(dict(config.mesh))
    _check_batch(config, mesh)
    batch_size, total = config.train.batch_size, config.train.steps
    max_bad = int(config.train.max_bad_steps)
    tx, schedule = make_optimizer(config.optim, total)
    ema_decay = float(config.optim.ema_decay)
    builder = StateBuilder(phase, tx, mesh, seed=config.seed, ema=ema_decay > 0,
                           frozen_dtype=config.train.get("frozen_param_dtype", ""))
    manager = ckpt.make_manager(ckpt.checkpoint_dir(workdir, phase.name), async_save=config.checkpoint.async_save)
    data_iter = phase.dataset(global_batch_size=batch_size, seed=config.seed, process_index=jax.process_index(),
                              process_count=jax.process_count())

    resumed_from = None
    if ckpt.committed_steps(manager):
        state, data_state, resumed_from = resume(manager, builder.abstract_state, config, run_dir, report=_say)
        if data_state is not None:
            restore_iterator(data_iter, data_state)
        frozen = initial_frozen(builder, phase, config)
    else:
        state, frozen = initial_state(builder, phase, config)
    bad = nonfinite_paths({"state": state, "frozen": frozen})
    if bad:
        manager.close()
        raise guard.NonFiniteError(f"the {'restored' if resumed_from is not None else 'initial'} weights hold "
                                   f"non-finite values, training on them is pointless: {bad[:20]}"
                                   + (f" (+{len(bad) - 20} more)" if len(bad) > 20 else ""))

    step_fn = jit_train_step(make_train_step(phase, tx, schedule, grad_accum_steps=config.train.grad_accum_steps,
                                             ema_decay=ema_decay, max_bad_steps=max_bad), builder, batch_size)
    abstract_batch = builder.abstract_batch(batch_size)
    with axis_rules(mesh):
        compiled = step_fn.lower(builder.abstract_state, builder.abstract_frozen, abstract_batch).compile()
    # XLA's count of the compiled step beside the analytic model FLOPs, and the peak for MFU (train/logging.py)
    flops = step_flops(phase, compiled, batch_size, mesh.size, config, device_list=list(mesh.devices.flat))

    step = int(jax.device_get(state.step))
    logger = MetricsLogger(run_dir, total_steps=total, initial_step=step, examples_per_step=batch_size,
                           tokens_per_example=phase.tokens_per_example(), flops=flops,
                           progress_bar=progress_bar, tensorboard=config.train.tensorboard,
                           description=phase.name)
    n_train = sum(x.size for x in jax.tree.leaves(builder.abstract_state.params))
    n_frozen = sum(x.size for x in jax.tree.leaves(builder.abstract_frozen))
    logger.message(f"phase {phase.name}: mesh {dict(mesh.shape)}, {n_train:,} trainable / {n_frozen:,} frozen "
                   f"parameters, " + (f"resumed from step {resumed_from}" if resumed_from is not None
                                      else "fresh start") + f", workdir {run_dir}")
    logger.message(flops.summary())

    watcher = PreemptionWatcher()
    tracker = SaveTracker(manager, keep=keep_count(config), report=logger.message)
    preempted, last = False, {}
    every, log_every = config.checkpoint.every, config.train.log_every

    def save_now() -> int:
        return ckpt.save_state(manager, state, data_state=json.loads(iterator_state(data_iter)), config=config)

    try:
        logger.restart_clock(step)
        while step < total:
            lock.check()
            batch = global_batch(next(data_iter), abstract_batch)
            state, metrics = compiled(state, frozen, batch)
            step += 1
            log_step = step % log_every == 0 or step == total
            if log_step:
                last = logger.log(step, metrics)
            preempted = watcher.reached(step, manager)
            save_step = step % every == 0 or step == total or preempted
            if log_step or save_step:  # the streak counters are read where the host waits for the device anyway
                stop, bad_steps, bad_since = guard.tripped(state, max_bad)
                if stop:
                    tracker.finish()
                    raise guard.NonFiniteError(guard.non_finite_message(step, bad_steps, bad_since,
                                                                        tracker.describe_last()))
            tracker.poll(step, when="save" if save_step else "log" if log_step else "step", retry=save_now)
            if save_step:
                tracker.save(save_now)
            if preempted:
                saved = tracker.finish()
                logger.message(f"preempted: checkpoint saved at step {saved}; rerun the command to resume")
                break
        tracker.finish()
    finally:
        watcher.close()
        try:
            manager.close()
        except Exception as e:  # already reported by the tracker, or masked by the error in flight
            logger.message(f"closing the checkpoint manager: {type(e).__name__}: {e}")
        logger.close()
    if jax.process_count() > 1 and "loss" in last:
        # Every host reports its copy of the (replicated) last loss: hosts that disagree hold different states.
        print(f"process {jax.process_index()}/{jax.process_count()}: step {step} loss {last['loss']!r}", flush=True)
    return TrainResult(state=state, frozen=frozen, step=step, preempted=preempted, last_metrics=last)


if __name__ == "__main__":
    sys.exit(main())
