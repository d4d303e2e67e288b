"""Loading a component's weights straight into its shardings: ports, ``bifrost port`` outputs, other phases'
checkpoints. Strict accounting everywhere: a missing, unexpected or wrong-shape weight is an error naming it.

Order for one component: its port (``port_dir``) first, then ``init_from`` (another phase's checkpoint) overrides
it. Variables of every phase are ``{"params": {component: ...}, ...}`` with the same component names in every
phase (``transformer``, ``controlnet``, ``vae``, ``t5``, ``clip``, ``vision``, ``mllm``), so a phase starts
params-only from another phase's checkpoint by name.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from bifrost_jax import port
from bifrost_jax.components.component import Component
from bifrost_jax.components.trees import abstract_dtype, check_keys, flat_paths, place
from bifrost_jax.models.flux.vae import AutoencoderKLConfig
from bifrost_jax.port.base import SafetensorsReader, load_mapped, read_json
from bifrost_jax.port.orbax_io import read_port_info
from bifrost_jax.port.qwen import vision_key_map
from bifrost_jax.port.vae import vae_dir, vae_key_map
from bifrost_jax import checkpoint as ckpt


def is_orbax_port(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "port.json"))


def has_key_prefix(path: str, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in SafetensorsReader(path).keys())


def bifrost1_layout(path: str) -> str | None:
    """"orbax" for a ``bifrost port --kind bifrost-1`` output, "official" for an official Bifrost-1 checkpoint
    directory (it has the top-level ``learnable_pos_emb`` tensor), else None."""
    if is_orbax_port(path):
        return "orbax" if read_port_info(path).get("kind") == "bifrost-1" else None
    try:
        return "official" if "learnable_pos_emb" in SafetensorsReader(path) else None
    except Exception:  # not a safetensors directory: the regular loader reports it
        return None


def restore_orbax_port(port_dir: str, kinds: tuple[str, ...], prefix: tuple[str, ...], abstract, shardings,
                        what: str):
    """The subtree at ``prefix`` of a ``bifrost port`` Orbax directory, restored straight into ``shardings``."""


    info = read_port_info(port_dir)
    if info.get("kind") not in kinds:
        raise ValueError(f"{what}: {port_dir} is a {info.get('kind')!r} port; expected one of {kinds}")
    # Accounting first: a partial restore would silently ignore extra weights and fail obscurely on missing ones.
    meta = ckpt.item_tree_metadata(os.path.join(os.path.abspath(port_dir), "variables"))
    saved = {k[len(prefix):]: tuple(m.shape) for k, m in flat_paths(meta).items() if k[:len(prefix)] == prefix}
    check_keys(saved, {k: tuple(a.shape) for k, a in flat_paths(abstract).items()},
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
    return place(got, abstract, shardings, f"{what} ({port_dir})")


def restore_phase_checkpoint(path: str, step: int, collections: dict, abstract, shardings, allow_unused=()):
    """``{collection: {component: tree}}`` from another phase's checkpoint (params-only, strict accounting:
    everything asked for must be there, and every saved weight of those components must be used, outside the
    section's ``init_allow_unused``; the checkpoint may hold other components)."""

    fs = flat_paths(shardings)
    target = {k: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=fs[k]) for k, a in flat_paths(abstract).items()
              if k[0] in collections and k[1] in collections[k[0]]}
    restored, _ = ckpt.restore_params(path, traverse_util.unflatten_dict(target), step=step,
                                      only_under=[(c, n) for c, names in collections.items() for n in names],
                                      allow_unused=ckpt.parse_prefixes(allow_unused))
    return traverse_util.unflatten_dict(restored)

def _hf_load(comp: Component, abstract, shardings, mesh):
    """``{"params": ...}`` (and ``batch_stats``) of ``comp`` from a diffusers/transformers directory."""

    path = comp.port_dir
    s = comp.section
    what = f"config.{s_name(comp)}.port_dir={path}"
    if comp.name == "vision":
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
        path = vae_dir(path)
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
    if kind in ("latent-controlnet", "latent-unet-controlnet"):
        # the official config.json has no clip_grid (the port would assume the released 16x16): the phase's
        kw["clip_grid"] = tuple(comp.module.config.clip_grid)
    _, variables = port.load(kind, path, **kw)
    return place(variables, abstract, shardings, what)

def s_name(comp: Component) -> str:
    return {"transformer": "flux"}.get(comp.name, comp.name)


def load_component(comp: Component, abstract_vars, shardings, collections=("params",)):
    """Pretrained ``{collection: {comp.name: ...}}`` of one component, or {} without a source. The port comes
    first; ``init_from`` (another phase's checkpoint) overrides it."""
    abstract = {c: abstract_vars[c][comp.name] for c in collections if comp.name in abstract_vars.get(c, {})}
    shard = {c: shardings[c][comp.name] for c in abstract}
    mesh = getattr(jax.tree.leaves(shard)[0], "mesh", None)  # None: one device (ports load unsharded)
    out = {}
    if comp.port_dir:
        if is_orbax_port(comp.port_dir):
            kind = read_port_info(comp.port_dir).get("kind")
            # the ViT may also come from a bifrost-1 port (its frozen Qwen2.5-VL)
            kinds = comp.port_kinds + (("bifrost-1",) if comp.name == "vision" else ())
            got = {c: restore_orbax_port(comp.port_dir, kinds, _orbax_prefix(comp, c, kind), abstract[c], shard[c],
                                          f"config.{s_name(comp)}.port_dir") for c in abstract}
        else:
            got = _hf_load(comp, abstract, shard, mesh)
        out = {c: {comp.name: got[c]} for c in got}
    if comp.init_from:
        step = int(comp.section.get("init_step", -1))
        out = restore_phase_checkpoint(comp.init_from, step, {c: (comp.name,) for c in abstract}, abstract_vars,
                                       shardings, comp.section.get("init_allow_unused", ()))
    return out


def _orbax_prefix(comp: Component, collection: str, kind: str | None = None) -> tuple[str, ...]:
    # `bifrost port` saves the port's variables: {"params": ...} (+ "batch_stats"); Qwen2.5-VL nests the ViT; a
    # bifrost-1 port saves {"mllm": {"params"}, "vl": {"params"}} (the ViT under vl.params.visual).
    if comp.name == "vision":
        return ("vl", collection, "visual") if kind == "bifrost-1" else (collection, "visual")
    return (collection,)

