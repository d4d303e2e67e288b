"""Port for transformers Qwen2.5-VL directories (``Qwen2_5_VLForConditionalGeneration``) <-> ``models.qwen.vl``.

Checkpoint keys: ``save_pretrained`` in transformers 5.x (like the hub checkpoints) writes ``visual.*`` (vision
tower), ``model.*`` (language model) and ``lm_head.weight`` (absent when ``tie_word_embeddings``); the in-memory
module names ``model.visual.*`` / ``model.language_model.*`` are accepted on load too. ``vision_key_map`` and
``qwen_vl_config_from_hf`` are public: the Bifrost-1 MLLM port reuses them.
"""
from __future__ import annotations

import os

from bifrost_jax.models.qwen.vision import QwenVisionConfig
from bifrost_jax.models.qwen.vl import QwenVLConfig, QwenVLForConditionalGeneration
from bifrost_jax.port.base import (IDENTITY, LINEAR, KeyMap, SafetensorsReader, abstract_params, export_mapped,
                                   layers_map, linear_from_flattened, load_mapped, mesh_shardings, prefixed,
                                   read_json, save_directory, src)
from bifrost_jax.port.qwen_text import text_key_map


def vision_key_map(cfg: QwenVisionConfig, scan: bool, prefix: str = "visual.") -> KeyMap:
    """Flax paths of ``QwenVisionTransformer`` (relative to the module) -> PyTorch keys under ``prefix``."""
    conv_shape = (cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
    out: KeyMap = {("patch_embed", "kernel"): src(f"{prefix}patch_embed.proj.weight",
                                                  linear_from_flattened(conv_shape))}

    def block(i: int) -> KeyMap:
        p = f"{prefix}blocks.{i}."
        m: KeyMap = {("norm1", "scale"): src(p + "norm1.weight"), ("norm2", "scale"): src(p + "norm2.weight")}
        for flax_name, torch_name in (("attn", "qkv"), ("attn", "proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"),
                                      ("mlp", "down_proj")):
            m[(flax_name, torch_name, "kernel")] = src(f"{p}{flax_name}.{torch_name}.weight", LINEAR)
            m[(flax_name, torch_name, "bias")] = src(f"{p}{flax_name}.{torch_name}.bias", IDENTITY)
        return m

    out.update(layers_map("blocks", cfg.depth, block, scan))
    out[("merger", "ln_q", "scale")] = src(f"{prefix}merger.ln_q.weight")
    for i in (0, 2):
        out[("merger", f"mlp_{i}", "kernel")] = src(f"{prefix}merger.mlp.{i}.weight", LINEAR)
        out[("merger", f"mlp_{i}", "bias")] = src(f"{prefix}merger.mlp.{i}.bias")
    return out


# ----------------------------------------------------------------------------------------------------------------
# the full model

# (vision prefix, language-model prefix): the layout transformers 5.x writes with save_pretrained (and the hub
# checkpoints use), and the in-memory module layout (accepted too)
HUB_LAYOUT = ("visual.", "model.")
MODULE_LAYOUT = ("model.visual.", "model.language_model.")


def qwen_vl_config_from_hf(d: dict) -> QwenVLConfig:
    """``QwenVLConfig`` from a transformers Qwen2.5-VL config.json dict (nested or flat text fields)."""
    return QwenVLConfig.from_hf_config(d)


def vl_key_map(cfg: QwenVLConfig, scan: bool, layout: tuple[str, str] = HUB_LAYOUT) -> KeyMap:
    """Every parameter of ``QwenVLForConditionalGeneration`` -> its transformers key."""
    vision_prefix, text_prefix = layout
    out = prefixed(("visual",), vision_key_map(cfg.vision, scan, vision_prefix))
    out.update(prefixed(("language_model",), text_key_map(cfg.text, scan, text_prefix)))
    if not cfg.tie_word_embeddings:
        out[("lm_head", "kernel")] = src("lm_head.weight", LINEAR)
    return out


def detect_layout(keys) -> tuple[str, str]:
    keys = list(keys)
    if any(k.startswith(MODULE_LAYOUT[0]) for k in keys):
        return MODULE_LAYOUT
    return HUB_LAYOUT


def abstract_vl(module: QwenVLForConditionalGeneration):
    """(shapes, logical specs) of the model's params from a one-image, one-merge-unit dummy call."""
    import jax.numpy as jnp

    v = module.config.vision
    m = v.spatial_merge_size
    ids = jnp.full((1, 1), module.config.image_token_id, jnp.int32)
    pixels = jnp.zeros((1, m * m, v.patch_dim), jnp.float32)
    return abstract_params(module, ids, None, pixels, (1, m, m))


def load_qwen_vl(path: str, *, dtype=None, mesh=None, scan_layers: bool = False, remat_policy: str = "none",
                 compute_dtype=None, attention_impl=None):
    """(QwenVLForConditionalGeneration, {"params": ...}) from a transformers Qwen2.5-VL directory. ``dtype``: the
    parameter dtype (compute dtype too unless ``compute_dtype``)."""
    import jax.numpy as jnp

    dtype = jnp.float32 if dtype is None else dtype
    cfg = qwen_vl_config_from_hf(read_json(os.path.join(path, "config.json")))
    module = QwenVLForConditionalGeneration(cfg, dtype=compute_dtype or dtype, param_dtype=dtype,
                                            scan_layers=scan_layers, remat_policy=remat_policy,
                                            attention_impl=attention_impl)
    shapes, specs = abstract_vl(module)
    reader = SafetensorsReader(path)
    key_map = vl_key_map(cfg, scan_layers, detect_layout(reader.keys()))
    shardings = mesh_shardings(specs, mesh)
    params = load_mapped(reader, key_map, shapes["params"], dtype=dtype,
                         shardings=None if shardings is None else shardings["params"],
                         what=f"Qwen2.5-VL checkpoint {path}")
    return module, {"params": params}


def save_qwen_vl(module: QwenVLForConditionalGeneration, variables, path: str) -> None:
    """A directory ``Qwen2_5_VLForConditionalGeneration.from_pretrained`` loads (hub key layout, float32)."""
    params = variables["params"] if "params" in variables else variables
    scan = module.scan_layers
    state = export_mapped(params, vl_key_map(module.config, scan, HUB_LAYOUT))
    config = module.config.to_hf_config()
    config["dtype"] = "float32"
    save_directory(path, config, state, "model.safetensors")


PORTS = {"qwen2.5-vl": (load_qwen_vl, save_qwen_vl)}
