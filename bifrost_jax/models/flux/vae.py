"""FLUX's VAE: diffusers ``AutoencoderKL`` in Flax (NHWC), plus FLUX's latent packing helpers.

    vae = AutoencoderKL(AutoencoderKLConfig.from_hf_config(config_json))
    mean, logvar = vae.apply(variables, images, method=vae.encode)          # images (B, H, W, 3) in [-1, 1]
    x0 = vae.config.latents_to_diffusion(mean)                               # the flow-matching space
    tokens = pack_latents(x0)                                                # (B, H/16 * W/16, 64)
    images = vae.apply(variables, vae.config.diffusion_to_latents(unpack_latents(tokens, h, w)),
                       method=vae.decode)

Module and parameter names mirror diffusers (``encoder.down_blocks.0.resnets.1.conv2`` is the Flax path
``encoder/down_blocks_0/resnets_1/conv2``), so the port (``bifrost_jax.port.vae``) is a naming rule. Blocks differ
in width, so nothing is scanned; ``remat_policy`` rematerialises each resnet/attention block (the decoder at 1024 px
is activation-heavy).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from bifrost_jax.nn.attention import dot_product_attention
from bifrost_jax.nn.conv import conv2d
from bifrost_jax.nn.layers import Dense, GroupNorm, activation, param_with_axes
from bifrost_jax.nn.stack import maybe_remat

Dtype = Any

IMAGE_AXES = ("batch", None, None, "act_embed")  # NHWC activations: shard the batch only


def _pairs(padding, n=2):
    if isinstance(padding, int):
        return ((padding, padding),) * n
    return tuple(tuple(p) for p in padding)


class Conv2d(nn.Module):
    """``torch.nn.Conv2d`` on NHWC with an HWIO kernel (PyTorch OIHW transposed by the port).

    ``padding``: an int (symmetric, as torch) or ((top, bottom), (left, right)) for asymmetric padding."""
    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: Any = 0
    use_bias: bool = True
    # A logical name may appear once per array, so only the first spatial axis is named (both are replicated).
    kernel_axes: tuple = ("conv_hw", None, "conv_in", "conv_out")
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()  # zeros for ControlNet's zero convs

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = param_with_axes(self, "kernel", self.kernel_init, (k, k, x.shape[-1], self.features),
                                 self.param_dtype, self.kernel_axes)
        y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, _pairs(self.padding))
        if self.use_bias:
            bias = param_with_axes(self, "bias", nn.initializers.zeros, (self.features,), self.param_dtype,
                                   (self.kernel_axes[-1],))
            y = y + bias.astype(self.dtype)
        return y


def nearest_upsample2x(x):
    """``nn.Upsample(scale_factor=2, mode="nearest")`` on NHWC: out[2i+k, 2j+l] = x[i, j]."""
    b, h, w, c = x.shape
    y = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return y.reshape(b, 2 * h, 2 * w, c)


# The convs to/from RGB have 3 channels, which no "conv_out" mesh axis divides: keep those replicated.
RGB_OUT_AXES = ("conv_hw", None, "conv_in", None)


# ----------------------------------------------------------------------------------------------------------------
# config

_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"
# diffusers bookkeeping fields that carry no model semantics
_IGNORED_HF_FIELDS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """The diffusers ``AutoencoderKL`` config. Defaults are FLUX.1's VAE."""
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 16
    norm_num_groups: int = 32
    sample_size: Any = 1024
    scaling_factor: float = 0.3611
    shift_factor: Optional[float] = 0.1159
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = True
    # Kept only so that export writes back what was read; the model does not use them.
    latents_mean: Optional[tuple[float, ...]] = None
    latents_std: Optional[tuple[float, ...]] = None
    force_upcast: bool = True
    # Not diffusers fields: compute options.
    remat_policy: str = "none"
    attention_impl: Optional[str] = "xla"  # head dim = width (512): beyond cuDNN flash limits

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_hf_config(cls, cfg: dict, **overrides) -> "AutoencoderKLConfig":
        cfg = dict(cfg)
        n = len(cfg.get("block_out_channels", cls.block_out_channels))
        for field, kind in (("down_block_types", _DOWN_BLOCK), ("up_block_types", _UP_BLOCK)):
            types = list(cfg.pop(field, [kind] * n))
            if len(types) != n:
                raise ValueError(f"AutoencoderKL config: {field} has {len(types)} entries but block_out_channels "
                                 f"has {n}")
            bad = sorted(set(types) - {kind})
            if bad:
                raise ValueError(f"AutoencoderKL config: {field} {bad} not supported (only {kind!r})")
        for f in _IGNORED_HF_FIELDS:
            cfg.pop(f, None)
        known = {f.name for f in dataclasses.fields(cls)} - {"remat_policy", "attention_impl"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"AutoencoderKL config: unsupported field(s) {unknown}")
        kw = {}
        for k, v in cfg.items():
            if k in ("block_out_channels", "latents_mean", "latents_std") and v is not None:
                v = tuple(v)
            if k == "sample_size" and isinstance(v, list):
                v = tuple(v)
            kw[k] = v
        config = cls(**kw, **overrides)
        config.validate()
        return config

    def validate(self) -> None:
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"AutoencoderKL config: block_out_channels {list(self.block_out_channels)} are "
                                 f"not all divisible by norm_num_groups={self.norm_num_groups}")
        activation(self.act_fn)

    def to_hf_config(self) -> dict:
        n = len(self.block_out_channels)
        out = {
            "_class_name": "AutoencoderKL",
            "down_block_types": [_DOWN_BLOCK] * n,
            "up_block_types": [_UP_BLOCK] * n,
        }
        for f in dataclasses.fields(self):
            if f.name in ("remat_policy", "attention_impl"):
                continue
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    # The FLUX latent normalisation (diffusers FluxPipeline: encode -> (z - shift) * scale; decode inverts it).
    def latents_to_diffusion(self, z):
        self._check_normalisation()
        return (z - (self.shift_factor or 0.0)) * self.scaling_factor

    def diffusion_to_latents(self, x):
        self._check_normalisation()
        return x / self.scaling_factor + (self.shift_factor or 0.0)

    def _check_normalisation(self):
        if self.latents_mean is not None or self.latents_std is not None:
            # Per-channel statistics belong to other pipelines' normalisation, which FLUX does not define.
            raise ValueError("AutoencoderKL config sets latents_mean/latents_std: the FLUX normalisation "
                             "(scaling_factor, shift_factor) does not apply to this VAE")


