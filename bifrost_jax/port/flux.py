"""FLUX transformer and ControlNet checkpoints (diffusers directories, the official Bifrost-1 ``flux_controlnet/``)
<-> Flax variables.

Kinds (see ``bifrost_jax.port.load``/``save``):
- "flux-transformer": a diffusers ``FluxTransformer2DModel`` directory (``config.json`` +
  ``diffusion_pytorch_model*.safetensors``, sharded or not), e.g. ``FLUX.1-dev/transformer``.
- "flux-controlnet": a diffusers ``FluxControlNetModel`` directory.
- "latent-controlnet": the Bifrost-1 latent ControlNet: diffusers ControlNet keys with a C_clip-wide
  ``controlnet_x_embedder`` plus ``up_sampling_block.{upconv,bn1,conv,bn2}.*`` (the official layout). Its config may
  lack our ``clip_latent_dim``/``clip_grid`` fields (the official one does): C_clip is then read from the
  ``controlnet_x_embedder.weight`` shape and the grid from the ``clip_grid`` argument (default (16, 16), the 448-px
  released setting). Export writes the same keys and a config.json with both fields.

Load options: ``dtype`` (parameter dtype), ``compute_dtype`` (defaults to ``dtype``), ``scan_layers``,
``remat_policy``, ``attention_impl``, ``mesh``, ``subfolder``. Key maps are declarative (``*_key_map``) and serve
both directions; scanned and unscanned layouts both load (``layers_map``).
"""
from __future__ import annotations

import os
from typing import Optional

import jax.numpy as jnp
import numpy as np

from bifrost_jax.models.flux.controlnet import FluxControlNetConfig, FluxControlNetModel, controlnet_module
from bifrost_jax.models.flux.transformer import FluxConfig, FluxTransformer2DModel
from bifrost_jax.models.flux.upsampler import LatentUpsampler
from bifrost_jax.port.base import (IDENTITY, LINEAR, KeyMap, PortError, SafetensorsReader, abstract_params,
                                   export_mapped, layers_map, load_mapped, mesh_shardings, prefixed, read_json, src,
                                   write_json)
from bifrost_jax.port.vae import load_upsampler, upsampler_key_map

WEIGHTS_PREFIX = "diffusion_pytorch_model"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
UPSAMPLER_PREFIX = "up_sampling_block."


# ----------------------------------------------------------------------------------------------------------------
# key maps (Flax path relative to the "params" collection -> PyTorch key)

def linear(path: tuple[str, ...], key: str, bias: bool = True) -> KeyMap:
    out: KeyMap = {path + ("kernel",): src(f"{key}.weight", LINEAR)}
    if bias:
        out[path + ("bias",)] = src(f"{key}.bias")
    return out


def _rms(path: tuple[str, ...], key: str) -> KeyMap:
    return {path + ("scale",): src(f"{key}.weight", IDENTITY)}


def double_block_map(p: str) -> KeyMap:
    """One ``FluxTransformerBlock`` (torch prefix ``p``, e.g. "transformer_blocks.3.")."""
    m: KeyMap = {}
    m.update(linear(("norm1", "linear"), f"{p}norm1.linear"))
    m.update(linear(("norm1_context", "linear"), f"{p}norm1_context.linear"))
    for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
        m.update(linear(("attn", name), f"{p}attn.{name}"))
    m.update(linear(("attn", "to_out"), f"{p}attn.to_out.0"))
    for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
        m.update(_rms(("attn", name), f"{p}attn.{name}"))
    for ff in ("ff", "ff_context"):
        m.update(linear((ff, "proj_in"), f"{p}{ff}.net.0.proj"))
        m.update(linear((ff, "proj_out"), f"{p}{ff}.net.2"))
    return m


