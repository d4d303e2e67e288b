"""Analytic forward FLOPs of the SD-family UNet and its (latent) ControlNet, from their configs, in the units of
``bifrost_jax.models.flops`` (``Counts``: weight matmuls/convolutions and attention apart; norms, activations and
the loss not counted). Pure Python: usable for full-size configs on any machine.

Both split into the pieces a training step runs differently: the UNet's encoder (embeddings, ``conv_in``, down
blocks, mid block) and its decoder (up blocks, ``conv_out``): under ControlNet residuals only the decoder lies on the
gradient path, since the residuals are added after the mid block.
"""
from __future__ import annotations

from bifrost_jax.models.flops import ZERO, Counts, attention, conv, dense, latent_upsampler
from bifrost_jax.models.unet.config import CROSS_DOWN, CROSS_UP, UNet2DConditionConfig


def _resnet(cfg: UNet2DConditionConfig, b: int, hw, c_in: int, c_out: int) -> Counts:
    h, w = hw
    out = conv(b, h, w, c_in, c_out, 3) + conv(b, h, w, c_out, c_out, 3) + dense(b, cfg.time_embed_dim, c_out)
    return out + (conv(b, h, w, c_in, c_out, 1) if c_in != c_out else ZERO)


def _transformer(cfg: UNet2DConditionConfig, b: int, hw, c: int, layers: int, text_len: int) -> Counts:
    """proj_in/out (1x1 conv or Linear: the same count), per block self-attention, cross-attention on the text
    (k/v over the text tokens), GEGLU feed-forward (C -> 8C, 4C -> C)."""
    n = hw[0] * hw[1]
    block = (dense(b * n, c, c) * 4 + attention(b, n, n, c)
             + dense(b * n, c, c) * 2 + dense(b * text_len, cfg.cross_dims[0], c) * 2 + attention(b, n, text_len, c)
             + dense(b * n, c, 8 * c) + dense(b * n, 4 * c, c))
    return dense(b * n, c, c) * 2 + block * layers


def _sizes(cfg: UNet2DConditionConfig, hw) -> list[tuple[int, int]]:
    """(h, w) of each level (stride-2 convs with padding 1: ceil halves)."""
    out = [tuple(hw)]
    for _ in range(cfg.num_blocks - 1):
        h, w = out[-1]
        out.append((-(-h // 2), -(-w // 2)))
    return out


def embeddings(cfg: UNet2DConditionConfig, b: int) -> Counts:
    """Timestep MLP (and SDXL's added text/time embedding)."""
    c0, t = cfg.block_out_channels[0], cfg.time_embed_dim
    out = dense(b, c0, t) + dense(b, t, t)
    if cfg.addition_embed_type == "text_time":
        out = out + dense(b, cfg.projection_class_embeddings_input_dim, t) + dense(b, t, t)
    return out


def encoder(cfg: UNet2DConditionConfig, b: int, hw, text_len: int) -> dict[str, Counts]:
    """{"conv_in", "down", "mid"} forward counts over (h, w) latents (a UNet's or a ControlNet's encoder)."""
    sizes, chans = _sizes(cfg, hw), cfg.block_out_channels
    h, w = sizes[0]
    conv_in = conv(b, h, w, cfg.in_channels, chans[0], cfg.conv_in_kernel)
    down, c_prev = ZERO, chans[0]
    for i, kind in enumerate(cfg.down_block_types):
        c = chans[i]
        for _ in range(cfg.layers[i]):
            down = down + _resnet(cfg, b, sizes[i], c_prev, c)
            if kind == CROSS_DOWN:
                down = down + _transformer(cfg, b, sizes[i], c, cfg.transformer_layers[i], text_len)
            c_prev = c
        if i < cfg.num_blocks - 1:
            down = down + conv(b, *sizes[i + 1], c, c, 3)
    last, c = sizes[-1], chans[-1]
    mid = _resnet(cfg, b, last, c, c) * 2 + _transformer(cfg, b, last, c, cfg.transformer_layers[-1], text_len)
    return {"conv_in": conv_in, "down": down, "mid": mid}


def decoder(cfg: UNet2DConditionConfig, b: int, hw, text_len: int) -> Counts:
    """Up blocks (resnets on [x, skip], transformers, upsampling convs) and ``conv_out``."""
    sizes, chans = _sizes(cfg, hw), cfg.block_out_channels
    skips = [chans[0]]
    for i, c in enumerate(chans):
        skips += [c] * cfg.layers[i] + ([c] if i < cfg.num_blocks - 1 else [])
    out, c_prev = ZERO, chans[-1]
    for j, kind in enumerate(cfg.up_block_types):
        i = cfg.num_blocks - 1 - j
        c = chans[i]
        for _ in range(cfg.layers[i] + 1):
            out = out + _resnet(cfg, b, sizes[i], c_prev + skips.pop(), c)
            if kind == CROSS_UP:
                out = out + _transformer(cfg, b, sizes[i], c, cfg.transformer_layers[i], text_len)
            c_prev = c
        if i > 0:
            out = out + conv(b, *sizes[i - 1], c, c, 3)
    return out + conv(b, *sizes[0], chans[0], cfg.out_channels, cfg.conv_out_kernel)


def unet(cfg: UNet2DConditionConfig, b: int, hw, text_len: int) -> Counts:
    enc = encoder(cfg, b, hw, text_len)
    return embeddings(cfg, b) + enc["conv_in"] + enc["down"] + enc["mid"] + decoder(cfg, b, hw, text_len)


def condition_embedding(cn_cfg, b: int) -> dict[str, Counts]:
    """The latent ControlNet's condition path: {"first": the upsampler's transposed conv (its input is data),
    "rest": the upsampler's conv and the conditioning embedding's convolutions}."""
    gh, gw = cn_cfg.clip_grid
    up = latent_upsampler(cn_cfg.clip_latent_dim, (gh, gw), b)
    chans = cn_cfg.conditioning_embedding_out_channels
    h, w = 2 * gh, 2 * gw
    rest = up["conv"] + conv(b, h, w, cn_cfg.clip_latent_dim, chans[0], 3)
    for i in range(len(chans) - 1):
        rest = rest + conv(b, h, w, chans[i], chans[i], 3)
        h, w = 2 * h, 2 * w
        rest = rest + conv(b, h, w, chans[i], chans[i + 1], 3)
    return {"first": up["upconv"], "rest": rest + conv(b, h, w, chans[-1], cn_cfg.block_out_channels[0], 3)}


def zero_convs(cfg: UNet2DConditionConfig, b: int, hw) -> Counts:
    """The ControlNet's 1x1 heads on every skip tensor and on the mid-block output."""
    sizes, chans = _sizes(cfg, hw), cfg.block_out_channels
    out = conv(b, *sizes[0], chans[0], chans[0], 1)
    for i, c in enumerate(chans):
        out = out + conv(b, *sizes[i], c, c, 1) * cfg.layers[i]
        if i < cfg.num_blocks - 1:
            out = out + conv(b, *sizes[i + 1], c, c, 1)
    return out + conv(b, *sizes[-1], chans[-1], chans[-1], 1)
