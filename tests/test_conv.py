"""``nn.conv.conv2d``: the CPU input gradient by matmul + col2im equals the transposed convolution's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bifrost_jax.nn import conv as conv_lib


def _reference(x, kernel, padding):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=conv_lib.DIMENSION_NUMBERS)


@pytest.mark.parametrize("k,hw", [(3, (3, 5)), (1, (4, 2))])
def test_matmul_input_gradient_matches_lax(k, hw):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, *hw, 8)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, 8, 64)), jnp.float32)
    padding = ((k // 2, k // 2),) * 2
    assert conv_lib._use_matmul_input_grad(x.shape, kernel.shape, 1, padding)  # 2*3*5 positions <= 64 channels
    dy = jnp.asarray(rng.standard_normal((2, *hw, 64)), jnp.float32)
    loss = lambda f: (lambda a, w: jnp.sum(f(a, w) * dy))  # noqa: E731
    got = jax.jit(jax.grad(loss(lambda a, w: conv_lib.conv2d(a, w, 1, padding)), argnums=(0, 1)))(x, kernel)
    want = jax.grad(loss(lambda a, w: _reference(a, w, padding)), argnums=(0, 1))(x, kernel)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(conv_lib.conv2d(x, kernel, 1, padding)),
                               np.asarray(_reference(x, kernel, padding)), rtol=1e-6, atol=1e-6)


def test_large_images_keep_the_transposed_convolution():
    assert not conv_lib._use_matmul_input_grad((2, 32, 32, 128), (3, 3, 128, 128), 1, ((1, 1), (1, 1)))
    assert not conv_lib._use_matmul_input_grad((1, 4, 4, 8), (3, 3, 8, 64), 2, ((1, 1), (1, 1)))  # strided
