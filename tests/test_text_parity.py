"""FLUX's text encoders against transformers: T5EncoderModel (text_encoder_2) and CLIPTextModel (text_encoder).

Tiny random-init references with every parameter re-randomised (norm scales, biases, the relative bias table), run
in float32 next to the Flax ports on padded batches; scanned == unscanned; export -> from_pretrained round trips;
port errors name the missing / unexpected key; the tied T5 embedding in every layout a checkpoint may use.
"""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_rel_err, rel_rms
from transformers import CLIPTextConfig as HFCLIPTextConfig
from transformers import CLIPTextModel as HFCLIPTextModel
from transformers import T5Config as HFT5Config
from transformers import T5EncoderModel as HFT5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention as HFT5Attention

import bifrost_jax.port as port
from bifrost_jax.models.text import CLIPTextConfig, T5EncoderConfig
from bifrost_jax.models.text.t5 import relative_position_bucket
from bifrost_jax.port.base import PortError, SafetensorsReader, flatten, write_safetensors

TOL = 1e-4

T5_TINY = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
               relative_attention_num_buckets=32, relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
               dropout_rate=0.0)
CLIP_TINY = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                 max_position_embeddings=16, hidden_act="quick_gelu", attention_dropout=0.0, bos_token_id=0,
                 pad_token_id=1)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (no zero bias, no unit norm scale), so a missed or mis-mapped weight shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            elif "embed" in name or "shared" in name or "relative_attention_bias" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))


def _save(model, path):
    model.save_pretrained(path)
    return str(path)


def _padded_batch(rng, length, vocab, pad_len, low=3):
    ids = rng.integers(low, vocab, size=(2, length)).astype(np.int64)
    mask = np.ones((2, length), np.int64)
    mask[1, length - pad_len:] = 0
    return ids, mask


def _rewrite(src_dir, dst_dir, edit):
    """Copy a checkpoint directory with its tensors passed through ``edit(dict) -> dict``."""
    os.makedirs(dst_dir, exist_ok=True)
    reader = SafetensorsReader(src_dir)
    tensors = edit({k: np.array(reader.get(k)) for k in reader.keys()})
    write_safetensors(os.path.join(dst_dir, "model.safetensors"), tensors)
    with open(os.path.join(src_dir, "config.json")) as f, open(os.path.join(dst_dir, "config.json"), "w") as g:
        g.write(f.read())
    return str(dst_dir)


def _run(module, variables, *args):
    return jax.jit(module.apply)(variables, *(jnp.asarray(a) for a in args))


# ----------------------------------------------------------------------------------------------------------------
# T5

@pytest.fixture(scope="module")
def t5_ref(tmp_path_factory):
    torch.manual_seed(0)
    model = HFT5EncoderModel(HFT5Config(**T5_TINY)).eval()
    _randomise(model, 1)
    path = _save(model, tmp_path_factory.mktemp("t5"))
    ids, mask = _padded_batch(np.random.default_rng(0), 24, 100, pad_len=7)  # 24 > max_distance: log buckets
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    return model, path, ids, mask, out


def test_t5_relative_buckets_match_transformers():
    for (q, k), (nb, md) in [((512, 512), (32, 128)), ((24, 24), (32, 20)), ((7, 40), (16, 64))]:
        rel = torch.arange(k)[None, :] - torch.arange(q)[:, None]
        expected = HFT5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=nb, max_distance=md)
        np.testing.assert_array_equal(relative_position_bucket(q, k, nb, md), expected.numpy())


def test_t5_parity_and_scan(t5_ref):
    _, path, ids, mask, expected = t5_ref
    module, variables = port.load("t5-encoder", path)
    out = _run(module, variables, ids, mask)
    err = max_rel_err(out, expected)
    print(f"t5 last_hidden_state max_rel_err={err:.2e}")
    assert err <= TOL

    scan_module, scan_vars = port.load("t5-encoder", path, scan_layers=True, remat_policy="full")
    assert flatten(scan_vars["params"])[("block", "ff", "wo", "kernel")].shape == (3, 48, 32)
    scan_err = max_rel_err(_run(scan_module, scan_vars, ids, mask), out)
    print(f"t5 scanned vs unscanned max_rel_err={scan_err:.2e}")
    assert scan_err <= 1e-6

    # the mask matters (a port that ignored it would still match on the unpadded row only)
    unmasked = _run(module, variables, ids, np.ones_like(mask))
    assert max_rel_err(unmasked[1], expected[1]) > 1e-3
    np.testing.assert_allclose(unmasked[0], out[0], rtol=0, atol=1e-5)


