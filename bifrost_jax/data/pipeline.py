"""grain input pipelines: per-host sharded, seeded, resumable training batches and padded eval batches.

Training (``make_train_iterator``), as a grain dataset graph:

    source --shuffle(seed)--> repeat(num_epochs) --[process_index::process_count]--> random_map(preprocess)
        --> to_iter_dataset (reader threads) --> skip corrupt (counted) --> batch(global / process_count)
        [--> mp_prefetch(worker_count)]

  * The shuffle is a global index permutation, re-drawn each epoch from (seed, epoch); every host applies the
    same one and keeps every process_count-th element of the shuffled stream, so the hosts' slices are disjoint
    and together cover each epoch. Each host yields batches of ``global_batch_size // process_count``.
  * ``preprocess_fn(element, rng)`` gets a generator seeded by (seed, position in the host's stream), so random
    crops are reproducible and resumable.
  * A preprocess failure of a "corrupt data" kind (``CorruptImageError`` and PIL's decode errors; see
    ``DEFAULT_SKIP_ERRORS``) drops the element, logs one line naming it, and counts it. The count lives in the
    iterator STATE, so it survives worker processes and checkpoints: read it with ``corrupt_count(it)``. Any other
    exception is a bug and propagates. ``max_consecutive_skips`` turns an all-corrupt source into an error
    instead of an endless loop.
  * Resuming: ``iterator_state(it)`` -> JSON bytes (store it in the checkpoint); build the same pipeline again
    and ``restore_iterator(it, state)``: the next batches equal those of the uninterrupted run. The state depends
    on ``worker_count`` (each worker owns a slice), so restore with the same worker_count.

Eval (``make_eval_iterator``): no shuffle, fixed order. Global batch b covers source elements
[b * G, (b + 1) * G); host h takes the h-th ``G // process_count`` of it. Every host yields the same number of
batches (ceil(len / G)); slots past the end, and elements that fail to decode, are zero-filled with
``valid = False``. ``example_index`` is the source index of each slot (-1 for padding).
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np
from PIL import Image

from bifrost_jax.data.preprocess import CorruptImageError, element_name

log = logging.getLogger(__name__)

PreprocessFn = Callable[[Mapping[str, Any], np.random.Generator], dict]

# Exceptions that mean "this element's data is bad" (not "the code is wrong").
DEFAULT_SKIP_ERRORS: tuple[type[BaseException], ...] = (CorruptImageError, Image.UnidentifiedImageError,
                                                        Image.DecompressionBombError, OSError, EOFError)
SKIPPED_STATE_KEY = "corrupt_skipped"
VALID_KEY = "valid"
INDEX_KEY = "example_index"


class CorruptElement:
    """What the map returns for a corrupt element; dropped and counted before batching."""

    __slots__ = ("name", "error")

    def __init__(self, name: str, error: str):
        self.name, self.error = name, error


class _SafePreprocess:
    """random_map transform: preprocess_fn, with corrupt-data errors turned into a ``CorruptElement``."""

    def __init__(self, preprocess_fn: PreprocessFn, skip_errors: tuple[type[BaseException], ...]):
        self.preprocess_fn, self.skip_errors = preprocess_fn, skip_errors

    def __call__(self, element: Mapping[str, Any], rng: np.random.Generator):
        try:
            return self.preprocess_fn(element, rng)
        except self.skip_errors as e:
            return CorruptElement(element_name(element) if isinstance(element, Mapping) else "",
                                  f"{type(e).__name__}: {e}")


class _SkipCorruptIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, max_consecutive_skips: int):
        super().__init__(parent)
        self._max_consecutive = max_consecutive_skips
        self._skipped = 0

    def __next__(self):
        consecutive = 0
        while True:
            element = next(self._parent)
            if not isinstance(element, CorruptElement):
                return element
            self._skipped += 1
            consecutive += 1
            log.warning("skipped corrupt element %s (%s); %d skipped so far by this reader",
                        element.name or "<unnamed>", element.error, self._skipped)
            if consecutive >= self._max_consecutive:
                raise RuntimeError(f"{consecutive} consecutive corrupt elements (last: {element.name!r}: "
                                   f"{element.error}); is the source or the preprocess_fn broken?")

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), SKIPPED_STATE_KEY: self._skipped}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._skipped = int(state[SKIPPED_STATE_KEY])

    def __str__(self) -> str:
        return "SkipCorruptDatasetIterator"


class SkipCorruptIterDataset(grain.IterDataset):
    """Drops ``CorruptElement``s, counting them in the iterator state (see the module docstring)."""

    def __init__(self, parent: grain.IterDataset, *, max_consecutive_skips: int = 1000):
        super().__init__(parent)
        self._max_consecutive = max_consecutive_skips

    def __iter__(self) -> _SkipCorruptIterator:
        return _SkipCorruptIterator(self._parent.__iter__(), self._max_consecutive)

    def __str__(self) -> str:
        return "SkipCorruptIterDataset"


def _default_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only when the caller did not say: keeps this module usable without initialising JAX

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for process_count {process_count}")
    return process_index, process_count


def per_host_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} is not a positive multiple of the process count "
                         f"{process_count}: each host reads global_batch_size / process_count elements")
    return global_batch_size // process_count


def _derived_seeds(seed: int) -> tuple[int, int]:
    shuffle_seed, map_seed = np.random.SeedSequence(seed).generate_state(2)
    return int(shuffle_seed), int(map_seed)


def _maybe_prefetch(ds: grain.IterDataset, worker_count: int, worker_buffer_size: int) -> grain.IterDataset:
    if worker_count <= 0:
        return ds
    from absl import flags

    if not flags.FLAGS.is_parsed():
        # grain's worker processes read absl flags; outside an absl app (scripts, tests) use their defaults.
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                       per_worker_buffer_size=worker_buffer_size))


def make_train_dataset(source: Sequence[Any], global_batch_size: int, *, seed: int, shuffle: bool = True,
                       num_epochs: int | None = None, process_index: int | None = None,
                       process_count: int | None = None, preprocess_fn: PreprocessFn,
                       worker_count: int = 0, worker_buffer_size: int = 2, num_threads: int = 8,
                       prefetch_buffer_size: int = 64,
                       skip_errors: tuple[type[BaseException], ...] = DEFAULT_SKIP_ERRORS,
                       max_consecutive_skips: int = 1000) -> grain.IterDataset:
    """The training ``IterDataset`` (module docstring); ``make_train_iterator`` is ``iter`` of it."""
    process_index, process_count = _default_process(process_index, process_count)
    batch = per_host_batch_size(global_batch_size, process_count)
    if len(source) == 0:
        raise ValueError("make_train_dataset: the source is empty")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None (forever), got {num_epochs}")
    shuffle_seed, map_seed = _derived_seeds(seed)
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=shuffle_seed)
    ds = ds.repeat(num_epochs)
    ds = ds[process_index::process_count]
    ds = ds.random_map(_SafePreprocess(preprocess_fn, tuple(skip_errors)), seed=map_seed)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                 prefetch_buffer_size=prefetch_buffer_size))
    it_ds = SkipCorruptIterDataset(it_ds, max_consecutive_skips=max_consecutive_skips)
    it_ds = it_ds.batch(batch, drop_remainder=True)
    return _maybe_prefetch(it_ds, worker_count, worker_buffer_size)


def make_train_iterator(source: Sequence[Any], global_batch_size: int, *, seed: int, shuffle: bool = True,
                        num_epochs: int | None = None, process_index: int | None = None,
                        process_count: int | None = None, preprocess_fn: PreprocessFn, worker_count: int = 0,
                        **kwargs) -> grain.DatasetIterator:
    """A resumable iterator of this host's training batches (dicts of stacked numpy arrays).

    source: a random-access source (a TFDS ``as_data_source`` split, ``ImageNetSource``, a list, ...).
    global_batch_size: summed over hosts; must divide by process_count (default ``jax.process_count()``).
    preprocess_fn: ``fn(element, rng) -> dict`` (e.g. ``preprocess.make_preprocess_fn``).
    Further keyword arguments go to ``make_train_dataset``.
    """
    return iter(make_train_dataset(source, global_batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                                   process_index=process_index, process_count=process_count,
                                   preprocess_fn=preprocess_fn, worker_count=worker_count, **kwargs))


def iterator_state(it: grain.DatasetIterator) -> bytes:
    """The iterator's position (and corrupt-skip counts) as JSON bytes, for the checkpoint."""
    return json.dumps(it.get_state(), sort_keys=True).encode("utf-8")


