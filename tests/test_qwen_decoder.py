"""Qwen2.5-VL language model (M-RoPE) against transformers' ``Qwen2_5_VLTextModel``: parity with left padding and
3-D positions that differ per axis, scanned == unscanned, port errors, export round trip."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_rel_err, rel_rms

from bifrost_jax.models.qwen.decoder import QwenLanguageModel, QwenTextConfig, mrope_cos_sin
from bifrost_jax.port import base
from bifrost_jax.port.qwen_text import load_language_model, text_key_map

TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=300, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
VISION = dict(hidden_size=32, depth=1, num_heads=2, intermediate_size=48, out_hidden_size=64)


def tiny_qwen_vl(seed=0):
    """A random tiny transformers Qwen2.5-VL with EVERY parameter randomised (norm weights and biases included)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(text_config=dict(TEXT), vision_config=dict(VISION))
    cfg._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    model = tiny_qwen_vl()
    path = str(tmp_path_factory.mktemp("qwen_vl"))
    model.save_pretrained(path)
    return model, path


def make_inputs(seed=1):
    """Batch of 2, length 11; row 0 has 3 left pads; a 2x3 'image' grid inside each row gets 3-D positions that
    differ per axis (t, t+row, t+col), as get_rope_index produces for an image in the prompt."""
    rng = np.random.default_rng(seed)
    b, length = 2, 11
    ids = rng.integers(0, TEXT["vocab_size"], size=(b, length))
    mask = np.ones((b, length), np.int64)
    mask[0, :3] = 0
    pos = np.ones((3, b, length), np.int64)
    for r in range(b):
        real = np.nonzero(mask[r])[0]
        p, k = 0, 0
        while k < len(real):
            if k == 2:  # a 2x3 image starting at the third real token
                for row in range(2):
                    for col in range(3):
                        pos[:, r, real[k]] = (p, p + row, p + col)
                        k += 1
                p += 3  # next text position = start + max(grid) + 1
            else:
                pos[:, r, real[k]] = p
                p += 1
                k += 1
    return ids, mask, pos


def torch_hidden(model, ids, mask, pos=None):
    with torch.no_grad():
        out = model.model.language_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                         position_ids=None if pos is None else torch.tensor(pos))
    return out.last_hidden_state.numpy()


def test_config_from_hf(qwen_dir):
    _, path = qwen_dir
    full = json.load(open(f"{path}/config.json"))
    cfg = QwenTextConfig.from_hf_config(full)
    assert (cfg.hidden_size, cfg.head_dim, cfg.num_key_value_heads, cfg.mrope_section, cfg.rope_theta) == \
        (64, 16, 2, (2, 3, 3), 10000.0)
    assert QwenTextConfig.from_hf_config(full["text_config"]) == cfg
    assert QwenTextConfig.from_hf_config(cfg.to_hf_config()) == cfg
    # a 4.x-style flat config: rope_scaling {"type": "mrope"} and a top-level rope_theta
    old = dict(full["text_config"], rope_theta=10000.0, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    del old["rope_parameters"]
    assert QwenTextConfig.from_hf_config(old) == cfg
    with pytest.raises(ValueError, match="use_sliding_window"):
        QwenTextConfig.from_hf_config(dict(full["text_config"], use_sliding_window=True))
    with pytest.raises(ValueError, match="rope_type"):
        QwenTextConfig.from_hf_config(dict(full["text_config"], rope_parameters={"rope_type": "yarn",
                                                                                "mrope_section": [2, 3, 3]}))
    with pytest.raises(ValueError, match="mrope_section"):
        QwenTextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 4))


def test_mrope_tables_match_transformers(qwen_dir):
    model, _ = qwen_dir
    _, _, pos = make_inputs()
    x = torch.zeros(1, dtype=torch.float32)
    cos_t, sin_t = model.model.language_model.rotary_emb(x, torch.tensor(pos))
    cos, sin = mrope_cos_sin(jnp.asarray(pos), 16, 10000.0, (2, 3, 3))
    assert max_rel_err(cos, cos_t.numpy()) <= 1e-6 and max_rel_err(sin, sin_t.numpy()) <= 1e-6


