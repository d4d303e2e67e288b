"""Inception-v3 as the FID metric uses it: pytorch-fid's ``FIDInceptionV3`` (the TensorFlow 2015-12-05 graph of
Heusel et al.'s original FID code), in Flax Linen, NHWC, float32, inference only.

    module, variables = bifrost_jax.port.load("inception-fid", "pt_inception-2015-12-05-6726825d.pth")
    features = module.apply(variables, images)          # (B, 2048) pool3 features; images (B, H, W, 3)
    features, logits = module.apply(variables, images, return_logits=True)   # + the 1008-way fc

``images`` are uint8 in [0, 255] or float in [0, 1] (pytorch-fid's input convention), any size: they are resized to
299x299 exactly as ``F.interpolate(x, (299, 299), mode="bilinear", align_corners=False)`` does (two taps per axis,
no antialiasing), then mapped to [-1, 1] by ``2 x - 1``.

The FID variant differs from torchvision's Inception3 (whose layer and parameter names it keeps, so checkpoints
map by a naming rule, see ``bifrost_jax.port.inception``):
- the 3x3 average pools of the A, C and first E blocks (``Mixed_5b-d``, ``Mixed_6b-e``, ``Mixed_7b``) do not
  count the zero padding (TensorFlow's ``avg_pool``);
- the last E block (``Mixed_7c``) max-pools its pool branch;
- BatchNorm eps is 1e-3, running statistics only (collection ``batch_stats``: ``mean``/``var``);
- ``fc`` has 1008 classes (it is part of the checkpoint; FID uses the 2048-d pool features before it).

The architecture is fixed, so there is no config; the blocks all differ in width, so nothing is scanned.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bifrost_jax.nn.layers import Dense, param_with_axes

Dtype = Any

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
BN_EPS = 1e-3

IMAGE_AXES = ("batch", None, None, "act_embed")  # NHWC activations: shard the batch only
KERNEL_AXES = ("conv_hw", None, "conv_in", "conv_out")
HIGHEST = jax.lax.Precision.HIGHEST  # FID is a metric: never TF32/bf16 passes on accelerators


# ----------------------------------------------------------------------------------------------------------------
# input: torch's bilinear resize (align_corners=False) and pytorch-fid's normalisation

def _bilinear_taps(in_size: int, out_size: int):
    """(i0, i1, w0, w1) per output index, as ATen's ``upsample_bilinear2d`` (align_corners=False, no scale factor
    given) computes them in float32: src = in/out * (dst + 0.5) - 0.5, clamped at 0; the upper tap stops at the
    last row. The multiply-subtract is one fused (FMA, single rounding) operation in PyTorch's compiled kernels: its
    weights differ from two-rounding float32 ones by up to 4e-6 (measured against torch 2.13 CPU), so it is done
    exactly in float64 (the float32 product is exact there) and rounded once."""
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    src = (np.float64(scale) * dst.astype(np.float64) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.floor(src).astype(np.int32)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0).astype(np.int32)
    return i0, i1, (np.float32(1.0) - w1).astype(np.float32), w1


def resize_bilinear(x, size: Sequence[int]):
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` on NHWC float32 (identity at equal
    size, where torch copies too). Separable: rows, then columns, each a two-tap gather."""
    for axis, out in zip((1, 2), size):
        n = x.shape[axis]
        if n == out:
            continue
        i0, i1, w0, w1 = _bilinear_taps(n, out)
        shape = [1] * x.ndim
        shape[axis] = out
        x = (jnp.take(x, i0, axis=axis) * w0.reshape(shape) + jnp.take(x, i1, axis=axis) * w1.reshape(shape))
    return x