def test_t5_relu_ff_parity(tmp_path):
    cfg = dict(T5_TINY, feed_forward_proj="relu", num_layers=2)
    model = HFT5EncoderModel(HFT5Config(**cfg)).eval()
    _randomise(model, 2)
    path = _save(model, tmp_path / "t5relu")
    ids, mask = _padded_batch(np.random.default_rng(1), 10, 100, pad_len=3)
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    module, variables = port.load("t5-encoder", path)
    assert not module.config.is_gated_act and module.config.dense_act_fn == "relu"
    err = max_rel_err(_run(module, variables, ids, mask), expected.numpy())
    print(f"t5 (relu FF) max_rel_err={err:.2e}")
    assert err <= TOL


def test_t5_tied_embedding_layouts(t5_ref, tmp_path):
    _, path, ids, mask, expected = t5_ref
    shared = "shared.weight"
    tied = "encoder.embed_tokens.weight"
    assert shared in SafetensorsReader(path) and tied not in SafetensorsReader(path)  # transformers 5 saves one
    both = _rewrite(path, tmp_path / "both", lambda t: {**t, tied: t[shared]})  # older files may hold both
    only_tied = _rewrite(path, tmp_path / "only_tied",
                         lambda t: {(tied if k == shared else k): v for k, v in t.items()})
    for p in (both, only_tied):
        module, variables = port.load("t5-encoder", p)
        assert max_rel_err(_run(module, variables, ids, mask), expected) <= TOL, p


