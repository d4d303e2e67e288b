"""Ports of the text encoders: transformers ``T5EncoderModel`` ("t5-encoder", FLUX ``text_encoder_2``),
``CLIPTextModel`` ("clip-text", FLUX's and SD's ``text_encoder``) and ``CLIPTextModelWithProjection``
("clip-text-projection", SDXL's ``text_encoder_2``) directories <-> Flax parameters.

Checkpoint layouts handled:
- T5: ``shared.weight`` and ``encoder.embed_tokens.weight`` are one tied tensor; a file may hold either or both.
  ``shared.weight`` wins when both are present (transformers ties embed_tokens to it); the duplicate is not an
  unexpected key. The decoder half and LM head of a full encoder-decoder checkpoint are ignored, as transformers'
  ``T5EncoderModel`` does for the decoder.
- CLIP with projection: ``text_model.*`` (both transformers versions) and ``text_projection.weight``.
- CLIP: transformers 4.x (and the FLUX.1 repositories) store keys under ``text_model.``; transformers 5 saves them
  without that prefix. Both load; export writes the ``text_model.`` layout, which both versions load.
"""
from __future__ import annotations

import os

import jax.numpy as jnp

from bifrost_jax.models.text.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from bifrost_jax.models.text.t5 import T5EncoderConfig, T5EncoderModel
from bifrost_jax.port.base import (IDENTITY, LINEAR, KeyMap, SafetensorsReader, abstract_params,
                                   export_mapped, layers_map, load_mapped, mesh_shardings, read_json,
                                   save_directory, src)

WEIGHTS_NAME = "model.safetensors"
CLIP_LEGACY_PREFIX = "text_model."

T5_SHARED = "shared.weight"
T5_EMBED_TOKENS = "encoder.embed_tokens.weight"


def _dummy_ids(length: int = 8):
    return jnp.zeros((1, length), jnp.int32)


def _module_options(dtype, compute_dtype, scan_layers, remat_policy, attention_impl) -> dict:
    # the compute dtype defaults to the parameter dtype: a float32 load computes in float32
    return dict(dtype=compute_dtype or dtype, param_dtype=dtype, scan_layers=scan_layers,
                remat_policy=remat_policy, attention_impl=attention_impl)


def _load_params(module, reader, key_map, *, dtype, mesh, ignore_unused=None, what=""):
    shapes, specs = abstract_params(module, _dummy_ids())
    params = load_mapped(reader, key_map, shapes["params"], dtype=dtype,
                         shardings=mesh_shardings(specs["params"], mesh), what=what, ignore_unused=ignore_unused)
    return {"params": params}


# ----------------------------------------------------------------------------------------------------------------
# T5 encoder

def t5_key_map(cfg: T5EncoderConfig, scan: bool, embed_key: str = T5_SHARED) -> KeyMap:
    def block(i: int) -> KeyMap:
        p = f"encoder.block.{i}.layer"
        m: KeyMap = {("self_attn_norm", "scale"): src(f"{p}.0.layer_norm.weight"),
                     ("ff_norm", "scale"): src(f"{p}.1.layer_norm.weight")}
        for n in ("q", "k", "v", "o"):
            m[("self_attn", n, "kernel")] = src(f"{p}.0.SelfAttention.{n}.weight", LINEAR)
        for n in (("wi_0", "wi_1") if cfg.is_gated_act else ("wi",)) + ("wo",):
            m[("ff", n, "kernel")] = src(f"{p}.1.DenseReluDense.{n}.weight", LINEAR)
        return m

    key_map: KeyMap = {
        ("shared", "embedding"): src(embed_key),
        ("relative_attention_bias",): src("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                                          IDENTITY),
        ("final_layer_norm", "scale"): src("encoder.final_layer_norm.weight"),
    }
    key_map.update(layers_map("block", cfg.num_layers, block, scan))
    return key_map


def load_t5_encoder(path: str, *, dtype=jnp.float32, mesh=None, compute_dtype=None, scan_layers: bool = False,
                    remat_policy: str = "none", attention_impl=None):
    """(T5EncoderModel, {"params": ...}) from a transformers T5EncoderModel directory (FLUX ``text_encoder_2``)."""
    cfg = T5EncoderConfig.from_hf_config(read_json(os.path.join(path, "config.json")))
    module = T5EncoderModel(cfg, **_module_options(dtype, compute_dtype, scan_layers, remat_policy,
                                                   attention_impl))
    reader = SafetensorsReader(path)
    # with neither copy present, the error names "shared.weight" (what transformers saves)
    embed_key = T5_EMBED_TOKENS if (T5_EMBED_TOKENS in reader and T5_SHARED not in reader) else T5_SHARED

    def ignore(key: str) -> bool:
        return (key == T5_EMBED_TOKENS and embed_key == T5_SHARED) or key.startswith(("decoder.", "lm_head."))

    return module, _load_params(module, reader, t5_key_map(cfg, scan_layers, embed_key), dtype=dtype, mesh=mesh,
                                ignore_unused=ignore, what=f"t5-encoder {path}")


def save_t5_encoder(module: T5EncoderModel, variables, path: str) -> None:
    """A directory ``T5EncoderModel.from_pretrained`` loads (the tied embedding written once, as ``shared``)."""
    state = export_mapped(variables["params"], t5_key_map(module.config, module.scan_layers))
    save_directory(path, module.config.to_hf_config(), state, WEIGHTS_NAME)


# ----------------------------------------------------------------------------------------------------------------
# CLIP text model

def clip_text_key_map(cfg: CLIPTextConfig, scan: bool, prefix: str = CLIP_LEGACY_PREFIX) -> KeyMap:
    def layer(i: int) -> KeyMap:
        p = f"{prefix}encoder.layers.{i}"
        m: KeyMap = {}
        for norm in ("layer_norm1", "layer_norm2"):
            m[(norm, "scale")] = src(f"{p}.{norm}.weight")
            m[(norm, "bias")] = src(f"{p}.{norm}.bias")
        for sub, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "out_proj")), ("mlp", ("fc1", "fc2"))):
            for n in names:
                m[(sub, n, "kernel")] = src(f"{p}.{sub}.{n}.weight", LINEAR)
                m[(sub, n, "bias")] = src(f"{p}.{sub}.{n}.bias")
        return m

    key_map: KeyMap = {
        ("token_embedding", "embedding"): src(f"{prefix}embeddings.token_embedding.weight"),
        ("position_embedding", "embedding"): src(f"{prefix}embeddings.position_embedding.weight"),
        ("final_layer_norm", "scale"): src(f"{prefix}final_layer_norm.weight"),
        ("final_layer_norm", "bias"): src(f"{prefix}final_layer_norm.bias"),
    }
    key_map.update(layers_map("layers", cfg.num_hidden_layers, layer, scan))
    return key_map