def restore_iterator(it: grain.DatasetIterator, state: bytes | str | Mapping[str, Any]) -> grain.DatasetIterator:
    """Moves ``it`` (built with the same arguments as the saved one) to a state from ``iterator_state``."""
    if isinstance(state, (bytes, bytearray, np.ndarray)):
        state = bytes(state).decode("utf-8") if not isinstance(state, np.ndarray) else state.tobytes().decode()
    if isinstance(state, str):
        state = json.loads(state)
    it.set_state(dict(state))
    return it


def corrupt_count(it_or_state: grain.DatasetIterator | Mapping[str, Any] | bytes) -> int:
    """Elements skipped as corrupt so far by this host (summed over its worker processes)."""
    if isinstance(it_or_state, grain.DatasetIterator):
        state: Any = it_or_state.get_state()
    elif isinstance(it_or_state, (bytes, str)):
        state = json.loads(it_or_state)
    else:
        state = it_or_state

    def total(node: Any) -> int:
        if isinstance(node, Mapping):
            return sum(int(v) if k == SKIPPED_STATE_KEY else total(v) for k, v in node.items())
        if isinstance(node, (list, tuple)):
            return sum(total(v) for v in node)
        return 0

    return total(state)


def _blank_like(element: Mapping[str, Any]) -> dict[str, Any]:
    def blank(value):
        if isinstance(value, str):
            return ""
        if isinstance(value, (bytes, np.bytes_)):
            return b""
        array = np.asarray(value)
        return np.zeros_like(array) if array.dtype != object else np.full(array.shape, b"", dtype=object)

    return {k: blank(v) for k, v in element.items()}


