"""Integrity information of a checkpoint step: per-array checksums, the item list, and their verification.

Every saved step carries an ``integrity`` item (JSON, written in the same atomic commit as the other items, so
it exists iff the step was committed) holding

* ``items``: the names of every item the step must hold (``params``, ``opt``, ``data``, ``config``, ``ema``);
* ``arrays``: for each array item, ``{dotted path: {"shape", "dtype", "checksum"}}``;
* ``config_sha256``: the digest of the run's config JSON;
* ``finite``: every saved array value is finite (a state with non-finite values is never saved);
* ``digest``: the SHA-256 of the rest, so a damaged manifest is recognised as such.

Checksums are computed ON DEVICE by one jitted program over the global (sharded) arrays: two 32-bit sums per
array, of the raw bits weighted by their flat position and of a mixed hash of (bits, position). Integer sums
wrap and commute, so the value does not depend on the mesh or sharding: a checkpoint saved on one mesh verifies
when restored onto another. A flipped byte changes the first sum unless two changes cancel exactly, and then
almost surely the second. The data-iterator files carry their own SHA-256 (each process writes its own).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from bifrost_jax.checkpoint.stops import NonFiniteError

MANIFEST_ITEM = "integrity"
FORMAT_VERSION = 1


class CheckpointDamagedError(RuntimeError):
    """A checkpoint step fails its integrity check (missing item, changed bytes, unreadable array)."""


# --------------------------------------------------------------------------------------------------------------
# Checksums of arrays, on device
# --------------------------------------------------------------------------------------------------------------
def _bits_u32(x: jax.Array) -> jax.Array:
    """The raw bits of ``x`` as uint32 (one word per element; 8-byte elements become two words on a new axis)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)  # (..., 2)
    unsigned = {2: jnp.uint16, 1: jnp.uint8}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _flat_index(shape) -> jax.Array:
    """Row-major position of every element (uint32, wrapping), built from iotas: no reshape of sharded arrays."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(stride % 2**32)
        stride *= shape[dim]
    return index


def _mix(h: jax.Array) -> jax.Array:
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    bits = _bits_u32(x)
    index = _flat_index(bits.shape)
    weighted = jnp.sum(bits * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
    mixed = jnp.sum(_mix(bits ^ _mix(index + jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)
    return jnp.stack([weighted, mixed])


def _leaf_finite(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.all(jnp.isfinite(x))
    return jnp.bool_(True)


@jax.jit
def _checksums_and_finite(leaves):
    return [_leaf_checksum(x) for x in leaves], [_leaf_finite(x) for x in leaves]


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def flat_arrays(tree) -> dict[str, Any]:
    """``{dotted path: leaf}`` of a pytree of arrays (dict keys, attribute names and sequence indices)."""
    if tree is None:
        return {}
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(_key_name(k) for k in path): v for path, v in leaves}


def describe_arrays(tree) -> tuple[dict[str, dict], list[str]]:
    """(``{path: {"shape", "dtype", "checksum"}}``, paths holding non-finite values) of a tree of arrays.
    One device program and one small transfer; every process gets the same answer."""
    flat = flat_arrays(tree)
    names = sorted(flat)
    if not names:
        return {}, []
    sums, finite = jax.device_get(_checksums_and_finite([flat[n] for n in names]))
    out = {n: {"shape": list(flat[n].shape), "dtype": str(flat[n].dtype),
               "checksum": "%08x-%08x" % tuple(int(v) for v in np.asarray(s))} for n, s in zip(names, sums)}
    return out, [n for n, ok in zip(names, finite) if not bool(ok)]


def nonfinite_paths(trees: Mapping[str, Any]) -> list[str]:
    """``item.path`` of every array holding a NaN or an infinity, over ``{item: tree}``."""
    bad = []
    for item, tree in trees.items():
        flat = flat_arrays(tree)
        names = sorted(flat)
        if names:
            _, finite = jax.device_get(_checksums_and_finite([flat[n] for n in names]))
            bad += [f"{item}.{n}" for n, ok in zip(names, finite) if not bool(ok)]
    return bad


# --------------------------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------------------------
def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _digest(manifest: Mapping) -> str:
    return text_sha256(canonical_json({k: v for k, v in manifest.items() if k != "digest"}))


def build_manifest(step: int, array_items: Mapping[str, Any], other_items: Mapping[str, Any]) -> dict:
    """The manifest of a step. ``array_items``: ``{item: tree of arrays}``; ``other_items``: ``{item: JSON-able
    value}`` (its digest is recorded) or ``None`` for per-process items that carry their own digest. Raises
    ``stops.NonFiniteError`` naming every array with a non-finite value: such a state is never saved."""
    arrays, bad = {}, []
    for item, tree in array_items.items():
        arrays[item], nonfinite = describe_arrays(tree)
        bad += [f"{item}.{p}" for p in nonfinite]
    if bad:
        raise NonFiniteError(f"step {step}: refusing to save a state with non-finite values in {bad[:20]}"
                         + (f" (+{len(bad) - 20} more)" if len(bad) > 20 else ""))
    manifest = {"version": FORMAT_VERSION, "step": int(step), "finite": True,
                "items": sorted(list(array_items) + list(other_items)), "arrays": arrays,
                "digests": {k: text_sha256(canonical_json(v)) for k, v in other_items.items() if v is not None}}
    manifest["digest"] = _digest(manifest)
    return manifest


def check_manifest(manifest: Any, where: str) -> dict:
    """The manifest if it is well formed and its own digest matches; else ``CheckpointDamagedError``."""
    if not isinstance(manifest, Mapping) or manifest.get("version") != FORMAT_VERSION:
        raise CheckpointDamagedError(f"{where}: the integrity manifest is unreadable or of an unknown version")
    if manifest.get("digest") != _digest(manifest):
        raise CheckpointDamagedError(f"{where}: the integrity manifest's own digest does not match (damaged)")
    return dict(manifest)


def verify_arrays(manifest: Mapping, item: str, tree, where: str) -> None:
    """Raise ``CheckpointDamagedError`` naming (item, array, problem) for every restored array of ``item`` (all of
    them, or the subset a partial restore took) whose checksum differs from the manifest's."""
    recorded = manifest["arrays"].get(item)
    if recorded is None:
        raise CheckpointDamagedError(f"{where}: the manifest lists no arrays for item {item!r}")
    got, nonfinite = describe_arrays(tree)
    problems = []
    for path, info in sorted(got.items()):
        want = recorded.get(path)
        if want is None:
            problems.append(f"{path}: not in the manifest")
        elif want["dtype"] != info["dtype"]:
            continue  # restored into another dtype (a cast on purpose): the bits cannot be compared
        elif want["checksum"] != info["checksum"]:
            why = "non-finite values, " if path in nonfinite else ""
            problems.append(f"{path}: {why}checksum {info['checksum']}, saved {want['checksum']}")
    if problems:
        raise CheckpointDamagedError(f"{where}: item {item!r} has changed since it was saved:\n    "
                                     + "\n    ".join(problems))


def verify_json(manifest: Mapping, item: str, value, where: str) -> None:
    want = manifest.get("digests", {}).get(item)
    if want is not None and want != text_sha256(canonical_json(value)):
        raise CheckpointDamagedError(f"{where}: item {item!r} has changed since it was saved (SHA-256 differs)")


def manifest_shapes(manifest: Mapping, item: str) -> dict[str, tuple[list, str]]:
    """``{path: (shape, dtype)}`` recorded for ``item``."""
    return {p: (v["shape"], v["dtype"]) for p, v in manifest["arrays"].get(item, {}).items()}