def load_clip_text(path: str, *, dtype=jnp.float32, mesh=None, compute_dtype=None, scan_layers: bool = False,
                   remat_policy: str = "none", attention_impl=None):
    """(CLIPTextModel, {"params": ...}) from a transformers CLIPTextModel directory (FLUX ``text_encoder``)."""
    cfg = CLIPTextConfig.from_hf_config(read_json(os.path.join(path, "config.json")))
    module = CLIPTextModel(cfg, **_module_options(dtype, compute_dtype, scan_layers, remat_policy,
                                                  attention_impl))
    reader = SafetensorsReader(path)
    # the layout is decided by where the token embedding is; every other key is then checked against it
    prefix = CLIP_LEGACY_PREFIX if f"{CLIP_LEGACY_PREFIX}embeddings.token_embedding.weight" in reader else ""
    return module, _load_params(module, reader, clip_text_key_map(cfg, scan_layers, prefix), dtype=dtype,
                                mesh=mesh, what=f"clip-text {path}")


def save_clip_text(module: CLIPTextModel, variables, path: str) -> None:
    """A directory ``CLIPTextModel.from_pretrained`` loads (keys under ``text_model.`` as in FLUX.1's files)."""
    state = export_mapped(variables["params"], clip_text_key_map(module.config, module.scan_layers))
    save_directory(path, module.config.to_hf_config(), state, WEIGHTS_NAME)


def clip_projection_key_map(cfg: CLIPTextConfig, scan: bool) -> KeyMap:
    key_map = clip_text_key_map(cfg, scan, CLIP_LEGACY_PREFIX)
    key_map[("text_projection", "kernel")] = src("text_projection.weight", LINEAR)
    return key_map


def load_clip_text_projection(path: str, *, dtype=jnp.float32, mesh=None, compute_dtype=None,
                              scan_layers: bool = False, remat_policy: str = "none", attention_impl=None):
    """(CLIPTextModelWithProjection, {"params": ...}) from a transformers directory (SDXL ``text_encoder_2``)."""
    cfg = CLIPTextConfig.from_hf_config(read_json(os.path.join(path, "config.json")))
    module = CLIPTextModelWithProjection(cfg, **_module_options(dtype, compute_dtype, scan_layers, remat_policy,
                                                                attention_impl))
    return module, _load_params(module, SafetensorsReader(path), clip_projection_key_map(cfg, scan_layers),
                                dtype=dtype, mesh=mesh, what=f"clip-text-projection {path}")


def save_clip_text_projection(module: CLIPTextModelWithProjection, variables, path: str) -> None:
    """A directory ``CLIPTextModelWithProjection.from_pretrained`` loads."""
    state = export_mapped(variables["params"], clip_projection_key_map(module.config, module.scan_layers))
    save_directory(path, module.config.to_hf_config("CLIPTextModelWithProjection"), state, WEIGHTS_NAME)


PORTS = {
    "t5-encoder": (load_t5_encoder, save_t5_encoder),
    "clip-text": (load_clip_text, save_clip_text),
    "clip-text-projection": (load_clip_text_projection, save_clip_text_projection),
}
