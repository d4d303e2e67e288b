"""Watching asynchronous checkpoint saves: a failure surfaces at the next training step, and old steps are deleted
only once a newer one is committed.

Orbax commits an asynchronous save in a background thread; when that fails (a full disk, a revoked bucket) the
error only shows at the NEXT save, by which time two intervals of work are gone, and its keep-N rotation has
already deleted older steps for the save that failed. Here:

* ``poll`` runs every step. With one process it is a flag read until the background save is done; with several
  processes it looks at log steps only, where the processes agree (a tiny all-gather) that the save is done
  everywhere, so every host decides at the same step. A finished save's step must then be in the manager's
  committed list, on every process: else the failure is named.
* A failed save is retried once, synchronously, with the CURRENT state; if that fails too the run stops with
  ``CheckpointSaveError`` naming both failures and the last committed step. A save counts as done ("checkpoint
  saved at step N") only once committed.
* Rotation: after a committed save, the oldest committed steps beyond ``keep`` are deleted (never the newest,
  which is always finite: non-finite states are never saved). ``keep=None`` keeps every step.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from bifrost_jax.train.guard import EXIT_SAVE_FAILED, TrainingStopped


class CheckpointSaveError(TrainingStopped):
    exit_code = EXIT_SAVE_FAILED


class SaveTracker:
    def __init__(self, manager: ocp.CheckpointManager, *, keep: Optional[int], report: Callable[[str], None]):
        self.manager, self.keep, self.report = manager, keep, report
        self.pending: Optional[int] = None
        self.last_committed: Optional[int] = max(manager.all_steps(), default=None)
        self.multi = jax.process_count() > 1

    def _all(self, flag: bool) -> bool:
        """``flag`` on every process (a tiny all-gather; every process must call it at the same step)."""
        if not self.multi:
            return flag
        return bool(np.all(multihost_utils.process_allgather(np.int32(flag))))

    def _outcome(self) -> Optional[str]:
        """None if the pending step committed on every process, else what went wrong (waits for the save)."""
        step, error = self.pending, None
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # whatever the writer raised: name it
            error = f"{type(e).__name__}: {e}"
        if error is None:
            self.manager.reload()
            if step not in self.manager.all_steps():
                error = "the step was not committed (see the log above for the writer's error)"
        if not self._all(error is None) and error is None:
            error = "the save failed on another process"
        return error

    # ------------------------------------------------------------------------------------------------------------
    def save(self, save_fn: Callable[[], int]) -> None:
        """Start a save (``save_fn()`` returns its step); a synchronous failure is retried once at once."""
        try:
            self.pending = save_fn()
            return
        except TrainingStopped:
            raise
        except Exception as e:  # the writer's error, whatever it is
            error = f"{type(e).__name__}: {e}"
        self.report(f"saving a checkpoint FAILED ({error}); retrying once")
        try:
            self.pending = save_fn()
        except Exception as e:
            raise CheckpointSaveError(f"saving a checkpoint failed ({error}), and so did a retry ({type(e).__name__}: "
                                      f"{e}). Last committed checkpoint: {self.describe_last()}. Fix the file "
                                      f"system (free space, permissions) and rerun the command to resume from it.")

    def poll(self, step: int, *, when: str, retry: Callable[[], int]) -> None:
        """Check the pending save at ``step``. ``when``: "step" (every step: a flag read, one process only),
        "log" (log steps: several processes agree whether it is done) or "save" (before a save: wait for it).
        A failed save is retried once with the current state (``retry()`` saves it and returns its step)."""
        if self.pending is None or (self.multi and when == "step"):
            return
        if when != "save" and not self._all(not self.manager.is_saving_in_progress()):
            return
        failed_step, error = self.pending, self._outcome()
        self.pending = None
        if error is None:
            self._committed(failed_step)
            return
        self.report(f"saving the checkpoint of step {failed_step} FAILED ({error}); retrying with the state of "
                    f"step {step}")
        retried, retry_error = None, None
        try:
            retried = self.pending = retry()
            retry_error = self._outcome()
        except Exception as e:  # the retry's own synchronous failure
            retry_error = f"{type(e).__name__}: {e}"
        self.pending = None
        if retry_error is not None:
            raise CheckpointSaveError(
                f"saving the checkpoint of step {failed_step} failed ({error}), and so did a retry at step {step} "
                f"({retry_error}). Last committed checkpoint: {self.describe_last()}. Fix the file system (free "
                f"space, permissions) and rerun the command to resume from it.")
        self._committed(retried)

    def finish(self) -> Optional[int]:
        """Wait for the pending save; returns its step once committed, raises ``CheckpointSaveError`` if not."""
        if self.pending is None:
            return None
        step, error = self.pending, self._outcome()
        self.pending = None
        if error is not None:
            raise CheckpointSaveError(f"saving the checkpoint of step {step} failed ({error}). Last committed "
                                      f"checkpoint: {self.describe_last()}. Rerun the command to resume from it.")
        self._committed(step)
        return step

    # ------------------------------------------------------------------------------------------------------------
    def _committed(self, step: int) -> None:
        self.last_committed = step
        if self.keep is None:
            return
        steps = sorted(self.manager.all_steps())
        for old in steps[:-self.keep]:
            if old != step:
                self.manager.delete(old)

    def describe_last(self) -> str:
        if self.last_committed is None:
            return f"none in {self.manager.directory}"
        return f"step {self.last_committed} ({self.manager.directory}/{self.last_committed})"
