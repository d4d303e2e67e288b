"""A trained workdir as a generation pipeline, with no config file (docs/design.md §12.8).

Every checkpoint step records the config its phase was trained with (the ``config`` item), hence every component
section: model config, dtypes and weight source (``port_dir`` / ``init_from`` / a fixed-key random init). A
pipeline is rebuilt from the ``controlnet`` and ``mllm`` phases of ``WORKDIR``:

* each phase is built from its saved config (``train.registry.get_phase``);
* its FROZEN weights come exactly as that run got them (``loop.initial_frozen``: the same ports, ``init_from``
  checkpoints and fixed-key inits): the FLUX transformer and VAE of the ``controlnet`` phase are those of the
  ``flux`` / ``vae`` runs it was started from, the MLLM's base those of its Qwen2.5-VL port;
* its TRAINED weights (and BatchNorm statistics) are restored from its own checkpoint, strictly: every trained
  weight must be there and nothing else of the model may be missing.

A phase that is named but absent or has no checkpoint is an error naming the directory: a workdir never yields
random weights. ``bifrost generate --checkpoint WORKDIR`` and ``bifrost eval ... --checkpoint WORKDIR`` use this
when no ``--config`` is given; with a config, the config's sections are the source (``sample/build.py``).
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import traverse_util

from bifrost_jax.configs import config_dict, parse_config_flags
from bifrost_jax.data.prompt import load_tokenizer
from bifrost_jax.data.sources import word_tokenizer_dir
from bifrost_jax.data.tokenizers import PaddedTokenizer
from bifrost_jax.parallel.multislice import mesh_from_config
from bifrost_jax.sample.build import build_pipeline, components_of
from bifrost_jax.sample.pipeline import BifrostPipeline, FluxTextEncoder, SamplingOptions
from bifrost_jax.sample.schedulers import DEFAULT_SAMPLER, SCHEDULERS
from bifrost_jax.sample.unet_pipeline import UNetBifrostPipeline, UNetTextEncoder
from bifrost_jax import checkpoint as ckpt
from bifrost_jax.train.loop import initial_frozen
from bifrost_jax.train.phases import Phase
from bifrost_jax.train.registry import get_phase
from bifrost_jax.train.state import StateBuilder, make_optimizer, merge_params

PIPELINE_PHASES = ("controlnet", "mllm")


def saved_config(workdir: str, phase: str, step: Optional[int] = None) -> ml_collections.ConfigDict:
    """The config recorded in ``WORKDIR/<phase>/checkpoints`` (latest step, or ``step``)."""
    root = ckpt.checkpoint_dir(workdir, phase)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{workdir}: no checkpoints of phase {phase!r} (expected {root}); train it first, "
                                f"or pass --config to build the pipeline from a generation config")
    step_dir = ckpt.resolve_step_dir(root, step)
    config_dir = step_dir / "config"
    if not config_dir.exists():
        raise FileNotFoundError(f"{step_dir}: the checkpoint records no config (item 'config'): pass --config")
    saved = ocp.JsonCheckpointHandler().restore(config_dir)
    return ml_collections.ConfigDict(saved)


def phase_variables(workdir: str, name: str, *, mesh=None, step: Optional[int] = None) -> tuple[Phase, dict]:
    """(phase, ``{"params": ..., <mutable collections>}``) of a trained phase of ``workdir``: frozen weights as the
    run initialised them, trained ones from its checkpoint."""
    config = saved_config(workdir, name, step)
    phase = get_phase(config)
    mesh = mesh if mesh is not None else mesh_from_config(dict(config.mesh), devices=jax.local_devices())
    tx, _ = make_optimizer(config.optim, int(config.train.steps))
    builder = StateBuilder(phase, tx, mesh, seed=int(config.seed), ema=False)
    frozen = initial_frozen(builder, phase, config)
    trained = {"params": builder.abstract_state.params, **builder.abstract_state.mutable}
    restored, _ = ckpt.restore_params(ckpt.checkpoint_dir(workdir, name), trained, step=step)
    values = traverse_util.unflatten_dict(restored)
    params = merge_params(values.get("params", {}), frozen)
    return phase, {"params": params, **{c: v for c, v in values.items() if c != "params"}}


def _component(variables: dict, name: str) -> dict:
    """``{collection: tree}`` of one component of a phase's variables."""
    return {c: tree[name] for c, tree in variables.items() if name in tree}


