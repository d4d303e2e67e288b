"""The "bifrost-1" port: the official MLLM checkpoint layout (+ a transformers Qwen2.5-VL base) <-> Flax.

The official checkpoint is built here from a tiny random transformers Qwen2.5-VL (its saved tensors under
``vision_language_model.``) plus the Bifrost-1 additions, their names written out from docs/design.md §12.2 (not taken from
the port's key map), every tensor random so that a mis-mapped weight cannot hide."""
import os

import numpy as np
import pytest
from conftest import max_rel_err, write_sharded_checkpoint
from flax import traverse_util

import bifrost_jax.port as port
from bifrost_jax.port.base import PortError, SafetensorsReader

HIDDEN, LAYERS, HEADS, KV, INTER, VOCAB, N = 32, 2, 4, 2, 48, 64, 4
VLM = "vision_language_model."


def _tiny_qwen_vl(tmp, seed=0):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV, vocab_size=VOCAB,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=HIDDEN,
                           fullatt_block_indexes=[1], window_size=56, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3),
        image_token_id=VOCAB - 1, video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3,
        vision_end_token_id=VOCAB - 4, tie_word_embeddings=False)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms start at 1 and some biases at 0: randomise everything
            p.copy_(torch.randn_like(p) * 0.2)
    model.save_pretrained(tmp)
    return model


def _branch_tensors(rng):
    """The Bifrost-1 additions, named as in the official checkpoint (docs/design.md §12.2)."""
    r = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)  # noqa: E731
    head_dim = HIDDEN // HEADS
    out = {}
    for i in range(LAYERS):
        p = f"{VLM}model.layers.{i}."
        out[p + "self_attn.vision_branch_q_proj.weight"] = r(HEADS * head_dim, HIDDEN)
        out[p + "self_attn.vision_branch_q_proj.bias"] = r(HEADS * head_dim)
        for kv in "kv":
            out[p + f"self_attn.vision_branch_{kv}_proj.weight"] = r(KV * head_dim, HIDDEN)
            out[p + f"self_attn.vision_branch_{kv}_proj.bias"] = r(KV * head_dim)
        out[p + "self_attn.vision_branch_o_proj.weight"] = r(HIDDEN, HEADS * head_dim)
        out[p + "vision_branch_mlp.gate_proj.weight"] = r(INTER, HIDDEN)
        out[p + "vision_branch_mlp.up_proj.weight"] = r(INTER, HIDDEN)
        out[p + "vision_branch_mlp.down_proj.weight"] = r(HIDDEN, INTER)
        out[p + "vision_branch_input_layernorm.weight"] = 1 + r(HIDDEN)
        out[p + "vision_branch_post_attention_layernorm.weight"] = 1 + r(HIDDEN)
    out[f"{VLM}model.vision_branch_norm.weight"] = 1 + r(HIDDEN)
    out["vision_head.weight"] = r(HIDDEN, HIDDEN)
    out["vision_head.bias"] = r(HIDDEN)
    out["mask_token"] = r(1, 1, HIDDEN)
    out["learnable_pos_emb"] = r(1, N, HIDDEN)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bifrost_port")
    base = str(root / "base")
    torch_base = _tiny_qwen_vl(base, seed=0)
    base_sd = {k: SafetensorsReader(base).get(k) for k in SafetensorsReader(base).keys()}
    # a second, different Qwen: its ViT and LM head go INTO the full checkpoint, so we can tell where they came from
    other = str(root / "other")
    _tiny_qwen_vl(other, seed=1)
    other_sd = {k: SafetensorsReader(other).get(k) for k in SafetensorsReader(other).keys()}
    rng = np.random.default_rng(0)
    branch = _branch_tensors(rng)
    # full official layout: original weights of `base` for the text model, ViT + LM head of `other`
    full = {VLM + k: v for k, v in base_sd.items() if k.startswith("model.")}
    full.update({VLM + k: v for k, v in other_sd.items() if not k.startswith("model.")})
    full.update(branch)
    full["vision_gen_vae_model.encoder.conv_in.weight"] = np.zeros((2, 2), np.float32)  # ignored (docs/design.md §11.5)
    full_dir = str(root / "official_full")
    write_sharded_checkpoint(full_dir, full)
    # trained weights only: text, ViT and LM head come from `base`
    trained_dir = str(root / "official_trained")
    write_sharded_checkpoint(trained_dir, branch, n_shards=1)
    return dict(root=root, base=base, torch_base=torch_base, base_sd=base_sd, other_sd=other_sd, branch=branch,
                full=full, full_dir=full_dir, trained_dir=trained_dir)


