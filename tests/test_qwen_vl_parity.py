"""The full Qwen2.5-VL (``port.load("qwen2.5-vl", ...)``) against transformers'
``Qwen2_5_VLForConditionalGeneration``: logits of left-padded prompts containing images (partial ViT windows,
two images in one prompt), 3-D M-RoPE positions, port errors, both key layouts, tied embeddings and the export
round trip."""
import os

import jax
import numpy as np
import pytest
import torch
from conftest import max_rel_err

import bifrost_jax.port as port
from bifrost_jax.models.qwen.vl import QwenVLConfig, get_rope_index
from bifrost_jax.port import base
from bifrost_jax.port.qwen import qwen_vl_config_from_hf

IMG, VSTART, VEND = 290, 288, 289
VISION = dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64, window_size=56,
              patch_size=14, fullatt_block_indexes=[1, 3])
TEXT = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
H, W = 140, 196                      # patch grid 10x14 -> merged 5x7: windows of 2x2 units are partial
GRID = (1, H // 14, W // 14)
TOKENS = (GRID[1] // 2) * (GRID[2] // 2)


def tiny_reference(tie=False, seed=0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(vision_config=dict(VISION), text_config=dict(TEXT), image_token_id=IMG,
                           video_token_id=291, vision_start_token_id=VSTART, vision_end_token_id=VEND,
                           tie_word_embeddings=tie)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():   # every parameter random; norm scales around 1
        for name, p in model.named_parameters():
            p.copy_((1.0 + 0.3 * torch.randn_like(p)) if p.ndim == 1 and ("norm" in name or "ln_q" in name)
                    else 0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    model = tiny_reference()
    path = str(tmp_path_factory.mktemp("qwen_vl"))
    model.save_pretrained(path)
    return model, path


def make_inputs(seed=1):
    """Row 0: two images; row 1: one image and left padding. Three images of the same grid in all."""
    rng = np.random.default_rng(seed)
    txt = lambda n: list(rng.integers(0, 280, n))  # noqa: E731
    image = [VSTART] + [IMG] * TOKENS + [VEND]
    rows = [txt(5) + image + txt(4) + image + txt(3), txt(6) + image + txt(7)]
    length = max(map(len, rows))
    ids = np.zeros((2, length), np.int64)
    mask = np.zeros((2, length), np.int64)
    for r, row in enumerate(rows):
        ids[r, length - len(row):] = row
        mask[r, length - len(row):] = 1
    pixel_values = rng.standard_normal((3, GRID[1] * GRID[2], 1176)).astype(np.float32)
    return ids, mask, pixel_values


def torch_logits(model, ids, mask, pv):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     pixel_values=torch.tensor(pv.reshape(-1, pv.shape[-1])),
                     image_grid_thw=torch.tensor([list(GRID)] * len(pv)),
                     mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64))).logits.numpy()


def jax_logits(module, variables, ids, mask, pv):
    return np.asarray(jax.jit(lambda v, i, a, p: module.apply(v, i, a, p, GRID))(variables, ids, mask, pv))


def test_config(ref_dir):
    _, path = ref_dir
    cfg = qwen_vl_config_from_hf(base.read_json(os.path.join(path, "config.json")))
    assert cfg.image_token_id == IMG and cfg.text.mrope_section == (2, 3, 3) and cfg.vision.window_units == 2
    assert QwenVLConfig.from_hf_config(cfg.to_hf_config()) == cfg
    with pytest.raises(ValueError, match="model_type"):
        QwenVLConfig.from_hf_config(dict(cfg.to_hf_config(), model_type="qwen2_vl"))


def test_flat_hub_config():
    """The hub's Qwen2.5-VL-7B-Instruct config.json layout: text fields at top level, legacy vision spellings."""
    flat = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
            "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
            "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
            "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
            "intermediate_size": 18944, "max_position_embeddings": 128000, "max_window_layers": 28,
            "model_type": "qwen2_5_vl", "num_attention_heads": 28, "num_hidden_layers": 28,
            "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.41.2",
            "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                              "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                              "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                              "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                              "temporal_patch_size": 2}}
    cfg = qwen_vl_config_from_hf(flat)
    assert (cfg.text.hidden_size, cfg.text.num_key_value_heads, cfg.text.head_dim) == (3584, 4, 128)
    assert cfg.text.mrope_section == (16, 24, 24) and cfg.text.rope_theta == 1e6
    assert (cfg.vision.hidden_size, cfg.vision.head_dim, cfg.vision.window_units) == (1280, 80, 4)
    assert cfg.vision.fullatt_block_indexes == (7, 15, 23, 31) and cfg.image_token_id == 151655


