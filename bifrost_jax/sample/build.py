"""Building a :class:`BifrostPipeline` from a generation config and an optional training workdir (the config schema
is ``BUILD_DOC``; ``configs/generate_tiny.py`` is a complete example)."""
from __future__ import annotations

import os
import tempfile
import zlib
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bifrost_jax import port
from bifrost_jax.data.prompt import build_word_tokenizer, load_tokenizer
from bifrost_jax.data.tokenizers import hash_tokenizer, hf_tokenizer
from bifrost_jax.models.bifrost import BifrostConfig, BifrostMLLM
from bifrost_jax.models.flux.controlnet import FluxControlNetConfig, LatentControlNet
from bifrost_jax.models.flux.transformer import FluxConfig, FluxTransformer2DModel
from bifrost_jax.models.flux.vae import AutoencoderKL, AutoencoderKLConfig
from bifrost_jax.models.qwen.vision import QwenVisionConfig, QwenVisionTransformer
from bifrost_jax.models.text.clip import CLIPTextConfig, CLIPTextModel
from bifrost_jax.models.text.t5 import T5EncoderConfig, T5EncoderModel
from bifrost_jax.parallel.mesh import make_mesh
from bifrost_jax.parallel.rules import tree_shardings
from bifrost_jax.port.orbax_io import restore_ported
from bifrost_jax.sample.pipeline import BifrostPipeline, FluxTextEncoder, SamplingOptions
from bifrost_jax.train.checkpoint import checkpoint_dir, checkpoint_param_shapes, resolve_step_dir, restore_params


BUILD_DOC = """Config schema of ``build_pipeline`` (ml_collections; every component a sub-dict):

    config.dtype, config.param_dtype     "float32" | "bfloat16": compute and parameter dtypes
    config.seed                          seeds the "random" sources
    config.mesh                          {"data", "fsdp", "tensor"} sizes over THIS process's devices (-1 fills)
    config.sample                        SamplingOptions fields (num_images_per_prompt, seed, mar_steps (0: N),
                                         mllm_cfg, flux_steps, guidance, conditioning_scale)
    config.<component> for mllm, transformer, controlnet, vae, t5, clip, vision:
        source       "random"  module config ``model`` + seeded synthetic weights (``synthetic_variables``;
                               ``init_noise`` scales biases and zero-init tensors): tests and demos only
                     "port"    ``bifrost_jax.port.load(kind, path, **port_kwargs)`` of a PyTorch directory
                               (kinds: mllm "bifrost-1" (port_kwargs.base = the Qwen2.5-VL dir), transformer
                               "flux-transformer", controlnet "latent-controlnet", vae "flux-vae", t5 "t5-encoder",
                               clip "clip-text", vision "qwen2.5-vl")
                     "orbax"   a ``bifrost port`` output directory ``path`` (restored, then ``subtree``, a dotted
                               path into the restored tree, selects the component's variables or params, e.g.
                               "mllm", or "vl.params.visual" for the ViT of a bifrost-1 port)
                     "phase"   the trained checkpoint of phase ``phase`` under WORKDIR (strict: every variable)
                     "mllm"    vision only: the ViT of the mllm component's Qwen2.5-VL (mllm source "port")
                     ""        no such component (vision: no reconstruction; mllm: no generation)
        path, port_kwargs, subtree, init_noise     as above
        model        the component's config.json dict (diffusers / transformers fields; mllm: BifrostConfig
                     fields), used by "random", "orbax" and "phase"
        phase, phase_subtree   with any source: when WORKDIR/<phase>/checkpoints exists, the variables saved there
                     (under ``phase_subtree`` of each collection) REPLACE the loaded ones; saved entries the
                     component does not have, or with other shapes, are errors
    config.mllm.tokenizer        a tokenizer.json directory, or "word" (``build_word_tokenizer`` over
                                 ``tokenizer_words``, written to a temporary directory)
    config.mllm.max_prompt_length
    config.t5.tokenizer / config.clip.tokenizer   a transformers tokenizer directory, or "hash" (``hash_tokenizer``)
    config.t5.max_length / config.clip.max_length  512 / 77 for FLUX.1
"""


def _dtype(name: str):
    table = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(table)}")
    return table[name]


def _opt(cc, key: str, default):
    value = cc.get(key, default) if hasattr(cc, "get") else default
    return default if value is None else value