def _hand_mllm_params(text_sd, branch):
    """BifrostMLLM params written out by hand from the official tensors (the reference "other path")."""
    t = lambda k: np.asarray(text_sd[k]).T  # noqa: E731
    a = lambda k: np.asarray(text_sd[k])  # noqa: E731
    params = {"embed_tokens": {"embedding": a(f"{VLM}model.embed_tokens.weight")},
              "norm": {"scale": a(f"{VLM}model.norm.weight")},
              "vision_branch_norm": {"scale": a(f"{VLM}model.vision_branch_norm.weight")},
              "vision_head": {"kernel": t("vision_head.weight"), "bias": a("vision_head.bias")},
              "mask_token": a("mask_token")[0, 0], "learnable_pos_emb": a("learnable_pos_emb")[0]}
    for i in range(LAYERS):
        p = f"{VLM}model.layers.{i}."
        layer = {"self_attn": {}}
        for pre in ("", "vision_branch_"):
            for proj in "qkv":
                layer["self_attn"][f"{pre}{proj}_proj"] = {"kernel": t(f"{p}self_attn.{pre}{proj}_proj.weight"),
                                                           "bias": a(f"{p}self_attn.{pre}{proj}_proj.bias")}
            layer["self_attn"][f"{pre}o_proj"] = {"kernel": t(f"{p}self_attn.{pre}o_proj.weight")}
            layer[f"{pre}mlp"] = {f"{m}_proj": {"kernel": t(f"{p}{pre}mlp.{m}_proj.weight")}
                                  for m in ("gate", "up", "down")}
            layer[f"{pre}input_layernorm"] = {"scale": a(f"{p}{pre}input_layernorm.weight")}
            layer[f"{pre}post_attention_layernorm"] = {"scale": a(f"{p}{pre}post_attention_layernorm.weight")}
        params[f"layers_{i}"] = layer
    return params


def _assert_same_tree(actual, expected):
    fa, fe = traverse_util.flatten_dict(actual), traverse_util.flatten_dict(expected)
    assert sorted(fa) == sorted(fe)
    for k in fe:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fe[k]), err_msg="/".join(k))


def _inputs(rng):
    ids = rng.integers(0, VOCAB - 4, (2, 7)).astype(np.int32)
    am = np.ones((2, 7), np.int32)
    am[0, :3] = 0
    latents = rng.standard_normal((2, N, HIDDEN)).astype(np.float32)
    mask = np.array([[True, False, True, False], [False, False, True, True]])
    return ids, am, latents, mask


def test_full_checkpoint_every_value_lands(setup):
    module, variables = port.load("bifrost-1", setup["full_dir"], base=setup["base"])
    mllm_params = variables["mllm"]["params"]
    _assert_same_tree(mllm_params, _hand_mllm_params(setup["full"], setup["branch"]))
    # same forward as E's module with the hand-written params
    ids, am, lat, mask = _inputs(np.random.default_rng(1))
    got = module.mllm.apply(variables["mllm"], ids, am, lat, mask)
    want = module.mllm.apply({"params": _hand_mllm_params(setup["full"], setup["branch"])}, ids, am, lat, mask)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # ViT and LM head came from the checkpoint (= `other`), not from base: compare with the qwen2.5-vl port of it
    _, other_vars = port.load("qwen2.5-vl", str(setup["root"] / "other"))
    _assert_same_tree(variables["vl"]["params"]["visual"], other_vars["params"]["visual"])
    _assert_same_tree(variables["vl"]["params"]["lm_head"], other_vars["params"]["lm_head"])
    # the frozen text weights are shared, not copied
    vl_lm = variables["vl"]["params"]["language_model"]
    assert vl_lm["embed_tokens"]["embedding"] is mllm_params["embed_tokens"]["embedding"]
    assert "vision_branch_q_proj" not in vl_lm["layers_0"]["self_attn"]
    assert module.mllm.config.num_image_tokens == N and module.mllm.config.image_grid == (2, 2)


def test_trained_only_checkpoint_takes_the_rest_from_base(setup):
    import torch
    module, variables = port.load("bifrost-1", setup["trained_dir"], base=setup["base"])
    text_sd = {VLM + k: v for k, v in setup["base_sd"].items()}
    _assert_same_tree(variables["mllm"]["params"], _hand_mllm_params({**text_sd, **setup["branch"]},
                                                                       setup["branch"]))
    # the frozen Qwen2.5-VL (ViT + text + LM head from base) reproduces transformers' logits
    ids, am, _, _ = _inputs(np.random.default_rng(2))
    got = module.vl.apply(variables["vl"], ids, am)
    with torch.no_grad():
        want = setup["torch_base"](input_ids=torch.tensor(ids, dtype=torch.long),
                                   attention_mask=torch.tensor(am, dtype=torch.long)).logits.numpy()
    err = max_rel_err(np.asarray(got)[am == 1], want[am == 1])
    assert err <= 1e-4, err


