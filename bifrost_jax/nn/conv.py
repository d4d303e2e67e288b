"""2-D convolution on NHWC with an HWIO kernel, and its input gradient in a form XLA:CPU runs fast.

    y = conv2d(x, kernel, stride=1, padding=((1, 1), (1, 1)))

Forward and the kernel gradient are ``lax.conv_general_dilated`` and its transpose everywhere. The input gradient of a
"same" stride-1 convolution is, on CPU only (``lax.platform_dependent``; TPU and GPU lower the plain transpose),
computed as one matmul ``dY @ K^T`` (the k*k*C_in gradient of each output position's patch) followed by summing the
k*k shifted patch gradients (col2im), when the image has no more positions than the kernel has output channels
(low-resolution, wide layers: SDXL-style 8x8..16x16 stages on a small batch). There XLA:CPU's transposed convolution
first copies the kernel into a flipped, input/output-swapped layout, a strided copy that costs more than the
convolution itself (e.g. 3x3x1024x512: 32 ms against 12 ms for the matmul form, one thread). Same arithmetic, other
summation order: float32 rounding only.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _lax_conv(x, kernel, stride: int, padding):
    return jax.lax.conv_general_dilated(x, kernel, window_strides=(stride, stride), padding=padding,
                                        dimension_numbers=DIMENSION_NUMBERS)


def _same_padding(k: int):
    p = (k - 1) // 2
    return ((p, p), (p, p))


def _input_grad_by_matmul(dy, kernel, x_shape):
    """d(conv)/dx of a stride-1 "same" conv: patch gradients ``dy @ K^T``, then col2im (sum of k*k shifts)."""
    k, _, c, o = kernel.shape
    b, h, w, _ = x_shape
    p = (k - 1) // 2
    patches = jnp.einsum("bhwo,ijco->bhwijc", dy, kernel)  # contracts O: no transposed kernel copy
    padded = sum(jnp.pad(patches[:, :, :, i, j], ((0, 0), (i, k - 1 - i), (j, k - 1 - j), (0, 0)))
                 for i in range(k) for j in range(k))
    return padded[:, p:p + h, p:p + w, :]


@jax.custom_vjp
def _same_conv_cpu(x, kernel):
    return _lax_conv(x, kernel, 1, _same_padding(kernel.shape[0]))


def _same_conv_cpu_fwd(x, kernel):
    return _same_conv_cpu(x, kernel), (x, kernel)


def _same_conv_cpu_bwd(residuals, dy):
    x, kernel = residuals
    padding = _same_padding(kernel.shape[0])
    _, kernel_vjp = jax.vjp(lambda kk: _lax_conv(x, kk, 1, padding), kernel)
    dx = _input_grad_by_matmul(dy, kernel, x.shape).astype(x.dtype)
    return dx, kernel_vjp(dy)[0]


_same_conv_cpu.defvjp(_same_conv_cpu_fwd, _same_conv_cpu_bwd)


def _use_matmul_input_grad(x_shape, kernel_shape, stride: int, padding) -> bool:
    k, k2, _, o = kernel_shape
    positions = x_shape[0] * x_shape[1] * x_shape[2]
    return (stride == 1 and k == k2 and k % 2 == 1 and tuple(map(tuple, padding)) == _same_padding(k)
            and positions <= o)


def conv2d(x, kernel, stride: int = 1, padding: Sequence = ((0, 0), (0, 0))):
    """``lax.conv_general_dilated`` NHWC x HWIO -> NHWC; ``padding`` ((top, bottom), (left, right))."""
    padding = tuple(tuple(int(v) for v in p) for p in padding)
    if not _use_matmul_input_grad(x.shape, kernel.shape, stride, padding):
        return _lax_conv(x, kernel, stride, padding)
    return jax.lax.platform_dependent(x, kernel, cpu=_same_conv_cpu,
                                      default=lambda a, kk: _lax_conv(a, kk, 1, padding))
