"""Meshes that span several TPU slices (or GPU nodes): ICI axes inside a slice, DCN axes across slices.

``config.mesh`` holds the per-slice (ICI) sizes ``data``, ``fsdp``, ``tensor`` and, for multislice, the
cross-slice (DCN) factors ``dcn_data``, ``dcn_fsdp``, ``dcn_tensor`` (default 1; one of them may be -1 = all
slices). Mesh axis ``a`` then has size ``a * dcn_a`` and its DCN factor is the slow, outer part: slice ``j`` holds
one contiguous block of it. Put only data parallelism across slices (``dcn_data``; ``dcn_fsdp`` if a model does
not fit one slice): gradients then cross DCN once per step, parameters never.

    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "dcn_data": -1})  # 2 x v5p-128 ...

Slices are told apart by ``device.slice_index`` (TPU multislice) or, where devices have none (GPU nodes),
``device.process_index``; ``granule_key`` overrides this (tests group simulated CPU devices into fake slices).
"""
from __future__ import annotations

import collections
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from bifrost_jax.parallel.mesh import make_mesh, resolve_axis_sizes
from bifrost_jax.parallel.rules import MESH_AXES

DCN_PREFIX = "dcn_"


def split_mesh_config(sizes: Mapping[str, int], axis_names: Sequence[str] = MESH_AXES):
    """``{"data": 2, "dcn_data": 4, ...}`` -> (ICI sizes dict, DCN sizes dict); unknown keys raise."""
    known = set(axis_names) | {DCN_PREFIX + a for a in axis_names}
    unknown = sorted(set(sizes) - known)
    if unknown:
        raise ValueError(f"mesh: unknown key(s) {unknown}; allowed: {sorted(known)}")
    ici = {a: int(sizes[a]) for a in axis_names if a in sizes}
    dcn = {a: int(sizes.get(DCN_PREFIX + a, 1)) for a in axis_names}
    return ici, dcn


def default_granule_key(device) -> Any:
    index = getattr(device, "slice_index", None)
    return device.process_index if index is None else index


def granules(devices: Sequence, granule_key: Optional[Callable[[Any], Any]] = None) -> list[list]:
    """Devices grouped by slice (sorted by key; devices keep their order inside a slice)."""
    key = granule_key or default_granule_key
    groups: dict[Any, list] = collections.defaultdict(list)
    for d in devices:
        groups[key(d)].append(d)
    return [groups[k] for k in sorted(groups)]


def make_hybrid_mesh(ici_sizes: Mapping[str, int], dcn_sizes: Mapping[str, int],
                     devices: Optional[Sequence] = None, *, granule_key: Optional[Callable[[Any], Any]] = None,
                     axis_names: Sequence[str] = MESH_AXES) -> Mesh:
    """A mesh whose axis ``a`` has size ``ici[a] * dcn[a]``: inside each slice a physical-topology-aware
    ``mesh_utils.create_device_mesh(ici)``, slices tiled over the DCN shape (as
    ``mesh_utils.create_hybrid_device_mesh``, with a configurable notion of slice). -1 fills ICI sizes from the
    devices per slice and a DCN size from the number of slices."""
    devices = list(devices if devices is not None else jax.devices())
    groups = granules(devices, granule_key)
    sizes = {len(g) for g in groups}
    if len(sizes) != 1:
        raise ValueError(f"mesh: slices have different device counts {sorted(len(g) for g in groups)}")
    dcn_shape = resolve_axis_sizes(dict(dcn_sizes), len(groups), axis_names)
    ici_shape = resolve_axis_sizes(dict(ici_sizes), sizes.pop(), axis_names)
    per_slice = [mesh_utils.create_device_mesh(ici_shape, g, allow_split_physical_axes=True) for g in groups]
    layout = np.arange(len(groups)).reshape(dcn_shape)
    blocks = np.vectorize(lambda i: per_slice[i], otypes=[object])(layout)
    device_array = np.block(blocks.tolist())
    assert device_array.shape == tuple(i * d for i, d in zip(ici_shape, dcn_shape))
    return Mesh(device_array, tuple(axis_names), axis_types=(AxisType.Auto,) * len(axis_names))


def mesh_from_config(sizes: Mapping[str, int] | None, devices: Optional[Sequence] = None, *,
                     granule_key: Optional[Callable[[Any], Any]] = None,
                     axis_names: Sequence[str] = MESH_AXES) -> Mesh:
    """The mesh for ``config.mesh``: a plain ``make_mesh`` when every DCN factor is 1, else a hybrid mesh."""
    ici, dcn = split_mesh_config(dict(sizes or {"fsdp": -1}), axis_names)
    if all(v == 1 for v in dcn.values()):
        return make_mesh(ici or None, devices=devices, axis_names=axis_names)
    return make_hybrid_mesh(ici, dcn, devices, granule_key=granule_key, axis_names=axis_names)


def dcn_size(sizes: Mapping[str, int] | None, axis_names: Sequence[str] = MESH_AXES) -> int:
    """The number of slices ``config.mesh`` asks for (product of DCN factors; -1 counts as unknown = 0)."""
    _, dcn = split_mesh_config(dict(sizes or {}), axis_names)
    return 0 if any(v == -1 for v in dcn.values()) else math.prod(dcn.values())
