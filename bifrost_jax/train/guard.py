"""Non-finite guard of the train step, and the errors that stop a run on purpose.

Inside the jitted step (no host synchronisation): a step whose loss or gradient norm is NaN or infinite applies
NO update (parameters, optimizer state, BatchNorm statistics and EMA keep their values; the step counter and the
data position advance, so a resumed run makes the same decision). ``TrainState.bad_steps`` counts consecutive
such steps and ``TrainState.bad_since`` holds the first of them; once ``train.max_bad_steps`` is reached both
freeze, so the loop sees the trip at its next log or checkpoint step (where it reads the device anyway) and stops
with ``NonFiniteError`` naming the steps and the last good checkpoint, without saving.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from bifrost_jax.checkpoint.stops import EXIT_NON_FINITE, EXIT_NO_INTACT_CHECKPOINT, EXIT_SAVE_FAILED, EXIT_WORKDIR_LOCKED, NonFiniteError, TrainingStopped  # noqa: F401  (guard's stops)


def is_finite_step(loss: jax.Array, grad_norm: jax.Array) -> jax.Array:
    return jnp.isfinite(loss) & jnp.isfinite(grad_norm)


def keep_if_not(finite: jax.Array, new, old):
    """``new`` where the step was finite, else ``old``, leaf by leaf (a select XLA fuses into the update)."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def bad_step_counters(finite: jax.Array, bad_steps: jax.Array, bad_since: jax.Array, step: jax.Array,
                      max_bad_steps: int):
    """(bad_steps, bad_since) after a step numbered ``step + 1``: reset by a finite step, frozen once tripped."""
    tripped = bad_steps >= max_bad_steps
    new_bad = jnp.where(finite, 0, bad_steps + 1)
    new_since = jnp.where(finite, 0, jnp.where(bad_steps == 0, step + 1, bad_since))
    return (jnp.where(tripped, bad_steps, new_bad).astype(jnp.int32),
            jnp.where(tripped, bad_since, new_since).astype(jnp.int32))


def tripped(state, max_bad_steps: int) -> tuple[bool, int, int]:
    """(tripped, bad_steps, bad_since) read from the device (a synchronisation: call at log/save steps)."""
    bad, since = (int(v) for v in jax.device_get((state.bad_steps, state.bad_since)))
    return bad >= max_bad_steps, bad, since


def non_finite_message(step: int, bad: int, since: int, last_good: str) -> str:
    return (f"training stopped at step {step}: {bad} consecutive steps ({since}..{since + bad - 1}) had a "
            f"non-finite loss or gradient norm; their updates were not applied and nothing was saved. Last good "
            f"checkpoint: {last_good}. Lower optim.lr, check the data and the initial weights, then rerun the "
            f"command to resume from it.")
