"""The official Bifrost-1 MLLM checkpoint (HF ``hanlincs/Bifrost-1``, top level) <-> ``models.bifrost.BifrostMLLM``
plus the frozen Qwen2.5-VL it was built on (docs/design.md §12.2).

Official layout (module names of ``MultiModalityCausalLM``, built on a transformers-4.x Qwen2.5-VL whose language
model sits at ``model.`` and ViT at ``visual.``; HF-sharded safetensors with ``model.safetensors.index.json``)::

    vision_language_model.model.embed_tokens.weight, .model.norm.weight          frozen original language model
    vision_language_model.model.layers.{i}.{self_attn.{q,k,v,o}_proj,mlp.*,input_layernorm,post_attention_layernorm}
    vision_language_model.model.layers.{i}.self_attn.vision_branch_{q,k,v,o}_proj.*      generation branch
    vision_language_model.model.layers.{i}.vision_branch_mlp.{gate,up,down}_proj.weight
    vision_language_model.model.layers.{i}.vision_branch_{input,post_attention}_layernorm.weight
    vision_language_model.model.vision_branch_norm.weight
    vision_language_model.lm_head.weight                                          frozen (unused by generation)
    vision_language_model.visual.*                                                frozen ViT (may be absent)
    vision_head.{weight,bias}, mask_token (1,1,C), learnable_pos_emb (1,N,C)

``load("bifrost-1", path, base=qwen_dir)``: ``base`` is a transformers Qwen2.5-VL directory (e.g. a download of
Qwen/Qwen2.5-VL-7B-Instruct) and is required: the official checkpoint's config.json describes the training run, not
the backbone, so the backbone config comes from ``base/config.json``. ``base`` also supplies, as whole groups, what
the checkpoint lacks (a group is taken from the checkpoint when ANY of its keys is there, and must then be
complete there):

* the ViT (``visual``): from ``base`` when no ``vision_language_model.visual.*`` key exists (the official loader
  tolerates exactly that omission);
* the LM head: from ``base`` when there is no ``vision_language_model.lm_head.weight`` (none with tied embeddings);
* the frozen original language model (embeddings, original layer weights, final norm): from ``base`` when the
  checkpoint holds none of them (a checkpoint of the trained weights only).

The generation branch, ``vision_branch_norm``, ``vision_head``, ``mask_token`` and ``learnable_pos_emb`` must be in the
checkpoint; N is read from ``learnable_pos_emb``. Keys under ``vision_gen_vae_model.`` (the FLUX VAE the official
model also builds and never uses, docs/design.md §11.5) are ignored; with tied embeddings so is a stored lm_head. Any other
missing, unexpected or wrong-shape key (checkpoint or base) is reported in ONE ``PortError``.

Returned ``(module, variables)``: ``module`` is a ``Bifrost1`` pair of Flax modules, ``module.mllm``
(``BifrostMLLM``: generation) and ``module.vl`` (``QwenVLForConditionalGeneration``: the frozen Qwen2.5-VL, i.e.
the ViT that makes CLIP-latent targets, and understanding); ``variables = {"mllm": {"params": ...}, "vl":
{"params": ...}}``. The frozen text weights are the SAME arrays in both trees (no second copy in memory).

``save("bifrost-1", module, variables, path, layout="official")`` writes the official layout (HF-sharded, with an
index; the ViT and LM head included); ``layout="transformers"`` writes the frozen Qwen2.5-VL as a plain
``Qwen2_5_VLForConditionalGeneration.from_pretrained`` directory.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from bifrost_jax.models.bifrost import BRANCH, BifrostConfig, BifrostMLLM
from bifrost_jax.models.qwen.vl import QwenVLForConditionalGeneration
from bifrost_jax.port.base import (IDENTITY, LINEAR, KeyMap, Path, PortError, SafetensorsReader, Source,
                                   abstract_params, export_mapped, layers_map, load_mapped, mesh_shardings, prefixed,
                                   read_json, reshape_transform, src, write_json, write_safetensors)
from bifrost_jax.port.qwen import abstract_vl, detect_layout, qwen_vl_config_from_hf, save_qwen_vl, vision_key_map
from bifrost_jax.port.qwen_text import text_key_map

VLM = "vision_language_model."
TEXT_PREFIX = VLM + "model."
VISUAL_PREFIX = VLM + "visual."
LM_HEAD_KEY = VLM + "lm_head.weight"
IGNORED_PREFIXES = ("vision_gen_vae_model.",)
BASE = "base:"  # namespace of the base directory's keys inside one combined reader (shows in error messages)


@dataclasses.dataclass(frozen=True)
class Bifrost1:
    """The bifrost-1 port's "module": the generation MLLM and the frozen Qwen2.5-VL it extends.

    ``mllm.apply(variables["mllm"], ...)`` generates (``sample.mar.mar_decode``); ``vl.apply(variables["vl"], ...)``
    is the unchanged Qwen2.5-VL (``vl.get_image_features`` gives the CLIP-latent targets)."""
    mllm: BifrostMLLM
    vl: QwenVLForConditionalGeneration


# ----------------------------------------------------------------------------------------------------------------
# key maps

def _branch_layer_map(layer_prefix: str) -> dict[Path, Source]:
    p = layer_prefix
    out: dict[Path, Source] = {}
    for name in ("q_proj", "k_proj", "v_proj"):
        out[("self_attn", f"{BRANCH}{name}", "kernel")] = src(f"{p}self_attn.{BRANCH}{name}.weight", LINEAR)
        out[("self_attn", f"{BRANCH}{name}", "bias")] = src(f"{p}self_attn.{BRANCH}{name}.bias", IDENTITY)
    out[("self_attn", f"{BRANCH}o_proj", "kernel")] = src(f"{p}self_attn.{BRANCH}o_proj.weight", LINEAR)
    for name in ("gate_proj", "up_proj", "down_proj"):
        out[(f"{BRANCH}mlp", name, "kernel")] = src(f"{p}{BRANCH}mlp.{name}.weight", LINEAR)
    out[(f"{BRANCH}input_layernorm", "scale")] = src(f"{p}{BRANCH}input_layernorm.weight")
    out[(f"{BRANCH}post_attention_layernorm", "scale")] = src(f"{p}{BRANCH}post_attention_layernorm.weight")
    return out


def trained_key_map(cfg: BifrostConfig, scan: bool) -> KeyMap:
    """The weights Bifrost-1 adds to Qwen2.5-VL (branch, its final norm, head, mask token, position embedding)."""
    n, c, hidden = cfg.num_image_tokens, cfg.clip_dim, cfg.text.hidden_size
    out = layers_map("layers", cfg.text.num_hidden_layers, lambda i: _branch_layer_map(f"{TEXT_PREFIX}layers.{i}."),
                     scan)
    out[("vision_branch_norm", "scale")] = src(f"{TEXT_PREFIX}vision_branch_norm.weight")
    out[("vision_head", "kernel")] = src("vision_head.weight", LINEAR)
    out[("vision_head", "bias")] = src("vision_head.bias")
    out[("mask_token",)] = src("mask_token", reshape_transform((1, 1, c), (c,), "(1,1,C)->(C,)"))
    out[("learnable_pos_emb",)] = src("learnable_pos_emb", reshape_transform((1, n, hidden), (n, hidden),
                                                                               "(1,N,C)->(N,C)"))
    return out


def official_key_map(cfg: BifrostConfig, vl_cfg, scan: bool) -> dict[str, KeyMap]:
    """Every weight of the official layout, by group: "trained" and "text" (paths in ``BifrostMLLM``), "visual"
    (paths in ``QwenVisionTransformer``) and "lm_head" (empty with tied embeddings)."""
    return {
        "trained": trained_key_map(cfg, scan),
        "text": text_key_map(cfg.text, scan, TEXT_PREFIX),  # BifrostMLLM keeps QwenLanguageModel's paths
        "visual": vision_key_map(vl_cfg.vision, scan, VISUAL_PREFIX),
        "lm_head": {} if vl_cfg.tie_word_embeddings else {("kernel",): src(LM_HEAD_KEY, LINEAR)},
    }


def _base_groups(vl_cfg, scan: bool, base_keys) -> dict[str, KeyMap]:
    vision_prefix, text_prefix = detect_layout(base_keys)
    return {
        "text": text_key_map(vl_cfg.text, scan, text_prefix),
        "visual": vision_key_map(vl_cfg.vision, scan, vision_prefix),
        "lm_head": {} if vl_cfg.tie_word_embeddings else {("kernel",): src("lm_head.weight", LINEAR)},
    }


def _in_base(m: KeyMap) -> KeyMap:
    return {p: dataclasses.replace(s, keys=tuple(BASE + k for k in s.keys)) for p, s in m.items()}


class _TwoReaders:
    """One reader over the checkpoint and the base directory (base keys carry the ``base:`` prefix)."""

    def __init__(self, ckpt: SafetensorsReader, base: SafetensorsReader):
        self.ckpt, self.base, self.path = ckpt, base, ckpt.path

    def keys(self):
        return self.ckpt.keys() + [BASE + k for k in self.base.keys()]

    def _pick(self, key):
        return (self.base, key[len(BASE):]) if key.startswith(BASE) else (self.ckpt, key)

    def shape(self, key):
        reader, k = self._pick(key)
        return reader.shape(k)

    def dtype(self, key):
        reader, k = self._pick(key)
        return reader.dtype(k)

    def file_of(self, key):
        reader, k = self._pick(key)
        return reader.file_of(k)

    def get(self, key):
        reader, k = self._pick(key)
        return reader.get(k)


# ----------------------------------------------------------------------------------------------------------------
# load

def _num_image_tokens(reader: SafetensorsReader, hidden: int) -> int:
    if "learnable_pos_emb" not in reader:
        raise PortError(f"{reader.path}: no 'learnable_pos_emb' tensor: not an official Bifrost-1 checkpoint with "
                        "vision_pos_emb_type='learnable_pos_emb' (the only kind supported)")
    shape = reader.shape("learnable_pos_emb")
    if len(shape) != 3 or shape[0] != 1 or shape[2] != hidden:
        raise PortError(f"{reader.path}: learnable_pos_emb has shape {shape}, expected (1, N, {hidden})")
    return int(shape[1])


def _square_grid(n: int) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side != n:
        raise PortError(f"the checkpoint has {n} image tokens, not a square grid; pass image_grid=(h, w)")
    return side, side


def _original_only(tree):
    """A BifrostMLLM layer subtree without the generation-branch entries (the QwenLanguageModel layout)."""
    if not isinstance(tree, Mapping):
        return tree
    return {k: _original_only(v) for k, v in tree.items() if not k.startswith(BRANCH)}


def vl_params_from(mllm_params, visual_params, lm_head_params):
    """The frozen Qwen2.5-VL's params, sharing the text arrays of ``mllm_params`` (no copy)."""
    language_model = {k: _original_only(v) for k, v in mllm_params.items()
                      if k in ("embed_tokens", "norm", "layers") or k.startswith("layers_")}
    out = {"visual": visual_params, "language_model": language_model}
    if lm_head_params:
        out["lm_head"] = lm_head_params
    return out


