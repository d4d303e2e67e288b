"""The two Bifrost components built from the others: the latent ControlNet (sized by the FLUX transformer and the
vision tower it bridges) and the dual-branch MLLM (its language model from a Qwen2.5-VL port, an official
Bifrost-1 checkpoint, or a fixed-key init). Training phases and the generation pipeline build and load them here,
the one way (docs/design.md §7, §3, §12.2).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from bifrost_jax import port
from bifrost_jax.components.component import Component, module_kwargs, vision_component
from bifrost_jax.components.loading import (bifrost1_layout, has_key_prefix, is_orbax_port, restore_orbax_port,
                                            restore_phase_checkpoint)
from bifrost_jax.components.model_config import resolve_model_config
from bifrost_jax.components.trees import abstract_dtype, flat_paths, merge_trees, place, rebox
from bifrost_jax.configs import config_dict
from bifrost_jax.models.bifrost import BifrostConfig, BifrostMLLM, init_branch_from_original
from bifrost_jax.models.bifrost import is_trainable as mllm_is_trainable
from bifrost_jax.models.flux.controlnet import FluxControlNetConfig, LatentControlNet
from bifrost_jax.models.qwen.decoder import QwenTextConfig
from bifrost_jax.port.base import SafetensorsReader, load_mapped
from bifrost_jax.port.qwen_text import text_key_map


# ----------------------------------------------------------------------------------------------------------------
# the latent ControlNet

def latent_controlnet_component(section, transformer: Component, clip_latent_dim: int,
                                clip_grid: tuple[int, int]) -> Component:
    """The latent ControlNet of ``config.controlnet`` (``num_layers`` / ``num_single_layers`` blocks, checked
    against a ported ControlNet's config.json), shaped like the FLUX ``transformer`` it steers and fed
    ``clip_grid`` CLIP latents of width ``clip_latent_dim``."""
    fcfg = transformer.module.config
    blocks = resolve_model_config({"num_layers": section.num_layers, "num_single_layers": section.num_single_layers},
                                  key="config.controlnet", kind="controlnet",
                                  port_dir=section.get("port_dir", "") or "")
    cfg = FluxControlNetConfig(
        patch_size=fcfg.patch_size, in_channels=fcfg.in_channels, num_layers=blocks["num_layers"],
        num_single_layers=blocks["num_single_layers"], attention_head_dim=fcfg.attention_head_dim,
        num_attention_heads=fcfg.num_attention_heads, joint_attention_dim=fcfg.joint_attention_dim,
        pooled_projection_dim=fcfg.pooled_projection_dim, guidance_embeds=fcfg.guidance_embeds,
        axes_dims_rope=fcfg.axes_dims_rope, clip_latent_dim=int(clip_latent_dim), clip_grid=tuple(clip_grid))
    module = LatentControlNet(cfg, **module_kwargs(section))
    return Component("controlnet", module, (), module.dummy_inputs(), section, ("latent-controlnet",),
                     trainable=True)


# ----------------------------------------------------------------------------------------------------------------
# the MLLM

@dataclasses.dataclass
class MllmComponent:
    """The MLLM component and where its weights come from: ``official`` is "official" (an official Bifrost-1
    checkpoint directory, with ``base_dir`` its Qwen2.5-VL), "orbax" (a ``bifrost port --kind bifrost-1`` output)
    or None (a Qwen2.5-VL directory or port, or no port)."""
    component: Component
    config: BifrostConfig
    official: str | None
    base_dir: str

    @property
    def module(self) -> BifrostMLLM:
        return self.component.module

    @property
    def base_init_from(self) -> str:
        return self.component.section.get("base_init_from", "") or ""

    @property
    def has_source(self) -> bool:
        return self.component.has_source or bool(self.base_init_from)


def mllm_component(section) -> MllmComponent:
    """``BifrostMLLM`` of ``config.mllm``: ``config`` = {text: QwenTextConfig fields (empty: the Qwen2.5-VL
    checkpoint's), num_image_tokens, image_grid, mask_ratio_*}; ``port_dir`` / ``base_dir`` / ``init_from``."""
    port_dir = section.get("port_dir", "") or ""
    base_dir = section.get("base_dir", "") or ""
    official = bifrost1_layout(port_dir) if port_dir else None
    if official == "official" and not base_dir:
        raise ValueError(f"config.mllm.port_dir={port_dir} is an official Bifrost-1 checkpoint: set "
                         "config.mllm.base_dir to the Qwen2.5-VL directory it was built on (its config.json "
                         "describes the backbone; it also holds what the checkpoint omits)")
    d = config_dict(section.config)
    text_source = base_dir if official == "official" else port_dir
    d["text"] = QwenTextConfig(**resolve_model_config(d.get("text"), key="config.mllm.config.text",
                                                      kind="qwen_text", port_dir=text_source))
    config = BifrostConfig.from_dict(d)
    module = BifrostMLLM(config, **module_kwargs(section))
    n, cdim = config.num_image_tokens, config.clip_dim
    init_args = (jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32), jnp.zeros((1, n, cdim)),
                 jnp.ones((1, n), bool))
    # the frozen language model dominates: it starts from the fixed key like every frozen component
    component = Component("mllm", module, init_args, {}, section, ("qwen2.5-vl",), trainable=False)
    return MllmComponent(component, config, official, base_dir)


def mllm_vision_section(vision_section, mllm: MllmComponent):
    """``config.vision`` with the MLLM's checkpoint as its port when it names no source of its own: the ViT of the
    same Qwen2.5-VL directory (or port, or Bifrost-1 checkpoint; an official one without its ViT: ``base_dir``)."""
    port_dir = mllm.component.port_dir
    if vision_section.get("port_dir", "") or vision_section.get("init_from", "") or not port_dir:
        return vision_section
    out = ml_collections.ConfigDict(vision_section.to_dict())
    out.port_dir = port_dir
    if mllm.official == "official" and not has_key_prefix(port_dir, "vision_language_model.visual."):
        out.port_dir = mllm.base_dir  # the official loader's rule: a missing ViT is the base's
    return out


def mllm_vision_component(vision_section, mllm: MllmComponent) -> Component:
    return vision_component(mllm_vision_section(vision_section, mllm))


def mllm_init(mllm: MllmComponent, rng):
    """Boxed ``{"params": ...}`` of a fresh MLLM: the fixed-key init, the branch a copy of the original weights."""
    v = mllm.component.init(rng)
    return {"params": rebox(v["params"], init_branch_from_original(nn.meta.unbox(v["params"])))}


def load_mllm(mllm: MllmComponent, abstract, shardings) -> dict:
    """The MLLM's pretrained params (a tree like ``abstract``, possibly partial), on ``shardings``: every weight from
    an official Bifrost-1 checkpoint or its port; or the frozen language model from a Qwen2.5-VL directory or port,
    or from another phase's checkpoint (``base_init_from``: the understanding phase's ``params.language_model``),
    with the branch copied from it; then ``init_from`` (another mllm run's checkpoint) for the TRAINED weights
    (branch, head, mask token, position embedding). {} without a source."""
    s = mllm.component.section
    out = {}
    if mllm.component.port_dir and mllm.base_init_from:
        raise ValueError(f"config.mllm.port_dir={mllm.component.port_dir} and config.mllm.base_init_from="
                         f"{mllm.base_init_from} both name the frozen language model: keep one")
    if mllm.component.port_dir and mllm.official:
        out = _load_official(mllm, abstract, shardings)
    elif mllm.component.port_dir:
        out = _load_text(mllm, abstract, shardings)
    elif mllm.base_init_from:
        out = _load_base_from_phase(mllm, abstract, shardings)
    if mllm.component.init_from:
        trained = {k: v for k, v in flat_paths(abstract).items() if mllm_is_trainable(k)}
        sub = {"params": {"mllm": traverse_util.unflatten_dict(trained)}}
        got = restore_phase_checkpoint(mllm.component.init_from, int(s.get("init_step", -1)),
                                       {"params": ("mllm",)}, sub, {"params": {"mllm": shardings}},
                                       s.get("init_allow_unused", ()))
        out = merge_trees(out, got["params"]["mllm"])
    return out


def _load_official(mllm: MllmComponent, abstract, shardings):
    path = mllm.component.port_dir
    what = f"config.mllm.port_dir={path}"
    if mllm.official == "orbax":
        return restore_orbax_port(path, ("bifrost-1",), ("mllm", "params"), abstract, shardings, what)
    mesh = getattr(jax.tree.leaves(shardings)[0], "mesh", None)
    _, variables = port.load("bifrost-1", path, base=mllm.base_dir, dtype=abstract_dtype({"params": abstract}),
                             mesh=mesh, scan_layers=bool(mllm.module.scan_layers),
                             image_grid=tuple(mllm.config.image_grid))
    return place(variables["mllm"]["params"], abstract, shardings, f"{what} (base {mllm.base_dir})")


def _original_weights(abstract, shardings):
    """(abstract, shardings) of the frozen language model's weights only (the QwenLanguageModel layout)."""
    flat_a, flat_s = traverse_util.flatten_dict(abstract), traverse_util.flatten_dict(shardings)
    orig = [k for k in flat_a if not mllm_is_trainable(tuple(k))]
    return (traverse_util.unflatten_dict({k: flat_a[k] for k in orig}),
            traverse_util.unflatten_dict({k: flat_s[k] for k in orig}))


def _with_branch(loaded, shardings):
    """The loaded original weights plus the generation branch as their copy, on ``shardings``."""
    flat_s = traverse_util.flatten_dict(shardings)
    with_branch = traverse_util.flatten_dict(init_branch_from_original(dict(loaded)))
    return traverse_util.unflatten_dict({k: jax.device_put(v, flat_s[k]) for k, v in with_branch.items()})


def _load_text(mllm: MllmComponent, abstract, shardings):
    """The frozen language model (original weights) from a Qwen2.5-VL directory or port, the branch copied from it."""
    path = mllm.component.port_dir
    orig_a, orig_s = _original_weights(abstract, shardings)
    if is_orbax_port(path):
        loaded = restore_orbax_port(path, ("qwen2.5-vl",), ("params", "language_model"), orig_a, orig_s,
                                    "config.mllm.port_dir")
    else:
        reader = SafetensorsReader(path)
        prefix = ("model.language_model." if any(k.startswith("model.language_model.") for k in reader.keys())
                  else "model.")
        key_map = text_key_map(mllm.config.text, mllm.module.scan_layers, prefix)
        loaded = load_mapped(reader, key_map, orig_a, dtype=abstract_dtype({"params": orig_a}), shardings=orig_s,
                             what=f"config.mllm.port_dir={path}",
                             ignore_unused=lambda k: not k.startswith(prefix) or k.startswith(f"{prefix}visual."))
    return _with_branch(loaded, shardings)


def _load_base_from_phase(mllm: MllmComponent, abstract, shardings):
    """The frozen language model from another phase's checkpoint (``params.language_model``, every weight of it
    used), the branch copied from it: the paper's initialisation from an MLLM that already understands images."""
    orig_a, orig_s = _original_weights(abstract, shardings)
    got = restore_phase_checkpoint(mllm.base_init_from, -1, {"params": ("language_model",)},
                                   {"params": {"language_model": orig_a}}, {"params": {"language_model": orig_s}})
    return _with_branch(got["params"]["language_model"], shardings)