def test_rope_index_matches_transformers(ref_dir):
    model, _ = ref_dir
    ids, mask, _ = make_inputs()
    ours = get_rope_index(ids, IMG, (GRID[1] // 2, GRID[2] // 2), mask)
    ref, _ = model.model.get_rope_index(torch.tensor(ids), torch.tensor((ids == IMG).astype(np.int64)),
                                        image_grid_thw=torch.tensor([list(GRID)] * 3),
                                        attention_mask=torch.tensor(mask))
    np.testing.assert_array_equal(np.asarray(ours), ref.numpy())
    assert len(np.unique(np.asarray(ours)[:, 0, mask[0] == 1], axis=0)) == 3   # t, h, w really differ


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_logits_parity(ref_dir, scan):
    model, path = ref_dir
    ids, mask, pv = make_inputs()
    ref = torch_logits(model, ids, mask, pv)
    module, variables = port.load("qwen2.5-vl", path, scan_layers=scan)
    ours = jax_logits(module, variables, ids, mask, pv)
    real = mask.astype(bool)
    err = max_rel_err(ours[real], ref[real])
    assert err <= 1e-4, f"max rel err {err}"
    # the flat processor layout of pixel_values gives the same logits
    grids = np.array([GRID] * 3)
    flat = np.asarray(jax.jit(lambda v, p: module.apply(v, ids, mask, p, grids))(variables, pv.reshape(-1, 1176)))
    assert max_rel_err(flat[real], ours[real]) <= 1e-5


def test_port_missing_and_extra_keys(ref_dir, tmp_path):
    _, path = ref_dir
    reader = base.SafetensorsReader(path)
    state = {k: np.array(reader.get(k)) for k in reader.keys()}
    cfg = base.read_json(os.path.join(path, "config.json"))

    def write(d, sd):
        base.save_directory(str(d), cfg, sd, "model.safetensors")
        return str(d)

    missing = {k: v for k, v in state.items() if k not in ("visual.blocks.1.mlp.up_proj.bias",
                                                           "model.layers.2.self_attn.k_proj.weight")}
    with pytest.raises(base.PortError) as e:
        port.load("qwen2.5-vl", write(tmp_path / "missing", missing))
    assert "visual.blocks.1.mlp.up_proj.bias" in str(e.value)
    assert "model.layers.2.self_attn.k_proj.weight" in str(e.value)
    extra = dict(state, **{"visual.merger.mlp.4.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(base.PortError, match=r"unexpected keys.*visual\.merger\.mlp\.4\.weight"):
        port.load("qwen2.5-vl", write(tmp_path / "extra", extra))


def test_module_key_layout_loads_the_same(ref_dir, tmp_path):
    """A directory with the in-memory names (model.visual.*, model.language_model.*) loads to the same params."""
    _, path = ref_dir
    reader = base.SafetensorsReader(path)
    cfg = base.read_json(os.path.join(path, "config.json"))

    def rename(k):
        if k.startswith("visual."):
            return "model." + k
        if k.startswith("model."):
            return "model.language_model." + k[len("model."):]
        return k
    base.save_directory(str(tmp_path), cfg, {rename(k): np.array(reader.get(k)) for k in reader.keys()},
                        "model.safetensors")
    _, a = port.load("qwen2.5-vl", path)
    _, b = port.load("qwen2.5-vl", str(tmp_path))
    for (pa, va), (pb, vb) in zip(base.flatten(a).items(), base.flatten(b).items()):
        assert pa == pb and np.array_equal(np.asarray(va), np.asarray(vb)), pa


def test_tied_embeddings(tmp_path):
    model = tiny_reference(tie=True, seed=3)
    model.save_pretrained(str(tmp_path))
    module, variables = port.load("qwen2.5-vl", str(tmp_path))
    assert "lm_head" not in variables["params"]
    ids, mask, pv = make_inputs(seed=4)
    real = mask.astype(bool)
    err = max_rel_err(jax_logits(module, variables, ids, mask, pv)[real], torch_logits(model, ids, mask, pv)[real])
    assert err <= 1e-4, f"max rel err {err}"


def test_export_round_trip(ref_dir, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration
    model, path = ref_dir
    module, variables = port.load("qwen2.5-vl", path, scan_layers=True)
    port.save("qwen2.5-vl", module, variables, str(tmp_path))
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    ids, mask, pv = make_inputs(seed=2)
    np.testing.assert_array_equal(torch_logits(reloaded, ids, mask, pv), torch_logits(model, ids, mask, pv))
    ref_state = model.state_dict()
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, ref_state[k]), k


def test_load_onto_mesh(ref_dir):
    """With a mesh every tensor lands in its logical-axis sharding, with the same values."""
    from jax.sharding import PartitionSpec as P

    from bifrost_jax.parallel.mesh import make_mesh
    _, path = ref_dir
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, sharded = port.load("qwen2.5-vl", path, mesh=mesh, scan_layers=True)
    _, plain = port.load("qwen2.5-vl", path, scan_layers=True)
    qkv = sharded["params"]["visual"]["blocks"]["attn"]["qkv"]["kernel"]
    assert qkv.sharding.spec == P(None, "fsdp", "tensor")
    for (pa, va), (_, vb) in zip(base.flatten(sharded).items(), base.flatten(plain).items()):
        assert np.array_equal(np.asarray(va), np.asarray(vb)), pa
