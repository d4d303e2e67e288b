"""Dense, norms and embeddings whose parameters carry logical axis names.

Conventions used across bifrost-jax:
- ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype; they are separate fields.
- Norm statistics are computed in float32 whatever the compute dtype (as the PyTorch references do).
- Kernels are (in, out), PyTorch Linear weights transposed; ports do the transpose.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

Dtype = Any
Axes = tuple[str | None, ...]

default_kernel_init = nn.initializers.lecun_normal()


def _mesh_axes(entry) -> tuple[str, ...]:
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def fsdp_gathered(value, axes: Axes):
    """``value`` (a parameter with logical ``axes``) constrained to its compute layout: every dimension whose mesh
    axes overlap those of the logical "batch" axis (the FSDP axis under the rules) is gathered, the others are left
    to the partitioner. A no-op unless logical rules and a mesh (``jax.set_mesh``) are active.

    Why: this is what FSDP does anyway, but left implicit XLA's SPMD partitioner (jax 0.10.2, Shardy and GSPMD)
    can miscompile a dot whose kernel keeps an fsdp-sharded output dimension while the activations are
    batch-sharded over ("data", "fsdp"): it permutes the batch shards to ("fsdp", "data") order and never permutes
    back (wrong values, no error). Repro: tests/repro_xla_spmd_3axis.py; test: tests/test_mesh_consistency.py."""
    rules = nn.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty or mesh.manual_axes:  # nothing to constrain, or inside shard_map
        return value
    batch = set(_mesh_axes(nn.logical_to_mesh_axes(("batch",), rules)[0])) & set(mesh.axis_names)
    if not batch:
        return value
    mesh_spec = nn.logical_to_mesh_axes(tuple(axes), rules)
    gathered = [bool(set(_mesh_axes(entry)) & batch) for entry in mesh_spec]
    if not any(gathered):
        return value
    spec = PartitionSpec(*(None if g else PartitionSpec.UNCONSTRAINED for g in gathered))
    return jax.lax.with_sharding_constraint(value, spec)


def param_with_axes(module: nn.Module, name: str, init: Callable, shape: Sequence[int], dtype: Dtype,
                    axes: Axes):
    """``module.param`` with logical axis names attached (unboxed values are returned), in its compute layout
    (:func:`fsdp_gathered`)."""
    return fsdp_gathered(module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape), dtype), axes)


class Dense(nn.Module):
    """y = x @ kernel + bias, with kernel logical axes ``kernel_axes`` (in-axis, out-axis)."""
    features: int
    use_bias: bool = True
    kernel_axes: Axes = ("embed", "mlp")
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = default_kernel_init
    bias_init: Callable = nn.initializers.zeros
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        kernel = param_with_axes(self, "kernel", self.kernel_init, (x.shape[-1], self.features),
                                 self.param_dtype, self.kernel_axes)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype), precision=self.precision)
        if self.use_bias:
            bias = param_with_axes(self, "bias", self.bias_init, (self.features,), self.param_dtype,
                                   (self.kernel_axes[-1],))
            y = y + bias.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """RMSNorm in float32; the scale multiplies the result cast back to the input dtype (HF Qwen/T5 order)."""
    eps: float = 1e-6
    use_scale: bool = True
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    scale_init: Callable = nn.initializers.ones
    # "input": weight * x.astype(input dtype) (HF Qwen2/T5); "fp32": (x * weight) in fp32, then cast (diffusers).
    scale_order: str = "input"

    @nn.compact
    def __call__(self, x):
        in_dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        if not self.use_scale:
            return x32.astype(self.dtype)
        scale = param_with_axes(self, "scale", self.scale_init, (x.shape[-1],), self.param_dtype, ("norm",))
        if self.scale_order == "fp32":
            return (x32 * scale.astype(jnp.float32)).astype(self.dtype)
        return scale.astype(self.dtype) * x32.astype(in_dtype).astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm in float32, optional affine (FLUX uses elementwise_affine=False)."""
    eps: float = 1e-6
    use_scale: bool = True
    use_bias: bool = True
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        if self.use_scale:
            y = y * param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype,
                                    ("norm",)).astype(jnp.float32)
        if self.use_bias:
            y = y + param_with_axes(self, "bias", nn.initializers.zeros, (x.shape[-1],), self.param_dtype,
                                    ("norm",)).astype(jnp.float32)
        return y.astype(self.dtype)


class GroupNorm(nn.Module):
    """GroupNorm over NHWC in float32 (PyTorch semantics: statistics per sample and group over H, W, C/G)."""
    num_groups: int = 32
    eps: float = 1e-6
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels do not divide into {self.num_groups} groups")
        x32 = x.astype(jnp.float32)
        g = x32.reshape(x.shape[:-1] + (self.num_groups, c // self.num_groups))
        red = tuple(range(1, g.ndim - 2)) + (g.ndim - 1,)
        mean = jnp.mean(g, axis=red, keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=red, keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        scale = param_with_axes(self, "scale", nn.initializers.ones, (c,), self.param_dtype, ("norm",))
        bias = param_with_axes(self, "bias", nn.initializers.zeros, (c,), self.param_dtype, ("norm",))
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class Embed(nn.Module):
    """Token embedding table (vocab, embed)."""
    num_embeddings: int
    features: int
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    axes: Axes = ("vocab", "embed")

    @nn.compact
    def __call__(self, ids):
        table = param_with_axes(self, "embedding", nn.initializers.normal(0.02),
                                (self.num_embeddings, self.features), self.param_dtype, self.axes)
        return jnp.take(table, ids, axis=0).astype(self.dtype)


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def gelu_erf(x):
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": gelu_erf,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_tanh": gelu_tanh,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None