def single_block_map(p: str) -> KeyMap:
    """One ``FluxSingleTransformerBlock`` (torch prefix ``p``)."""
    m: KeyMap = {}
    m.update(linear(("norm", "linear"), f"{p}norm.linear"))
    m.update(linear(("proj_mlp",), f"{p}proj_mlp"))
    m.update(linear(("proj_out",), f"{p}proj_out"))
    for name in ("to_q", "to_k", "to_v"):
        m.update(linear(("attn", name), f"{p}attn.{name}"))
    for name in ("norm_q", "norm_k"):
        m.update(_rms(("attn", name), f"{p}attn.{name}"))
    return m


def embedders_map(guidance_embeds: bool) -> KeyMap:
    m: KeyMap = {}
    m.update(linear(("x_embedder",), "x_embedder"))
    m.update(linear(("context_embedder",), "context_embedder"))
    embedders = ["timestep_embedder", "text_embedder"] + (["guidance_embedder"] if guidance_embeds else [])
    for e in embedders:
        for lin in ("linear_1", "linear_2"):
            m.update(linear(("time_text_embed", e, lin), f"time_text_embed.{e}.{lin}"))
    return m


def blocks_map(num_layers: int, num_single_layers: int, scan: bool) -> KeyMap:
    """Both block kinds in the unscanned (``name_{i}``) or scanned (``name/block`` stacked) layout."""
    def per_layer(fn, prefix):
        if scan:
            return lambda i: prefixed(("block",), fn(f"{prefix}.{i}."))
        return lambda i: fn(f"{prefix}.{i}.")
    m: KeyMap = {}
    if num_layers:
        m.update(layers_map("transformer_blocks", num_layers, per_layer(double_block_map, "transformer_blocks"),
                            scan))
    if num_single_layers:
        m.update(layers_map("single_transformer_blocks", num_single_layers,
                            per_layer(single_block_map, "single_transformer_blocks"), scan))
    return m


def transformer_key_map(config: FluxConfig, scan: bool = False) -> KeyMap:
    m = embedders_map(config.guidance_embeds)
    m.update(blocks_map(config.num_layers, config.num_single_layers, scan))
    m.update(linear(("norm_out", "linear"), "norm_out.linear"))
    m.update(linear(("proj_out",), "proj_out"))
    return m


def controlnet_key_map(config: FluxControlNetConfig, scan: bool = False) -> KeyMap:
    """Params of a stock or latent ControlNet, without the upsampler (see ``upsampler_key_map``)."""
    m = embedders_map(config.guidance_embeds)
    m.update(blocks_map(config.num_layers, config.num_single_layers, scan))
    m.update(linear(("controlnet_x_embedder",), "controlnet_x_embedder"))
    for i in range(config.num_layers):
        m.update(linear((f"controlnet_blocks_{i}",), f"controlnet_blocks.{i}"))
    for i in range(config.num_single_layers):
        m.update(linear((f"controlnet_single_blocks_{i}",), f"controlnet_single_blocks.{i}"))
    if config.num_mode is not None:
        m[("controlnet_mode_embedder", "embedding")] = src("controlnet_mode_embedder.weight")
    return m


def latent_controlnet_key_maps(config: FluxControlNetConfig, scan: bool = False) -> KeyMap:
    """Every variable of a ``LatentControlNet``, with collection-prefixed paths ("params"/"batch_stats")."""
    up_params, up_stats = upsampler_key_map(UPSAMPLER_PREFIX)
    m = prefixed(("params",), controlnet_key_map(config, scan))
    m.update(prefixed(("params", "up_sampling_block"), up_params))
    m.update(prefixed(("batch_stats", "up_sampling_block"), up_stats))
    return m


# ----------------------------------------------------------------------------------------------------------------
# load / save

def _dir(path: str, subfolder: Optional[str]) -> str:
    return os.path.join(path, subfolder) if subfolder else path


def _module_kw(dtype, compute_dtype, scan_layers, remat_policy, attention_impl) -> dict:
    return dict(dtype=compute_dtype or dtype, param_dtype=dtype, scan_layers=scan_layers, remat_policy=remat_policy,
                attention_impl=attention_impl)


