"""The one table that maps logical axis names to mesh axes.

Every parameter and activation in bifrost-jax carries logical axis names (``nn.with_logical_partitioning`` and
``nn.with_logical_constraint``); this table is the only place that decides how they land on the mesh
``("data", "fsdp", "tensor")``. Rules are tried in order; a logical name absent from the table is replicated.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),            # sequence positions (text, image tokens, patches)
    ("act_embed", None),         # hidden width of activations
    ("act_heads", "tensor"),     # attention heads of activations
    ("act_mlp", "tensor"),       # MLP hidden of activations
    ("act_kv", None),
    # parameters
    ("layers", None),            # the stacked axis of scanned blocks
    ("embed", "fsdp"),           # model width (rows of most kernels)
    ("mlp", "tensor"),           # MLP hidden
    ("heads", "tensor"),         # attention heads (q/k/v/o fused "heads*kv" columns)
    ("kv_heads", "tensor"),
    ("kv", None),                # head dim
    ("vocab", "tensor"),
    ("norm", None),              # norm scales and biases
    ("conv_in", None),           # conv kernels: input channels
    ("conv_out", "tensor"),      # conv kernels: output channels
    ("conv_hw", None),           # conv spatial taps
    ("cond", "fsdp"),            # conditioning inputs (CLIP-latent width, VAE channels)
)


def logical_to_mesh_spec(logical: Sequence[str | None] | None, rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
    """PartitionSpec for one tuple of logical names."""
    if logical is None:
        return PartitionSpec()
    return nn.logical_to_mesh_axes(tuple(logical), rules)


def batch_shards(mesh: Mesh | None, rules=LOGICAL_AXIS_RULES) -> int:
    """Into how many parts the logical "batch" axis splits over ``mesh`` (1 without a mesh): batches are padded to a
    multiple of it."""
    if mesh is None:
        return 1
    spec = logical_to_mesh_spec(("batch",), rules)[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    size = 1
    for a in axes:
        size *= mesh.shape[a]
    return size


def tree_shardings(logical_specs, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """NamedShardings for a tree of logical PartitionSpecs (from ``nn.get_partition_spec``)."""
    mesh_specs = nn.logical_to_mesh(logical_specs, rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), mesh_specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def fit_sharding(sharding, shape: Sequence[int]):
    """``sharding`` with every mesh axis that does not divide its array dimension dropped (that dimension is
    replicated instead). ``jax.device_put`` refuses uneven shardings; a 3-channel RGB conv or a vocabulary not
    divisible by the tensor axis must still load."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    mesh = sharding.mesh
    entries = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    fitted = []
    for dim, entry in zip(shape, entries):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        size = 1
        for a in axes:
            size *= mesh.shape[a]
        fitted.append(entry if size == 1 or dim % size == 0 else None)
    return NamedSharding(mesh, PartitionSpec(*fitted))


@contextlib.contextmanager
def axis_rules(mesh: Mesh | None = None, rules=LOGICAL_AXIS_RULES) -> Iterator[None]:
    """Activate the rules (for ``nn.with_logical_constraint``) and, if given, the mesh."""
    with nn.logical_axis_rules(rules):
        if mesh is None:
            yield
        else:
            with jax.set_mesh(mesh):
                yield


def abstract_variables(init_fn, mesh: Mesh | None = None, rules=LOGICAL_AXIS_RULES):
    """``jax.ShapeDtypeStruct``s of the (logically boxed) variables ``init_fn(rng)`` returns, carrying their
    shardings on ``mesh`` by the rules (without a mesh: this host's first device). Nothing is allocated: this is the
    abstract state every placed init or restore starts from."""
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)  # an abstract PRNG key: no array on a (possibly absent) device
    with axis_rules(mesh, rules):
        boxed = jax.eval_shape(init_fn, key)
    shapes = nn.meta.unbox(boxed)
    if mesh is None:
        single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: single, shapes)
    else:
        shardings = tree_shardings(nn.get_partition_spec(boxed), mesh, rules)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