def preprocess(images, size: Optional[int] = INPUT_SIZE):
    """uint8 [0, 255] or float [0, 1] NHWC images -> float32 (B, size, size, 3) in [-1, 1] (pytorch-fid: scale to
    [0, 1] as ``ToTensor``, resize, then ``2 x - 1``). ``size=None``: no resize."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"Inception-v3 takes NHWC RGB images (B, H, W, 3), got shape {tuple(images.shape)}")
    if jnp.issubdtype(images.dtype, jnp.integer):
        x = images.astype(jnp.float32) / 255.0
    else:
        x = images.astype(jnp.float32)
    if size is not None:
        x = resize_bilinear(x, (size, size))
    return 2.0 * x - 1.0


# ----------------------------------------------------------------------------------------------------------------
# layers

class BatchNorm(nn.Module):
    """Inference BatchNorm2d (running statistics) in float32: params ``scale``/``bias`` (torch weight/bias),
    ``batch_stats`` ``mean``/``var`` (torch running_mean/running_var)."""
    eps: float = BN_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = param_with_axes(self, "scale", nn.initializers.ones, (c,), self.param_dtype, ("norm",))
        bias = param_with_axes(self, "bias", nn.initializers.zeros, (c,), self.param_dtype, ("norm",))
        mean = self.variable("batch_stats", "mean", nn.with_logical_partitioning(
            lambda s: jnp.zeros(s, self.param_dtype), ("norm",)), (c,)).value
        var = self.variable("batch_stats", "var", nn.with_logical_partitioning(
            lambda s: jnp.ones(s, self.param_dtype), ("norm",)), (c,)).value
        inv = jax.lax.rsqrt(var.astype(jnp.float32) + self.eps) * scale.astype(jnp.float32)
        y = (x.astype(jnp.float32) - mean.astype(jnp.float32)) * inv + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class BasicConv2d(nn.Module):
    """torchvision's ``BasicConv2d``: bias-free conv (submodule ``conv``, HWIO kernel) -> BatchNorm (``bn``) ->
    ReLU. ``kernel_size``/``padding`` are (h, w) pairs (the 1x7 / 7x1 factorised convs) or ints."""
    features: int
    kernel_size: Any = 1
    stride: int = 1
    padding: Any = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kh, kw = (self.kernel_size,) * 2 if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        ph, pw = (self.padding,) * 2 if isinstance(self.padding, int) else tuple(self.padding)
        kernel = _Kernel((kh, kw, x.shape[-1], self.features), self.param_dtype, name="conv")()
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype),
                                         window_strides=(self.stride, self.stride), padding=((ph, ph), (pw, pw)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)
        y = BatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="bn")(y)
        return nn.relu(y)


class _Kernel(nn.Module):
    """The ``conv`` submodule: holds the kernel only (torch ``<name>.conv.weight``, no bias)."""
    shape: tuple
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self):
        return param_with_axes(self, "kernel", nn.initializers.lecun_normal(), self.shape, self.param_dtype,
                               KERNEL_AXES)


def _avg_pool_3x3_exclude_pad(x):
    # TensorFlow's avg_pool (SAME): the zero padding is not counted (pytorch-fid's count_include_pad=False patch)
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


# ----------------------------------------------------------------------------------------------------------------
# Inception blocks (torchvision names; FID pooling)

class _Block(nn.Module):
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def conv(self, features, kernel_size, name, stride=1, padding=0):
        return BasicConv2d(features, kernel_size, stride, padding, dtype=self.dtype, param_dtype=self.param_dtype,
                           name=name)

    def out(self, branches):
        return nn.with_logical_constraint(jnp.concatenate(branches, axis=-1), IMAGE_AXES)


class InceptionA(_Block):
    """``FIDInceptionA`` (Mixed_5b/c/d): 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg-pool (pad excluded) -> 1x1."""
    pool_features: int = 32

    @nn.compact
    def __call__(self, x):
        b1 = self.conv(64, 1, "branch1x1")(x)
        b5 = self.conv(64, 5, "branch5x5_2", padding=2)(self.conv(48, 1, "branch5x5_1")(x))
        b3 = self.conv(64, 1, "branch3x3dbl_1")(x)
        b3 = self.conv(96, 3, "branch3x3dbl_2", padding=1)(b3)
        b3 = self.conv(96, 3, "branch3x3dbl_3", padding=1)(b3)
        bp = self.conv(self.pool_features, 1, "branch_pool")(_avg_pool_3x3_exclude_pad(x))
        return self.out([b1, b5, b3, bp])


class InceptionB(_Block):
    """``InceptionB`` (Mixed_6a, grid reduction): 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max-pool 3x3/2."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv(384, 3, "branch3x3", stride=2)(x)
        bd = self.conv(64, 1, "branch3x3dbl_1")(x)
        bd = self.conv(96, 3, "branch3x3dbl_2", padding=1)(bd)
        bd = self.conv(96, 3, "branch3x3dbl_3", stride=2)(bd)
        return self.out([b3, bd, _max_pool_3x3_s2(x)])


class InceptionC(_Block):
    """``FIDInceptionC`` (Mixed_6b-e): factorised 7x7 branches; avg-pool (pad excluded) -> 1x1."""
    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = self.conv(192, 1, "branch1x1")(x)
        b7 = self.conv(c7, 1, "branch7x7_1")(x)
        b7 = self.conv(c7, (1, 7), "branch7x7_2", padding=(0, 3))(b7)
        b7 = self.conv(192, (7, 1), "branch7x7_3", padding=(3, 0))(b7)
        bd = self.conv(c7, 1, "branch7x7dbl_1")(x)
        bd = self.conv(c7, (7, 1), "branch7x7dbl_2", padding=(3, 0))(bd)
        bd = self.conv(c7, (1, 7), "branch7x7dbl_3", padding=(0, 3))(bd)
        bd = self.conv(c7, (7, 1), "branch7x7dbl_4", padding=(3, 0))(bd)
        bd = self.conv(192, (1, 7), "branch7x7dbl_5", padding=(0, 3))(bd)
        bp = self.conv(192, 1, "branch_pool")(_avg_pool_3x3_exclude_pad(x))
        return self.out([b1, b7, bd, bp])