def _as_dict(x) -> dict:
    return x.to_dict() if hasattr(x, "to_dict") else dict(x or {})


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(tree)


def _unflat(flat: dict):
    return traverse_util.unflatten_dict(flat)


def _abstract(module, init_fn, mesh):
    """(ShapeDtypeStructs with shardings, init function) of a module's variables."""
    boxed = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    shapes = nn.meta.unbox(boxed)
    if mesh is not None:
        shardings = tree_shardings(nn.get_partition_spec(boxed), mesh)
    else:
        single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: single, shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def synthetic_variables(abstract, seed: int, noise: float = 0.05):
    """Seeded random variables for the "random" source (tests, demos), drawn on the host from the shapes alone (no
    init compile): kernels and embeddings N(0, 1/fan_in) with fan_in the product of all but the last axis, norm
    scales 1 + noise * N(0, 1), every other parameter (biases, zero-init tokens) noise * N(0, 1); BatchNorm
    statistics mean 0, var 1."""
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


def _check_against(tree, abstract, what: str) -> None:
    got, want = _flat(tree), _flat(abstract)
    problems = [f"missing {'.'.join(k)}" for k in want if k not in got]
    problems += [f"unexpected {'.'.join(k)}" for k in got if k not in want]
    problems += [f"{'.'.join(k)}: shape {tuple(np.shape(got[k]))}, expected {tuple(want[k].shape)}"
                 for k in want if k in got and tuple(np.shape(got[k])) != tuple(want[k].shape)]
    if problems:
        raise ValueError(f"{what} does not match the module's variables:\n  " + "\n  ".join(problems))


def _place(tree, abstract):
    return jax.tree.map(lambda x, a: jax.device_put(jnp.asarray(x, a.dtype), a.sharding), tree, abstract)


def _select(tree, dotted: str, what: str):
    for part in [p for p in dotted.split(".") if p]:
        if not isinstance(tree, dict) or part not in tree:
            raise KeyError(f"{what}: no {part!r} in {sorted(tree) if isinstance(tree, dict) else type(tree)} "
                           f"(subtree {dotted!r})")
        tree = tree[part]
    return tree


