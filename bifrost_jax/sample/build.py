"""Building a :class:`BifrostPipeline` from a generation config (schema: ``BUILD_DOC``; ``configs/generate_tiny.py``
is a complete example). Every component is built and loaded exactly as the training phases build and load it
(``bifrost_jax/components``): the same config sections, the same loaders."""
from __future__ import annotations

import os
import tempfile
import zlib
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from bifrost_jax.components import (Component, clip_component, flux_component, load_component, t5_component,
                                    vae_component)
from bifrost_jax.components.bifrost import (MllmComponent, latent_controlnet_component, load_mllm, mllm_component,
                                            mllm_init, mllm_vision_component)
from bifrost_jax.data.prompt import build_word_tokenizer, load_tokenizer
from bifrost_jax.data.tokenizers import PaddedTokenizer, hash_tokenizer, hf_tokenizer
from bifrost_jax.parallel.mesh import make_mesh
from bifrost_jax.parallel.rules import abstract_variables, axis_rules
from bifrost_jax.components.unet import (clip_projection_component, latent_unet_controlnet_component,
                                         unet_component)
from bifrost_jax.configs import config_dict
from bifrost_jax.sample.pipeline import BifrostPipeline, FluxTextEncoder, SamplingOptions
from bifrost_jax.sample.schedulers import DEFAULT_SAMPLER, SCHEDULERS
from bifrost_jax.sample.unet_pipeline import UNetBifrostPipeline, UNetTextEncoder

BUILD_DOC = """Config schema of ``build_pipeline`` (ml_collections):

    config.seed                          seeds the fresh inits
    config.mesh                          {"data", "fsdp", "tensor"} sizes over THIS process's devices (-1 fills);
                                         None: one device
    config.sample                        SamplingOptions fields (num_images_per_prompt, seed, mar_steps (0: N),
                                         mllm_cfg, flux_steps, guidance, conditioning_scale)
    config.flux, vae, t5, clip, vision, controlnet, mllm: the component sections of the training configs
                                         (bifrost_jax/components): config (the model config; empty = the config.json
                                         of port_dir), dtype, param_dtype, scan_layers, remat_policy, and the source:
        port_dir     a diffusers/transformers directory or a ``bifrost port`` output (mllm: a Qwen2.5-VL directory,
                     or an official Bifrost-1 checkpoint with ``base_dir``; vision without a source of its own:
                     the mllm's)
        init_from    a training checkpoint (e.g. WORKDIR/controlnet/checkpoints): the component's variables
                     saved there by name (mllm: its trained weights over port_dir's), ``init_step`` (-1: latest)
        neither      a fresh init (frozen components from their fixed key, as training does); with
                     ``init_noise`` > 0 seeded synthetic weights instead (``synthetic_variables``: zero-init layers
                     made non-zero, for tests and smoke runs only)
    config.controlnet.num_layers / num_single_layers   its blocks (grid and width follow the mllm)
    config.t5.tokenizer_dir / config.clip.tokenizer_dir   a tokenizer directory (tokenizer.json, or a transformers
                                         slow tokenizer), or "hash" (``hash_tokenizer``); max_length (512 / 77)
    config.mllm.tokenizer_dir            a tokenizer.json directory, or "word" (``build_word_tokenizer`` over
                                         ``tokenizer_words``); max_prompt_length
UNet decoder (``config.decoder = "unet"``, docs/unet.md): sections ``unet``, ``controlnet``
                                         (conditioning_embedding_out_channels, or a port_dir), ``vae``, ``clip``
                                         (+ ``clip_2`` for SDXL), ``vision``, ``mllm``; ``config.scheduler`` the
                                         noise schedule (scheduler_config.json fields) and ``config.sample.scheduler``
                                         the sampler class name (default DPMSolverMultistepScheduler); flux_steps and
                                         guidance are then the UNet's steps and text CFG scale
Without --config, ``bifrost generate --checkpoint WORKDIR`` takes every section from the configs a trained
workdir's checkpoints recorded (``train/export.py``).
"""

COMPONENTS = ("flux", "controlnet", "vae", "t5", "clip", "vision", "mllm")
UNET_COMPONENTS = ("unet", "controlnet", "vae", "clip", "vision", "mllm")  # + clip_2 for SDXL


def components_of(config) -> tuple[str, ...]:
    """The component sections a generation config must have (its ``decoder``: "flux", the default, or "unet")."""
    if config.get("decoder", "flux") == "unet":
        return UNET_COMPONENTS + (("clip_2",) if "clip_2" in config else ())
    return COMPONENTS


