"""Bifrost-1's learned 2x latent upsampler (docs/design.md §7.1 item 2): the ``up_sampling_block`` of the latent ControlNet.

It lifts the (h*w) grid of Qwen2.5-VL merger latents (16x16 for a 448-px image) onto the FLUX packed-token grid
(32x32 for 512 px). Mirrors ``NHWCUpsampleBlock`` of the official ``bifrost/models/flux_cnet/controlnet_flux.py``::

    identity = nearest_upsample2x(x)
    y = ReLU(BN1(ConvTranspose2d(C, C, k=2, s=2)(x)))
    y = BN2(Conv2d(C, C, k=3, pad=1)(y))
    out = ReLU(y + identity)

Submodule names (``upconv``, ``bn1``, ``conv``, ``bn2``) are the PyTorch ones, so ``upsampler_key_map`` is a plain
table. BatchNorm follows ``torch.nn.BatchNorm2d`` exactly (see ``BatchNorm2d``), with its statistics in the
"batch_stats" collection: ``module.apply(variables, x, train=True, mutable=["batch_stats"])`` during training.
Porting: ``bifrost_jax.port.vae.upsampler_key_map`` (the key table) and ``load_upsampler`` (both collections).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bifrost_jax.models.flux.vae import Conv2d, nearest_upsample2x
from bifrost_jax.nn.layers import param_with_axes

Dtype = Any


class ConvTranspose2x2(nn.Module):
    """``torch.nn.ConvTranspose2d(C_in, C_out, kernel_size=2, stride=2)`` on NHWC, weight kept in PyTorch layout
    (C_in, C_out, 2, 2). The taps do not overlap, so each input pixel writes one 2x2 output patch: an einsum plus a
    depth-to-space reshape (docs/design.md §12.2), free of ConvTranspose kernel-flip conventions."""
    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        kernel = param_with_axes(self, "kernel", nn.initializers.lecun_normal(in_axis=0, out_axis=1),
                                 (c, self.features, 2, 2), self.param_dtype,
                                 ("conv_in", "conv_out", "conv_hw", None))
        # out[b, 2i+k, 2j+l, o] = sum_c x[b, i, j, c] * W[c, o, k, l]
        y = jnp.einsum("bhwc,cokl->bhkwlo", x.astype(self.dtype), kernel.astype(self.dtype))
        y = y.reshape(b, 2 * h, 2 * w, self.features)
        if self.use_bias:
            bias = param_with_axes(self, "bias", nn.initializers.zeros, (self.features,), self.param_dtype,
                                   ("conv_out",))
            y = y + bias.astype(self.dtype)
        return y


class BatchNorm2d(nn.Module):
    """``torch.nn.BatchNorm2d`` over the channel (last) axis of NHWC, statistics in float32.

    Eval (``train=False``): normalise with the running statistics. Train: normalise with the batch mean and the
    *biased* batch variance, and (unless initialising) update ``mean <- (1-m) mean + m batch_mean`` and
    ``var <- (1-m) var + m batch_var * n/(n-1)`` (the *unbiased* variance, torch's rule; flax's nn.BatchNorm uses
    the biased one), and count ``num_batches_tracked`` (kept for export fidelity; with a fixed momentum torch does
    not use it). Updating needs ``mutable=["batch_stats"]``.
    """
    eps: float = 1e-5
    momentum: float = 0.1
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        c = x.shape[-1]
        scale = param_with_axes(self, "scale", nn.initializers.ones, (c,), self.param_dtype, ("norm",))
        bias = param_with_axes(self, "bias", nn.initializers.zeros, (c,), self.param_dtype, ("norm",))
        # Running statistics stay float32 whatever the parameter dtype: they are accumulated, never trained.
        mean_var = self.variable("batch_stats", "mean",
                                 nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                                 jax.random.PRNGKey(0), (c,), jnp.float32)
        var_var = self.variable("batch_stats", "var",
                                nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                                jax.random.PRNGKey(0), (c,), jnp.float32)
        count = self.variable("batch_stats", "num_batches_tracked",
                              nn.with_logical_partitioning(nn.initializers.zeros, ()),
                              jax.random.PRNGKey(0), (), jnp.int32)
        x32 = x.astype(jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            n = x32.size // c
            if n < 2:
                raise ValueError(f"BatchNorm2d in train mode needs more than 1 value per channel, got input "
                                 f"shape {x.shape} (as torch does)")
            mean = jnp.mean(x32, axis=axes)
            var = jnp.mean(jnp.square(x32 - mean), axis=axes)
            if not self.is_initializing():
                m = self.momentum
                mean_var.value = (1.0 - m) * mean_var.value + m * jax.lax.stop_gradient(mean)
                var_var.value = (1.0 - m) * var_var.value + m * jax.lax.stop_gradient(var) * (n / (n - 1))
                count.value = count.value + 1
        else:
            mean = mean_var.value.astype(jnp.float32)
            var = var_var.value.astype(jnp.float32)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class LatentUpsampler(nn.Module):
    """The Bifrost-1 2x upsampler: (B, h*w, C) row-major tokens -> (B, (2h)*(2w), C) row-major tokens.

    ``grid`` is (h, w). The official block assumes a square grid (h = sqrt(L)); any (h, w) works here.
    """
    channels: int
    grid: tuple[int, int]
    eps: float = 1e-5
    momentum: float = 0.1
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        h, w = self.grid
        if x.ndim != 3 or x.shape[1] != h * w or x.shape[2] != self.channels:
            raise ValueError(f"LatentUpsampler(channels={self.channels}, grid={tuple(self.grid)}) expects input "
                             f"(batch, {h * w}, {self.channels}), got {x.shape}")
        b = x.shape[0]
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        x = x.astype(self.dtype).reshape(b, h, w, self.channels)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bn = dict(eps=self.eps, momentum=self.momentum, **kw)

        identity = nearest_upsample2x(x)
        y = ConvTranspose2x2(self.channels, name="upconv", **kw)(x)
        y = jax.nn.relu(BatchNorm2d(name="bn1", **bn)(y, train))
        y = Conv2d(self.channels, kernel_size=3, padding=1, name="conv", **kw)(y)
        y = BatchNorm2d(name="bn2", **bn)(y, train)
        out = jax.nn.relu(y + identity)
        out = out.reshape(b, 4 * h * w, self.channels)
        return nn.with_logical_constraint(out, ("batch", "length", "act_embed"))