class _EvalSlot:
    """Maps this host's slot i to its source element, preprocessed, or a zero-filled invalid slot."""

    def __init__(self, source, preprocess_fn: PreprocessFn, skip_errors, global_batch: int, per_host: int,
                 process_index: int, template: Mapping[str, Any]):
        self.source, self.preprocess_fn, self.skip_errors = source, preprocess_fn, skip_errors
        self.global_batch, self.per_host, self.process_index = global_batch, per_host, process_index
        self.length = len(source)
        self.blank = _blank_like(template)

    def source_index(self, slot: int) -> int:
        return (slot // self.per_host) * self.global_batch + self.process_index * self.per_host + slot % self.per_host

    def __call__(self, slot: int) -> dict[str, Any]:
        index = self.source_index(slot)
        if index < self.length:
            element = self.source[index]
            try:
                out = dict(self.preprocess_fn(element, np.random.default_rng(index)))
                out[VALID_KEY], out[INDEX_KEY] = np.bool_(True), np.int64(index)
                return out
            except self.skip_errors as e:
                log.warning("eval: corrupt element %d %s (%s: %s) is padded and marked invalid", index,
                            element_name(element), type(e).__name__, e)
        out = dict(self.blank)
        out[VALID_KEY], out[INDEX_KEY] = np.bool_(False), np.int64(index if index < self.length else -1)
        return out


def make_eval_iterator(source: Sequence[Any], global_batch_size: int, *, process_index: int | None = None,
                       process_count: int | None = None, preprocess_fn: PreprocessFn, worker_count: int = 0,
                       worker_buffer_size: int = 2, num_threads: int = 8, prefetch_buffer_size: int = 64,
                       skip_errors: tuple[type[BaseException], ...] = DEFAULT_SKIP_ERRORS) -> grain.DatasetIterator:
    """Fixed-order eval batches, sharded over hosts, padded with ``valid = False`` (module docstring).

    Corrupt elements also come out as invalid slots: they are those with ``valid == False`` and
    ``example_index >= 0``.
    """
    process_index, process_count = _default_process(process_index, process_count)
    per_host = per_host_batch_size(global_batch_size, process_count)
    if len(source) == 0:
        raise ValueError("make_eval_iterator: the source is empty")
    template = None
    for index in range(min(len(source), 100)):  # the structure of a valid element, for padding
        try:
            template = preprocess_fn(source[index], np.random.default_rng(index))
            break
        except tuple(skip_errors):
            continue
    if template is None:
        raise ValueError("make_eval_iterator: none of the first 100 source elements preprocess without error")
    num_batches = math.ceil(len(source) / global_batch_size)
    slots = _EvalSlot(source, preprocess_fn, tuple(skip_errors), global_batch_size, per_host, process_index, template)
    ds = grain.MapDataset.range(num_batches * per_host).map(slots)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size))
    it_ds = it_ds.batch(per_host, drop_remainder=False)
    return iter(_maybe_prefetch(it_ds, worker_count, worker_buffer_size))