def load_transformer(path: str, *, dtype=jnp.float32, mesh=None, compute_dtype=None, scan_layers: bool = False,
                     remat_policy: str = "none", attention_impl: Optional[str] = None, subfolder: Optional[str] = None):
    """(FluxTransformer2DModel, {"params": ...}) from a diffusers transformer directory."""
    path = _dir(path, subfolder)
    config = FluxConfig.from_hf_config(read_json(os.path.join(path, "config.json")))
    module = FluxTransformer2DModel(config, **_module_kw(dtype, compute_dtype, scan_layers, remat_policy,
                                                         attention_impl))
    shapes, specs = abstract_params(module, **module.dummy_inputs())
    key_map = prefixed(("params",), transformer_key_map(config, scan_layers))
    reader = SafetensorsReader(path, prefix=WEIGHTS_PREFIX)
    variables = load_mapped(reader, key_map, shapes, dtype=dtype, shardings=mesh_shardings(specs, mesh),
                            what=f"FLUX transformer {path}")
    return module, variables


def save_transformer(module: FluxTransformer2DModel, variables, path: str) -> None:
    """A directory ``FluxTransformer2DModel.from_pretrained`` loads (fp32 weights)."""
    key_map = prefixed(("params",), transformer_key_map(module.config, module.scan_layers))
    state = export_mapped({"params": variables["params"]}, key_map)
    _write(path, module.config.to_hf_config(), state)


def _write(path: str, config: dict, state: dict) -> None:
    os.makedirs(path, exist_ok=True)
    # torch keeps BatchNorm's counter as an int64 scalar; everything else is written as float32. (base's
    # export_mapped/write_safetensors turn 0-d arrays into shape (1,) through np.ascontiguousarray, so scalars are
    # restored here and written with safetensors' own writer.)
    from safetensors.numpy import save_file
    tensors = {k: (np.asarray(v).astype(np.int64).reshape(()) if k.endswith("num_batches_tracked") else
                   np.ascontiguousarray(np.asarray(v, np.float32))) for k, v in state.items()}
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    write_json(os.path.join(path, "config.json"), config)


def load_controlnet(path: str, *, dtype=jnp.float32, mesh=None, compute_dtype=None, scan_layers: bool = False,
                    remat_policy: str = "none", attention_impl: Optional[str] = None, subfolder: Optional[str] = None):
    """(FluxControlNetModel, {"params": ...}) from a diffusers ControlNet directory."""
    path = _dir(path, subfolder)
    config = FluxControlNetConfig.from_hf_config(read_json(os.path.join(path, "config.json")))
    if config.is_latent:
        raise PortError(f"{path}: config has clip_latent_dim/clip_grid: load it as kind 'latent-controlnet'")
    module = FluxControlNetModel(config, **_module_kw(dtype, compute_dtype, scan_layers, remat_policy,
                                                      attention_impl))
    shapes, specs = abstract_params(module, **module.dummy_inputs())
    key_map = prefixed(("params",), controlnet_key_map(config, scan_layers))
    reader = SafetensorsReader(path, prefix=WEIGHTS_PREFIX)
    if any(k.startswith(UPSAMPLER_PREFIX) for k in reader.keys()):
        raise PortError(f"{path}: has {UPSAMPLER_PREFIX}* weights (a Bifrost-1 latent ControlNet): load it as kind "
                        "'latent-controlnet'")
    variables = load_mapped(reader, key_map, shapes, dtype=dtype, shardings=mesh_shardings(specs, mesh),
                            what=f"FLUX ControlNet {path}")
    return module, variables


def save_controlnet(module: FluxControlNetModel, variables, path: str) -> None:
    """A directory ``FluxControlNetModel.from_pretrained`` loads."""
    key_map = prefixed(("params",), controlnet_key_map(module.config, module.scan_layers))
    state = export_mapped({"params": variables["params"]}, key_map)
    _write(path, module.config.to_hf_config(), state)


