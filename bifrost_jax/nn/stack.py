"""Repeated blocks: a Python loop of named blocks, or one ``nn.scan`` over stacked parameters.

Both layouts give the same outputs. Unscanned, block i has the name ``f"{name}_{i}"``; scanned, one module
``name`` holds parameters with a leading "layers" axis of size n. Ports handle both (``port.base``).
Remat policies are chosen by name from config.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax

REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
    "save_block_out": jax.checkpoint_policies.save_only_these_names("block_out"),
}


def remat_policy(name: str):
    try:
        return REMAT_POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown remat policy {name!r}; known: {sorted(REMAT_POLICIES)}") from None


def maybe_remat(block_cls, policy_name: str, static_argnums: Sequence[int] = ()):
    if policy_name == "none":
        return block_cls
    return nn.remat(block_cls, policy=remat_policy(policy_name), prevent_cse=True,
                    static_argnums=tuple(static_argnums))


def scanned(block_cls, length: int, *, in_axes: Any = nn.broadcast, remat: str = "none"):
    """A scan of ``block_cls`` over ``length`` layers: the carry is the first argument (and the first output),
    every other argument is broadcast (``in_axes``). The block must return ``(carry, None)`` style via the
    wrapper below."""
    cls = maybe_remat(block_cls, remat)
    return nn.scan(cls, variable_axes={"params": 0, "batch_stats": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=in_axes, length=length, metadata_params={nn.PARTITION_NAME: "layers"})


def stack_name(name: str, i: int) -> str:
    return f"{name}_{i}"
