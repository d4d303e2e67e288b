"""Key map of the Qwen2.5(-VL) language model (``models/qwen/decoder.QwenLanguageModel``) <-> transformers keys.

transformers 5.x saves ``Qwen2_5_VLForConditionalGeneration`` in the hub layout: the language model under
``model.`` (``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.q_proj.weight``, ``model.norm.weight``),
the ViT under ``model.visual.`` / ``visual.`` and ``lm_head.weight`` at top level (checked by saving a tiny model;
the in-memory module path ``model.language_model.`` is NOT what is written to disk). The default prefix is therefore
``"model."``; pass another one for other layouts (the official Bifrost-1 checkpoint nests the same names under
``vision_language_model.model.``). Used by the full Qwen2.5-VL port (``port/qwen.py``) and the Bifrost-1 port.
"""
from __future__ import annotations

import os

import jax.numpy as jnp

from bifrost_jax.models.qwen.decoder import QwenLanguageModel, QwenTextConfig
from bifrost_jax.port.base import (IDENTITY, LINEAR, KeyMap, Path, SafetensorsReader, Source, abstract_params,
                                   layers_map, load_mapped, mesh_shardings, read_json, src)

TEXT_PREFIX = "model."


def text_layer_map(layer_prefix: str) -> dict[Path, Source]:
    """One decoder layer's leaves (relative to the layer) -> keys under ``layer_prefix`` (ending in ".")."""
    p = layer_prefix
    out: dict[Path, Source] = {}
    for name in ("q_proj", "k_proj", "v_proj"):
        out[("self_attn", name, "kernel")] = src(f"{p}self_attn.{name}.weight", LINEAR)
        out[("self_attn", name, "bias")] = src(f"{p}self_attn.{name}.bias", IDENTITY)
    out[("self_attn", "o_proj", "kernel")] = src(f"{p}self_attn.o_proj.weight", LINEAR)
    for name in ("gate_proj", "up_proj", "down_proj"):
        out[("mlp", name, "kernel")] = src(f"{p}mlp.{name}.weight", LINEAR)
    out[("input_layernorm", "scale")] = src(f"{p}input_layernorm.weight")
    out[("post_attention_layernorm", "scale")] = src(f"{p}post_attention_layernorm.weight")
    return out


def text_key_map(cfg: QwenTextConfig, scan: bool, prefix: str = TEXT_PREFIX) -> KeyMap:
    """Flax path -> transformers key for every parameter of ``QwenLanguageModel`` (either layer layout)."""
    out: KeyMap = {
        ("embed_tokens", "embedding"): src(f"{prefix}embed_tokens.weight"),
        ("norm", "scale"): src(f"{prefix}norm.weight"),
    }
    out.update(layers_map("layers", cfg.num_hidden_layers, lambda i: text_layer_map(f"{prefix}layers.{i}."), scan))
    return out


def load_language_model(path: str, *, dtype=None, mesh=None, scan_layers: bool = False, remat_policy: str = "none",
                        compute_dtype=None, prefix: str = TEXT_PREFIX):
    """(QwenLanguageModel, {"params": ...}) from a transformers Qwen2.5-VL directory, reading only the language-model
    keys (``prefix``...; the ViT ``visual.*`` and ``lm_head.*`` are left for the full port). Any other key under
    ``prefix`` that the model does not use is an error, as is any missing or wrong-shape one."""
    dtype = jnp.float32 if dtype is None else dtype
    cfg = QwenTextConfig.from_hf_config(read_json(os.path.join(path, "config.json")))
    module = QwenLanguageModel(cfg, dtype=compute_dtype or dtype, param_dtype=dtype, scan_layers=scan_layers,
                               remat_policy=remat_policy)
    shapes, specs = abstract_params(module, jnp.zeros((1, 2), jnp.int32))
    key_map = text_key_map(cfg, scan_layers, prefix)
    shardings = mesh_shardings(specs, mesh)
    params = load_mapped(SafetensorsReader(path), key_map, shapes["params"], dtype=dtype,
                         shardings=None if shardings is None else shardings["params"],
                         what=f"Qwen2.5 language model in {path}",
                         ignore_unused=lambda k: not k.startswith(prefix) or k.startswith(f"{prefix}visual."))
    return module, {"params": params}