def load_latent_controlnet(path: str, *, dtype=jnp.float32, mesh=None, compute_dtype=None,
                           scan_layers: bool = False, remat_policy: str = "none",
                           attention_impl: Optional[str] = None, subfolder: Optional[str] = None,
                           clip_grid: Optional[tuple[int, int]] = None):
    """(LatentControlNet, {"params", "batch_stats"}) from an official Bifrost-1 ``flux_controlnet/`` directory or
    one written by ``save_latent_controlnet``. ``clip_grid`` overrides/supplies the (h, w) CLIP-latent grid."""
    path = _dir(path, subfolder)
    reader = SafetensorsReader(path, prefix=WEIGHTS_PREFIX)
    hf = read_json(os.path.join(path, "config.json"))
    if "controlnet_x_embedder.weight" not in reader:
        raise PortError(f"{path}: no controlnet_x_embedder.weight, cannot tell the CLIP-latent width")
    c_clip = reader.shape("controlnet_x_embedder.weight")[1]
    if hf.get("clip_latent_dim") not in (None, c_clip):
        raise PortError(f"{path}: config clip_latent_dim={hf['clip_latent_dim']} but controlnet_x_embedder.weight "
                        f"is {reader.shape('controlnet_x_embedder.weight')} (in-width {c_clip})")
    grid = clip_grid or hf.get("clip_grid") or (16, 16)
    config = FluxControlNetConfig.from_hf_config(hf, clip_latent_dim=c_clip, clip_grid=tuple(grid))
    module = controlnet_module(config, **_module_kw(dtype, compute_dtype, scan_layers, remat_policy,
                                                    attention_impl))
    shapes, specs = abstract_params(module, collections=("params", "batch_stats"), **module.dummy_inputs())
    shardings = mesh_shardings(specs, mesh)
    key_map = prefixed(("params",), controlnet_key_map(config, scan_layers))
    shapes_wo_up = {k: v for k, v in shapes["params"].items() if k != "up_sampling_block"}
    params = load_mapped(reader, key_map, {"params": shapes_wo_up}, dtype=dtype,
                         shardings=shardings and {"params": {k: v for k, v in shardings["params"].items()
                                                             if k != "up_sampling_block"}},
                         what=f"latent ControlNet {path}", ignore_unused=lambda k: k.startswith(UPSAMPLER_PREFIX))
    # the upsampler's own port: its keys, BatchNorm running statistics (float32) and counters
    up = load_upsampler(reader, _upsampler_of(module), prefix=UPSAMPLER_PREFIX, dtype=dtype, mesh=mesh)
    params["params"]["up_sampling_block"] = up["params"]
    return module, {"params": params["params"], "batch_stats": {"up_sampling_block": up["batch_stats"]}}


def _upsampler_of(module) -> LatentUpsampler:
    """A standalone copy of the ControlNet's ``up_sampling_block`` (same fields), for its own port."""
    cfg = module.config
    return LatentUpsampler(cfg.clip_latent_dim, cfg.clip_grid, dtype=module.dtype, param_dtype=module.param_dtype)


def save_latent_controlnet(module, variables, path: str) -> None:
    """Official-layout keys (diffusers ControlNet + ``up_sampling_block.*``) and a config.json with our
    ``clip_latent_dim``/``clip_grid``; ``load_latent_controlnet`` reads it back."""
    key_map = latent_controlnet_key_maps(module.config, module.scan_layers)
    state = export_mapped({"params": variables["params"], "batch_stats": variables["batch_stats"]}, key_map)
    _write(path, module.config.to_hf_config(), state)


PORTS = {
    "flux-transformer": (load_transformer, save_transformer),
    "flux-controlnet": (load_controlnet, save_controlnet),
    "latent-controlnet": (load_latent_controlnet, save_latent_controlnet),
}
