"""Meshes from config and multi-host initialisation."""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from bifrost_jax.parallel.rules import MESH_AXES


def resolve_axis_sizes(sizes: Mapping[str, int] | Sequence[int], num_devices: int,
                       axis_names: Sequence[str] = MESH_AXES) -> tuple[int, ...]:
    """Sizes for every axis; one size may be -1 and is filled so the product equals ``num_devices``."""
    if isinstance(sizes, Mapping):
        multislice = {k: v for k, v in sizes.items() if k.startswith("dcn_") and int(v) != 1}
        if multislice:
            raise ValueError(f"mesh: {multislice} asks for several slices; build the mesh with "
                             "bifrost_jax.parallel.multislice.mesh_from_config")
        sizes = {k: v for k, v in sizes.items() if not k.startswith("dcn_")}
        unknown = set(sizes) - set(axis_names)
        if unknown:
            raise ValueError(f"mesh: unknown axis name(s) {sorted(unknown)}; axes are {list(axis_names)}")
        sizes = [int(sizes.get(a, 1)) for a in axis_names]
    sizes = [int(s) for s in sizes]
    if len(sizes) != len(axis_names):
        raise ValueError(f"mesh: {len(sizes)} sizes for axes {list(axis_names)}")
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh: at most one axis size may be -1, got {dict(zip(axis_names, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {dict(zip(axis_names, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices do not divide into {dict(zip(axis_names, sizes))}")
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh: axis sizes {dict(zip(axis_names, sizes))} use {math.prod(sizes)} devices, "
                         f"but {num_devices} are available; set one size to -1 to fill")
    return tuple(sizes)


def make_mesh(sizes: Mapping[str, int] | Sequence[int] | None = None, devices: Sequence[jax.Device] | None = None,
              axis_names: Sequence[str] = MESH_AXES) -> Mesh:
    """A mesh with Auto axes (``jax.jit`` propagates shardings), sizes from config (default: all on ``fsdp``)."""
    devices = list(devices if devices is not None else jax.devices())
    if sizes is None:
        sizes = {"fsdp": -1}
    shape = resolve_axis_sizes(sizes, len(devices), axis_names)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, tuple(axis_names), axis_types=(AxisType.Auto,) * len(shape))
    return Mesh(np.asarray(devices).reshape(shape), tuple(axis_names),
                axis_types=(AxisType.Auto,) * len(shape))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_ids: Sequence[int] | None = None) -> None:
    """Multi-host start-up. With no arguments, JAX reads the TPU/SLURM environment; GPU clusters and local
    multi-process runs pass them explicitly (or through BIFROST_COORDINATOR / BIFROST_NUM_PROCESSES /
    BIFROST_PROCESS_ID)."""
    coordinator_address = coordinator_address or os.environ.get("BIFROST_COORDINATOR")
    if num_processes is None and "BIFROST_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["BIFROST_NUM_PROCESSES"])
    if process_id is None and "BIFROST_PROCESS_ID" in os.environ:
        process_id = int(os.environ["BIFROST_PROCESS_ID"])
    # Checking the backend here would initialise it before jax.distributed; read the environment instead.
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if coordinator_address is not None:
        kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    jax.distributed.initialize(**kwargs)


def maybe_initialize_distributed() -> bool:
    """Join the multi-host run when ``BIFROST_COORDINATOR`` or ``BIFROST_DISTRIBUTED=1`` says there is one."""
    if os.environ.get("BIFROST_COORDINATOR") or os.environ.get("BIFROST_DISTRIBUTED") == "1":
        initialize_distributed()
        return True
    return False