def test_t5_export_round_trip(t5_ref, tmp_path):
    model, path, ids, mask, expected = t5_ref
    for scan in (False, True):
        module, variables = port.load("t5-encoder", path, scan_layers=scan)
        out_dir = str(tmp_path / f"export_scan{scan}")
        port.save("t5-encoder", module, variables, out_dir)
        reloaded, info = HFT5EncoderModel.from_pretrained(out_dir, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        ref_sd, new_sd = model.state_dict(), reloaded.state_dict()
        assert set(ref_sd) == set(new_sd)
        for k in ref_sd:
            assert torch.equal(ref_sd[k], new_sd[k]), k
        with torch.no_grad():
            out = reloaded.eval()(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        np.testing.assert_array_equal(out.last_hidden_state.numpy(), expected)


def test_t5_port_errors_name_keys(t5_ref, tmp_path):
    _, path, *_ = t5_ref
    missing_key = "encoder.block.2.layer.1.DenseReluDense.wi_1.weight"
    extra_key = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"  # an umT5-style per-layer bias
    missing = _rewrite(path, tmp_path / "missing", lambda t: {k: v for k, v in t.items() if k != missing_key})
    with pytest.raises(PortError, match="missing keys.*" + missing_key.replace(".", r"\.")):
        port.load("t5-encoder", missing)
    extra = _rewrite(path, tmp_path / "extra", lambda t: {**t, extra_key: np.zeros((32, 4), np.float32)})
    with pytest.raises(PortError, match="unexpected keys.*" + extra_key.replace(".", r"\.")):
        port.load("t5-encoder", extra)
    # both tied copies absent: the embedding is reported missing under the name transformers saves
    no_embed = _rewrite(path, tmp_path / "no_embed", lambda t: {k: v for k, v in t.items() if k != "shared.weight"})
    with pytest.raises(PortError, match=r"missing keys.*shared\.weight"):
        port.load("t5-encoder", no_embed)


def test_t5_config_rejects_unsupported():
    base = HFT5Config(**T5_TINY).to_dict()
    assert T5EncoderConfig.from_hf_config(base).to_hf_config()["feed_forward_proj"] == "gated-gelu"
    for field, value in (("model_type", "umt5"), ("is_decoder", True), ("feed_forward_proj", "gated-mish")):
        with pytest.raises(ValueError, match=field):
            T5EncoderConfig.from_hf_config({**base, field: value})


# ----------------------------------------------------------------------------------------------------------------
# CLIP

def _clip_ref(tmp_path, eos_token_id, seed):
    torch.manual_seed(seed)
    model = HFCLIPTextModel(HFCLIPTextConfig(**CLIP_TINY, eos_token_id=eos_token_id)).eval()
    _randomise(model, seed)
    path = _save(model, tmp_path / f"clip_eos{eos_token_id}")
    rng = np.random.default_rng(seed)
    ids, mask = _padded_batch(rng, 12, 45, pad_len=4)  # ids 3..44: no random 2, 50 or 99
    # put end-of-text tokens where the two pooling rules disagree: a 2 early and the largest id (99) later in
    # row 0; in row 1 eos_token_id twice, and the largest id before them
    ids[0, 3], ids[0, 8] = 2, 99
    ids[1, 2], ids[1, 5], ids[1, 7] = 99, 50, 50
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    return model, path, ids, mask, out.last_hidden_state.numpy(), out.pooler_output.numpy()


@pytest.mark.parametrize("eos_token_id,expected_positions", [(2, [8, 2]), (50, [0, 5])])
def test_clip_parity_scan_and_export(tmp_path, eos_token_id, expected_positions):
    model, path, ids, mask, last, pooled = _clip_ref(tmp_path, eos_token_id, seed=3 + eos_token_id)
    # the reference pooled exactly where this test says each rule pools (so the two cases really differ)
    np.testing.assert_array_equal(pooled, last[np.arange(2), expected_positions])

    module, variables = port.load("clip-text", path)
    out_last, out_pooled = _run(module, variables, ids, mask)
    err_last, err_pooled = max_rel_err(out_last, last), max_rel_err(out_pooled, pooled)
    print(f"clip eos={eos_token_id}: last_hidden max_rel_err={err_last:.2e} pooled max_rel_err={err_pooled:.2e}")
    assert err_last <= TOL and err_pooled <= TOL

    scan_module, scan_vars = port.load("clip-text", path, scan_layers=True, remat_policy="dots")
    s_last, s_pooled = _run(scan_module, scan_vars, ids, mask)
    assert max_rel_err(s_last, out_last) <= 1e-6 and max_rel_err(s_pooled, out_pooled) <= 1e-6

    # export (scanned layout, written with the text_model. prefix of FLUX's files) -> transformers, exactly
    out_dir = str(tmp_path / f"export_eos{eos_token_id}")
    port.save("clip-text", scan_module, scan_vars, out_dir)
    assert all(k.startswith("text_model.") for k in SafetensorsReader(out_dir).keys())
    reloaded, info = HFCLIPTextModel.from_pretrained(out_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for k, v in model.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k
    with torch.no_grad():
        r = reloaded.eval()(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    np.testing.assert_array_equal(r.last_hidden_state.numpy(), last)
    np.testing.assert_array_equal(r.pooler_output.numpy(), pooled)
    # and the prefixed layout loads back into Flax
    module2, variables2 = port.load("clip-text", out_dir)
    assert max_rel_err(_run(module2, variables2, ids, mask)[0], last) <= TOL


def test_clip_port_errors_name_keys(tmp_path):
    torch.manual_seed(0)
    model = HFCLIPTextModel(HFCLIPTextConfig(**CLIP_TINY, eos_token_id=2)).eval()
    path = _save(model, tmp_path / "clip")
    missing_key = "encoder.layers.1.mlp.fc2.bias"
    missing = _rewrite(path, tmp_path / "missing", lambda t: {k: v for k, v in t.items() if k != missing_key})
    with pytest.raises(PortError, match="missing keys.*" + missing_key.replace(".", r"\.")):
        port.load("clip-text", missing)
    extra = _rewrite(path, tmp_path / "extra", lambda t: {**t, "text_projection.weight": np.zeros((8, 32), np.float32)})
    with pytest.raises(PortError, match=r"unexpected keys.*text_projection\.weight"):
        port.load("clip-text", extra)


def test_clip_config_rejects_unsupported():
    base = HFCLIPTextConfig(**CLIP_TINY).to_dict()
    assert CLIPTextConfig.from_hf_config(base).hidden_act == "quick_gelu"
    for field, value in (("hidden_act", "mish"), ("eos_token_id", [2, 3]), ("model_type", "siglip_text_model")):
        with pytest.raises(ValueError, match=field):
            CLIPTextConfig.from_hf_config({**base, field: value})


def test_sharded_load_and_forward(t5_ref, tmp_path):
    """With a mesh, every tensor lands in its logical sharding and the sharded forward still matches."""
    from jax.sharding import PartitionSpec as P

    from bifrost_jax.parallel.mesh import make_mesh
    from bifrost_jax.parallel.rules import axis_rules

    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    _, path, ids, mask, expected = t5_ref
    module, variables = port.load("t5-encoder", path, mesh=mesh, scan_layers=True)
    q = flatten(variables["params"])[("block", "self_attn", "q", "kernel")]
    assert q.sharding.spec == P(None, "fsdp", "tensor")
    with axis_rules(mesh):
        out = _run(module, variables, ids, mask)
    assert max_rel_err(out, expected) <= TOL

    _, clip_path, cids, cmask, last, pooled = _clip_ref(tmp_path, 2, seed=11)
    cmodule, cvars = port.load("clip-text", clip_path, mesh=mesh)
    assert flatten(cvars["params"])[("layers_0", "mlp", "fc1", "kernel")].sharding.spec == P("fsdp", "tensor")
    with axis_rules(mesh):
        c_last, c_pooled = _run(cmodule, cvars, cids, cmask)
    assert max_rel_err(c_last, last) <= TOL and max_rel_err(c_pooled, pooled) <= TOL


def test_bfloat16_no_worse_than_transformers_bf16(t5_ref, tmp_path):
    """bf16 parameters and compute (the FLUX inference setting): the error against the fp32 reference is of the
    size transformers' own bf16 run has (these random tiny models are rounding-sensitive: several percent), with no
    absolute allowance. Per-layer bf16 roundings are pinned in test_bf16_numerics.py."""
    import copy

    def torch_bf16(model, ids, mask):
        with torch.no_grad():
            out = copy.deepcopy(model).to(torch.bfloat16)(input_ids=torch.from_numpy(ids),
                                                          attention_mask=torch.from_numpy(mask))
        return out

    model, path, ids, mask, expected = t5_ref
    module, variables = port.load("t5-encoder", path, dtype=jnp.bfloat16)
    out = _run(module, variables, ids, mask)
    assert out.dtype == jnp.bfloat16
    err = rel_rms(np.asarray(out, np.float32), expected)
    torch_err = rel_rms(torch_bf16(model, ids, mask).last_hidden_state.float().numpy(), expected)
    print(f"t5 bf16 vs fp32 reference (relative RMS): ours {err:.2e}, transformers bf16 {torch_err:.2e}")
    assert 0 < err <= 1.5 * torch_err

    model, clip_path, cids, cmask, last, pooled = _clip_ref(tmp_path, 2, seed=12)
    cmodule, cvars = port.load("clip-text", clip_path, dtype=jnp.bfloat16)
    c_last, c_pooled = _run(cmodule, cvars, cids, cmask)
    assert c_last.dtype == c_pooled.dtype == jnp.bfloat16
    ref16 = torch_bf16(model, cids, cmask)
    for name, got, want, want16 in (("last_hidden_state", c_last, last, ref16.last_hidden_state),
                                    ("pooled", c_pooled, pooled, ref16.pooler_output)):
        err, torch_err = rel_rms(np.asarray(got, np.float32), want), rel_rms(want16.float().numpy(), want)
        print(f"clip bf16 {name} vs fp32 reference (relative RMS): ours {err:.2e}, transformers bf16 "
              f"{torch_err:.2e}")
        # the pooled output is 2 rows of 32: its ratio varies more with the draw than the 2 x 16 x 32 states'
        assert 0 < err <= (1.5 if name == "last_hidden_state" else 2.0) * torch_err