@pytest.mark.parametrize("scan", [False, True])
def test_parity_left_padding_3d_positions(qwen_dir, scan):
    model, path = qwen_dir
    module, variables = load_language_model(path, scan_layers=scan)
    ids, mask, pos = make_inputs()
    want = torch_hidden(model, ids, mask, pos)
    got = np.asarray(module.apply(variables, input_ids=jnp.asarray(ids), position_ids=jnp.asarray(pos),
                                  attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)  # pad rows are don't-care (fully masked queries; ours give zeros, HF garbage)
    err = max_rel_err(got[real], want[real])
    print(f"decoder parity (scan={scan}) max rel err {err:.2e}")
    assert err <= 1e-4
    assert np.all(np.isfinite(got))
    # the positions really matter: the same tokens with 1-D positions give a clearly different result
    pos_1d = np.broadcast_to(pos[0:1], pos.shape)
    other = np.asarray(module.apply(variables, input_ids=jnp.asarray(ids), position_ids=jnp.asarray(pos_1d),
                                    attention_mask=jnp.asarray(mask)))
    assert max_rel_err(other[real], want[real]) > 1e-2


def test_default_positions_and_inputs_embeds(qwen_dir):
    model, path = qwen_dir
    module, variables = load_language_model(path)
    ids, mask, _ = make_inputs(seed=2)
    pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 1)[None].repeat(3, 0)
    want = torch_hidden(model, ids, mask, pos)
    got = np.asarray(module.apply(variables, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)
    assert max_rel_err(got[real], want[real]) <= 1e-4
    emb = module.apply(variables, jnp.asarray(ids), method=QwenLanguageModel.embed)
    got2 = np.asarray(module.apply(variables, inputs_embeds=emb, attention_mask=jnp.asarray(mask)))
    np.testing.assert_array_equal(got2, got)


def test_scanned_equals_unscanned_random_init():
    cfg = QwenTextConfig.from_hf_config(TEXT)
    ids, mask, pos = make_inputs(seed=3)
    a = QwenLanguageModel(cfg, dtype=jnp.float32, scan_layers=False)
    s = QwenLanguageModel(cfg, dtype=jnp.float32, scan_layers=True, remat_policy="dots")
    params = nn_unbox(a.init(jax.random.PRNGKey(0), jnp.asarray(ids))["params"])
    # restack the unscanned params into the scanned layout
    n = cfg.num_hidden_layers
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layers_{i}"] for i in range(n)])
    sparams = {k: v for k, v in params.items() if not k.startswith("layers_")}
    sparams["layers"] = stacked
    s_shapes = jax.eval_shape(lambda: s.init(jax.random.PRNGKey(0), jnp.asarray(ids)))["params"]
    assert jax.tree.map(lambda x: x.shape, nn_unbox(s_shapes)) == jax.tree.map(lambda x: x.shape, sparams)
    # the stacked axis carries the "layers" logical name
    specs = nn.get_partition_spec(s_shapes)
    assert tuple(specs["layers"]["self_attn"]["q_proj"]["kernel"]) == ("layers", "embed", "heads")
    kw = dict(input_ids=jnp.asarray(ids), position_ids=jnp.asarray(pos), attention_mask=jnp.asarray(mask))
    out_a = np.asarray(a.apply({"params": params}, **kw))
    out_s = np.asarray(s.apply({"params": sparams}, **kw))
    assert max_rel_err(out_s, out_a) <= 1e-6


def nn_unbox(tree):
    return nn.meta.unbox(tree)


def test_bf16_no_worse_than_transformers_bf16(qwen_dir):
    """bf16 compute: the error against transformers' fp32 run is of the size of transformers' own bf16 run (no
    absolute allowance; per-layer roundings are pinned in test_bf16_numerics.py)."""
    import copy

    model, path = qwen_dir
    ids, mask, pos = make_inputs()
    want = torch_hidden(model, ids, mask, pos)
    with torch.no_grad():
        want16 = copy.deepcopy(model).to(torch.bfloat16).model.language_model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(pos)).last_hidden_state.float().numpy()
    kw = dict(input_ids=jnp.asarray(ids), position_ids=jnp.asarray(pos), attention_mask=jnp.asarray(mask))
    real = mask.astype(bool)
    torch_err = rel_rms(want16[real], want[real])
    for dtype in (jnp.float32, jnp.bfloat16):  # fp32 weights used in bf16 (training), and bf16 weights
        m16, v16 = load_language_model(path, dtype=dtype, compute_dtype=jnp.bfloat16)
        b = m16.apply(v16, **kw)
        assert b.dtype == jnp.bfloat16
        err = rel_rms(np.asarray(b, np.float32)[real], want[real])
        print(f"decoder bf16 (params {jnp.dtype(dtype).name}) vs fp32 reference (relative RMS): ours {err:.2e}, "
              f"transformers bf16 {torch_err:.2e}")
        assert 0 < err <= 1.5 * torch_err


