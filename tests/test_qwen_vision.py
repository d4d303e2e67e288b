"""Qwen2.5-VL vision tower against transformers' ``Qwen2_5_VisionTransformerPretrainedModel`` (full and partial
windows, batched images, scanned == unscanned, remat + gradients through the scanned window/full switch), and the
NumPy/jnp preprocessing against transformers' ``Qwen2VLImageProcessorPil``."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_rel_err

from bifrost_jax.data.qwen_image import patchify, preprocess, smart_resize, stack_same_grid
from bifrost_jax.models.qwen.vision import QwenVisionConfig, QwenVisionTransformer, window_layout
from bifrost_jax.port.base import PortError, abstract_params, load_mapped
from bifrost_jax.port.qwen import vision_key_map

# window 56 px = 2x2 merged units; fullatt blocks 1 and 3
VISION = dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64, window_size=56,
              patch_size=14, fullatt_block_indexes=[1, 3], spatial_merge_size=2, temporal_patch_size=2)


@pytest.fixture(scope="module")
def ref_vit():
    """Tiny random transformers ViT with every parameter randomised (norm scales around 1)."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    torch.manual_seed(0)
    hf_cfg = Qwen2_5_VLVisionConfig(**VISION)
    model = Qwen2_5_VisionTransformerPretrainedModel(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "norm" in name or "ln_q" in name
            p.copy_((1.0 + 0.3 * torch.randn_like(p)) if is_norm else 0.2 * torch.randn_like(p))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    return model, hf_cfg.to_dict(), state


def load_vit(cfg_dict, state, scan, **kw):
    cfg = QwenVisionConfig.from_hf_config(cfg_dict)
    module = QwenVisionTransformer(cfg, dtype=jnp.float32, scan_layers=scan, **kw)
    shapes, _ = abstract_params(module, jnp.zeros((1, 4, cfg.patch_dim)), (1, 2, 2))
    params = load_mapped(state, vision_key_map(cfg, scan, prefix=""), shapes["params"], what="tiny ViT")
    return module, params


def torch_vit(model, pv, grid):
    b = pv.shape[0]
    with torch.no_grad():
        out = model(torch.tensor(pv.reshape(-1, pv.shape[-1])), grid_thw=torch.tensor([list(grid)] * b))
    return out.pooler_output.numpy().reshape(b, -1, out.pooler_output.shape[-1])


@pytest.mark.parametrize("hw", [(112, 168), (140, 196)], ids=["full-windows", "partial-windows"])
def test_vision_parity(ref_vit, hw):
    model, cfg_dict, state = ref_vit
    grid = (1, hw[0] // 14, hw[1] // 14)
    pv = np.random.default_rng(1).standard_normal((2, grid[1] * grid[2], 1176)).astype(np.float32)
    ref = torch_vit(model, pv, grid)
    outs = {}
    for scan in (False, True):
        module, params = load_vit(cfg_dict, state, scan)
        outs[scan] = np.asarray(jax.jit(lambda p, x: module.apply({"params": p}, x, grid))(params, pv))
        err = max_rel_err(outs[scan], ref)
        assert err <= 1e-4, f"scan={scan} {hw}: max rel err {err}"
    np.testing.assert_allclose(outs[True], outs[False], rtol=0, atol=1e-5 * np.abs(outs[False]).max())


def test_layout_partial_windows():
    cfg = QwenVisionConfig.from_hf_config(VISION)
    lay = window_layout(cfg, (1, 10, 14))        # merged 5x7 -> 3x4 windows of 2x2 units
    assert lay.num_windows == 12 and lay.window_len == 16 and lay.has_padding
    assert lay.unit_valid.sum() == 35
    assert sorted(lay.unit_index[lay.unit_valid].tolist()) == list(range(35))
    assert not window_layout(cfg, (1, 8, 12)).has_padding


def test_images_attend_only_within_their_window_and_image(ref_vit):
    """Changing one patch of image 0 changes: every token of image 0 (full attention blocks), nothing of image 1."""
    _, cfg_dict, state = ref_vit
    module, params = load_vit(cfg_dict, state, scan=False)
    grid = (1, 8, 12)
    pv = np.random.default_rng(2).standard_normal((2, 96, 1176)).astype(np.float32)
    pv2 = pv.copy()
    pv2[0, 0] += 1.0
    f = jax.jit(lambda x: module.apply({"params": params}, x, grid))
    a, b = np.asarray(f(pv)), np.asarray(f(pv2))
    assert np.array_equal(a[1], b[1])
    assert (np.abs(a[0] - b[0]).max(axis=-1) > 0).all()


def test_remat_scan_gradients(ref_vit):
    _, cfg_dict, state = ref_vit
    grid = (1, 6, 6)                              # merged 3x3: partial windows
    pv = np.random.default_rng(3).standard_normal((1, 36, 1176)).astype(np.float32)
    grads = {}
    for scan, remat in ((False, "none"), (True, "full")):
        module, params = load_vit(cfg_dict, state, scan, remat_policy=remat)
        grads[scan] = jax.jit(jax.grad(lambda x: jnp.sum(module.apply({"params": params}, x, grid) ** 2)))(pv)
    assert np.isfinite(np.asarray(grads[True])).all()
    assert max_rel_err(grads[True], grads[False]) <= 1e-4


def test_vision_input_errors(ref_vit):
    _, cfg_dict, state = ref_vit
    module, params = load_vit(cfg_dict, state, scan=False)
    with pytest.raises(ValueError, match="t=2"):
        module.apply({"params": params}, jnp.zeros((1, 192, 1176)), (2, 8, 12))
    with pytest.raises(ValueError, match="do not match grid_thw"):
        module.apply({"params": params}, jnp.zeros((1, 90, 1176)), (1, 8, 12))
    with pytest.raises(ValueError, match="share one grid"):
        module.apply({"params": params}, jnp.zeros((2, 96, 1176)), np.array([[1, 8, 12], [1, 12, 8]]))


def test_vision_port_errors(ref_vit):
    _, cfg_dict, state = ref_vit
    cfg = QwenVisionConfig.from_hf_config(cfg_dict)
    module = QwenVisionTransformer(cfg, dtype=jnp.float32)
    shapes, _ = abstract_params(module, jnp.zeros((1, 4, cfg.patch_dim)), (1, 2, 2))
    missing = {k: v for k, v in state.items() if k != "blocks.2.attn.qkv.bias"}
    with pytest.raises(PortError, match=r"blocks\.2\.attn\.qkv\.bias"):
        load_mapped(missing, vision_key_map(cfg, False, prefix=""), shapes["params"])
    extra = dict(state, **{"blocks.0.attn.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(PortError, match=r"blocks\.0\.attn\.extra\.weight"):
        load_mapped(extra, vision_key_map(cfg, False, prefix=""), shapes["params"])


def test_vision_config_fields():
    legacy = {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
              "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
              "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
              "tokens_per_second": 2, "temporal_patch_size": 2, "model_type": "qwen2_5_vl"}
    cfg = QwenVisionConfig.from_hf_config(legacy)
    assert cfg.head_dim == 80 and cfg.window_units == 4 and cfg.patch_dim == 1176
    assert QwenVisionConfig.from_hf_config(cfg.to_hf_config()) == cfg
    with pytest.raises(ValueError, match="'use_fancy_pool'"):
        QwenVisionConfig.from_hf_config(dict(legacy, use_fancy_pool=True))
    with pytest.raises(ValueError, match="rope_type"):
        QwenVisionConfig.from_hf_config(dict(legacy, rope_parameters={"rope_type": "yarn"}))


# ----------------------------------------------------------------------------------------------------------------
# preprocessing

def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
    rng = np.random.default_rng(4)
    for h, w in rng.integers(20, 3000, size=(200, 2)):
        for mn, mx in ((56 * 56, 28 * 28 * 1280), (256 * 28 * 28, 256 * 28 * 28)):
            assert smart_resize(int(h), int(w), 28, mn, mx) == hf_smart_resize(int(h), int(w), 28, mn, mx)


def test_preprocess_matches_processor():
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    rng = np.random.default_rng(5)
    kw = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    proc = Qwen2VLImageProcessorPil(**kw)
    images = [Image.fromarray(rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)),          # resized up/down
              Image.fromarray(rng.integers(0, 256, (1000, 700, 3), dtype=np.uint8)),         # capped by max_pixels
              Image.fromarray(rng.integers(0, 256, (30, 40, 4), dtype=np.uint8), "RGBA"),    # min_pixels, alpha
              Image.fromarray(rng.integers(0, 256, (112, 168), dtype=np.uint8), "L")]        # grey, already 28k
    ref = proc(images=images, return_tensors="np")
    pv, grid = preprocess(images, **kw)
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    assert pv.shape == ref["pixel_values"].shape and pv.dtype == np.float32
    np.testing.assert_allclose(pv, ref["pixel_values"], rtol=0, atol=1e-6)


def test_patchify_matches_processor_on_fixed_size():
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    rng = np.random.default_rng(6)
    imgs = rng.integers(0, 256, (2, 112, 168, 3), dtype=np.uint8)
    ref = Qwen2VLImageProcessorPil()(images=[Image.fromarray(i) for i in imgs], return_tensors="np")
    want, grid = stack_same_grid(ref["pixel_values"], ref["image_grid_thw"])
    assert grid == (1, 8, 12)
    got01 = jax.jit(patchify)(imgs / 255.0)
    got11 = patchify(imgs / 127.5 - 1.0, value_range=(-1.0, 1.0))
    assert got01.shape == want.shape == (2, 96, 1176)
    np.testing.assert_allclose(np.asarray(got01), want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got11), want, rtol=0, atol=1e-5)
