"""Variable trees: flattening, placing on shardings with strict shape accounting, logical-axis boxes.

Every weight that reaches a model goes through :func:`place` (or :func:`place_partial` for copies that enter a
donated train state): a tree that misses, adds or mis-shapes a weight is an error naming each key.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from bifrost_jax.parallel.rules import LOGICAL_AXIS_RULES
from bifrost_jax.checkpoint import shape_mismatches


def dtype_of(name) -> Any:
    return jnp.dtype(name) if name else jnp.float32


def _is_box(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def rebox(boxed, values):
    """``values`` (plain arrays) wearing the logical-axis boxes of ``boxed`` (same structure)."""
    return jax.tree.map(lambda b, v: b.replace_boxed(v) if _is_box(b) else v, boxed, values, is_leaf=_is_box)


def relax_indivisible(variables):
    """Replace logical axis names whose mesh axes do not divide the dimension by None (replicated).

    The VAE's 3-channel output conv (``conv_out`` -> "tensor") cannot be split over a tensor axis of 2 or 4, and
    jit refuses uneven shardings. The StateBuilder traces ``init_variables`` under the mesh, so the abstract mesh
    is known here; without one this is the identity."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or not getattr(mesh, "shape", None):
        return variables
    sizes = dict(mesh.shape)

    def fix(leaf):
        if not isinstance(leaf, nn.LogicallyPartitioned):
            return leaf
        axes = nn.logical_to_mesh_axes(tuple(leaf.names), LOGICAL_AXIS_RULES)
        shape = jnp.shape(leaf.value)
        names = list(leaf.names)
        for i, (name, mesh_axes) in enumerate(zip(leaf.names, axes)):
            if mesh_axes is None:
                continue
            mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
            n = math.prod(sizes.get(a, 1) for a in mesh_axes)
            if shape[i] % n:
                names[i] = None
        return leaf.replace(names=tuple(names)) if names != list(leaf.names) else leaf

    return jax.tree.map(fix, variables, is_leaf=_is_box)


def flat_paths(tree) -> dict:
    return {tuple(str(p) for p in k): v for k, v in traverse_util.flatten_dict(tree).items()} if tree else {}


def place(values, abstract, shardings, what: str):
    """``values`` (a tree like ``abstract``) checked against the expected shapes and put on ``shardings``."""
    fv, fa = flat_paths(values), flat_paths(abstract)
    missing = sorted(set(fa) - set(fv))
    extra = sorted(set(fv) - set(fa))
    wrong = [f"{'.'.join(k)}: {tuple(fv[k].shape)} vs expected {tuple(fa[k].shape)}"
             for k in fa if k in fv and tuple(fv[k].shape) != tuple(fa[k].shape)]
    if missing or extra or wrong:
        raise ValueError(f"{what} does not match the model configured here:"
                         + (f"\n  missing: {['.'.join(k) for k in missing]}" if missing else "")
                         + (f"\n  unexpected: {['.'.join(k) for k in extra]}" if extra else "")
                         + (f"\n  wrong shape: {wrong}" if wrong else ""))
    fs = flat_paths(shardings)
    out = {k: jax.device_put(jnp.asarray(fv[k], fa[k].dtype), fs[k], may_alias=False) for k in fa}
    return traverse_util.unflatten_dict(out)


def check_keys(saved: dict, expected: dict, what: str) -> None:
    """Raise naming every expected key absent from ``saved``, every unexpected one and every wrong shape."""
    missing, extra, wrong = shape_mismatches(saved, expected)
    if missing or extra or wrong:
        raise ValueError(f"{what} does not match the model configured here:"
                         + (f"\n  missing: {['.'.join(k) for k in missing]}" if missing else "")
                         + (f"\n  unexpected: {['.'.join(k) for k in extra]}" if extra else "")
                         + (f"\n  wrong shape: {wrong}" if wrong else ""))

def abstract_dtype(abstract):
    leaves = jax.tree.leaves(abstract["params"] if "params" in abstract else abstract)
    return leaves[0].dtype if leaves else jnp.float32

def merge_trees(*trees):
    flat = {}
    for t in trees:
        flat.update(traverse_util.flatten_dict(t) if t else {})
    return traverse_util.unflatten_dict(flat) if flat else {}

def place_partial(values, abstract, shardings):
    """Copies of ``values`` (a subset of ``abstract``) on their shardings. Never aliases: the copies go into the
    donated train state while their sources stay frozen inputs of the same step."""
    fv, fa, fs = flat_paths(values), flat_paths(abstract), flat_paths(shardings)
    return traverse_util.unflatten_dict({k: jax.device_put(jnp.asarray(v, fa[k].dtype), fs[k], may_alias=False)
                                         for k, v in fv.items()})