# ----------------------------------------------------------------------------------------------------------------
# blocks

class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` without time embedding: GN-act-conv3x3-GN-act-conv3x3 + (1x1 conv) shortcut."""
    out_channels: int
    groups: int
    act_fn: str = "silu"
    eps: float = 1e-6
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        act = activation(self.act_fn)
        h = act(GroupNorm(self.groups, self.eps, name="norm1", **kw)(x))
        h = Conv2d(self.out_channels, 3, padding=1, name="conv1", **kw)(h)
        h = act(GroupNorm(self.groups, self.eps, name="norm2", **kw)(h))
        h = Conv2d(self.out_channels, 3, padding=1, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = Conv2d(self.out_channels, 1, name="conv_shortcut", **kw)(x)
        out = nn.with_logical_constraint(x.astype(self.dtype) + h, IMAGE_AXES)
        return checkpoint_name(out, "block_out")


class AttentionBlock(nn.Module):
    """The VAE mid-block attention (diffusers ``Attention`` with group_norm, one head of width C over H*W,
    residual connection, rescale_output_factor 1)."""
    groups: int
    eps: float = 1e-6
    implementation: Optional[str] = "xla"
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GroupNorm(self.groups, self.eps, name="group_norm", **kw)(x).reshape(b, hh * ww, 1, c)
        q = Dense(c, kernel_axes=("embed", "heads"), name="to_q", **kw)(h)
        k = Dense(c, kernel_axes=("embed", "heads"), name="to_k", **kw)(h)
        v = Dense(c, kernel_axes=("embed", "heads"), name="to_v", **kw)(h)
        o = dot_product_attention(q, k, v, implementation=self.implementation)
        o = checkpoint_name(o, "attn_out")
        o = Dense(c, kernel_axes=("heads", "embed"), name="to_out_0", **kw)(o.reshape(b, hh * ww, c))
        out = nn.with_logical_constraint(o.reshape(b, hh, ww, c) + x.astype(self.dtype), IMAGE_AXES)
        return checkpoint_name(out, "block_out")


class Downsample2D(nn.Module):
    """diffusers ``Downsample2D(padding=0)``: pad right/bottom by one, then a stride-2 3x3 conv."""
    out_channels: int
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return Conv2d(self.out_channels, 3, stride=2, padding=((0, 1), (0, 1)), name="conv", dtype=self.dtype,
                      param_dtype=self.param_dtype)(x)


class Upsample2D(nn.Module):
    """diffusers ``Upsample2D(use_conv=True)``: nearest 2x, then a 3x3 conv."""
    out_channels: int
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return Conv2d(self.out_channels, 3, padding=1, name="conv", dtype=self.dtype,
                      param_dtype=self.param_dtype)(nearest_upsample2x(x))


def _blocks(config: AutoencoderKLConfig):
    resnet = maybe_remat(ResnetBlock2D, config.remat_policy)
    attn = maybe_remat(AttentionBlock, config.remat_policy)
    return resnet, attn


class MidBlock2D(nn.Module):
    """diffusers ``UNetMidBlock2D`` (one layer): resnet, optional attention, resnet."""
    config: AutoencoderKLConfig
    channels: int
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet, attn = _blocks(cfg)
        x = resnet(self.channels, cfg.norm_num_groups, cfg.act_fn, name="resnets_0", **kw)(x)
        if cfg.mid_block_add_attention:
            x = attn(cfg.norm_num_groups, implementation=cfg.attention_impl, name="attentions_0", **kw)(x)
        return resnet(self.channels, cfg.norm_num_groups, cfg.act_fn, name="resnets_1", **kw)(x)


class DownEncoderBlock2D(nn.Module):
    """diffusers ``DownEncoderBlock2D``: ``layers_per_block`` resnets, then (except the last block) a downsample."""
    config: AutoencoderKLConfig
    out_channels: int
    add_downsample: bool
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet, _ = _blocks(cfg)
        for j in range(cfg.layers_per_block):
            x = resnet(self.out_channels, cfg.norm_num_groups, cfg.act_fn, name=f"resnets_{j}", **kw)(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, name="downsamplers_0", **kw)(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """diffusers ``UpDecoderBlock2D``: ``layers_per_block + 1`` resnets, then (except the last block) an upsample."""
    config: AutoencoderKLConfig
    out_channels: int
    add_upsample: bool
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet, _ = _blocks(cfg)
        for j in range(cfg.layers_per_block + 1):
            x = resnet(self.out_channels, cfg.norm_num_groups, cfg.act_fn, name=f"resnets_{j}", **kw)(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
        return x


class Encoder(nn.Module):
    """diffusers ``vae.Encoder`` with double_z: image (B, H, W, in) -> (B, H/f, W/f, 2 * latent)."""
    config: AutoencoderKLConfig
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chans = cfg.block_out_channels
        x = nn.with_logical_constraint(x, IMAGE_AXES)
        x = Conv2d(chans[0], 3, padding=1, name="conv_in", **kw)(x)
        for i, c in enumerate(chans):
            x = DownEncoderBlock2D(cfg, c, add_downsample=i < len(chans) - 1, name=f"down_blocks_{i}", **kw)(x)
        x = MidBlock2D(cfg, chans[-1], name="mid_block", **kw)(x)
        x = activation(cfg.act_fn)(GroupNorm(cfg.norm_num_groups, 1e-6, name="conv_norm_out", **kw)(x))
        return Conv2d(2 * cfg.latent_channels, 3, padding=1, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    """diffusers ``vae.Decoder`` (group norm): latents (B, h, w, latent) -> image (B, h*f, w*f, out)."""
    config: AutoencoderKLConfig
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chans = tuple(reversed(cfg.block_out_channels))
        z = nn.with_logical_constraint(z, IMAGE_AXES)
        x = Conv2d(chans[0], 3, padding=1, name="conv_in", **kw)(z)
        x = MidBlock2D(cfg, chans[0], name="mid_block", **kw)(x)
        for i, c in enumerate(chans):
            x = UpDecoderBlock2D(cfg, c, add_upsample=i < len(chans) - 1, name=f"up_blocks_{i}", **kw)(x)
        x = activation(cfg.act_fn)(GroupNorm(cfg.norm_num_groups, 1e-6, name="conv_norm_out", **kw)(x))
        return Conv2d(cfg.out_channels, 3, padding=1, kernel_axes=RGB_OUT_AXES, name="conv_out", **kw)(x)


# ----------------------------------------------------------------------------------------------------------------
# the autoencoder

class AutoencoderKL(nn.Module):
    """diffusers ``AutoencoderKL`` on NHWC images in [-1, 1].

    ``encode(sample) -> (mean, logvar)``: the diagonal Gaussian posterior, logvar clamped to [-30, 20] as diffusers
    does; ``sample_posterior(mean, logvar, rng)`` draws from it. ``decode(z) -> image``.
    ``__call__(sample, sample_posterior=False, rng=None)``: encode, take the mode (or a sample), decode."""
    config: AutoencoderKLConfig = AutoencoderKLConfig()
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        if cfg.use_quant_conv:
            self.quant_conv = Conv2d(2 * cfg.latent_channels, 1, **kw)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = Conv2d(cfg.latent_channels, 1, **kw)

    def encode(self, sample):
        if sample.ndim != 4 or sample.shape[-1] != self.config.in_channels:
            raise ValueError(f"AutoencoderKL.encode expects NHWC images with {self.config.in_channels} channels, "
                             f"got shape {sample.shape}")
        moments = self.encoder(sample)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
            raise ValueError(f"AutoencoderKL.decode expects NHWC latents with {self.config.latent_channels} "
                             f"channels, got shape {z.shape}")
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, sample, sample_posterior: bool = False, rng=None):
        mean, logvar = self.encode(sample)
        if sample_posterior:
            if rng is None:
                rng = self.make_rng("sample")
            z = sample_posterior_latents(mean, logvar, rng)
        else:
            z = mean
        return self.decode(z)


def sample_posterior_latents(mean, logvar, rng):
    """A draw from the VAE posterior N(mean, exp(logvar)) (diffusers ``DiagonalGaussianDistribution.sample``)."""
    eps = jax.random.normal(rng, mean.shape, jnp.float32)
    return (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * eps).astype(mean.dtype)


# ----------------------------------------------------------------------------------------------------------------
# FLUX latent packing (diffusers FluxPipeline._pack_latents / _unpack_latents / _prepare_latent_image_ids)

def pack_latents(z):
    """(B, H, W, C) latents -> (B, H/2 * W/2, 4C) tokens, row-major over the 2x2 patches; each token's features
    are ordered (c, dy, dx) as diffusers packs NCHW latents."""
    b, h, w, c = z.shape
    if h % 2 or w % 2:
        raise ValueError(f"pack_latents: latent size {h}x{w} must be even")
    z = z.reshape(b, h // 2, 2, w // 2, 2, c)
    z = jnp.transpose(z, (0, 1, 3, 5, 2, 4))  # (b, h/2, w/2, c, dy, dx)
    return z.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens, height: int, width: int):
    """Inverse of ``pack_latents``: (B, height/2 * width/2, 4C) -> (B, height, width, C). ``height``/``width`` are
    the *latent* sizes (diffusers' ``_unpack_latents`` takes pixel sizes and the VAE scale factor instead)."""
    b, n, d = tokens.shape
    if height % 2 or width % 2 or n != (height // 2) * (width // 2) or d % 4:
        raise ValueError(f"unpack_latents: {tokens.shape} tokens do not form a {height}x{width} latent")
    c = d // 4
    z = tokens.reshape(b, height // 2, width // 2, c, 2, 2)
    z = jnp.transpose(z, (0, 1, 4, 2, 5, 3))  # (b, h/2, dy, w/2, dx, c)
    return z.reshape(b, height, width, c)


def latent_image_ids(height: int, width: int, dtype=jnp.float32):
    """(height * width, 3) FLUX position ids (0, row, col) of the packed-token grid (height, width = latent size
    / 2), row-major, as diffusers' ``_prepare_latent_image_ids(batch, height, width)``."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    ids = np.stack([np.zeros_like(rows), rows, cols], axis=-1).reshape(height * width, 3)
    return jnp.asarray(ids, dtype=dtype)
