"""Attention dispatch: the XLA path against jax.nn, structured masks, splash (Pallas interpret mode on CPU, sharded
through shard_map), the cuDNN argument mapping (mocked: no GPU here) and the "auto" choice."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_rel_err

from bifrost_jax.nn import attention as attn
from bifrost_jax.nn.attention import AttentionMask, attention_options, choose_implementation, dot_product_attention
from bifrost_jax.parallel.mesh import make_mesh
from bifrost_jax.parallel.rules import axis_rules


def _qkv(rng, b=2, l=6, s=6, h=4, kh=2, d=8, dtype=jnp.float32):
    q = jnp.asarray(rng.normal(size=(b, l, h, d)), dtype)
    k = jnp.asarray(rng.normal(size=(b, s, kh, d)), dtype)
    v = jnp.asarray(rng.normal(size=(b, s, kh, d)), dtype)
    return q, k, v


def _bifrost_mask(b, l, n_image, pads):
    valid = np.ones((b, l), bool)
    for i, p in enumerate(pads):
        valid[i, :p] = False
    return valid, AttentionMask.padded_self_attention(valid, causal=True, full_suffix=n_image)


# ------------------------------------------------------------------------------------------------------------------
# XLA path
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_xla_matches_jax_nn(kv_heads, rng):
    q, k, v = _qkv(rng, l=5, s=7, kh=kv_heads)
    mask = jnp.asarray(rng.random((2, 1, 5, 7)) > 0.3).at[:, :, :, 0].set(True)  # no empty row: jax.nn averages
    bias = jnp.asarray(rng.normal(size=(2, 4, 5, 7)), jnp.float32)
    for kwargs in ({}, {"mask": mask}, {"bias": bias}, {"mask": mask, "bias": bias, "scale": 0.3}):
        ours = dot_product_attention(q, k, v, implementation="xla", **kwargs)
        ref = jax.nn.dot_product_attention(q, k, v, implementation="xla", **kwargs)
        assert max_rel_err(ours, ref) <= 1e-5, kwargs


def test_causal_mask_matches_jax_nn_is_causal(rng):
    q, k, v = _qkv(rng, l=9, s=9)
    ours = dot_product_attention(q, k, v, mask=AttentionMask(causal=True), implementation="xla")
    ref = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    assert max_rel_err(ours, ref) <= 1e-5


def test_bifrost_mask_dense_semantics():
    """docs/design.md §4.4: causal text, image rows see all real text and all image keys, nothing sees pads, pad rows empty."""
    l, n = 7, 3
    valid, m = _bifrost_mask(2, l, n, pads=(2, 0))
    dense = np.asarray(m.dense(l, l))[:, 0]
    for b in range(2):
        for i in range(l):
            for j in range(l):
                expected = valid[b, i] and valid[b, j] and (j <= i or (i >= l - n and j >= l - n))
                assert dense[b, i, j] == expected, (b, i, j)
    rows = np.asarray(m.row_has_key(l, l))
    np.testing.assert_array_equal(rows, valid)


def test_structured_mask_equals_dense_mask_and_zero_rows(rng):
    q, k, v = _qkv(rng, l=8, s=8)
    valid, m = _bifrost_mask(2, 8, 3, pads=(3, 1))
    out_struct = dot_product_attention(q, k, v, mask=m, implementation="xla")
    out_dense = dot_product_attention(q, k, v, mask=m.dense(8, 8), implementation="xla")
    np.testing.assert_array_equal(np.asarray(out_struct), np.asarray(out_dense))
    assert np.all(np.asarray(out_struct)[0, :3] == 0) and np.all(np.asarray(out_struct)[1, :1] == 0)
    assert np.all(np.abs(np.asarray(out_struct)[0, 3:]).sum(-1) > 0)


# ------------------------------------------------------------------------------------------------------------------
# splash (Pallas interpret mode on CPU)
# ------------------------------------------------------------------------------------------------------------------
def _loss_and_grads(impl, q, k, v, mask):
    def loss(q, k, v):
        o = dot_product_attention(q, k, v, mask=mask, implementation=impl)
        return jnp.sum(o * jnp.cos(o)), o
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def test_splash_interpret_matches_xla(rng):
    """Forward and all three gradients with GQA and the Bifrost mask; L=100 exercises the padding to 128."""
    q, k, v = _qkv(rng, b=2, l=100, s=100, h=2, kh=1, d=128)
    _, mask = _bifrost_mask(2, 100, 30, pads=(17, 0))
    ref_out, ref_grads = _loss_and_grads("xla", q, k, v, mask)
    with attention_options(splash_interpret=True):
        out, grads = _loss_and_grads("splash", q, k, v, mask)
        unmasked = dot_product_attention(q[:1], k[:1], v[:1], implementation="splash")
    assert max_rel_err(out, ref_out) <= 1e-4
    for g, rg in zip(grads, ref_grads):
        assert max_rel_err(g, rg) <= 1e-4
    assert np.all(np.asarray(out)[0, :17] == 0)
    assert max_rel_err(unmasked, dot_product_attention(q[:1], k[:1], v[:1], implementation="xla")) <= 1e-4


def test_splash_sharded_shard_map_matches_xla(rng):
    """Under a (data=2, fsdp=2, tensor=2) mesh splash runs in shard_map over batch and heads; GQA with too few KV
    heads for the tensor axis (1 < 2) takes the repeat-to-MHA path."""
    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, devices=jax.devices()[:4])
    q, k, v = _qkv(rng, b=2, l=128, s=128, h=4, kh=1, d=128)
    _, mask = _bifrost_mask(2, 128, 32, pads=(5, 9))
    ref = dot_product_attention(q, k, v, mask=mask, implementation="xla")
    fn = jax.jit(lambda q, k, v, m: dot_product_attention(q, k, v, mask=m, implementation="splash"))
    with attention_options(splash_interpret=True), axis_rules(mesh):
        text = fn.lower(q, k, v, mask).as_text()
        out = fn(q, k, v, mask)
    assert "shard_map" in text or "manual" in text.lower()
    assert max_rel_err(out, ref) <= 1e-4


def test_splash_refuses_bias_and_dense_masks(rng):
    q, k, v = _qkv(rng, l=128, s=128, d=128)
    with pytest.raises(ValueError, match="additive bias"):
        dot_product_attention(q, k, v, bias=jnp.zeros((1, 1, 128, 128)), implementation="splash")
    with pytest.raises(ValueError, match="dense boolean mask"):
        dot_product_attention(q, k, v, mask=jnp.ones((1, 1, 128, 128), bool), implementation="splash")


# ------------------------------------------------------------------------------------------------------------------
# cuDNN (mocked: the mapping of our arguments onto jax.nn.dot_product_attention)
# ------------------------------------------------------------------------------------------------------------------
def test_cudnn_argument_mapping_mocked(monkeypatch, rng):
    calls = []
    real = jax.nn.dot_product_attention

    def fake(q, k, v, bias=None, mask=None, *, scale=None, is_causal=False, implementation=None, **kw):
        assert implementation == "cudnn"
        calls.append(dict(mask=None if mask is None else mask.shape, bias=None if bias is None else bias.shape,
                          is_causal=is_causal, k_heads=k.shape[2], scale=scale))
        return real(q, k, v, bias=bias, mask=mask, scale=scale, is_causal=is_causal, implementation="xla")

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    q, k, v = _qkv(rng, l=8, s=8, h=4, kh=2)
    _, bif = _bifrost_mask(2, 8, 3, pads=(3, 0))
    dense = jnp.asarray(rng.random((2, 1, 8, 8)) > 0.4).at[1, 0, 2].set(False)  # one fully masked row
    bias = jnp.asarray(rng.normal(size=(2, 4, 8, 8)), jnp.float32)
    key_pad = jnp.arange(8) < 6                                                   # (1, 1, 1, S): a key-padding mask
    cases = [dict(mask=AttentionMask(causal=True)), dict(mask=bif), dict(mask=dense), dict(bias=bias, scale=0.2),
             dict(mask=key_pad[None, None, None, :], bias=bias[:, :1, :1])]
    for kwargs in cases:
        ours = dot_product_attention(q, k, v, implementation="cudnn", **kwargs)
        ref = dot_product_attention(q, k, v, implementation="xla", **kwargs)
        assert max_rel_err(ours, ref) <= 1e-5, kwargs
    assert calls[0]["is_causal"] and calls[0]["mask"] is None          # causal only: no mask tensor
    assert not calls[1]["is_causal"] and calls[1]["mask"] == (2, 1, 8, 8)
    assert all(c["k_heads"] == 2 for c in calls)                         # GQA passed natively, not repeated
    assert calls[3]["bias"] == (2, 4, 8, 8) and calls[3]["scale"] == 0.2
    # JAX's cuDNN lowering needs the full (L, S) in mask and bias ("Bias must have same seq length as QKV"):
    # size-1 query dims are broadcast, the leading ones left as given
    assert calls[4]["mask"] == (1, 1, 8, 8) and calls[4]["bias"] == (2, 1, 8, 8)
    assert np.all(np.asarray(dot_product_attention(q, k, v, mask=dense, implementation="cudnn"))[1, 2] == 0)


# ------------------------------------------------------------------------------------------------------------------
# auto
# ------------------------------------------------------------------------------------------------------------------
def test_auto_choice_by_platform():
    def arr(shape, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct(shape, dtype)
    q, k = arr((2, 256, 8, 128)), arr((2, 256, 8, 128))
    assert choose_implementation(q, k, platform="tpu")[0] == "splash"
    assert choose_implementation(q, k, mask=AttentionMask(causal=True), platform="tpu")[0] == "splash"
    impl, why = choose_implementation(arr((2, 256, 8, 80)), arr((2, 256, 8, 80)), platform="tpu")
    assert impl == "xla" and "head_dim 80" in why
    assert choose_implementation(arr((2, 300, 8, 128)), arr((2, 300, 8, 128)), platform="tpu")[0] == "xla"
    assert choose_implementation(q, k, bias=arr((2, 1, 256, 256)), platform="tpu")[0] == "xla"
    assert choose_implementation(q, k, mask=arr((2, 1, 256, 256), bool), platform="tpu")[0] == "xla"
    assert choose_implementation(q, k, platform="gpu")[0] == "cudnn"
    assert choose_implementation(arr((2, 256, 8, 128), jnp.float32), k, platform="gpu")[0] == "xla"
    assert choose_implementation(q, k, platform="cpu")[0] == "xla"
    assert choose_implementation(q, k)[0] == "xla"  # this host
    with attention_options(platform="tpu"):
        assert choose_implementation(q, k)[0] == "splash"
    with axis_rules(make_mesh({"fsdp": -1})):
        assert attn.target_platform() == "cpu"
    with pytest.raises(ValueError, match="unknown implementation"):
        choose_implementation(q, k, implementation="flash")