class InceptionD(_Block):
    """``InceptionD`` (Mixed_7a, grid reduction): 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max-pool 3x3/2."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv(320, 3, "branch3x3_2", stride=2)(self.conv(192, 1, "branch3x3_1")(x))
        b7 = self.conv(192, 1, "branch7x7x3_1")(x)
        b7 = self.conv(192, (1, 7), "branch7x7x3_2", padding=(0, 3))(b7)
        b7 = self.conv(192, (7, 1), "branch7x7x3_3", padding=(3, 0))(b7)
        b7 = self.conv(192, 3, "branch7x7x3_4", stride=2)(b7)
        return self.out([b3, b7, _max_pool_3x3_s2(x)])


class InceptionE(_Block):
    """``FIDInceptionE_1`` (Mixed_7b: avg-pool, pad excluded) / ``FIDInceptionE_2`` (Mixed_7c: ``max_pool``):
    1x1 | 1x1 -> (1x3 | 3x1) | 1x1 -> 3x3 -> (1x3 | 3x1) | pool -> 1x1."""
    pool: str = "avg"  # "avg" (E_1) | "max" (E_2)

    @nn.compact
    def __call__(self, x):
        b1 = self.conv(320, 1, "branch1x1")(x)
        b3 = self.conv(384, 1, "branch3x3_1")(x)
        b3 = [self.conv(384, (1, 3), "branch3x3_2a", padding=(0, 1))(b3),
              self.conv(384, (3, 1), "branch3x3_2b", padding=(1, 0))(b3)]
        bd = self.conv(448, 1, "branch3x3dbl_1")(x)
        bd = self.conv(384, 3, "branch3x3dbl_2", padding=1)(bd)
        bd = [self.conv(384, (1, 3), "branch3x3dbl_3a", padding=(0, 1))(bd),
              self.conv(384, (3, 1), "branch3x3dbl_3b", padding=(1, 0))(bd)]
        if self.pool == "avg":
            pooled = _avg_pool_3x3_exclude_pad(x)
        elif self.pool == "max":
            # pytorch-fid: "the FID Inception model uses max pooling instead of average pooling" here
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            raise ValueError(f"InceptionE.pool must be 'avg' or 'max', got {self.pool!r}")
        bp = self.conv(192, 1, "branch_pool")(pooled)
        return self.out([b1, *b3, *bd, bp])


# ----------------------------------------------------------------------------------------------------------------
# the network

class InceptionV3FID(nn.Module):
    """pytorch-fid's Inception-v3 up to the 2048-d pool3 features (plus the 1008-way ``fc`` of the checkpoint).

    ``__call__(images, return_logits=False)``: (B, 2048) float32 features (``return_logits``: also the (B, 1008)
    logits of ``fc``, as a pair). ``resize_input=False`` feeds images at their own size (pytorch-fid's option of the
    same name); the network is fully convolutional up to the global average pool."""
    num_classes: int = NUM_CLASSES
    resize_input: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images, return_logits: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = preprocess(images, INPUT_SIZE if self.resize_input else None)
        x = nn.with_logical_constraint(x.astype(self.dtype), IMAGE_AXES)

        def conv(features, kernel_size, name, stride=1, padding=0):
            return BasicConv2d(features, kernel_size, stride, padding, name=name, **kw)

        # block 0: input -> first max pool
        x = conv(32, 3, "Conv2d_1a_3x3", stride=2)(x)
        x = conv(32, 3, "Conv2d_2a_3x3")(x)
        x = conv(64, 3, "Conv2d_2b_3x3", padding=1)(x)
        x = _max_pool_3x3_s2(x)
        # block 1: -> second max pool
        x = conv(80, 1, "Conv2d_3b_1x1")(x)
        x = conv(192, 3, "Conv2d_4a_3x3")(x)
        x = nn.with_logical_constraint(_max_pool_3x3_s2(x), IMAGE_AXES)
        # block 2: 35x35 and 17x17 grids
        x = InceptionA(pool_features=32, name="Mixed_5b", **kw)(x)
        x = InceptionA(pool_features=64, name="Mixed_5c", **kw)(x)
        x = InceptionA(pool_features=64, name="Mixed_5d", **kw)(x)
        x = InceptionB(name="Mixed_6a", **kw)(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(channels_7x7=c7, name=name, **kw)(x)
        # block 3: 8x8 grid -> global average pool
        x = InceptionD(name="Mixed_7a", **kw)(x)
        x = InceptionE(pool="avg", name="Mixed_7b", **kw)(x)
        x = InceptionE(pool="max", name="Mixed_7c", **kw)(x)
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        features = nn.with_logical_constraint(features, ("batch", "act_embed"))
        # fc is in every checkpoint (so it loads strictly); under jit it costs nothing when only features are used
        logits = Dense(self.num_classes, kernel_axes=("embed", "vocab"), dtype=jnp.float32,
                       param_dtype=self.param_dtype, precision=HIGHEST, name="fc")(features)
        return (features, logits) if return_logits else features