def load_bifrost(path: str, *, base: str | None = None, dtype=jnp.float32, mesh=None, scan_layers: bool = False,
                 remat_policy: str = "none", compute_dtype=None, image_grid: tuple[int, int] | None = None,
                 attention_impl=None):
    """(Bifrost1, {"mllm": {"params"}, "vl": {"params"}}) from an official Bifrost-1 checkpoint directory ``path``
    and the Qwen2.5-VL directory ``base`` (see the module docstring for what comes from where). ``dtype``: the
    parameter dtype (and compute dtype unless ``compute_dtype``); with ``mesh`` every tensor goes straight to its
    sharding."""
    if base is None:
        raise ValueError("load('bifrost-1', ...) needs base=<transformers Qwen2.5-VL directory> (its config.json "
                         "describes the backbone; it also supplies the ViT / LM head if the checkpoint omits them)")
    vl_cfg = qwen_vl_config_from_hf(read_json(os.path.join(base, "config.json")))
    ckpt = SafetensorsReader(path)
    base_reader = SafetensorsReader(base)
    n = _num_image_tokens(ckpt, vl_cfg.text.hidden_size)
    cfg = BifrostConfig(text=vl_cfg.text, num_image_tokens=n, image_grid=image_grid or _square_grid(n))
    kw = dict(dtype=compute_dtype or dtype, param_dtype=dtype, scan_layers=scan_layers, remat_policy=remat_policy)
    mllm = BifrostMLLM(cfg, **kw)
    vl = QwenVLForConditionalGeneration(vl_cfg, attention_impl=attention_impl, **kw)

    ids = jnp.zeros((1, 2), jnp.int32)
    mllm_shapes, mllm_specs = abstract_params(mllm, ids, jnp.ones((1, 2), jnp.int32),
                                              jnp.zeros((1, n, cfg.clip_dim)), jnp.ones((1, n), bool))
    vl_shapes, vl_specs = abstract_vl(vl)

    official = official_key_map(cfg, vl_cfg, scan_layers)
    from_base = _base_groups(vl_cfg, scan_layers, base_reader.keys())
    has = {
        "text": any(k in ckpt for s in official["text"].values() for k in s.keys),
        "visual": any(k.startswith(VISUAL_PREFIX) for k in ckpt.keys()),
        "lm_head": LM_HEAD_KEY in ckpt,
    }
    # one combined tree {"mllm", "visual", "lm_head"} and one map, so that one check reports every problem
    key_map: KeyMap = prefixed(("mllm",), official["trained"])
    key_map.update(prefixed(("mllm",), official["text"] if has["text"] else _in_base(from_base["text"])))
    key_map.update(prefixed(("visual",), official["visual"] if has["visual"] else _in_base(from_base["visual"])))
    key_map.update(prefixed(("lm_head",), official["lm_head"] if has["lm_head"] or vl_cfg.tie_word_embeddings
                            else _in_base(from_base["lm_head"])))
    expected = {"mllm": mllm_shapes["params"], "visual": vl_shapes["params"]["visual"]}
    specs = {"mllm": mllm_specs["params"], "visual": vl_specs["params"]["visual"]}
    if not vl_cfg.tie_word_embeddings:
        expected["lm_head"] = vl_shapes["params"]["lm_head"]
        specs["lm_head"] = vl_specs["params"]["lm_head"]

    def ignored(key: str) -> bool:
        if key.startswith(BASE):
            return True  # the base directory holds more than we take from it
        if key.startswith(IGNORED_PREFIXES):
            return True
        return vl_cfg.tie_word_embeddings and key == LM_HEAD_KEY

    params = load_mapped(_TwoReaders(ckpt, base_reader), key_map, expected, dtype=dtype,
                         shardings=mesh_shardings(specs, mesh),
                         what=f"Bifrost-1 checkpoint {path} (base {base})", ignore_unused=ignored)
    vl_params = vl_params_from(params["mllm"], params["visual"], params.get("lm_head"))
    return Bifrost1(mllm, vl), {"mllm": {"params": params["mllm"]}, "vl": {"params": vl_params}}


