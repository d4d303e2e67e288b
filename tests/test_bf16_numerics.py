"""bf16 numerics of the shared layers against PyTorch's own bf16 runs, with bounds tied to the reference's bf16 error
(no absolute floor): the norms reproduce transformers' / diffusers' bf16 result (statistics in fp32, one rounding
where the reference rounds), and attention keeps its softmax in fp32, so its bf16 error stays of the size of
PyTorch's fused attention's. A norm or a softmax computed in bf16 fails here.

The inputs are the same bf16 values for every run; the fp32 reference runs on them upcast, so only the arithmetic
differs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_rms
from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from transformers.models.t5.modeling_t5 import T5LayerNorm

from bifrost_jax.nn.attention import dot_product_attention
from bifrost_jax.nn.layers import LayerNorm, RMSNorm


@pytest.fixture(scope="module")
def rows():
    """(bf16 torch tensor, its fp32 upcast, weight): 64 rows of width 256, values of scale 3 (so that squares in
    bf16 would lose bits), a non-trivial weight."""
    rng = np.random.default_rng(0)
    x16 = torch.from_numpy((3.0 * rng.standard_normal((64, 256))).astype(np.float32)).bfloat16()
    w = torch.from_numpy((1.0 + 0.3 * rng.standard_normal(256)).astype(np.float32)).bfloat16()
    return x16, x16.float(), w


def _torch_pair(make, weight_name, x16, x32, w):
    """(bf16 output, fp32 output) of the reference norm with weight ``w``."""
    outs = []
    for dtype, x in ((torch.bfloat16, x16), (torch.float32, x32)):
        m = make().to(dtype)
        with torch.no_grad():
            getattr(m, weight_name).copy_(w.to(dtype))
            outs.append(m(x).float().numpy())
    return outs


@pytest.mark.parametrize("reference", ["t5", "qwen2", "diffusers"])
def test_rms_norm_reproduces_the_reference_bf16(rows, reference):
    x16, x32, w = rows
    make = {"t5": lambda: T5LayerNorm(256, eps=1e-6), "qwen2": lambda: Qwen2RMSNorm(256, eps=1e-6),
            "diffusers": lambda: DiffusersRMSNorm(256, eps=1e-6)}[reference]
    torch16, fp32 = _torch_pair(make, "weight", x16, x32, w)
    norm = RMSNorm(eps=1e-6, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ours = jax.jit(norm.apply)({"params": {"scale": jnp.asarray(w.float().numpy(), jnp.bfloat16)}},
                               jnp.asarray(x16.float().numpy(), jnp.bfloat16))
    assert ours.dtype == jnp.bfloat16
    ours = np.asarray(ours, np.float32)
    torch_err = rel_rms(torch16, fp32)
    assert torch_err > 0  # the reference's bf16 run does round
    # the same rounding as the reference: far closer to its bf16 result than that is to fp32 (bf16 statistics
    # put ours as far from it as the reference's own rounding error)
    assert rel_rms(ours, torch16) <= 0.25 * torch_err, (rel_rms(ours, torch16), torch_err)
    assert rel_rms(ours, fp32) <= 1.1 * torch_err


def test_layer_norm_reproduces_torch_bf16(rows):
    x16, x32, w = rows
    outs = []
    for dtype, x in ((torch.bfloat16, x16), (torch.float32, x32)):
        m = torch.nn.LayerNorm(256, eps=1e-6).to(dtype)
        with torch.no_grad():
            m.weight.copy_(w.to(dtype))
            m.bias.copy_((0.5 * w - 0.4).to(dtype))
            outs.append(m(x).float().numpy())
    torch16, fp32 = outs
    norm = LayerNorm(eps=1e-6, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = {"scale": jnp.asarray(w.float().numpy(), jnp.bfloat16),
              "bias": jnp.asarray((0.5 * w - 0.4).float().numpy(), jnp.bfloat16)}
    shapes = jax.eval_shape(norm.init, jax.random.PRNGKey(0), jnp.zeros((1, 256), jnp.bfloat16))["params"]
    assert set(shapes) == set(params)
    ours = np.asarray(jax.jit(norm.apply)({"params": params}, jnp.asarray(x16.float().numpy(), jnp.bfloat16)),
                      np.float32)
    torch_err = rel_rms(torch16, fp32)
    assert rel_rms(ours, torch16) <= 0.25 * torch_err, (rel_rms(ours, torch16), torch_err)


def test_attention_softmax_in_fp32():
    """bf16 q, k, v with logits of a few units: ours against PyTorch's scaled_dot_product_attention (fp32
    accumulation, one rounding of the output). Ours rounds the probabilities once more for the bf16 value matmul
    (~1.3x its error); logits or softmax in bf16 would triple it."""
    rng = np.random.default_rng(1)
    b, l, h, d = 2, 64, 4, 32
    q, k, v = [torch.from_numpy((s * rng.standard_normal((b, l, h, d))).astype(np.float32)).bfloat16()
               for s in (1.5, 1.5, 1.0)]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    heads_first = lambda t: t.transpose(1, 2)  # noqa: E731  (B, L, H, D) <-> (B, H, L, D)
    fp32 = heads_first(sdpa(*[heads_first(t.float()) for t in (q, k, v)])).numpy()
    torch16 = heads_first(sdpa(*[heads_first(t) for t in (q, k, v)])).float().numpy()
    run = jax.jit(lambda *a: dot_product_attention(*a, implementation="xla"))
    ours = run(*[jnp.asarray(t.float().numpy(), jnp.bfloat16) for t in (q, k, v)])
    assert ours.dtype == jnp.bfloat16
    torch_err = rel_rms(torch16, fp32)
    assert torch_err > 0
    assert rel_rms(np.asarray(ours, np.float32), fp32) <= 2.0 * torch_err, (rel_rms(ours, fp32), torch_err)