def pipeline_from_workdir(workdir: str, *, options: Optional[SamplingOptions] = None, mesh=None,
                          step: Optional[int] = None, sampler: Optional[str] = None) -> BifrostPipeline:
    """The ``BifrostPipeline`` of a trained workdir (its ``controlnet`` and ``mllm`` phases). ``sampler``: a UNet
    decoder's sampling scheduler, one of ``sample.schedulers.SCHEDULERS`` (diffusers' class names; default
    DPM-Solver++ (2M)) on the noise schedule it was trained with; FLUX samples with its flow-matching Euler."""
    unet = saved_config(workdir, "controlnet", step).get("decoder", "flux") == "unet"
    if sampler is not None and sampler not in SCHEDULERS:
        raise ValueError(f"sampler {sampler!r} is not one of {sorted(SCHEDULERS)}")
    if sampler is not None and not unet:
        raise ValueError(f"sampler {sampler!r}: {workdir} has a FLUX decoder, which samples with its flow-matching "
                         "Euler scheduler (the sampler choice is for UNet decoders)")
    cn, cn_vars = phase_variables(workdir, "controlnet", mesh=mesh, step=step)
    mp, mllm_vars = phase_variables(workdir, "mllm", mesh=mesh, step=step)
    c = cn.config
    vision_vars: Any = _component(cn_vars, "vision") or _component(mllm_vars, "vision")
    if not vision_vars:  # both phases read CLIP latents from a cache: the tower they were built with
        vision_vars = frozen_vision(mp)
    m = mp.config
    tokenizer = load_tokenizer(m.mllm.tokenizer_dir or word_tokenizer_dir(m.data, None))
    shared = dict(controlnet=cn.controlnet.module, controlnet_variables=_component(cn_vars, "controlnet"),
                  vae=cn.vae.module, vae_variables=_component(cn_vars, "vae"), mllm=mp.mllm.module,
                  mllm_variables=_component(mllm_vars, "mllm"), tokenizer=tokenizer,
                  max_prompt_length=int(m.mllm.max_prompt_length), vision=cn.vision.module,
                  vision_variables=vision_vars, mesh=mesh, options=options or SamplingOptions())
    if unet:
        return _unet_pipeline(cn, cn_vars, shared, sampler or DEFAULT_SAMPLER)
    tok_dir = None if (c.t5.tokenizer_dir and c.clip.tokenizer_dir) else word_tokenizer_dir(c.data, None)
    encode_text = FluxTextEncoder(cn.t5.module, _component(cn_vars, "t5"),
                                  PaddedTokenizer(c.t5.tokenizer_dir or tok_dir, c.t5.max_length),
                                  cn.clip.module, _component(cn_vars, "clip"),
                                  PaddedTokenizer(c.clip.tokenizer_dir or tok_dir, c.clip.max_length))
    return BifrostPipeline(transformer=cn.transformer.module, transformer_variables=_component(cn_vars, "transformer"),
                           encode_text=encode_text, **shared)