def synthetic_variables(abstract, seed: int, noise: float = 0.05):
    """Seeded random variables, drawn on the host from the shapes alone (no init compile): kernels and embeddings
    N(0, 1/fan_in) with fan_in the product of all but the last axis, norm scales 1 + noise * N(0, 1), every other
    parameter (biases, zero-init tokens) noise * N(0, 1); BatchNorm statistics mean 0, var 1."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        shape = tuple(leaf.shape)
        if name == "var":
            return np.ones(shape, np.float32)
        if name == "mean":
            return np.zeros(shape, np.float32)
        z = rng.standard_normal(shape).astype(np.float32)
        if name == "scale":
            return 1.0 + noise * z
        if len(shape) >= 2 and name in ("kernel", "embedding"):
            return z / np.sqrt(max(1, int(np.prod(shape[:-1]))))
        return noise * z
    return jax.tree_util.tree_map_with_path(draw, abstract)


class _Placer:
    """Abstract variables, shardings and fresh inits of components on one mesh (or one device)."""

    def __init__(self, mesh, seed: int):
        self.mesh, self.seed = mesh, int(seed)

    def abstract(self, init_fn):
        return abstract_variables(init_fn, self.mesh)

    def fresh(self, name: str, init_fn, abstract, noise: float):
        if noise > 0:
            values = synthetic_variables(abstract, self.seed + zlib.crc32(name.encode()) % 1000, noise)
            return jax.tree.map(lambda x, a: jax.device_put(jnp.asarray(x, a.dtype), a.sharding), values, abstract)
        shardings = jax.tree.map(lambda a: a.sharding, abstract)
        with axis_rules(self.mesh):
            return jax.jit(lambda r: nn.meta.unbox(init_fn(r)), out_shardings=shardings)(
                jax.random.PRNGKey(self.seed))


def _noise(section) -> float:
    return float(section.get("init_noise", 0.0) or 0.0)


def _variables(placer: _Placer, comp: Component, section_name: str):
    """``{collection: tree}`` of one component: its port / init_from (strict), else a fresh init."""
    abstract = placer.abstract(comp.init)
    if not comp.has_source:
        return placer.fresh(comp.name, comp.init, abstract, _noise(comp.section))
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    wrap = lambda tree: {c: {comp.name: v} for c, v in tree.items()}  # noqa: E731
    got = load_component(comp, wrap(abstract), wrap(shardings), collections=tuple(abstract))
    missing = [c for c in abstract if comp.name not in got.get(c, {})]
    if missing:
        raise ValueError(f"config.{section_name}: its source holds no {missing} of {comp.name!r}")
    return {c: got[c][comp.name] for c in abstract}


def _mllm_variables(placer: _Placer, mllm: MllmComponent):
    """The MLLM's ``{"params"}``: ``load_mllm`` (an official checkpoint holds every weight; a Qwen2.5-VL port the
    language model and the branch copied from it; ``init_from`` the trained weights), over a fresh init for what
    its sources do not hold (the head, mask token and position embedding next to a Qwen2.5-VL port)."""
    comp = mllm.component
    init_fn = lambda r: mllm_init(mllm, r)  # noqa: E731
    abstract = placer.abstract(init_fn)["params"]
    loaded = {}
    if mllm.has_source:
        loaded = load_mllm(mllm, abstract, jax.tree.map(lambda a: a.sharding, abstract))
    flat = traverse_util.flatten_dict(loaded)
    if flat and set(flat) == set(traverse_util.flatten_dict(abstract)):
        return {"params": loaded}
    fresh = traverse_util.flatten_dict(placer.fresh("mllm", init_fn, {"params": abstract},
                                                    _noise(comp.section))["params"])
    fresh.update(flat)
    return {"params": traverse_util.unflatten_dict(fresh)}


def _text_tokenizer(section, module_cfg, eos: int, pad: int, bos: Optional[int] = None):
    spec, length = section.tokenizer_dir, int(section.max_length)
    if spec == "hash":
        return hash_tokenizer(module_cfg.vocab_size, length, eos_token_id=eos, pad_token_id=pad, bos_token_id=bos)
    if os.path.isfile(os.path.join(spec, "tokenizer.json")):
        return PaddedTokenizer(spec, length)
    return hf_tokenizer(spec, length)  # a slow (sentencepiece / vocab+merges) tokenizer directory


def _mllm_tokenizer(section):
    spec = section.tokenizer_dir
    if spec == "word":
        directory = tempfile.mkdtemp(prefix="bifrost_word_tokenizer_")
        return load_tokenizer(build_word_tokenizer(list(section.get("tokenizer_words", ())), directory))
    return load_tokenizer(spec)


def build_pipeline(config: ml_collections.ConfigDict, *, mesh=None) -> BifrostPipeline:
    """A ``BifrostPipeline`` from a generation config (``BUILD_DOC``)."""
    missing = [name for name in components_of(config) if name not in config]
    if missing:
        raise ValueError(f"generation config: no section {missing} (BUILD_DOC; the FLUX transformer's is flux, a "
                         "UNet decoder's unet)")
    if mesh is None and config.get("mesh", None) is not None:
        mesh = make_mesh(dict(config.mesh), devices=jax.local_devices())
    placer = _Placer(mesh, config.get("seed", 0))

    mllm = mllm_component(config.mllm)
    mllm_vars = _mllm_variables(placer, mllm)
    tokenizer = _mllm_tokenizer(config.mllm)
    if tokenizer.vocab_size > mllm.config.text.vocab_size:
        raise ValueError(f"the MLLM tokenizer has {tokenizer.vocab_size} tokens but config.mllm's vocab_size is "
                         f"{mllm.config.text.vocab_size}")
    s = config.sample
    options = SamplingOptions(num_images_per_prompt=int(s.num_images_per_prompt), seed=int(s.seed),
                              mar_steps=int(s.mar_steps) or None, mllm_cfg=float(s.mllm_cfg),
                              flux_steps=int(s.flux_steps), guidance=float(s.guidance),
                              conditioning_scale=float(s.conditioning_scale))
    if config.get("decoder", "flux") == "unet":
        return _build_unet_pipeline(config, placer, mllm, dict(
            mllm=mllm.module, mllm_variables=mllm_vars, tokenizer=tokenizer,
            max_prompt_length=int(config.mllm.max_prompt_length), mesh=mesh, options=options))
    transformer = flux_component(config.flux, trainable=False)
    controlnet = latent_controlnet_component(config.controlnet, transformer, mllm.config.clip_dim,
                                             tuple(mllm.config.image_grid))
    vae, t5, clip = vae_component(config.vae, trainable=False), t5_component(config.t5), clip_component(config.clip)
    vision = mllm_vision_component(config.vision, mllm)
    variables = {comp.name: _variables(placer, comp, name)
                 for comp, name in ((transformer, "flux"), (controlnet, "controlnet"), (vae, "vae"), (t5, "t5"),
                                    (clip, "clip"), (vision, "vision"))}
    t5_cfg, clip_cfg = t5.module.config, clip.module.config
    encode_text = FluxTextEncoder(
        t5.module, variables["t5"], _text_tokenizer(config.t5, t5_cfg, t5_cfg.eos_token_id, t5_cfg.pad_token_id or 0),
        clip.module, variables["clip"], _text_tokenizer(config.clip, clip_cfg, clip_cfg.eos_token_id,
                                                        clip_cfg.pad_token_id or 0, clip_cfg.bos_token_id))
    return BifrostPipeline(transformer=transformer.module, transformer_variables=variables["transformer"],
                           controlnet=controlnet.module, controlnet_variables=variables["controlnet"],
                           vae=vae.module, vae_variables=variables["vae"], encode_text=encode_text,
                           mllm=mllm.module, mllm_variables=mllm_vars, tokenizer=tokenizer,
                           max_prompt_length=int(config.mllm.max_prompt_length), vision=vision.module,
                           vision_variables=variables["vision"], mesh=mesh, options=options)


# ----------------------------------------------------------------------------------------------------------------
# the UNet decoder (config.decoder = "unet", docs/unet.md)

def _build_unet_pipeline(config, placer: _Placer, mllm: MllmComponent, shared: dict) -> UNetBifrostPipeline:
    """``UNET_BUILD_DOC``'s pipeline: the sections ``unet``, ``controlnet`` (its widths; the rest follows the UNet
    and the mllm's grid), ``vae``, ``clip`` (+ ``clip_2`` for SDXL), ``vision``, ``mllm``, and ``scheduler``."""
    unet = unet_component(config.unet, trainable=False)
    vision = mllm_vision_component(config.vision, mllm)
    vae = vae_component(config.vae, trainable=False)
    controlnet = latent_unet_controlnet_component(config.controlnet, unet, mllm.config.clip_dim,
                                                  tuple(mllm.config.image_grid))
    comps = [(unet, "unet"), (controlnet, "controlnet"), (vae, "vae"), (clip_component(config.clip), "clip"),
             (vision, "vision")]
    if "clip_2" in config:
        comps.append((clip_projection_component(config.clip_2), "clip_2"))
    variables = {comp.name: _variables(placer, comp, name) for comp, name in comps}
    encoders = []
    for comp, _ in comps[3:4] + comps[5:]:
        cfg = comp.module.config
        encoders += [comp.module, variables[comp.name],
                     _text_tokenizer(comp.section, cfg, cfg.eos_token_id, cfg.pad_token_id or 0, cfg.bos_token_id)]
    scheduler = SCHEDULERS[config.sample.get("scheduler", DEFAULT_SAMPLER)].from_hf_config(
        config_dict(config.scheduler))
    return UNetBifrostPipeline(transformer=unet.module, transformer_variables=variables["unet"],
                               controlnet=controlnet.module, controlnet_variables=variables["controlnet"],
                               vae=vae.module, vae_variables=variables["vae"], encode_text=UNetTextEncoder(*encoders),
                               vision=vision.module, vision_variables=variables["vision"], scheduler=scheduler,
                               **shared)
