"""The real training phases of Bifrost-1 and the demo aids it needs, one loss each (spec 6, 9):

* ``controlnet`` (stage A, spec 9): the latent ControlNet learns to steer a FROZEN FLUX with the patch-level CLIP
  latents of the image. Flow matching on packed VAE latents; CLIP latents from the frozen Qwen2.5-VL vision tower
  on the fly (ViT view of the same crop) or from a cache. The ControlNet's BatchNorm runs in training mode and its
  running statistics are carried (and checkpointed) as the ``batch_stats`` collection.
* ``mllm`` (stage B, spec 6): the generation branch of ``BifrostMLLM`` regresses the vision tower's latents of the
  image from the prompt and a MAR-masked copy of them (MSE over ALL slots). Only the branch, ``vision_branch_norm``,
  ``vision_head``, ``mask_token`` and ``learnable_pos_emb`` train.
* ``flux``: trains (from scratch or a port) a FLUX-architecture transformer with the same flow-matching loss and
  no ControlNet: the embedded/tiny default has no pretrained FLUX offline.
* ``vae``: trains the ``AutoencoderKL`` (reconstruction + kl_weight * KL). A DEMO AID only: FLUX's real VAE comes
  from a port; the tiny default has none offline.

Variables of every phase are ``{"params": {component: ...}, ...}`` with the same component names in every phase
(``transformer``, ``controlnet``, ``vae``, ``t5``, ``clip``, ``vision``, ``mllm``), so a phase starts params-only
from another phase's checkpoint by name: ``config.flux.init_from = WORKDIR/flux/checkpoints`` restores
``params.transformer`` saved by the ``flux`` phase, ``config.vae.init_from`` ``params.vae`` saved by the ``vae``
phase.

Initial weights of a component, in order: random init, then its port (``config.<component>.port_dir``: a
diffusers/transformers directory or a ``bifrost port`` Orbax directory), then another phase's checkpoint
(``config.<component>.init_from``). A component with neither keeps its random init and is listed in
``new_subtrees`` (so H's accounting allows it) and in a log line. FROZEN components are randomly initialised from a
fixed key derived from their name (not from ``config.seed``), so every phase that builds a random frozen T5 / CLIP /
vision tower / VAE gets the same one (the tiny demo trains ``vae`` and ``flux`` first, then ``controlnet`` reuses
their T5/CLIP and the ``mllm`` phase's vision tower is the ``controlnet`` phase's).

Data: images from ``config.data.source`` (``shapes``: built into ``data.data_dir`` on first use; ``captions``;
``imagenet``), read with ``data/pipeline.make_train_iterator``. Batches hold uint8 image views (converted on
device) and host-tokenised int32 ids. Registration: ``PHASES`` entries ``"controlnet"``, ``"mllm"``, ``"flux"``,
``"vae"`` -> ``bifrost_jax.train.bifrost_phases:<Class>`` (importing this module also registers them).
"""
from __future__ import annotations

import logging
import math
import os
import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bifrost_jax.models.bifrost import BifrostConfig, BifrostMLLM, init_branch_from_original, mse_loss
from bifrost_jax.models.bifrost import is_trainable as mllm_is_trainable
from bifrost_jax.models.bifrost import sample_mar_mask
from bifrost_jax.models.flux.controlnet import FluxControlNetConfig, LatentControlNet
from bifrost_jax.models.flux.transformer import FluxConfig, FluxTransformer2DModel
from bifrost_jax.models.flux.vae import (AutoencoderKL, AutoencoderKLConfig, latent_image_ids, pack_latents,
                                         sample_posterior_latents)
from bifrost_jax.models.qwen.decoder import QwenTextConfig
from bifrost_jax.models.qwen.vision import QwenVisionConfig, QwenVisionTransformer
from bifrost_jax.models.text.clip import CLIPTextConfig, CLIPTextModel
from bifrost_jax.models.text.t5 import T5EncoderConfig, T5EncoderModel
from bifrost_jax.parallel.rules import LOGICAL_AXIS_RULES
from bifrost_jax.sample.flow import add_noise, sample_training_sigmas
from bifrost_jax.train.phases import PHASES, Phase
from bifrost_jax.train.state import merge_params
from bifrost_jax.train.text_conditioning import PaddedTokenizer, encode_flux_text, ensure_word_tokenizer

log = logging.getLogger(__name__)

Params = Any


# ----------------------------------------------------------------------------------------------------------------
# small helpers

def _dtype(name) -> Any:
    return jnp.dtype(name) if name else jnp.float32