def _unet_pipeline(cn: Phase, cn_vars: dict, shared: dict, sampler: str) -> UNetBifrostPipeline:
    """The UNet-decoder pipeline of a ``controlnet`` phase trained with ``decoder: unet``: its UNet, text encoders
    and VAE, and the ``sampler`` scheduler on the noise schedule it was trained with."""
    c = cn.config
    tok_dir = None
    if not all(comp.section.tokenizer_dir for comp, _ in cn.text_encoders()):
        tok_dir = word_tokenizer_dir(c.data, None)
    toks = [PaddedTokenizer(comp.section.tokenizer_dir or tok_dir, comp.section.max_length)
            for comp, _ in cn.text_encoders()]
    clip_2 = cn.clip_2
    encode_text = UNetTextEncoder(cn.clip.module, _component(cn_vars, "clip"), toks[0],
                                  clip_2 and clip_2.module, clip_2 and _component(cn_vars, "clip_2"),
                                  toks[1] if clip_2 else None)
    scheduler = SCHEDULERS[sampler].from_hf_config(config_dict(c.scheduler))
    return UNetBifrostPipeline(transformer=cn.unet.module, transformer_variables=_component(cn_vars, "unet"),
                               encode_text=encode_text, scheduler=scheduler, **shared)


def frozen_vision(phase: Phase) -> dict:
    """The vision tower of a phase that did not hold it (CLIP-latent cache): its configured weights."""
    config = phase.config.copy_and_resolve_references()
    config.data.precomputed_clip_latents = ""
    with_tower = get_phase(config)
    mesh = mesh_from_config(dict(config.mesh), devices=jax.local_devices())
    tx, _ = make_optimizer(config.optim, int(config.train.steps))
    frozen = initial_frozen(StateBuilder(with_tower, tx, mesh, seed=int(config.seed), ema=False), with_tower,
                            config)
    return {"params": frozen["vision"]}


def has_config_flag(argv) -> bool:
    return any(a == "--config" or a.startswith("--config=") for a in argv)


class WeightsError(ValueError):
    """A generation config whose components would have random weights without ``--random-weights``."""


def random_components(config) -> list[str]:
    """The components of a generation config with no weight source (neither ``port_dir`` nor ``init_from``; the
    vision tower also takes the mllm's ``port_dir``): what would be random."""
    def sourced(section):
        return bool(section.get("port_dir", "") or section.get("init_from", ""))
    out = [n for n in components_of(config) if n in config and n != "vision" and not sourced(config[n])]
    if "vision" in config and not (sourced(config.vision) or config.mllm.get("port_dir", "")):
        out.append("vision")
    return out


def load_pipeline(config_argv, checkpoint: Optional[str], *, random_weights: bool = False,
                  sampler: Optional[str] = None):
    """The pipeline a command line asks for: the trained workdir ``checkpoint`` (the configs its phases recorded),
    or ``--config FILE [--config.KEY=VALUE ...]`` (a generation config whose sections name their weights: a
    workdir's phases through ``init_from``). Random weights only when asked for by name: a config component with no
    weight source is an error (``WeightsError``) unless ``random_weights``. Returns ``(pipeline, config or None)``."""
    argv = list(config_argv)
    if has_config_flag(argv):
        if checkpoint:
            raise ValueError(f"--checkpoint {checkpoint} with --config: a generation config names its weights itself "
                             "(config.<component>.port_dir / init_from=WORKDIR/<phase>/checkpoints); give "
                             "--checkpoint WORKDIR alone to use a trained workdir as it is")
        if sampler is not None:
            raise ValueError(f"--sampler {sampler} with --config: a generation config names its sampler itself "
                             f"(--config.sample.scheduler={sampler})")
        config, _ = parse_config_flags(argv)
        random = random_components(config)
        if random and not random_weights:
            raise WeightsError(f"component(s) {random} of this config have no weights (no port_dir / init_from): "
                               "pass --random-weights to use random weights anyway, or --checkpoint WORKDIR")
        if random:
            print(f"using RANDOM weights for {random} (--random-weights)")
        return build_pipeline(config), config
    if argv:
        raise ValueError(f"unexpected arguments {argv} (config overrides need --config FILE)")
    if not checkpoint:
        raise ValueError("give --checkpoint WORKDIR (a trained workdir) or --config FILE (a generation config, e.g. "
                         "configs/generate_tiny.py)")
    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such directory")
    return pipeline_from_workdir(checkpoint, sampler=sampler), None
