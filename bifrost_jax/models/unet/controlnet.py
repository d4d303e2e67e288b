"""UNet ControlNets, NHWC: diffusers ``ControlNetModel`` and Bifrost-1's latent ControlNet for a UNet.

Both are a copy of the UNet's encoder (``conv_in``, time/added embeddings, down blocks, mid block) run on
``conv_in(noisy latents) + embed_condition(condition)``; every skip tensor and the mid-block output go through a
zero-initialised 1x1 conv (``controlnet_down_blocks.{i}``, ``controlnet_mid_block``) and ``conditioning_scale``: the
``down_block_additional_residuals`` / ``mid_block_additional_residual`` that ``UNet2DConditionModel`` adds.
``__call__`` returns ``(down_block_res_samples (list), mid_block_res_sample)`` like diffusers' ``return_dict=False``.

- ``UNetControlNetModel``: the condition is a pixel-space image (B, 8h, 8w, conditioning_channels) through
  ``ConditioningEmbedding`` (diffusers' ``ControlNetConditioningEmbedding``: 3x3 convs, stride-2 stages,
  zero-init ``conv_out``). ``guess_mode``, ``global_pool_conditions`` and the "bgr" channel order behave as
  diffusers'.
- ``LatentUNetControlNet``: the condition is the patch-level CLIP-latent grid (B, h*w, C_clip) (``clip_grid`` = (h, w))
  -> the learned 2x ``LatentUpsampler`` (BatchNorm, as for FLUX) -> ``ConditioningEmbedding(upsample=True)`` (3x3
  convs with ``len(conditioning_embedding_out_channels) - 1`` nearest-2x stages, zero-init ``conv_out``) to the
  UNet's latent resolution (2h * 2**stages, 2w * 2**stages), added after ``conv_in``. The arithmetic is in docs/unet.md.
  ``embed_condition`` is timestep-independent: compute it once per image and pass it as
  ``controlnet_cond_embedding`` at every denoising step. Training updates the BatchNorm statistics:
  ``apply(..., train=True, mutable=["batch_stats"])``.

``controlnet_from_unet`` builds either from a UNet like diffusers ``ControlNetModel.from_unet``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bifrost_jax.models.flux.upsampler import LatentUpsampler
from bifrost_jax.models.flux.vae import Conv2d, nearest_upsample2x
from bifrost_jax.models.unet.config import (CROSS_DOWN, CROSS_MID, CROSS_UP, PLAIN_UP, UNet2DConditionConfig,
                                            check_unsupported)
from bifrost_jax.models.unet.unet import (check_inputs, down_path, dummy_added_cond_kwargs, embed_and_conv_in,
                                          mid_block)

Dtype = Any
_META_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")
# ControlNet-only fields (diffusers), and ours for the latent ControlNet (written on export, optional on load)
_CONDITION_FIELDS = ("conditioning_channels", "controlnet_conditioning_channel_order",
                     "conditioning_embedding_out_channels", "global_pool_conditions")
_LATENT_FIELDS = ("clip_latent_dim", "clip_grid")
PIXEL_EMBEDDING_CHANNELS = (16, 32, 96, 256)


@dataclasses.dataclass(frozen=True)
class UNetControlNetConfig:
    """diffusers ``ControlNetModel.__init__`` arguments (defaults as diffusers'), plus ``clip_latent_dim`` and
    ``clip_grid`` (h, w) for the latent ControlNet (both None for the stock one)."""
    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, "DownBlock2D")
    mid_block_type: Optional[str] = CROSS_MID
    only_cross_attention: Any = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: Optional[int] = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: Any = 1
    encoder_hid_dim: Optional[int] = None
    encoder_hid_dim_type: Optional[str] = None
    attention_head_dim: Any = 8
    num_attention_heads: Any = None
    use_linear_projection: bool = False
    class_embed_type: Optional[str] = None
    addition_embed_type: Optional[str] = None
    addition_time_embed_dim: Optional[int] = None
    num_class_embeds: Optional[int] = None
    upcast_attention: Any = False
    resnet_time_scale_shift: str = "default"
    projection_class_embeddings_input_dim: Optional[int] = None
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = PIXEL_EMBEDDING_CHANNELS
    global_pool_conditions: bool = False
    addition_embed_type_num_heads: int = 64
    clip_latent_dim: Optional[int] = None
    clip_grid: Optional[tuple[int, int]] = None

    def __post_init__(self):
        for f in ("down_block_types", "block_out_channels", "conditioning_embedding_out_channels"):
            object.__setattr__(self, f, tuple(getattr(self, f)))
        for f in ("transformer_layers_per_block", "attention_head_dim"):
            if isinstance(getattr(self, f), list):
                object.__setattr__(self, f, tuple(getattr(self, f)))
        if self.clip_grid is not None:
            grid = tuple(int(g) for g in self.clip_grid)
            if len(grid) != 2:
                raise ValueError(f"UNet ControlNet config: clip_grid must be (h, w), got {self.clip_grid}")
            object.__setattr__(self, "clip_grid", grid)
        if (self.clip_latent_dim is None) != (self.clip_grid is None):
            raise ValueError("UNet ControlNet config: clip_latent_dim and clip_grid must both be set (latent "
                             f"ControlNet) or both be null (stock); got {self.clip_latent_dim}, {self.clip_grid}")
        check_unsupported(self, {"controlnet_conditioning_channel_order": ("rgb", "bgr")}, "UNet ControlNet")
        if not self.conditioning_embedding_out_channels:
            raise ValueError("UNet ControlNet config: conditioning_embedding_out_channels must not be empty")
        self.unet  # validates the encoder fields  # noqa: B018

    @property
    def is_latent(self) -> bool:
        return self.clip_latent_dim is not None

    @property
    def conditioning_stages(self) -> int:
        """2x stages of the conditioning embedding: stride-2 (pixel) or nearest-upsampling (latent) convs."""
        return len(self.conditioning_embedding_out_channels) - 1

    @property
    def unet(self) -> UNet2DConditionConfig:
        """The encoder fields as a UNet config (the up blocks mirror the down blocks; the ControlNet has none)."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(UNet2DConditionConfig)
                  if hasattr(self, f.name)}
        ups = tuple(CROSS_UP if t == CROSS_DOWN else PLAIN_UP for t in reversed(self.down_block_types))
        return UNet2DConditionConfig(**shared, up_block_types=ups)

    @classmethod
    def from_unet_config(cls, unet: UNet2DConditionConfig, **fields) -> "UNetControlNetConfig":
        """The ControlNet of ``unet`` (diffusers ``from_unet``'s field copy); ``fields``: the conditioning ones."""
        if not isinstance(unet.layers_per_block, int) or not isinstance(unet.cross_attention_dim, int):
            raise ValueError("controlnet from UNet: diffusers' ControlNetModel takes one layers_per_block and one "
                             f"cross_attention_dim; the UNet has {unet.layers_per_block}, {unet.cross_attention_dim}")
        shared = {f.name: getattr(unet, f.name) for f in dataclasses.fields(cls) if hasattr(unet, f.name)}
        return cls(**{**shared, **fields})

    @classmethod
    def from_hf_config(cls, cfg: dict, **overrides) -> "UNetControlNetConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in cfg if k not in known and k not in _META_KEYS)
        if unknown:
            raise ValueError(f"ControlNetModel config: unknown field(s) {unknown}")
        fields = {k: v for k, v in cfg.items() if k in known}
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)

    def to_hf_config(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            if f.name in _LATENT_FIELDS and not self.is_latent:
                continue
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return {"_class_name": "ControlNetModel", **out}


def _zero_conv(features: int, kernel_size: int, name: str, dtype, param_dtype) -> Conv2d:
    return Conv2d(features, kernel_size, padding=(kernel_size - 1) // 2, kernel_init=nn.initializers.zeros,
                  dtype=dtype, param_dtype=param_dtype, name=name)


class ConditioningEmbedding(nn.Module):
    """The condition -> ``conv_in`` width: conv_in (-> c_0), per stage (conv c_i -> c_i, a 2x resampling conv
    c_i -> c_{i+1}) with SiLU, zero-initialised conv_out. ``upsample=False``: diffusers' pixel-space hint encoder
    (stride-2 convs, ``ControlNetConditioningEmbedding``); ``upsample=True``: the latent one (nearest 2x, then a
    3x3 conv)."""
    conditioning_embedding_channels: int
    block_out_channels: tuple[int, ...] = PIXEL_EMBEDDING_CHANNELS
    upsample: bool = False
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chans = self.block_out_channels
        x = jax.nn.silu(Conv2d(chans[0], 3, padding=1, name="conv_in", **kw)(x))
        for i in range(len(chans) - 1):
            x = jax.nn.silu(Conv2d(chans[i], 3, padding=1, name=f"blocks_{2 * i}", **kw)(x))
            if self.upsample:
                x = nearest_upsample2x(x)
            x = jax.nn.silu(Conv2d(chans[i + 1], 3, stride=1 if self.upsample else 2, padding=1,
                                   name=f"blocks_{2 * i + 1}", **kw)(x))
        return _zero_conv(self.conditioning_embedding_channels, 3, "conv_out", **kw)(x)


class UNetControlNetModel(nn.Module):
    """diffusers ``ControlNetModel`` (see the module docstring). ``controlnet_cond``: NHWC, pixel resolution."""
    config: UNetControlNetConfig
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: Optional[str] = None

    def setup(self):
        cfg = self.config
        if cfg.is_latent:
            raise ValueError("UNetControlNetModel: config has clip_latent_dim/clip_grid; use LatentUNetControlNet")
        self.controlnet_cond_embedding = ConditioningEmbedding(
            cfg.block_out_channels[0], cfg.conditioning_embedding_out_channels, dtype=self.dtype,
            param_dtype=self.param_dtype)

    def embed_condition(self, controlnet_cond, train: bool = False):
        """(B, H*8, W*8, conditioning_channels) control image -> (B, H, W, block_out_channels[0])."""
        del train  # no batch statistics here
        if self.config.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = controlnet_cond[..., ::-1]
        return self.controlnet_cond_embedding(controlnet_cond)

    @nn.compact
    def __call__(self, sample, timestep, encoder_hidden_states, controlnet_cond=None, conditioning_scale=1.0,
                 added_cond_kwargs: Optional[dict] = None, guess_mode: bool = False, *,
                 controlnet_cond_embedding=None, train: bool = False):
        cfg = self.config
        unet_cfg = cfg.unet
        check_inputs(unet_cfg, sample, encoder_hidden_states, type(self).__name__)
        context = encoder_hidden_states.astype(self.dtype)
        h, emb = embed_and_conv_in(self, unet_cfg, sample, timestep, added_cond_kwargs)
        if controlnet_cond_embedding is None:
            if controlnet_cond is None:
                raise ValueError(f"{type(self).__name__}: pass controlnet_cond or a precomputed "
                                 "controlnet_cond_embedding")
            controlnet_cond_embedding = self.embed_condition(controlnet_cond, train=train)
        if tuple(controlnet_cond_embedding.shape) != tuple(h.shape):
            raise ValueError(f"{type(self).__name__}: the condition embeds to {tuple(controlnet_cond_embedding.shape)}"
                             f" but conv_in(sample) is {tuple(h.shape)} (see docs/unet.md for the resolutions)")
        h = h + controlnet_cond_embedding.astype(h.dtype)
        h, skips = down_path(self, unet_cfg, h, emb, context, None)
        h = mid_block(self, unet_cfg, h, emb, context, None)

        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        down = [_zero_conv(s.shape[-1], 1, f"controlnet_down_blocks_{i}", **kw)(s) for i, s in enumerate(skips)]
        mid = _zero_conv(h.shape[-1], 1, "controlnet_mid_block", **kw)(h)
        if guess_mode and not cfg.global_pool_conditions:
            scales = jnp.logspace(-1.0, 0.0, len(down) + 1, dtype=jnp.float32) * conditioning_scale  # 0.1 .. 1
            down = [d * scales[i].astype(d.dtype) for i, d in enumerate(down)]
            mid = mid * scales[-1].astype(mid.dtype)
        else:
            down = [d * jnp.asarray(conditioning_scale, d.dtype) for d in down]
            mid = mid * jnp.asarray(conditioning_scale, mid.dtype)
        if cfg.global_pool_conditions:
            down = [jnp.mean(d, axis=(1, 2), keepdims=True) for d in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return down, mid

    def dummy_inputs(self, batch: int = 1, text_len: int = 2) -> dict:
        """Small inputs with the right trailing shapes (for ``init`` / ``eval_shape``)."""
        cfg = self.config
        unet_cfg = cfg.unet
        latent = 2 ** unet_cfg.num_upsamplers
        if cfg.is_latent:
            gh, gw = cfg.clip_grid
            size = (2 * gh * 2 ** cfg.conditioning_stages, 2 * gw * 2 ** cfg.conditioning_stages)
            cond = jnp.zeros((batch, gh * gw, cfg.clip_latent_dim), jnp.float32)
        else:
            size = (latent, latent)
            f = 2 ** cfg.conditioning_stages
            cond = jnp.zeros((batch, latent * f, latent * f, cfg.conditioning_channels), jnp.float32)
        return dict(sample=jnp.zeros((batch, *size, cfg.in_channels), jnp.float32),
                    timestep=jnp.zeros((batch,), jnp.float32),
                    encoder_hidden_states=jnp.zeros((batch, text_len, cfg.cross_attention_dim), jnp.float32),
                    controlnet_cond=cond, added_cond_kwargs=dummy_added_cond_kwargs(unet_cfg, batch))


class LatentUNetControlNet(UNetControlNetModel):
    """Bifrost-1's latent ControlNet for a UNet: ``controlnet_cond`` is (B, h*w, C_clip) patch-level CLIP latents,
    row-major over ``config.clip_grid``; the latents must be (2h, 2w) * 2**conditioning_stages."""

    def setup(self):
        cfg = self.config
        if not cfg.is_latent:
            raise ValueError("LatentUNetControlNet: config needs clip_latent_dim and clip_grid")
        self.up_sampling_block = LatentUpsampler(cfg.clip_latent_dim, cfg.clip_grid, dtype=self.dtype,
                                                 param_dtype=self.param_dtype)
        self.controlnet_cond_embedding = ConditioningEmbedding(
            cfg.block_out_channels[0], cfg.conditioning_embedding_out_channels, upsample=True, dtype=self.dtype,
            param_dtype=self.param_dtype)

    def embed_condition(self, controlnet_cond, train: bool = False):
        """(B, h*w, C_clip) -> (B, 2h * 2**stages, 2w * 2**stages, block_out_channels[0]). Independent of the
        timestep: compute it once per image. ``train`` uses batch statistics (and needs mutable batch_stats)."""
        gh, gw = self.config.clip_grid
        up = self.up_sampling_block(controlnet_cond, train=train)
        return self.controlnet_cond_embedding(up.reshape(up.shape[0], 2 * gh, 2 * gw, up.shape[-1]))


def controlnet_module(config: UNetControlNetConfig, **kw) -> UNetControlNetModel:
    """The right class for ``config`` (latent if it has clip_latent_dim/clip_grid)."""
    return (LatentUNetControlNet if config.is_latent else UNetControlNetModel)(config, **kw)


# ----------------------------------------------------------------------------------------------------------------
# from_unet

COPIED_FROM_UNET = ("conv_in", "time_embedding", "add_embedding", "mid_block")


def copied_from_unet(name: str) -> bool:
    """Whether the top-level ControlNet parameter ``name`` is a copy of the UNet's (diffusers ``from_unet``)."""
    return name in COPIED_FROM_UNET or name.startswith("down_blocks_")


def latent_embedding_channels(stages: int) -> tuple[int, ...]:
    """Default widths of the latent conditioning embedding: 256, halving per 2x stage (at least 32)."""
    return tuple(max(256 >> i, 32) for i in range(stages + 1))


def latent_stages(clip_grid: tuple[int, int], latent_size: tuple[int, int]) -> int:
    """The number of 2x stages taking the upsampled grid (2h, 2w) to the UNet's latent size (H, W); raises unless
    H / 2h = W / 2w is a power of two >= 1."""
    (gh, gw), (lh, lw) = clip_grid, latent_size
    ratio_h, ratio_w = lh / (2 * gh), lw / (2 * gw)
    ratio = int(round(ratio_h))
    if ratio_h != ratio_w or ratio < 1 or ratio != ratio_h or ratio & (ratio - 1):
        raise ValueError(f"latent UNet ControlNet: latents {lh}x{lw} are not a power-of-two multiple of the "
                         f"upsampled CLIP grid {2 * gh}x{2 * gw} (the grid {gh}x{gw}, 2x upsampled); see docs/unet.md")
    return ratio.bit_length() - 1


def controlnet_from_unet(unet_variables, unet_config: UNet2DConditionConfig, *, clip_latent_dim: Optional[int] = None,
                         clip_grid: Optional[tuple[int, int]] = None, latent_size: Optional[tuple[int, int]] = None,
                         conditioning_embedding_out_channels: Optional[tuple[int, ...]] = None,
                         conditioning_channels: int = 3, controlnet_conditioning_channel_order: str = "rgb",
                         load_weights_from_unet: bool = True, rng=None, **module_kw):
    """(module, variables) of a ControlNet built like diffusers ``ControlNetModel.from_unet``: the config copied
    from the UNet; ``conv_in``, ``time_embedding``, ``add_embedding``, ``down_blocks`` and ``mid_block`` copied from
    its weights; the zero convs at zero, so the residuals start at exactly 0.

    With ``clip_latent_dim`` and ``clip_grid`` the result is a ``LatentUNetControlNet``: its stages are set by
    ``latent_size`` (the UNet's latent (H, W), default its ``sample_size``) and the default widths by
    ``latent_embedding_channels``. ``module_kw``: dtype, param_dtype, scan_layers (the UNet's variables must have the
    same layout), remat_policy, attention_impl."""
    fields = dict(conditioning_channels=conditioning_channels,
                  controlnet_conditioning_channel_order=controlnet_conditioning_channel_order)
    if clip_latent_dim is not None:
        if latent_size is None:
            if unet_config.sample_size is None:
                raise ValueError("controlnet_from_unet: pass latent_size (the UNet config has no sample_size)")
            s = unet_config.sample_size
            latent_size = tuple(s) if isinstance(s, (list, tuple)) else (s, s)
        stages = latent_stages(tuple(clip_grid), tuple(latent_size))
        channels = conditioning_embedding_out_channels or latent_embedding_channels(stages)
        if len(channels) - 1 != stages:
            raise ValueError(f"controlnet_from_unet: conditioning_embedding_out_channels {channels} has "
                             f"{len(channels) - 1} stages; the resolutions need {stages}")
        fields.update(clip_latent_dim=clip_latent_dim, clip_grid=tuple(clip_grid))
    else:
        channels = conditioning_embedding_out_channels or PIXEL_EMBEDDING_CHANNELS
    config = UNetControlNetConfig.from_unet_config(unet_config, conditioning_embedding_out_channels=tuple(channels),
                                                   **fields)
    module = controlnet_module(config, **module_kw)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    if not load_weights_from_unet:
        return module, nn.meta.unbox(jax.jit(lambda r: module.init(r, **module.dummy_inputs()))(rng))
    # everything but the conditioning embedding (and upsampler) is copied or zero: build the tree from shapes and
    # initialise only those parts (no random init of the whole encoder, which would be overwritten)
    shapes = nn.meta.unbox(jax.eval_shape(lambda r: module.init(r, **module.dummy_inputs()), rng))
    src = unet_variables["params"]
    params = {}
    for name, leaf in shapes["params"].items():
        if name.startswith("controlnet_down_blocks_") or name == "controlnet_mid_block":
            params[name] = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), leaf)
        elif copied_from_unet(name):
            if name not in src:
                raise ValueError(f"controlnet_from_unet: the UNet variables have no {name!r}")
            if jax.tree.map(lambda a: a.shape, leaf) != jax.tree.map(lambda a: a.shape, src[name]):
                raise ValueError(f"controlnet_from_unet: {name!r} of the UNet does not match the ControlNet's "
                                 "(a different scan_layers layout or config?)")
            params[name] = jax.tree.map(lambda v: jnp.asarray(v, module.param_dtype), src[name])
    embed_key, up_key = jax.random.split(rng)
    kw = dict(dtype=module.dtype, param_dtype=module.param_dtype)
    cond = module.dummy_inputs()["controlnet_cond"]
    variables = {}
    if config.is_latent:
        up = LatentUpsampler(config.clip_latent_dim, config.clip_grid, **kw)
        up_vars = nn.meta.unbox(jax.jit(up.init)(up_key, cond))
        params["up_sampling_block"] = up_vars["params"]
        variables["batch_stats"] = {"up_sampling_block": up_vars["batch_stats"]}
        gh, gw = config.clip_grid
        embed = ConditioningEmbedding(config.block_out_channels[0], channels, upsample=True, **kw)
        cond = jnp.zeros((1, 2 * gh, 2 * gw, config.clip_latent_dim), jnp.float32)
    else:
        embed = ConditioningEmbedding(config.block_out_channels[0], channels, **kw)
    params["controlnet_cond_embedding"] = nn.meta.unbox(jax.jit(embed.init)(embed_key, cond))["params"]
    variables["params"] = params
    want = jax.tree.map(lambda s: (s.shape, jnp.dtype(s.dtype)), shapes)
    got = jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), variables)
    if want != got:
        raise AssertionError("controlnet_from_unet: variables do not match the module's structure")
    return module, variables