def _cfg_dict(cfg) -> dict:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def _fixed_key(name: str) -> jax.Array:
    """The init key of a FROZEN component: a function of its name only (see the module docstring)."""
    return jax.random.fold_in(jax.random.PRNGKey(0), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _component_key(rng, name: str) -> jax.Array:
    return jax.random.fold_in(rng, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _is_box(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _rebox(boxed, values):
    """``values`` (plain arrays) wearing the logical-axis boxes of ``boxed`` (same structure)."""
    return jax.tree.map(lambda b, v: b.replace_boxed(v) if _is_box(b) else v, boxed, values, is_leaf=_is_box)


def relax_indivisible(variables):
    """Replace logical axis names whose mesh axes do not divide the dimension by None (replicated).

    The VAE's 3-channel output conv (``conv_out`` -> "tensor") cannot be split over a tensor axis of 2 or 4, and
    jit refuses uneven shardings. The StateBuilder traces ``init_variables`` under the mesh, so the abstract mesh
    is known here; without one this is the identity."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or not getattr(mesh, "shape", None):
        return variables
    sizes = dict(mesh.shape)

    def fix(leaf):
        if not isinstance(leaf, nn.LogicallyPartitioned):
            return leaf
        axes = nn.logical_to_mesh_axes(tuple(leaf.names), LOGICAL_AXIS_RULES)
        shape = jnp.shape(leaf.value)
        names = list(leaf.names)
        for i, (name, mesh_axes) in enumerate(zip(leaf.names, axes)):
            if mesh_axes is None:
                continue
            mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
            n = math.prod(sizes.get(a, 1) for a in mesh_axes)
            if shape[i] % n:
                names[i] = None
        return leaf.replace(names=tuple(names)) if names != list(leaf.names) else leaf

    return jax.tree.map(fix, variables, is_leaf=_is_box)


def _flat(tree) -> dict:
    return {tuple(str(p) for p in k): v for k, v in traverse_util.flatten_dict(tree).items()} if tree else {}


def _place(values, abstract, shardings, what: str):
    """``values`` (a tree like ``abstract``) checked against the expected shapes and put on ``shardings``."""
    fv, fa = _flat(values), _flat(abstract)
    missing = sorted(set(fa) - set(fv))
    extra = sorted(set(fv) - set(fa))
    wrong = [f"{'.'.join(k)}: {tuple(fv[k].shape)} vs expected {tuple(fa[k].shape)}"
             for k in fa if k in fv and tuple(fv[k].shape) != tuple(fa[k].shape)]
    if missing or extra or wrong:
        raise ValueError(f"{what} does not match the model configured here:"
                         + (f"\n  missing: {['.'.join(k) for k in missing]}" if missing else "")
                         + (f"\n  unexpected: {['.'.join(k) for k in extra]}" if extra else "")
                         + (f"\n  wrong shape: {wrong}" if wrong else ""))
    fs = _flat(shardings)
    out = {k: jax.device_put(jnp.asarray(fv[k], fa[k].dtype), fs[k], may_alias=False) for k in fa}
    return traverse_util.unflatten_dict(out)


def _check_keys(saved: dict, expected: dict, what: str) -> None:
    """Raise naming every expected key absent from ``saved``, every unexpected one and every wrong shape."""
    from bifrost_jax.train.checkpoint import shape_mismatches
    missing, extra, wrong = shape_mismatches(saved, expected)
    if missing or extra or wrong:
        raise ValueError(f"{what} does not match the model configured here:"
                         + (f"\n  missing: {['.'.join(k) for k in missing]}" if missing else "")
                         + (f"\n  unexpected: {['.'.join(k) for k in extra]}" if extra else "")
                         + (f"\n  wrong shape: {wrong}" if wrong else ""))


def _is_orbax_port(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "port.json"))


def _has_key_prefix(path: str, prefix: str) -> bool:
    from bifrost_jax.port.base import SafetensorsReader
    return any(k.startswith(prefix) for k in SafetensorsReader(path).keys())


def _bifrost1_layout(path: str) -> str | None:
    """"orbax" for a ``bifrost port --kind bifrost-1`` output, "official" for an official Bifrost-1 checkpoint
    directory (it has the top-level ``learnable_pos_emb`` tensor), else None."""
    if _is_orbax_port(path):
        from bifrost_jax.port.orbax_io import read_port_info
        return "orbax" if read_port_info(path).get("kind") == "bifrost-1" else None
    from bifrost_jax.port.base import SafetensorsReader
    try:
        return "official" if "learnable_pos_emb" in SafetensorsReader(path) else None
    except Exception:  # not a safetensors directory: the regular loader reports it
        return None


def _restore_orbax_port(port_dir: str, kinds: tuple[str, ...], prefix: tuple[str, ...], abstract, shardings,
                        what: str):
    """The subtree at ``prefix`` of a ``bifrost port`` Orbax directory, restored straight into ``shardings``."""
    import orbax.checkpoint as ocp

    from bifrost_jax.port.orbax_io import read_port_info

    info = read_port_info(port_dir)
    if info.get("kind") not in kinds:
        raise ValueError(f"{what}: {port_dir} is a {info.get('kind')!r} port; expected one of {kinds}")
    # Accounting first: a partial restore would silently ignore extra weights and fail obscurely on missing ones.
    meta = ocp.PyTreeCheckpointer().metadata(os.path.join(os.path.abspath(port_dir), "variables"))
    meta = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    saved = {k[len(prefix):]: tuple(m.shape) for k, m in _flat(meta).items() if k[:len(prefix)] == prefix}
    _check_keys(saved, {k: tuple(a.shape) for k, a in _flat(abstract).items()},
                f"{what}={port_dir} ({info.get('kind')} port, subtree {'.'.join(prefix)})")
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    for key in reversed(prefix):
        target = {key: target}
    got = ocp.PyTreeCheckpointer().restore(
        os.path.join(os.path.abspath(port_dir), "variables"),
        args=ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                    partial_restore=True))
    for key in prefix:
        got = got[key]
    return _place(got, abstract, shardings, f"{what} ({port_dir})")


def _restore_phase_checkpoint(path: str, step: int, collections: dict, abstract, shardings, allow_unused=()):
    """``{collection: {component: tree}}`` from another phase's checkpoint (params-only, strict accounting:
    everything asked for must be there, and every saved weight of those components must be used, outside the
    section's ``init_allow_unused``; the checkpoint may hold other components)."""
    from bifrost_jax.train import checkpoint as ckpt

    fs = _flat(shardings)
    target = {k: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=fs[k]) for k, a in _flat(abstract).items()
              if k[0] in collections and k[1] in collections[k[0]]}
    restored, _ = ckpt.restore_params(path, traverse_util.unflatten_dict(target), step=step,
                                      only_under=[(c, n) for c, names in collections.items() for n in names],
                                      allow_unused=ckpt.parse_prefixes(allow_unused))
    return traverse_util.unflatten_dict(restored)


# ----------------------------------------------------------------------------------------------------------------
# components

class Component:
    """One model of a phase: its module, dummy init inputs and where its pretrained weights come from."""

    def __init__(self, name: str, module: nn.Module, init_args: tuple, init_kwargs: dict, section,
                 port_kinds: tuple[str, ...] = (), trainable: bool = False):
        self.name, self.module, self.init_args, self.init_kwargs = name, module, init_args, init_kwargs
        self.section, self.port_kinds, self.trainable = section, port_kinds, trainable

    def init(self, rng):
        key = _component_key(rng, self.name) if self.trainable else _fixed_key(self.name)
        return self.module.init(key, *self.init_args, **self.init_kwargs)

    @property
    def port_dir(self) -> str:
        return self.section.get("port_dir", "") or ""

    @property
    def init_from(self) -> str:
        return self.section.get("init_from", "") or ""

    @property
    def has_source(self) -> bool:
        return bool(self.port_dir or self.init_from)


def _module_kw(section) -> dict:
    kw = dict(dtype=_dtype(section.dtype), param_dtype=_dtype(section.param_dtype))
    for k in ("scan_layers", "remat_policy"):
        if k in section:
            kw[k] = section[k]
    return kw


def flux_component(section, trainable: bool) -> Component:
    cfg = FluxConfig.from_hf_config(_cfg_dict(section.config))
    module = FluxTransformer2DModel(cfg, **_module_kw(section))
    return Component("transformer", module, (), module.dummy_inputs(), section, ("flux-transformer",), trainable)


def vae_component(section, trainable: bool) -> Component:
    cfg = AutoencoderKLConfig.from_hf_config(_cfg_dict(section.config), remat_policy=section.remat_policy)
    module = AutoencoderKL(cfg, dtype=_dtype(section.dtype), param_dtype=_dtype(section.param_dtype))
    f = cfg.downsample_factor
    # an EMPTY batch: the parameters are the same, and XLA compiles the init's forward convolutions much faster
    x = jnp.zeros((0, 2 * f, 2 * f, cfg.in_channels), jnp.float32)
    return Component("vae", module, (x,), {}, section, ("flux-vae",), trainable)


def t5_component(section) -> Component:
    module = T5EncoderModel(T5EncoderConfig.from_hf_config(_cfg_dict(section.config)), **_module_kw(section))
    return Component("t5", module, (jnp.zeros((1, 2), jnp.int32),), {}, section, ("t5-encoder",))


def clip_component(section) -> Component:
    module = CLIPTextModel(CLIPTextConfig.from_hf_config(_cfg_dict(section.config)), **_module_kw(section))
    return Component("clip", module, (jnp.zeros((1, 2), jnp.int32),), {}, section, ("clip-text",))


def vision_component(section) -> Component:
    cfg = QwenVisionConfig.from_hf_config(_cfg_dict(section.config))
    module = QwenVisionTransformer(cfg, **_module_kw(section))
    m = cfg.spatial_merge_size
    x = jnp.zeros((1, m * m, cfg.patch_dim), jnp.float32)
    return Component("vision", module, (x, (1, m, m)), {}, section, ("qwen2.5-vl",))


def vision_grid(section) -> tuple[int, int, int]:
    cfg = QwenVisionConfig.from_hf_config(_cfg_dict(section.config))
    r = int(section.resolution)
    unit = cfg.patch_size * cfg.spatial_merge_size
    if r % unit:
        raise ValueError(f"config.vision.resolution={r} must be a multiple of patch_size*spatial_merge_size={unit}")
    return (1, r // cfg.patch_size, r // cfg.patch_size)


def clip_latents_from_pixels(vision: nn.Module, vision_params, vit_pixels, grid_thw):
    """uint8 (B, R, R, 3) ViT views -> (B, (R/28)^2, C) patch-level CLIP latents of the frozen vision tower."""
    from bifrost_jax.data.qwen_image import patchify

    cfg = vision.config
    pixels = patchify(jnp.asarray(vit_pixels).astype(jnp.float32), value_range=(0.0, 255.0),
                      patch_size=cfg.patch_size, temporal_patch_size=cfg.temporal_patch_size,
                      merge_size=cfg.spatial_merge_size)
    out = vision.apply({"params": vision_params}, pixels, grid_thw)
    return jax.lax.stop_gradient(out.astype(jnp.float32))


# ----------------------------------------------------------------------------------------------------------------
# loading ports into the phase's shardings

def _hf_load(comp: Component, abstract, shardings, mesh):
    """``{"params": ...}`` (and ``batch_stats``) of ``comp`` from a diffusers/transformers directory."""
    from bifrost_jax import port
    from bifrost_jax.port.base import SafetensorsReader, load_mapped, read_json

    path = comp.port_dir
    s = comp.section
    what = f"config.{s_name(comp)}.port_dir={path}"
    if comp.name == "vision":
        from bifrost_jax.port.qwen import vision_key_map
        reader = SafetensorsReader(path)
        # a transformers Qwen2.5-VL (hub layout "visual.", in-memory "model.visual.") or an official Bifrost-1
        # checkpoint that includes its ViT
        prefix = next((p for p in ("vision_language_model.visual.", "model.visual.")
                       if any(k.startswith(p) for k in reader.keys())), "visual.")
        key_map = vision_key_map(comp.module.config, comp.module.scan_layers, prefix)
        params = load_mapped(reader, key_map, abstract["params"], dtype=abstract_dtype(abstract),
                             shardings=shardings["params"], what=what,
                             ignore_unused=lambda k: not k.startswith(prefix))
        return {"params": params}
    if comp.name == "vae":
        from bifrost_jax.port.vae import _vae_dir, vae_key_map
        path = _vae_dir(path)
        AutoencoderKLConfig.from_hf_config(read_json(os.path.join(path, "config.json")))  # validates the file
        reader = SafetensorsReader(path, prefix="diffusion_pytorch_model")
        key_map = vae_key_map(abstract["params"], {k: reader.shape(k) for k in reader.keys()})
        params = load_mapped(reader, key_map, abstract["params"], dtype=abstract_dtype(abstract),
                             shardings=shardings["params"], what=what)
        return {"params": params}
    kind = comp.port_kinds[0]
    kw = dict(dtype=abstract_dtype(abstract), mesh=mesh)
    if "scan_layers" in s:
        kw["scan_layers"] = s.scan_layers
    if kind == "latent-controlnet":
        # the official config.json has no clip_grid (the port would assume the released 16x16): the phase's
        kw["clip_grid"] = tuple(comp.module.config.clip_grid)
    _, variables = port.load(kind, path, **kw)
    return _place(variables, abstract, shardings, what)


def abstract_dtype(abstract):
    leaves = jax.tree.leaves(abstract["params"] if "params" in abstract else abstract)
    return leaves[0].dtype if leaves else jnp.float32


def s_name(comp: Component) -> str:
    return {"transformer": "flux"}.get(comp.name, comp.name)


def load_component(comp: Component, abstract_vars, shardings, collections=("params",)):
    """Pretrained ``{collection: {comp.name: ...}}`` of one component, or {} without a source. The port comes
    first; ``init_from`` (another phase's checkpoint) overrides it."""
    abstract = {c: abstract_vars[c][comp.name] for c in collections if comp.name in abstract_vars.get(c, {})}
    shard = {c: shardings[c][comp.name] for c in abstract}
    mesh = jax.tree.leaves(shard)[0].mesh
    out = {}
    if comp.port_dir:
        if _is_orbax_port(comp.port_dir):
            from bifrost_jax.port.orbax_io import read_port_info
            kind = read_port_info(comp.port_dir).get("kind")
            # the ViT may also come from a bifrost-1 port (its frozen Qwen2.5-VL)
            kinds = comp.port_kinds + (("bifrost-1",) if comp.name == "vision" else ())
            got = {c: _restore_orbax_port(comp.port_dir, kinds, _orbax_prefix(comp, c, kind), abstract[c], shard[c],
                                          f"config.{s_name(comp)}.port_dir") for c in abstract}
        else:
            got = _hf_load(comp, abstract, shard, mesh)
        out = {c: {comp.name: got[c]} for c in got}
    if comp.init_from:
        step = int(comp.section.get("init_step", -1))
        out = _restore_phase_checkpoint(comp.init_from, step, {c: (comp.name,) for c in abstract}, abstract_vars,
                                        shardings, comp.section.get("init_allow_unused", ()))
    return out


def _orbax_prefix(comp: Component, collection: str, kind: str | None = None) -> tuple[str, ...]:
    # `bifrost port` saves the port's variables: {"params": ...} (+ "batch_stats"); Qwen2.5-VL nests the ViT; a
    # bifrost-1 port saves {"mllm": {"params"}, "vl": {"params"}} (the ViT under vl.params.visual).
    if comp.name == "vision":
        return ("vl", collection, "visual") if kind == "bifrost-1" else (collection, "visual")
    return (collection,)


def _merge(*trees):
    flat = {}
    for t in trees:
        flat.update(traverse_util.flatten_dict(t) if t else {})
    return traverse_util.unflatten_dict(flat) if flat else {}


# ----------------------------------------------------------------------------------------------------------------
# data

def shapes_vocabulary() -> list[str]:
    from bifrost_jax.data import shapes
    words = ["a", "an"] + list(shapes.COLORS) + list(shapes.SHAPES) + [s + "s" for s in shapes.SHAPES]
    return words + list(shapes.RELATIONS) + list(shapes.NUMBER_WORDS)


def image_source(data):
    """The random-access training source named by ``config.data.source``."""
    if data.source == "shapes":
        from bifrost_jax.data.shapes import ShapesOptions, load_shapes
        options = ShapesOptions(resolution=data.image_resolution, train_size=data.train_size, validation_size=0,
                                test_size=0, seed=data.shapes_seed, layout=data.shapes_layout,
                                jitter=float(data.shapes_jitter))
        return load_shapes(data.data_dir, "train", options)
    if data.source == "captions":
        from bifrost_jax.data.captions import CaptionsOptions, prepare_captions
        builder = prepare_captions(data.data_dir, CaptionsOptions(source=data.captions_source))  # rebuilt if stale
        return builder.as_data_source("train")
    if data.source == "imagenet":
        from bifrost_jax.data.imagenet import ImageNetSource
        return ImageNetSource(data.data_dir, "train", class_names_file=data.class_names_file or None)
    raise ValueError(f"config.data.source={data.source!r}: use 'shapes', 'captions' or 'imagenet'")


class IndexedSource:
    """A source whose elements carry their index (to look up precomputed CLIP latents)."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return {**self.source[i], "source_index": np.int64(i)}


def word_tokenizer_dir(data, source) -> str:
    path = os.path.join(os.path.abspath(data.data_dir), f"word_tokenizer_{data.source}")
    if data.source == "shapes":
        words = shapes_vocabulary()
    else:  # a small custom set: its whole caption vocabulary
        from bifrost_jax.data.preprocess import _as_text
        words = [_as_text(source[i].get("caption", "")) for i in range(len(source))]
    return ensure_word_tokenizer(path, words)


def _caption(element) -> str:
    from bifrost_jax.data.preprocess import _as_text
    return _as_text(element.get("caption", ""))


def make_image_preprocess(*, vae_resolution: int = 0, vit_resolution: int = 0, random_crop: bool = False,
                          min_crop_scale: float = 1.0, text_dropout: float = 0.0, text_fn=None, clip_cache=None):
    """``fn(element, rng)``: uint8 views of one shared square crop, the caption (dropped to "" with probability
    ``text_dropout``) turned into id arrays by ``text_fn(caption) -> dict``, and cached CLIP latents."""
    from bifrost_jax.data.preprocess import crop_box, decode_image, element_name, resize_crop

    def fn(element, rng):
        image = decode_image(element["image"], name=element_name(element))
        box = crop_box(image.width, image.height, random=random_crop, rng=rng, min_scale=min_crop_scale)
        out = {}
        if vae_resolution:
            out["vae_pixels"] = resize_crop(image, box, vae_resolution)
        if vit_resolution:
            out["vit_pixels"] = resize_crop(image, box, vit_resolution)
        if clip_cache is not None:
            out["clip_latents"] = np.asarray(clip_cache[int(element["source_index"])], np.float32)
        if text_fn is not None:
            caption = _caption(element)
            if text_dropout and rng.random() < text_dropout:
                caption = ""
            out.update(text_fn(caption))
        return out

    return fn


def _train_iterator(config, source, preprocess, *, global_batch_size, seed, process_index, process_count):
    from bifrost_jax.data.pipeline import make_train_iterator
    d = config.data
    return make_train_iterator(source, global_batch_size, seed=seed, process_index=process_index,
                               process_count=process_count, preprocess_fn=preprocess, worker_count=d.worker_count,
                               num_threads=d.num_threads, prefetch_buffer_size=d.prefetch_buffer_size)


def _load_clip_cache(path: str, num_tokens: int, dim: int, source_len: int, expected: dict | None = None):
    """The memory-mapped cache, its shape checked, and its sidecar (``data/latent_cache.py``) against
    ``expected`` (``latent_cache.cache_fields`` of this run): errors name the file and the field."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config.data.precomputed_clip_latents={path}: no such file (build it with "
                                "`bifrost cache-latents`)")
    cache = np.load(path, mmap_mode="r")
    if cache.shape != (source_len, num_tokens, dim):
        raise ValueError(f"config.data.precomputed_clip_latents={path}: shape {cache.shape}, expected "
                         f"({source_len}, {num_tokens}, {dim}) (one row per source element, in source order)")
    if expected is not None:
        from bifrost_jax.data.latent_cache import check_cache
        check_cache(path, cache.shape, expected)
    return cache


def _check_cache_crop(config) -> None:
    if config.data.precomputed_clip_latents and config.data.random_crop:
        raise ValueError("config.data.precomputed_clip_latents with data.random_crop=True: random crops cannot use "
                         "a CLIP-latent cache (it holds one latent per image, of its centre crop); set "
                         "data.random_crop=False or drop the cache")


def _clip_cache_fields(config, vision: Component, source_len: int) -> dict:
    from bifrost_jax.data.latent_cache import cache_fields
    return cache_fields(config, vision, source_len)


def pixels_to_unit(pixels):
    """uint8 [0, 255] -> float32 [-1, 1] (the VAE range), on device."""
    return jnp.asarray(pixels).astype(jnp.float32) / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------------------------
# the FLUX family (controlnet, flux)

class _FluxFamily(Phase):
    """Shared parts of the ``controlnet`` and ``flux`` phases: FLUX, VAE and text encoders, the flow loss."""

    train_transformer = False

    def __init__(self, config):
        super().__init__(config)
        self.transformer = flux_component(config.flux, trainable=self.train_transformer)
        self.vae = vae_component(config.vae, trainable=False)
        self.t5 = t5_component(config.t5)
        self.clip = clip_component(config.clip)
        fcfg = self.transformer.module.config
        vcfg = self.vae.module.config
        if fcfg.in_channels != 4 * vcfg.latent_channels:
            raise ValueError(f"config.flux.config.in_channels={fcfg.in_channels} must be 4 * "
                             f"config.vae.config.latent_channels={4 * vcfg.latent_channels} (2x2 packing)")
        if fcfg.joint_attention_dim != self.t5.module.config.d_model:
            raise ValueError(f"config.flux.config.joint_attention_dim={fcfg.joint_attention_dim} != "
                             f"config.t5.config.d_model={self.t5.module.config.d_model}")
        if fcfg.pooled_projection_dim != self.clip.module.config.hidden_size:
            raise ValueError(f"config.flux.config.pooled_projection_dim={fcfg.pooled_projection_dim} != "
                             f"config.clip.config.hidden_size={self.clip.module.config.hidden_size}")
        self.resolution = int(config.data.vae_resolution)
        f = vcfg.downsample_factor
        if self.resolution % (2 * f):
            raise ValueError(f"config.data.vae_resolution={self.resolution} must be a multiple of 2 * VAE "
                             f"downsampling ({2 * f})")
        self.latent_hw = self.resolution // f
        self.num_img_tokens = (self.latent_hw // 2) ** 2

    # components -------------------------------------------------------------------------------------------------
    def components(self) -> list[Component]:
        return [self.transformer, self.vae, self.t5, self.clip]

    @property
    def new_subtrees(self):
        # components without a configured source keep their (deterministic) random init
        out = []
        for comp in self.components():
            if not comp.has_source:
                out += [("params", comp.name), ("batch_stats", comp.name)]
        return tuple(out)

    def _init_components(self, rng):
        variables: dict = {}
        for comp in self.components():
            v = comp.init(rng)
            for c, tree in v.items():
                variables.setdefault(c, {})[comp.name] = tree
        return variables

    def init_variables(self, rng):
        return relax_indivisible(self._init_components(rng))

    def load_pretrained(self, abstract_variables, shardings):
        out = {}
        random = []
        for comp in self.components():
            if comp.has_source:
                out = _merge(out, load_component(comp, abstract_variables, shardings,
                                                 collections=tuple(c for c in abstract_variables
                                                                   if comp.name in abstract_variables[c])))
            else:
                random.append(comp.name)
        if random and out:
            log.warning("phase %s: no port_dir/init_from for %s: random init (fixed key)", self.name, random)
        return out or None

    # text / latents ---------------------------------------------------------------------------------------------
    def text_embeddings(self, frozen, batch):
        return encode_flux_text(self.t5.module, frozen["t5"], self.clip.module, frozen["clip"], batch["t5_ids"],
                                batch["clip_ids"])

    def image_latents(self, vae_params, vae_pixels, rng):
        """Packed flow-matching latents x0 = pack((z - shift) * scale) of the VAE view, z the posterior sample
        (``model.latent_sample``) or mean."""
        vae = self.vae.module
        mean, logvar = vae.apply({"params": vae_params}, pixels_to_unit(vae_pixels), method=vae.encode)
        z = sample_posterior_latents(mean, logvar, rng) if self.config.model.latent_sample else mean
        return jax.lax.stop_gradient(pack_latents(vae.config.latents_to_diffusion(z.astype(jnp.float32))))

    def flow_inputs(self, frozen, batch, rng):
        """Everything the FLUX call needs for one batch: noisy latents, sigmas, target, text, ids, guidance."""
        k_lat, k_noise, k_sigma = jax.random.split(rng, 3)
        m = self.config.model
        x0 = self.image_latents(frozen["vae"], batch["vae_pixels"], k_lat)
        b = x0.shape[0]
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        sigmas = sample_training_sigmas(k_sigma, b, weighting=m.weighting, logit_mean=m.logit_mean,
                                        logit_std=m.logit_std)
        x_s = add_noise(x0, noise, sigmas)
        prompt_embeds, pooled = self.text_embeddings(frozen, batch)
        fcfg = self.transformer.module.config
        guidance = jnp.full((b,), m.guidance, jnp.float32) if fcfg.guidance_embeds else None
        return dict(x_s=x_s, sigmas=sigmas, target=noise - x0, prompt_embeds=prompt_embeds, pooled=pooled,
                    img_ids=latent_image_ids(self.latent_hw // 2, self.latent_hw // 2),
                    txt_ids=jnp.zeros((prompt_embeds.shape[1], len(fcfg.axes_dims_rope)), jnp.float32),
                    guidance=guidance)

    def transformer_forward(self, params, f, **residuals):
        return self.transformer.module.apply(
            {"params": params}, f["x_s"], f["prompt_embeds"], f["pooled"], f["sigmas"], f["img_ids"], f["txt_ids"],
            guidance=f["guidance"], **residuals)

    # data -------------------------------------------------------------------------------------------------------
    def text_lengths(self) -> tuple[int, int]:
        return int(self.config.t5.max_length), int(self.config.clip.max_length)

    def batch_spec(self, batch_size):
        r = self.resolution
        lt, lc = self.text_lengths()
        return {"vae_pixels": jax.ShapeDtypeStruct((batch_size, r, r, 3), jnp.uint8),
                "t5_ids": jax.ShapeDtypeStruct((batch_size, lt), jnp.int32),
                "clip_ids": jax.ShapeDtypeStruct((batch_size, lc), jnp.int32)}

    def text_fn(self, source):
        """caption -> {"t5_ids", "clip_ids"} with the configured tokenizers (a word tokenizer if none)."""
        c = self.config
        fallback = None
        if not c.t5.tokenizer_dir or not c.clip.tokenizer_dir:
            fallback = word_tokenizer_dir(c.data, source)
        t5_tok = PaddedTokenizer(c.t5.tokenizer_dir or fallback, c.t5.max_length)
        clip_tok = PaddedTokenizer(c.clip.tokenizer_dir or fallback, c.clip.max_length)
        for tok, comp in ((t5_tok, self.t5), (clip_tok, self.clip)):
            if tok.vocab_size > comp.module.config.vocab_size:
                raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} ids but config.{comp.name}.config."
                                 f"vocab_size is {comp.module.config.vocab_size}")

        def fn(caption):
            return {"t5_ids": t5_tok(caption)[0], "clip_ids": clip_tok(caption)[0]}

        return fn

    def extra_views(self, source) -> dict:
        return {}

    def dataset(self, *, global_batch_size, seed, process_index, process_count):
        d = self.config.data
        source = image_source(d)
        extra = self.extra_views(source)
        if extra.get("clip_cache") is not None:
            source = IndexedSource(source)
        preprocess = make_image_preprocess(vae_resolution=self.resolution, random_crop=d.random_crop,
                                           min_crop_scale=d.min_crop_scale, text_dropout=d.text_dropout,
                                           text_fn=self.text_fn(source), **extra)
        return _train_iterator(self.config, source, preprocess, global_batch_size=global_batch_size, seed=seed,
                               process_index=process_index, process_count=process_count)

    # FLOPs (analytic counts: Phase.analytic_flops -> bifrost_jax.parallel.flops.phase_flops) ----------------------
    def tokens_per_example(self):
        return self.num_img_tokens


class FluxPhase(_FluxFamily):
    """Train (or fine-tune) a FLUX-architecture transformer with flow matching; VAE and text encoders frozen.

    Config: ``flux``, ``vae``, ``t5``, ``clip`` sections (module config, dtypes, port_dir / init_from), ``model``
    (guidance, weighting, logit_mean, logit_std, latent_sample), ``data``."""

    name = "flux"
    train_transformer = True

    def is_trainable(self, path):
        return path[0] == "transformer"

    def loss_fn(self, trainable, frozen, mutable, batch, rng):
        f = self.flow_inputs(frozen, batch, rng)
        pred = self.transformer_forward(trainable["transformer"], f)
        loss = jnp.mean(jnp.square(pred.astype(jnp.float32) - f["target"]))
        return loss, ({"mse": loss, "sigma_mean": jnp.mean(f["sigmas"])}, dict(mutable))


class ControlNetPhase(_FluxFamily):
    """Stage A (spec 9): only the latent ControlNet trains; FLUX, VAE, T5/CLIP and the vision tower are frozen.

    Config adds ``controlnet`` (num_layers, num_single_layers, from_transformer, dtypes, port_dir, scan_layers,
    remat_policy), ``vision`` (module config, resolution of the ViT view, port_dir: a Qwen2.5-VL directory), and
    ``data.precomputed_clip_latents`` (a .npy of (source_len, N, C) latents, centre crops only) replacing the
    on-the-fly vision tower; ``model.conditioning_scale`` (1.0 in training)."""

    name = "controlnet"

    def __init__(self, config):
        super().__init__(config)
        c = config
        self.use_cache = bool(c.data.precomputed_clip_latents)
        _check_cache_crop(c)
        self.vision = vision_component(c.vision)
        vcfg = self.vision.module.config
        self.grid_thw = vision_grid(c.vision)
        m = vcfg.spatial_merge_size
        gh, gw = self.grid_thw[1] // m, self.grid_thw[2] // m
        if (2 * gh) * (2 * gw) != self.num_img_tokens:
            raise ValueError(f"the ViT view (config.vision.resolution={c.vision.resolution}: {gh}x{gw} CLIP latents, "
                             f"upsampled to {2 * gh}x{2 * gw}) must match the FLUX token grid of "
                             f"config.data.vae_resolution={self.resolution} ({self.latent_hw // 2}x"
                             f"{self.latent_hw // 2})")
        self.clip_grid = (gh, gw)
        fcfg = self.transformer.module.config
        s = c.controlnet
        cn_cfg = FluxControlNetConfig(
            patch_size=fcfg.patch_size, in_channels=fcfg.in_channels, num_layers=s.num_layers,
            num_single_layers=s.num_single_layers, attention_head_dim=fcfg.attention_head_dim,
            num_attention_heads=fcfg.num_attention_heads, joint_attention_dim=fcfg.joint_attention_dim,
            pooled_projection_dim=fcfg.pooled_projection_dim, guidance_embeds=fcfg.guidance_embeds,
            axes_dims_rope=fcfg.axes_dims_rope, clip_latent_dim=vcfg.out_hidden_size, clip_grid=self.clip_grid)
        module = LatentControlNet(cn_cfg, **_module_kw(s))
        self.controlnet = Component("controlnet", module, (), module.dummy_inputs(), s, ("latent-controlnet",),
                                    trainable=True)

    def components(self):
        comps = [self.transformer, self.controlnet, self.vae, self.t5, self.clip]
        return comps if self.use_cache else comps + [self.vision]

    @property
    def new_subtrees(self):
        out = set(super().new_subtrees)
        # the ControlNet's non-copied parts (upsampler, zero heads) keep their init
        out |= {("params", "controlnet"), ("batch_stats", "controlnet")}
        return tuple(sorted(out))

    def init_variables(self, rng):
        variables = self._init_components(rng)
        if self.config.controlnet.from_transformer:
            values = nn.meta.unbox(variables)
            cn = copy_transformer_into_controlnet(values["params"]["controlnet"], values["params"]["transformer"],
                                                  self.controlnet.module, self.transformer.module)
            # FLUX may be stored in bf16 while the trained ControlNet keeps fp32 master weights
            cn = jax.tree.map(lambda new, old: new.astype(old.dtype), cn, values["params"]["controlnet"])
            variables["params"]["controlnet"] = _rebox(variables["params"]["controlnet"], cn)
        return relax_indivisible(variables)

    def load_pretrained(self, abstract_variables, shardings):
        out = super().load_pretrained(abstract_variables, shardings) or {}
        cn = self.controlnet
        if (not cn.has_source and self.config.controlnet.from_transformer
                and "transformer" in out.get("params", {})):
            # the ControlNet starts from the LOADED FLUX (diffusers from_transformer): copy after loading
            copied = copy_transformer_into_controlnet({}, out["params"]["transformer"], cn.module,
                                                      self.transformer.module, only_copied=True)
            shard = shardings["params"]["controlnet"]
            copied = _place_partial(copied, abstract_variables["params"]["controlnet"], shard)
            out = _merge(out, {"params": {"controlnet": copied}})
        return out or None

    def is_trainable(self, path):
        return path[0] == "controlnet"

    def clip_latents(self, frozen, batch):
        if self.use_cache:
            return jnp.asarray(batch["clip_latents"], jnp.float32)
        return clip_latents_from_pixels(self.vision.module, frozen["vision"], batch["vit_pixels"], self.grid_thw)

    def loss_fn(self, trainable, frozen, mutable, batch, rng):
        f = self.flow_inputs(frozen, batch, rng)
        cond = self.clip_latents(frozen, batch)
        cn = self.controlnet.module
        (blocks, singles), new_mutable = cn.apply(
            {"params": trainable["controlnet"], "batch_stats": mutable["batch_stats"]["controlnet"]},
            f["x_s"], controlnet_cond=cond, conditioning_scale=self.config.model.conditioning_scale,
            encoder_hidden_states=f["prompt_embeds"], pooled_projections=f["pooled"], timestep=f["sigmas"],
            img_ids=f["img_ids"], txt_ids=f["txt_ids"], guidance=f["guidance"], train=True,
            mutable=["batch_stats"])
        pred = self.transformer_forward(frozen["transformer"], f, controlnet_block_samples=blocks,
                                        controlnet_single_block_samples=singles)
        loss = jnp.mean(jnp.square(pred.astype(jnp.float32) - f["target"]))
        mutable = {**mutable, "batch_stats": {**mutable["batch_stats"], "controlnet": new_mutable["batch_stats"]}}
        return loss, ({"mse": loss, "sigma_mean": jnp.mean(f["sigmas"])}, mutable)

    def batch_spec(self, batch_size):
        spec = super().batch_spec(batch_size)
        if self.use_cache:
            cfg = self.controlnet.module.config
            spec["clip_latents"] = jax.ShapeDtypeStruct(
                (batch_size, self.clip_grid[0] * self.clip_grid[1], cfg.clip_latent_dim), jnp.float32)
        else:
            r = int(self.config.vision.resolution)
            spec["vit_pixels"] = jax.ShapeDtypeStruct((batch_size, r, r, 3), jnp.uint8)
        return spec

    def extra_views(self, source):
        if self.use_cache:
            cfg = self.controlnet.module.config
            _check_cache_crop(self.config)
            return {"clip_cache": _load_clip_cache(self.config.data.precomputed_clip_latents,
                                                   self.clip_grid[0] * self.clip_grid[1], cfg.clip_latent_dim,
                                                   len(source),
                                                   _clip_cache_fields(self.config, self.vision, len(source)))}
        return {"vit_resolution": int(self.config.vision.resolution)}


def _place_partial(values, abstract, shardings):
    """Copies of ``values`` (a subset of ``abstract``) on their shardings. Never aliases: the copies go into the
    donated train state while their sources stay frozen inputs of the same step."""
    fv, fa, fs = _flat(values), _flat(abstract), _flat(shardings)
    return traverse_util.unflatten_dict({k: jax.device_put(jnp.asarray(v, fa[k].dtype), fs[k], may_alias=False)
                                         for k, v in fv.items()})


def _block(tree, name: str, i: int, scanned: bool):
    if scanned:
        return jax.tree.map(lambda a: a[i], tree[name]["block"])
    return tree[f"{name}_{i}"]


def copy_transformer_into_controlnet(cn_params, flux_params, cn_module, flux_module, only_copied: bool = False):
    """diffusers ``FluxControlNetModel.from_transformer`` on parameter trees: ``cn_params`` with ``time_text_embed``,
    ``context_embedder``, ``x_embedder`` and the first double / single blocks replaced by FLUX's (either layer
    layout on either side). The zero-init heads and the upsampler are left alone (``only_copied``: return just
    the copied entries)."""
    cn_cfg, f_cfg = cn_module.config, flux_module.config
    out = {} if only_copied else dict(cn_params)
    for name in ("time_text_embed", "context_embedder", "x_embedder"):
        out[name] = flux_params[name]
    for name, n_cn, n_f in (("transformer_blocks", cn_cfg.num_layers, f_cfg.num_layers),
                            ("single_transformer_blocks", cn_cfg.num_single_layers, f_cfg.num_single_layers)):
        k = min(n_cn, n_f)
        if k == 0:
            continue
        blocks = [_block(flux_params, name, i, flux_module.scan_layers) for i in range(k)]
        if cn_module.scan_layers:
            if k < n_cn and only_copied:
                raise ValueError(f"controlnet has {n_cn} {name} but FLUX only {n_f}: scanned ControlNet blocks "
                                 "cannot be partly copied after loading; use num_layers <= FLUX's")
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
            if k < n_cn:
                stacked = jax.tree.map(lambda a, s: a.at[:k].set(s.astype(a.dtype)), cn_params[name]["block"],
                                       stacked)
            out[name] = {"block": stacked}
        else:
            for i in range(k):
                out[f"{name}_{i}"] = blocks[i]
    # (dtypes are the callers': init_variables casts to the ControlNet's own leaves, _place_partial to its abstract
    # state, so the trained copy keeps fp32 master weights when FLUX is stored in bf16)
    return out


# ----------------------------------------------------------------------------------------------------------------
# vae

class VaePhase(Phase):
    """DEMO AID: train the FLUX-architecture ``AutoencoderKL`` on images (no pretrained VAE exists offline).
    Loss: reconstruction (``model.recon_loss`` "l1" | "mse", mean over pixels) of the decoded posterior sample
    + ``model.kl_weight`` * KL(q(z|x) || N(0, I)) (summed over latent elements, averaged over the batch)."""

    name = "vae"

    def __init__(self, config):
        super().__init__(config)
        self.vae = vae_component(config.vae, trainable=True)
        self.resolution = int(config.data.vae_resolution)
        f = self.vae.module.config.downsample_factor
        if self.resolution % f:
            raise ValueError(f"config.data.vae_resolution={self.resolution} is not a multiple of the VAE "
                             f"downsampling {f}")
        if config.model.recon_loss not in ("l1", "mse"):
            raise ValueError(f"config.model.recon_loss={config.model.recon_loss!r}: use 'l1' or 'mse'")

    @property
    def new_subtrees(self):
        return () if self.vae.has_source else (("params", "vae"),)

    def init_variables(self, rng):
        return relax_indivisible({"params": {"vae": self.vae.init(rng)["params"]}})

    def load_pretrained(self, abstract_variables, shardings):
        return load_component(self.vae, abstract_variables, shardings) if self.vae.has_source else None

    def is_trainable(self, path):
        return True

    def loss_fn(self, trainable, frozen, mutable, batch, rng):
        vae = self.vae.module
        params = {"params": merge_params(trainable, frozen)["vae"]}
        x = pixels_to_unit(batch["vae_pixels"])
        mean, logvar = vae.apply(params, x, method=vae.encode)
        z = sample_posterior_latents(mean, logvar, rng)
        recon = vae.apply(params, z, method=vae.decode).astype(jnp.float32)
        diff = recon - x
        rec = jnp.mean(jnp.abs(diff)) if self.config.model.recon_loss == "l1" else jnp.mean(jnp.square(diff))
        mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
        kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
        kl = jnp.mean(kl)
        loss = rec + self.config.model.kl_weight * kl
        return loss, ({"recon": rec, "kl": kl}, dict(mutable))

    def batch_spec(self, batch_size):
        r = self.resolution
        return {"vae_pixels": jax.ShapeDtypeStruct((batch_size, r, r, 3), jnp.uint8)}

    def dataset(self, *, global_batch_size, seed, process_index, process_count):
        d = self.config.data
        source = image_source(d)
        preprocess = make_image_preprocess(vae_resolution=self.resolution, random_crop=d.random_crop,
                                           min_crop_scale=d.min_crop_scale)
        return _train_iterator(self.config, source, preprocess, global_batch_size=global_batch_size, seed=seed,
                               process_index=process_index, process_count=process_count)

    def tokens_per_example(self):
        return self.resolution * self.resolution


# ----------------------------------------------------------------------------------------------------------------
# mllm

class MllmPhase(Phase):
    """Stage B (spec 6): ``BifrostMLLM``'s generation branch regresses the frozen vision tower's CLIP latents.

    Config: ``mllm`` (config: {text: QwenTextConfig fields, num_image_tokens, image_grid, mask_ratio_*};
    tokenizer_dir, max_prompt_length, dtypes, scan_layers, remat_policy, port_dir: a transformers Qwen2.5-VL
    directory (text weights) or a ``bifrost port`` Orbax dir, init_from), ``vision`` (as the controlnet phase;
    its port_dir defaults to mllm.port_dir), ``model.per_example_ratio``, ``data`` (text_dropout: probability of the
    "" caption, precomputed_clip_latents). The branch is a copy of the original weights AFTER they are loaded.

    Starting from the OFFICIAL Bifrost-1 checkpoint: ``mllm.port_dir`` = its directory (recognised by its
    ``learnable_pos_emb`` tensor) and ``mllm.base_dir`` = the Qwen2.5-VL directory it was built on (the
    ``bifrost-1`` port's ``base``), or ``mllm.port_dir`` = a ``bifrost port --kind bifrost-1`` Orbax output. Then
    EVERY mllm weight comes from it (branch, head, mask token, position embedding included: nothing is new), and
    the vision tower too unless ``vision.port_dir``/``init_from`` say otherwise (from the checkpoint's
    ``vision_language_model.visual.*`` if present, else from ``base_dir``)."""

    name = "mllm"

    def __init__(self, config):
        super().__init__(config)
        c = config
        self.use_cache = bool(c.data.precomputed_clip_latents)
        _check_cache_crop(c)
        s = c.mllm
        d = _cfg_dict(s.config)
        d["text"] = QwenTextConfig(**dict(d["text"]))
        self.mllm_config = BifrostConfig.from_dict(d)
        module = BifrostMLLM(self.mllm_config, **_module_kw(s))
        n, cdim = self.mllm_config.num_image_tokens, self.mllm_config.clip_dim
        init_args = (jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32), jnp.zeros((1, n, cdim)),
                     jnp.ones((1, n), bool))
        # The frozen language model dominates; it starts from the fixed key like every frozen component.
        self.mllm = Component("mllm", module, init_args, {}, s, ("qwen2.5-vl",), trainable=False)
        self.base_dir = s.get("base_dir", "") or ""
        self.official = _bifrost1_layout(s.port_dir) if s.port_dir else None
        if self.official == "official" and not self.base_dir:
            raise ValueError(f"config.mllm.port_dir={s.port_dir} is an official Bifrost-1 checkpoint: set "
                             "config.mllm.base_dir to the Qwen2.5-VL directory it was built on (its config.json "
                             "describes the backbone; it also holds what the checkpoint omits)")
        vision_section = c.vision
        if not (c.vision.port_dir or c.vision.init_from) and s.port_dir:
            # the ViT of the same Qwen2.5-VL directory (or port, or Bifrost-1 checkpoint) as the language model
            import ml_collections
            vision_section = ml_collections.ConfigDict(c.vision.to_dict())
            vision_section.port_dir = s.port_dir
            if self.official == "official" and not _has_key_prefix(s.port_dir, "vision_language_model.visual."):
                vision_section.port_dir = self.base_dir  # the official loader's rule: a missing ViT is the base's
        self.vision = vision_component(vision_section)
        self.grid_thw = vision_grid(c.vision)
        m = self.vision.module.config.spatial_merge_size
        gh, gw = self.grid_thw[1] // m, self.grid_thw[2] // m
        if (gh, gw) != tuple(self.mllm_config.image_grid):
            raise ValueError(f"config.vision.resolution={c.vision.resolution} gives a {gh}x{gw} latent grid but "
                             f"config.mllm.config.image_grid is {self.mllm_config.image_grid}")
        if self.vision.module.config.out_hidden_size != cdim:
            raise ValueError(f"vision out_hidden_size {self.vision.module.config.out_hidden_size} != mllm clip_dim "
                             f"{cdim}")

    def components(self):
        return [self.mllm] if self.use_cache else [self.mllm, self.vision]

    @property
    def new_subtrees(self):
        # a Bifrost-1 checkpoint holds the head, mask token and position embedding too
        out = [] if self.official else [("params", "mllm", k) for k in ("vision_head", "mask_token",
                                                                         "learnable_pos_emb")]
        if not self.mllm.has_source:
            out.append(("params", "mllm"))
        if not self.use_cache and not self.vision.has_source:
            out.append(("params", "vision"))
        return tuple(out)

    def init_variables(self, rng):
        v = self.mllm.init(rng)
        params = nn.meta.unbox(v["params"])
        branch = init_branch_from_original(params)
        variables = {"params": {"mllm": _rebox(v["params"], branch)}}
        if not self.use_cache:
            variables["params"]["vision"] = self.vision.init(rng)["params"]
        return relax_indivisible(variables)

    def load_pretrained(self, abstract_variables, shardings):
        out = {}
        s = self.config.mllm
        a_mllm = abstract_variables["params"]["mllm"]
        sh_mllm = shardings["params"]["mllm"]
        if s.port_dir and self.official:
            out = _merge(out, {"params": {"mllm": self._load_official(s.port_dir, a_mllm, sh_mllm)}})
        elif s.port_dir:
            out = _merge(out, {"params": {"mllm": self._load_text(s.port_dir, a_mllm, sh_mllm)}})
        if s.init_from:
            # another mllm run's checkpoint: its TRAINED weights (branch, head, mask token, position embedding)
            trained = {k: v for k, v in _flat(a_mllm).items() if mllm_is_trainable(k)}
            sub = {"params": {"mllm": traverse_util.unflatten_dict(trained)}}
            out = _merge(out, _restore_phase_checkpoint(s.init_from, int(s.get("init_step", -1)),
                                                        {"params": ("mllm",)}, sub, shardings,
                                                        s.get("init_allow_unused", ())))
        if not self.use_cache and self.vision.has_source:
            out = _merge(out, load_component(self.vision, abstract_variables, shardings))
        return out or None

    def _load_official(self, path, abstract, shardings):
        """Every BifrostMLLM weight (frozen text model, generation branch, head, mask token, position embedding)
        from an official Bifrost-1 checkpoint (+ ``mllm.base_dir``) or a ``bifrost-1`` Orbax port."""
        what = f"config.mllm.port_dir={path}"
        if self.official == "orbax":
            return _restore_orbax_port(path, ("bifrost-1",), ("mllm", "params"), abstract, shardings, what)
        from bifrost_jax import port
        mesh = jax.tree.leaves(shardings)[0].mesh
        _, variables = port.load("bifrost-1", path, base=self.base_dir, dtype=abstract_dtype({"params": abstract}),
                                 mesh=mesh, scan_layers=bool(self.config.mllm.scan_layers),
                                 image_grid=tuple(self.mllm_config.image_grid))
        return _place(variables["mllm"]["params"], abstract, shardings, f"{what} (base {self.base_dir})")

    def _load_text(self, path, abstract, shardings):
        """The frozen language model (original weights) from a Qwen2.5-VL directory or port, then the branch
        copied from it."""
        from flax.traverse_util import flatten_dict, unflatten_dict

        flat_a = flatten_dict(abstract)
        orig = {k: v for k, v in flat_a.items() if not mllm_is_trainable(tuple(k))}
        orig_a, orig_s = unflatten_dict(orig), unflatten_dict({k: flatten_dict(shardings)[k] for k in orig})
        if _is_orbax_port(path):
            loaded = _restore_orbax_port(path, ("qwen2.5-vl",), ("params", "language_model"), orig_a, orig_s,
                                         f"config.mllm.port_dir")
        else:
            from bifrost_jax.port.base import SafetensorsReader, load_mapped
            from bifrost_jax.port.qwen_text import text_key_map
            reader = SafetensorsReader(path)
            prefix = "model.language_model." if any(k.startswith("model.language_model.") for k in reader.keys()) \
                else "model."
            key_map = text_key_map(self.mllm_config.text, self.mllm.module.scan_layers, prefix)
            loaded = load_mapped(reader, key_map, orig_a, dtype=abstract_dtype({"params": orig_a}),
                                 shardings=orig_s, what=f"config.mllm.port_dir={path}",
                                 ignore_unused=lambda k: not k.startswith(prefix) or k.startswith(f"{prefix}visual."))
        with_branch = init_branch_from_original(dict(loaded))
        flat = flatten_dict(with_branch)
        flat_s = flatten_dict(shardings)
        return unflatten_dict({k: jax.device_put(v, flat_s[k]) for k, v in flat.items()})

    def is_trainable(self, path):
        return path[0] == "mllm" and mllm_is_trainable(tuple(path[1:]))

    def targets(self, frozen, batch):
        if self.use_cache:
            return jnp.asarray(batch["clip_latents"], jnp.float32)
        return clip_latents_from_pixels(self.vision.module, frozen["vision"], batch["vit_pixels"], self.grid_thw)

    def sample_mask(self, rng, batch_size):
        c = self.mllm_config
        return sample_mar_mask(rng, batch_size, c.num_image_tokens, ratio_min=c.mask_ratio_min,
                               ratio_max=c.mask_ratio_max, mean=c.mask_ratio_mean, std=c.mask_ratio_std,
                               per_example=bool(self.config.model.per_example_ratio))

    def loss_fn(self, trainable, frozen, mutable, batch, rng):
        params = merge_params(trainable, frozen)["mllm"]
        target = self.targets(frozen, batch)
        mask = self.sample_mask(rng, target.shape[0])
        pred = self.mllm.module.apply({"params": params}, batch["input_ids"], batch["attention_mask"], target, mask)
        loss = mse_loss(pred, target)  # every slot, visible and masked (spec 6.1)
        sq = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
        m = mask.astype(jnp.float32)
        metrics = {"mse": loss, "mask_ratio": jnp.mean(m),
                   "mse_masked": jnp.sum(sq * m) / jnp.maximum(jnp.sum(m), 1.0),
                   "mse_visible": jnp.sum(sq * (1 - m)) / jnp.maximum(jnp.sum(1 - m), 1.0)}
        return loss, (metrics, dict(mutable))

    def batch_spec(self, batch_size):
        t = int(self.config.mllm.max_prompt_length)
        spec = {"input_ids": jax.ShapeDtypeStruct((batch_size, t), jnp.int32),
                "attention_mask": jax.ShapeDtypeStruct((batch_size, t), jnp.int32)}
        if self.use_cache:
            c = self.mllm_config
            spec["clip_latents"] = jax.ShapeDtypeStruct((batch_size, c.num_image_tokens, c.clip_dim), jnp.float32)
        else:
            r = int(self.config.vision.resolution)
            spec["vit_pixels"] = jax.ShapeDtypeStruct((batch_size, r, r, 3), jnp.uint8)
        return spec

    def dataset(self, *, global_batch_size, seed, process_index, process_count):
        from bifrost_jax.data.prompt import build_t2i_prompt, load_tokenizer

        c = self.config
        d = c.data
        source = image_source(d)
        tok = load_tokenizer(c.mllm.tokenizer_dir or word_tokenizer_dir(d, source))
        if tok.vocab_size > self.mllm_config.text.vocab_size:
            raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} ids but config.mllm.config.text.vocab_size "
                             f"is {self.mllm_config.text.vocab_size}")
        max_len = int(c.mllm.max_prompt_length)

        def text_fn(caption):
            ids, mask = build_t2i_prompt(tok, [caption], max_length=max_len)
            return {"input_ids": ids[0], "attention_mask": mask[0]}

        extra = {}
        if self.use_cache:
            _check_cache_crop(c)
            extra["clip_cache"] = _load_clip_cache(d.precomputed_clip_latents, self.mllm_config.num_image_tokens,
                                                   self.mllm_config.clip_dim, len(source),
                                                   _clip_cache_fields(c, self.vision, len(source)))
            source = IndexedSource(source)
        else:
            extra["vit_resolution"] = int(c.vision.resolution)
        preprocess = make_image_preprocess(random_crop=d.random_crop, min_crop_scale=d.min_crop_scale,
                                           text_dropout=d.text_dropout, text_fn=text_fn, **extra)
        return _train_iterator(c, source, preprocess, global_batch_size=global_batch_size, seed=seed,
                               process_index=process_index, process_count=process_count)

    def tokens_per_example(self):
        return int(self.config.mllm.max_prompt_length) + self.mllm_config.num_image_tokens


# ----------------------------------------------------------------------------------------------------------------
# registration (the lead adds the same entries to PHASES; importing this module also registers them)

for _name, _cls in (("controlnet", "ControlNetPhase"), ("mllm", "MllmPhase"), ("flux", "FluxPhase"),
                    ("vae", "VaePhase")):
    PHASES.setdefault(_name, f"bifrost_jax.train.bifrost_phases:{_cls}")