# ----------------------------------------------------------------------------------------------------------------
# save

def official_state_dict(module: Bifrost1, variables, dtype=np.float32) -> dict[str, np.ndarray]:
    """The official-layout state dict (numpy) of ``variables`` (trained + frozen text + ViT + LM head)."""
    mllm_params = variables["mllm"]["params"]
    vl_params = variables["vl"]["params"]
    scan = module.mllm.scan_layers
    groups = official_key_map(module.mllm.config, module.vl.config, scan)
    mllm_map = {**groups["trained"], **groups["text"]}
    state = export_mapped(mllm_params, mllm_map, dtype)
    state.update(export_mapped(vl_params["visual"], groups["visual"], dtype))
    if groups["lm_head"]:
        state.update(export_mapped(vl_params["lm_head"], groups["lm_head"], dtype))
    return state


def _official_config(module: Bifrost1) -> dict[str, Any]:
    """A config.json for the official layout. The original file's full content is not public; this records the
    fields of ``MultiModalityCausalLM``'s config that the released inference path reads, plus the backbone config
    (so the directory is self-describing)."""
    c = module.mllm.config
    return {
        "architectures": ["MultiModalityCausalLM"],
        "add_vision_branch": True, "add_vision_branch_reuse_layernorm": False,
        "vision_denoising_type": "mar", "vision_head_type": "linear", "vision_loss_type": "mse",
        "vision_pos_emb_type": "learnable_pos_emb", "num_visual_gen_tokens": c.num_image_tokens,
        "inner_dim": c.clip_dim, "image_grid": list(c.image_grid),
        "vision_language_model_config": {"cls": "Qwen2_5_VLForConditionalGeneration",
                                         "config": module.vl.config.to_hf_config()},
    }


def save_bifrost(module: Bifrost1, variables, path: str, *, layout: str = "official", dtype=np.float32,
                 max_shard_bytes: int = 5 * 1024 ** 3) -> None:
    """Write ``layout="official"`` (the official Bifrost-1 layout, HF-sharded safetensors + index + config.json)
    or ``layout="transformers"`` (the frozen Qwen2.5-VL as a transformers directory)."""
    if layout == "transformers":
        return save_qwen_vl(module.vl, variables["vl"], path)
    if layout != "official":
        raise ValueError(f"save('bifrost-1'): layout must be 'official' or 'transformers', got {layout!r}")
    state = official_state_dict(module, variables, dtype)
    os.makedirs(path, exist_ok=True)
    shards: list[list[str]] = [[]]
    size = 0
    for k in sorted(state):
        nbytes = state[k].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    weight_map = {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(path, name), {k: state[k] for k in keys})
        weight_map.update({k: name for k in keys})
    total = int(sum(a.nbytes for a in state.values()))
    write_json(os.path.join(path, "model.safetensors.index.json"),
               {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(os.path.join(path, "config.json"), _official_config(module))


PORTS = {"bifrost-1": (load_bifrost, save_bifrost)}