def _abstract_of(variables):
    """ShapeDtypeStructs (with the arrays' shardings) of loaded variables."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), variables)


def _overlay_phase(variables, abstract, cc, workdir: Optional[str], name: str, strict: bool):
    """Variables from ``WORKDIR/<phase>/checkpoints`` (see BUILD_DOC) replacing those of ``variables``;
    ``strict``: every variable of ``abstract`` must be in the checkpoint."""
    phase = _opt(cc, "phase", "")
    if not phase or not workdir:
        if strict:
            raise ValueError(f"config.{name}: source 'phase' needs config.{name}.phase and --checkpoint WORKDIR")
        return variables
    root = checkpoint_dir(workdir, phase)
    if not os.path.isdir(root):  # a named checkpoint never silently falls back to the configured weights
        raise FileNotFoundError(f"config.{name}.phase={phase!r}: no checkpoint directory {root} under --checkpoint "
                                f"{workdir}")
    prefix = tuple(p for p in _opt(cc, "phase_subtree", "").split(".") if p)
    flat = {(k[0],) + prefix + k[1:]: v for k, v in _flat(abstract).items()}
    saved = checkpoint_param_shapes(resolve_step_dir(root))
    # entries outside this component's subtree belong to other components of the phase
    outside = tuple(k for k in saved if tuple(k[1:1 + len(prefix)]) != prefix) if prefix else ()
    if not strict:  # overlay: what the checkpoint holds (unexpected or wrong-shape saved entries still raise)
        flat = {k: v for k, v in flat.items() if k in saved}
    restored, _ = restore_params(root, _unflat(flat), allow_unused=outside)
    stripped = {(k[0],) + tuple(k[1 + len(prefix):]): v for k, v in restored.items()}
    merged = dict(_flat(variables)) if variables is not None else {}
    merged.update(stripped)
    print(f"{name}: {len(stripped)} variables from {root}")
    return _unflat(merged)


def _component(config, name: str, module, init_fn, port_kind: str, workdir, mesh, dtype, param_dtype):
    """(module, variables) of one component per its config (BUILD_DOC)."""
    cc = config[name]
    source = cc.source
    if source == "port":
        module, variables = port.load(port_kind, cc.path, dtype=param_dtype, mesh=mesh, compute_dtype=dtype,
                                      **_as_dict(_opt(cc, "port_kwargs", {})))
        return module, _overlay_phase(variables, _abstract_of(variables), cc, workdir, name, strict=False)
    abstract = _abstract(module, init_fn, mesh)
    if source == "random":
        seed = int(config.seed) + zlib.crc32(name.encode()) % 1000
        variables = _place(synthetic_variables(abstract, seed, float(_opt(cc, "init_noise", 0.05))), abstract)
    elif source == "orbax":
        tree = _select(restore_ported(cc.path), _opt(cc, "subtree", ""), f"config.{name}")
        if "params" not in tree:  # the subtree named a params tree
            tree = {"params": tree}
        _check_against(tree, abstract, f"{cc.path} ({name})")
        variables = _place(tree, abstract)
    elif source == "phase":
        return module, _overlay_phase(None, abstract, cc, workdir, name, strict=True)
    else:
        raise ValueError(f"config.{name}.source={source!r}: use random | port | orbax | phase")
    return module, _overlay_phase(variables, abstract, cc, workdir, name, strict=False)


def _word_tokenizer_dir(words: Sequence[str]) -> str:
    return build_word_tokenizer(list(words), tempfile.mkdtemp(prefix="bifrost_word_tokenizer_"))


def build_pipeline(config, workdir: Optional[str] = None, *, mesh=None) -> BifrostPipeline:
    """A ``BifrostPipeline`` from an ml_collections config (schema: ``BUILD_DOC``) and an optional training
    WORKDIR whose phase checkpoints override the configured weights."""
    if workdir is not None:
        if not os.path.isdir(workdir):
            raise FileNotFoundError(f"--checkpoint {workdir}: no such directory")
        takers = [n for n in ("mllm", "transformer", "controlnet", "vae", "t5", "clip", "vision")
                  if n in config and _opt(config[n], "phase", "")]
        if not takers:
            raise ValueError(f"--checkpoint {workdir}: no component of this config takes weights from it (set "
                             "config.<component>.phase); without --config the workdir's own saved configs are used")
    dtype, param_dtype = _dtype(_opt(config, "dtype", "bfloat16")), _dtype(_opt(config, "param_dtype", "float32"))
    if mesh is None and _opt(config, "mesh", None) is not None:
        mesh = make_mesh(_as_dict(config.mesh), devices=jax.local_devices())
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    common = dict(workdir=workdir, mesh=mesh, dtype=dtype, param_dtype=param_dtype)

    def model_dict(name):
        return _as_dict(_opt(config[name], "model", {}))

    transformer = FluxTransformer2DModel(FluxConfig.from_hf_config(model_dict("transformer")), **kw)
    transformer, transformer_vars = _component(config, "transformer", transformer,
                                               lambda r: transformer.init(r, **transformer.dummy_inputs()),
                                               "flux-transformer", **common)
    controlnet = LatentControlNet(FluxControlNetConfig.from_hf_config(model_dict("controlnet")), **kw)
    controlnet, controlnet_vars = _component(config, "controlnet", controlnet,
                                             lambda r: controlnet.init(r, **controlnet.dummy_inputs()),
                                             "latent-controlnet", **common)
    vae = AutoencoderKL(AutoencoderKLConfig.from_hf_config(model_dict("vae")), **kw)
    f = vae.config.downsample_factor
    vae, vae_vars = _component(config, "vae", vae, lambda r: vae.init(r, jnp.zeros((1, 2 * f, 2 * f, 3))),
                               "flux-vae", **common)

    t5 = T5EncoderModel(T5EncoderConfig.from_hf_config(model_dict("t5")), **kw)
    t5, t5_vars = _component(config, "t5", t5, lambda r: t5.init(r, jnp.zeros((1, 4), jnp.int32)), "t5-encoder",
                             **common)
    clip = CLIPTextModel(CLIPTextConfig.from_hf_config(model_dict("clip")), **kw)
    clip, clip_vars = _component(config, "clip", clip, lambda r: clip.init(r, jnp.zeros((1, 4), jnp.int32)),
                                 "clip-text", **common)

    def text_tokenizer(name, module_cfg, eos, pad, bos=None):
        cc = config[name]
        spec, length = cc.tokenizer, int(cc.max_length)
        if spec == "hash":
            return hash_tokenizer(module_cfg.vocab_size, length, eos_token_id=eos, pad_token_id=pad,
                                  bos_token_id=bos)
        return hf_tokenizer(spec, length)

    t5_cfg, clip_cfg = t5.config, clip.config
    encode_text = FluxTextEncoder(
        t5, t5_vars, text_tokenizer("t5", t5_cfg, t5_cfg.eos_token_id, t5_cfg.pad_token_id or 0),
        clip, clip_vars, text_tokenizer("clip", clip_cfg, clip_cfg.eos_token_id, clip_cfg.pad_token_id or 0,
                                        clip_cfg.bos_token_id))

    mllm = mllm_vars = tokenizer = None
    vl_module = vl_vars = None
    mc = config.mllm
    if mc.source:
        if mc.source == "port":
            pair, both = port.load("bifrost-1", mc.path, dtype=param_dtype, mesh=mesh, compute_dtype=dtype,
                                   **_as_dict(_opt(mc, "port_kwargs", {})))
            mllm, mllm_vars, vl_module, vl_vars = pair.mllm, both["mllm"], pair.vl, both["vl"]
            mllm_vars = _overlay_phase(mllm_vars, _abstract_of(mllm_vars), mc, workdir, "mllm", strict=False)
        else:
            bcfg = BifrostConfig.from_dict(model_dict("mllm"))
            mllm = BifrostMLLM(bcfg, **kw)
            n = bcfg.num_image_tokens
            mllm, mllm_vars = _component(
                config, "mllm", mllm, lambda r: mllm.init(r, jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32),
                                                          jnp.zeros((1, n, bcfg.clip_dim)), jnp.ones((1, n), bool)),
                "bifrost-1", **common)
        spec = mc.tokenizer
        tokenizer = load_tokenizer(_word_tokenizer_dir(list(_opt(mc, "tokenizer_words", ())))
                                   if spec == "word" else spec)
        if tokenizer.vocab_size > mllm.config.text.vocab_size:
            raise ValueError(f"the MLLM tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                             f"{mllm.config.text.vocab_size}")

    vision = vision_vars = None
    vc = config.get("vision", None)
    if vc is not None and vc.source:
        if vc.source == "mllm":
            if vl_module is None:
                raise ValueError("config.vision.source='mllm' needs config.mllm.source='port' (the Qwen2.5-VL ViT)")
            vision = QwenVisionTransformer(vl_module.config.vision, **kw)
            vision_vars = {"params": vl_vars["params"]["visual"]}
        elif vc.source == "port":
            vl, vars_ = port.load("qwen2.5-vl", vc.path, dtype=param_dtype, mesh=mesh, compute_dtype=dtype,
                                  **_as_dict(_opt(vc, "port_kwargs", {})))
            vision, vision_vars = QwenVisionTransformer(vl.config.vision, **kw), {"params": vars_["params"]["visual"]}
        else:
            vcfg = QwenVisionConfig.from_hf_config(model_dict("vision"))
            vision = QwenVisionTransformer(vcfg, **kw)
            unit = vcfg.patch_size * vcfg.spatial_merge_size
            dummy = jnp.zeros((1, (unit // vcfg.patch_size) ** 2, vcfg.patch_dim))
            grid = (1, unit // vcfg.patch_size, unit // vcfg.patch_size)
            vision, vision_vars = _component(config, "vision", vision, lambda r: vision.init(r, dummy, grid),
                                             "qwen2.5-vl", **common)

    s = config.sample
    options = SamplingOptions(num_images_per_prompt=int(s.num_images_per_prompt), seed=int(s.seed),
                              mar_steps=int(s.mar_steps) or None, mllm_cfg=float(s.mllm_cfg),
                              flux_steps=int(s.flux_steps), guidance=float(s.guidance),
                              conditioning_scale=float(s.conditioning_scale))
    return BifrostPipeline(transformer=transformer, transformer_variables=transformer_vars, controlnet=controlnet,
                           controlnet_variables=controlnet_vars, vae=vae, vae_variables=vae_vars,
                           encode_text=encode_text, mllm=mllm, mllm_variables=mllm_vars, tokenizer=tokenizer,
                           max_prompt_length=int(_opt(mc, "max_prompt_length", 300)), vision=vision,
                           vision_variables=vision_vars, mesh=mesh, options=options)