def test_scanned_layout_same_outputs(setup):
    module, variables = port.load("bifrost-1", setup["full_dir"], base=setup["base"])
    smodule, svariables = port.load("bifrost-1", setup["full_dir"], base=setup["base"], scan_layers=True)
    assert svariables["mllm"]["params"]["layers"]["self_attn"]["vision_branch_q_proj"]["kernel"].shape[0] == LAYERS
    ids, am, lat, mask = _inputs(np.random.default_rng(3))
    a = module.mllm.apply(variables["mllm"], ids, am, lat, mask)
    b = smodule.mllm.apply(svariables["mllm"], ids, am, lat, mask)
    assert max_rel_err(b, a) <= 1e-6


def test_port_errors_list_every_bad_key(setup, tmp_path):
    bad = dict(setup["full"])
    del bad[f"{VLM}model.layers.1.vision_branch_mlp.up_proj.weight"]
    bad[f"{VLM}model.layers.0.self_attn.vision_branch_extra.weight"] = np.zeros((3,), np.float32)
    bad["vision_head.bias"] = np.zeros((HIDDEN + 1,), np.float32)
    write_sharded_checkpoint(str(tmp_path / "bad"), bad)
    with pytest.raises(PortError) as e:
        port.load("bifrost-1", str(tmp_path / "bad"), base=setup["base"])
    msg = str(e.value)
    assert "missing keys (1)" in msg and f"{VLM}model.layers.1.vision_branch_mlp.up_proj.weight" in msg
    assert "unexpected keys (1)" in msg and "vision_branch_extra.weight" in msg
    assert "wrong-shape keys (1)" in msg and f"vision_head.bias: checkpoint shape ({HIDDEN + 1},)" in msg
    # a partial group is an error too (here: one ViT tensor present, the rest missing)
    partial = dict(setup["branch"])
    partial[f"{VLM}visual.merger.ln_q.weight"] = setup["other_sd"]["visual.merger.ln_q.weight"]
    write_sharded_checkpoint(str(tmp_path / "partial"), partial, n_shards=1)
    with pytest.raises(PortError, match=r"missing keys .*vision_language_model\.visual\.patch_embed\.proj\.weight"):
        port.load("bifrost-1", str(tmp_path / "partial"), base=setup["base"])
    with pytest.raises(ValueError, match="base="):
        port.load("bifrost-1", setup["full_dir"])


def test_export_round_trip_official(setup, tmp_path):
    module, variables = port.load("bifrost-1", setup["full_dir"], base=setup["base"])
    out = str(tmp_path / "official")
    port.save("bifrost-1", module, variables, out, layout="official", max_shard_bytes=20_000)
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1  # really sharded
    reader = SafetensorsReader(out)
    want = {k: v for k, v in setup["full"].items() if not k.startswith("vision_gen_vae_model.")}
    assert sorted(reader.keys()) == sorted(want)
    for k, v in want.items():
        np.testing.assert_array_equal(reader.get(k), v, err_msg=k)
    # and the export loads back (scanned this time) to the same values
    smodule, svariables = port.load("bifrost-1", out, base=setup["base"], scan_layers=True)
    state = port.bifrost.official_state_dict(smodule, svariables)
    assert sorted(state) == sorted(want)
    assert all(np.array_equal(state[k], want[k]) for k in want)


def test_export_transformers_base(setup, tmp_path):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration
    module, variables = port.load("bifrost-1", setup["trained_dir"], base=setup["base"])
    out = str(tmp_path / "qwen")
    port.save("bifrost-1", module, variables, out, layout="transformers")
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    reader = SafetensorsReader(out)
    assert sorted(reader.keys()) == sorted(setup["base_sd"])
    for k, v in setup["base_sd"].items():
        np.testing.assert_array_equal(reader.get(k), v, err_msg=k)
    ids = torch.tensor(np.random.default_rng(4).integers(0, VOCAB - 4, (1, 6)))
    with torch.no_grad():
        np.testing.assert_array_equal(model.eval()(input_ids=ids).logits.numpy(),
                                      setup["torch_base"](input_ids=ids).logits.numpy())