def test_port_errors_name_the_key(qwen_dir, tmp_path):
    _, path = qwen_dir
    reader = base.SafetensorsReader(path)
    tensors = {k: reader.get(k) for k in reader.keys()}
    missing = dict(tensors)
    del missing["model.layers.1.self_attn.k_proj.bias"]
    extra = dict(tensors, **{"model.layers.2.self_attn.extra_proj.weight": np.zeros((2, 2), np.float32)})
    wrong = dict(tensors, **{"model.norm.weight": np.zeros((65,), np.float32)})
    cfg_json = json.load(open(f"{path}/config.json"))
    for name, tens, pattern in [("missing", missing, r"missing keys \(1\): model\.layers\.1\.self_attn\.k_proj\.bias"),
                                ("extra", extra, r"unexpected keys \(1\): model\.layers\.2\.self_attn\.extra_proj"),
                                ("wrong", wrong, r"model\.norm\.weight: checkpoint shape \(65,\)")]:
        d = tmp_path / name
        d.mkdir()
        base.save_directory(str(d), cfg_json, tens, "model.safetensors")
        for scan in (False, True):
            with pytest.raises(base.PortError, match=pattern):
                load_language_model(str(d), scan_layers=scan)


def test_export_round_trip(qwen_dir):
    """export_mapped of the ported params gives back exactly the transformers tensors, and torch loads them."""
    model, path = qwen_dir
    reader = base.SafetensorsReader(path)
    ids, mask, pos = make_inputs()
    want = torch_hidden(model, ids, mask, pos)
    for scan in (False, True):
        module, variables = load_language_model(path, scan_layers=scan)
        sd = base.export_mapped(variables["params"], text_key_map(module.config, scan))
        lm_keys = [k for k in reader.keys() if k.startswith("model.") and not k.startswith("model.visual.")]
        assert sorted(sd) == sorted(lm_keys)
        for k in sd:
            np.testing.assert_array_equal(sd[k], reader.get(k))
    fresh = tiny_qwen_vl(seed=5)
    lm = fresh.model.language_model
    lm.load_state_dict({k[len("model."):]: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    np.testing.assert_array_equal(torch_hidden(fresh, ids, mask, pos), want)


def test_sharded_load_and_remat_match(qwen_dir):
    """Ported straight into shardings on a (data 2, fsdp 2, tensor 2) mesh, run under the rules with a remat
    policy, scanned: same hidden states; the kernels really are split."""
    from bifrost_jax.parallel.mesh import make_mesh
    from bifrost_jax.parallel.rules import axis_rules
    model, path = qwen_dir
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    module, variables = load_language_model(path, mesh=mesh, scan_layers=True, remat_policy="full")
    q = variables["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.shard_shape(q.shape) == (3, 32, 32)  # ("layers", "embed"->fsdp, "heads"->tensor)
    ids, mask, pos = make_inputs()
    with axis_rules(mesh):
        fwd = jax.jit(lambda v, *a: module.apply(v, input_ids=a[0], position_ids=a[1], attention_mask=a[2]))
        got = np.asarray(fwd(variables, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask)))
        # gradients flow through the rematerialised scan
        g = jax.jit(jax.grad(lambda v: jnp.sum(module.apply(v, input_ids=jnp.asarray(ids),
                                                            attention_mask=jnp.asarray(mask)) ** 2)))(variables)
    assert np.all(np.isfinite(np.asarray(g["params"]["layers"]["mlp"]["down_proj"]["kernel"])))
    want = torch_hidden(model, ids, mask, pos)
    real = mask.astype(bool)
    assert max_rel_err(got[real], want[real]) <= 1e-4
