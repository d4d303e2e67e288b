"""The shared foundation: mesh, rules, safetensors I/O, the port error report, attention."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bifrost_jax.nn.attention import dot_product_attention
from bifrost_jax.parallel.mesh import make_mesh, resolve_axis_sizes
from bifrost_jax.port import base


def test_eight_devices():
    assert jax.device_count() == 8


def test_mesh_fill_and_errors():
    assert resolve_axis_sizes({"fsdp": -1, "tensor": 2}, 8) == (1, 4, 2)
    with pytest.raises(ValueError, match="at most one"):
        resolve_axis_sizes({"fsdp": -1, "tensor": -1}, 8)
    with pytest.raises(ValueError, match="unknown axis"):
        resolve_axis_sizes({"model": 2}, 8)
    with pytest.raises(ValueError, match="use 6 devices"):
        resolve_axis_sizes({"fsdp": 3, "tensor": 2}, 8)
    mesh = make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_safetensors_roundtrip_bf16(tmp_path):
    import ml_dtypes
    tensors = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
               "b": np.ones((4,), dtype=ml_dtypes.bfloat16)}
    f = str(tmp_path / "m.safetensors")
    base.write_safetensors(f, tensors)
    r = base.SafetensorsReader(str(tmp_path))
    assert r.keys() == ["a.weight", "b"]
    np.testing.assert_array_equal(r.get("a.weight"), tensors["a.weight"])
    assert r.get("b").dtype == ml_dtypes.bfloat16
    # torch's reader agrees with ours
    from safetensors.numpy import load_file
    np.testing.assert_array_equal(load_file(f)["a.weight"], tensors["a.weight"])


def test_sharded_index(tmp_path):
    base.write_safetensors(str(tmp_path / "m-1.safetensors"), {"x": np.zeros(2, np.float32)})
    base.write_safetensors(str(tmp_path / "m-2.safetensors"), {"y": np.ones(3, np.float32)})
    with open(tmp_path / "m.safetensors.index.json", "w") as fh:
        json.dump({"weight_map": {"x": "m-1.safetensors", "y": "m-2.safetensors"}}, fh)
    r = base.SafetensorsReader(str(tmp_path))
    assert r.shape("y") == (3,) and r.get("x").sum() == 0


def test_port_error_lists_everything():
    expected = {"dense": {"kernel": jax.ShapeDtypeStruct((3, 4), jnp.float32),
                          "bias": jax.ShapeDtypeStruct((4,), jnp.float32)},
                "layers": {"w": jax.ShapeDtypeStruct((2, 5), jnp.float32)}}
    key_map = {("dense", "kernel"): base.src("fc.weight", base.LINEAR), ("dense", "bias"): base.src("fc.bias"),
               **base.prefixed(("layers",), base.stacked_map(lambda i: {("w",): base.src(f"l.{i}.w")}, 2))}
    good = {"fc.weight": np.ones((4, 3)), "fc.bias": np.zeros(4), "l.0.w": np.zeros(5), "l.1.w": np.ones(5)}
    params = base.load_mapped(good, key_map, expected)
    assert params["layers"]["w"].shape == (2, 5) and float(params["layers"]["w"][1, 0]) == 1.0
    np.testing.assert_array_equal(base.export_mapped(params, key_map)["fc.weight"], good["fc.weight"])
    bad = dict(good)
    del bad["fc.bias"]
    bad["extra.w"] = np.zeros(1)
    bad["fc.weight"] = np.ones((3, 3))
    with pytest.raises(base.PortError) as e:
        base.load_mapped(bad, key_map, expected)
    msg = str(e.value)
    assert "fc.bias" in msg and "extra.w" in msg and "fc.weight" in msg and "(4, 3)" in msg


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_gqa_matches_dense(kv_heads, rng):
    b, l, s, h, d = 2, 5, 7, 4, 8
    q = jnp.asarray(rng.normal(size=(b, l, h, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, s, kv_heads, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, s, kv_heads, d)), jnp.float32)
    mask = jnp.asarray(rng.random((b, 1, l, s)) > 0.3)
    mask = mask.at[0, 0, 0].set(False)  # a fully masked row must give zeros, not NaN
    out = dot_product_attention(q, k, v, mask=mask)
    rep = h // kv_heads
    kr, vr = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    logits = np.einsum("blhd,bshd->bhls", q, kr) / np.sqrt(d)
    logits = np.where(mask, logits, -np.inf)
    with np.errstate(invalid="ignore"):
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p = p / p.sum(-1, keepdims=True)
    p = np.nan_to_num(p)
    ref = np.einsum("bhls,bshd->blhd", p, vr)
    assert not np.isnan(np.asarray(out)).any()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(out)[0, 0] == 0)


def test_fit_sharding_replicates_uneven_dims():
    from jax.sharding import NamedSharding, PartitionSpec as P

    from bifrost_jax.parallel.rules import fit_sharding
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    s = NamedSharding(mesh, P("fsdp", "tensor"))
    assert fit_sharding(s, (4, 8)).spec == P("fsdp", "tensor")
    assert fit_sharding(s, (4, 3)).spec == P("fsdp", None)       # 3 RGB channels over tensor=4: replicated
    assert fit_sharding(s, (3, 8)).spec == P(None, "tensor")
    # and load_mapped places such a tensor instead of failing
    expected = {"w": jax.ShapeDtypeStruct((4, 3), jnp.float32)}
    params = base.load_mapped({"w": np.ones((4, 3))}, {("w",): base.src("w")}, expected, shardings={"w": s})
    assert params["w"].sharding.spec == P("fsdp", None)
