"""Training phases: one class per phase holds everything the generic loop needs, including the phase's one loss.

The loop (``train/loop.py``) knows nothing about models. A phase provides:

* ``init_variables(rng)``: the full variable collections of its modules (``{"params": ..., "batch_stats": ...}``)
  with logical-axis metadata, randomly initialised. It is traced under ``jax.eval_shape`` (abstract state,
  shardings) and under ``jax.jit`` with sharded outputs, so it must be a pure function of ``rng``.
* ``load_pretrained(abstract, shardings)``: optional weights from ports or other checkpoints (partial
  ``{"params": ...}`` trees of arrays already on their shardings). Every expected weight they do not cover must lie
  under ``new_subtrees`` or the loop raises, listing it.
* ``is_trainable(path)``: the path predicate splitting ``params`` into trainable and frozen trees. Frozen weights hold
  no optimizer state and are passed to the step as a non-differentiated, non-donated input.
* ``loss_fn(trainable, frozen, mutable, batch, rng) -> (loss, (metrics, new_mutable))``: ``mutable`` holds the
  non-param collections (BatchNorm statistics), returned updated.
* ``batch_spec(batch_size)``: ``{name: jax.ShapeDtypeStruct}`` of a global batch; ``batch_axes()`` the logical axes
  of each entry (default: leading "batch", the rest replicated).
* ``dataset(global_batch_size, seed, process_index, process_count)``: this host's resumable iterator of numpy
  batches (``global_batch_size // process_count`` rows each), a grain ``DatasetIterator`` as built by
  ``bifrost_jax.data.pipeline.make_train_iterator``; the loop checkpoints it with ``iterator_state`` /
  ``restore_iterator``.
* FLOPs info: ``tokens_per_example()`` (for tokens/s) and ``analytic_flops(batch_size)``: the analytic model
  FLOPs of one training step (a ``bifrost_jax.models.flops.FlopsBreakdown``: matmuls + attention of every module,
  x3 / x2 / x1 by how the step runs it), logged beside XLA's cost analysis and used for MFU; it sums the
  phase's ``analytic_parts`` (None: unknown). ``flops_per_example()`` is its total at batch 1.

The phases are listed by name in ``bifrost_jax/train/registry.py``.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import jax
import ml_collections

from bifrost_jax.models.flops import FlopsBreakdown, Part

Params = Any
Batch = Mapping[str, jax.Array]


class Phase:
    """Base class of a training phase. Subclasses override the methods that raise ``NotImplementedError``."""

    name: str = ""
    # Parameter subtrees (tuples of keys under "params") that may be absent from pretrained sources: they keep their
    # random init (a new ControlNet, the generation branch's head).
    new_subtrees: tuple[tuple[str, ...], ...] = ()

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    # -- modules ------------------------------------------------------------------------------------------------
    def init_variables(self, rng: jax.Array) -> dict[str, Any]:
        raise NotImplementedError

    def load_pretrained(self, abstract_variables: Any, shardings: Any) -> dict[str, Any] | None:
        """Weights from ports or other phases' checkpoints, or ``None`` (random init only)."""
        del abstract_variables, shardings
        return None

    def is_trainable(self, path: tuple[str, ...]) -> bool:
        raise NotImplementedError

    # -- loss -----------------------------------------------------------------------------------------------------
    def loss_fn(self, trainable: Params, frozen: Params, mutable: dict[str, Any], batch: Batch, rng: jax.Array):
        raise NotImplementedError

    # -- data -----------------------------------------------------------------------------------------------------
    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        raise NotImplementedError

    def batch_axes(self) -> dict[str, tuple[str | None, ...]]:
        return {k: ("batch",) + (None,) * (len(v.shape) - 1) for k, v in self.batch_spec(1).items()}

    def dataset(self, *, global_batch_size: int, seed: int, process_index: int,
                process_count: int) -> Iterator[dict]:
        raise NotImplementedError

    # -- FLOPs info -----------------------------------------------------------------------------------------------
    def tokens_per_example(self) -> int:
        return 1

    def analytic_parts(self, batch_size: int) -> list[Part] | None:
        """The modules one training step runs at global ``batch_size``, each with its forward counts and how the
        step runs it (``bifrost_jax.models.flops.Part``), or None if unknown."""
        del batch_size
        return None

    def analytic_flops(self, batch_size: int) -> FlopsBreakdown | None:
        """Analytic FLOPs of one training step at global ``batch_size`` (``FlopsBreakdown``), or None."""
        parts = self.analytic_parts(batch_size)
        if parts is None:
            return None
        return FlopsBreakdown(tuple(p for p in parts if p.forward.total),
                              f"phase {self.name}, global batch {batch_size}")

    def flops_per_example(self) -> float | None:
        counts = self.analytic_flops(1)
        return None if counts is None else counts.total
