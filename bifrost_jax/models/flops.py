"""Analytic model FLOPs of a training step (or an inference step), for MFU accounting and as a cross-check of XLA's
cost analysis.

Every matmul and convolution of the models is counted from their configs (2 FLOPs per multiply-add): the FLUX
transformer (double / single blocks, embedders, output head), the latent ControlNet (blocks, upsampler, zero heads),
the dual-branch Qwen2.5 decoder (frozen text rows, generation branch on the image slots), the Qwen2.5-VL ViT
(window and full attention over its padded window layout, merger), T5 and CLIP text encoders and the VAE (convs and
mid-block attention). Attention is counted apart from the weight matmuls (scores QK^T and the value product PV,
``4 L S H D`` forward, over the key range the implementation computes: causal masks do not halve it here).
Norms, activations, softmax, RoPE, the loss and the optimizer update are NOT counted (elementwise: they are what
XLA's cost analysis adds on top; see ``tests/test_flops.py`` for the measured ratios).

A step is a list of :class:`Part`s, each a module's forward counts and how the step runs it:

* ``"train"``: trained weights: forward + gradient w.r.t. the input activations + gradient w.r.t. the weights:
  3x the forward matmuls, 3x the attention;
* ``"backprop"``: frozen weights that sit between the loss and trained weights (the frozen FLUX under the ControlNet
  residuals): forward + gradient w.r.t. activations only: 2x the matmuls, but 3x the attention (attention has no
  weights: its backward is all activation gradients, dQ dK dV and dP);
* ``"forward"``: frozen and not on the gradient path (text encoders, VAE encoder, ViT, the MLLM's text rows): 1x;
* ``"leaf"``: trained weights whose input needs no gradient (the first layer of a trained model: embedders of
  data): forward + weight gradient, 2x.

Counts are GLOBAL (all devices, the whole global batch) per step; divide by the device count for per-device FLOPs.
Each training phase builds its own parts from these counts (``Phase.analytic_parts``).

The module is pure Python over the config dataclasses: no tracing, usable for full-size configs on any machine.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Optional, Sequence

from bifrost_jax.models.qwen.vision import window_layout

# forward multiple of (matmul, attention) FLOPs per mode
MODES = {"train": (3.0, 3.0), "backprop": (2.0, 3.0), "forward": (1.0, 1.0), "leaf": (2.0, 2.0)}


@dataclasses.dataclass(frozen=True)
class Counts:
    """Forward FLOPs of a module: weight matmuls / convolutions, and attention (scores + value product)."""
    matmul: float = 0.0
    attention: float = 0.0

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(self.matmul + other.matmul, self.attention + other.attention)

    def __mul__(self, k: float) -> "Counts":
        return Counts(self.matmul * k, self.attention * k)

    __rmul__ = __mul__

    @property
    def total(self) -> float:
        return self.matmul + self.attention


ZERO = Counts()


def _sum(counts: Iterable[Counts]) -> Counts:
    out = ZERO
    for c in counts:
        out = out + c
    return out


@dataclasses.dataclass(frozen=True)
class Part:
    """One module (or a slice of one) in a step: its forward counts and its mode (see the module docstring)."""
    name: str
    forward: Counts
    mode: str = "forward"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"flops Part {self.name!r}: mode {self.mode!r} is not one of {sorted(MODES)}")

    @property
    def matmul_flops(self) -> float:
        return MODES[self.mode][0] * self.forward.matmul

    @property
    def attention_flops(self) -> float:
        return MODES[self.mode][1] * self.forward.attention

    @property
    def flops(self) -> float:
        return self.matmul_flops + self.attention_flops


@dataclasses.dataclass(frozen=True)
class FlopsBreakdown:
    """The analytic FLOPs of one step: a list of parts; ``total`` (global per step) and per-kind sums."""
    parts: tuple[Part, ...]
    what: str = ""

    @property
    def total(self) -> float:
        return sum(p.flops for p in self.parts)

    @property
    def attention(self) -> float:
        return sum(p.attention_flops for p in self.parts)

    @property
    def matmul(self) -> float:
        return sum(p.matmul_flops for p in self.parts)

    def by_name(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for p in self.parts:
            out[p.name] = out.get(p.name, 0.0) + p.flops
        return out

    def table(self, devices: int = 1) -> str:
        """One line per part: mode, forward GFLOPs, step GFLOPs (per device when ``devices`` > 1)."""
        unit = f"per device of {devices}" if devices > 1 else "global"
        lines = [f"analytic FLOPs per step ({self.what}; {unit}):"]
        for p in self.parts:
            lines.append(f"  {p.name:<40} {p.mode:<8} fwd {_g(p.forward.total / devices)}  step {_g(p.flops / devices)}"
                         f"  (attention {_g(p.attention_flops / devices)})")
        lines.append(f"  {'total':<40} {'':<8} {'':<15}  step {_g(self.total / devices)}"
                     f"  (attention {_g(self.attention / devices)})")
        return "\n".join(lines)


def _g(x: float) -> str:
    return f"{x:.4g}".rjust(10)


def attention(b: float, q_len: float, kv_len: float, width: float) -> Counts:
    """Scores and value product of ``b`` sequences: 2 matmuls of q_len x kv_len x (heads * head_dim)."""
    return Counts(attention=4.0 * b * q_len * kv_len * width)


def dense(tokens: float, d_in: float, d_out: float) -> Counts:
    return Counts(matmul=2.0 * tokens * d_in * d_out)


def conv(b: float, out_h: int, out_w: int, c_in: int, c_out: int, k: int) -> Counts:
    return Counts(matmul=2.0 * b * out_h * out_w * c_in * c_out * k * k)


# ----------------------------------------------------------------------------------------------------------------
# FLUX transformer and ControlNet

def flux_double_block(cfg, b: int, img: int, txt: int, *, streams: str = "both") -> Counts:
    """One double-stream block (AdaLN modulations, q/k/v of both streams, joint attention, outputs, FFs).
    ``streams``: "both", or "img" / "txt" / "adaln" / "attention" for the pieces (used to split modes)."""
    d = cfg.inner_dim
    adaln = dense(b, d, 6 * d) * 2
    per_stream = lambda n: dense(b * n, d, 3 * d) + dense(b * n, d, d) + dense(b * n, d, 4 * d) * 2  # noqa: E731
    att = attention(b, img + txt, img + txt, d)
    pieces = {"adaln": adaln, "img": per_stream(img), "txt": per_stream(txt), "attention": att}
    if streams == "both":
        return _sum(pieces.values())
    return pieces[streams]


def flux_single_block(cfg, b: int, seq: int, *, mlp_ratio: float = 4.0, adaln: Optional[bool] = None) -> Counts:
    """One single-stream block over ``seq`` = txt + img tokens. ``adaln``: only the modulation (True), all but it
    (False), everything (None)."""
    d = cfg.inner_dim
    mod = dense(b, d, 3 * d)
    hidden = int(d * mlp_ratio)
    rest = (dense(b * seq, d, 3 * d) + dense(b * seq, d, hidden) + dense(b * seq, d + hidden, d)
            + attention(b, seq, seq, d))
    return {True: mod, False: rest, None: mod + rest}[adaln]


def flux_embedders(cfg, b: int, img: int, txt: int) -> dict[str, Counts]:
    """x_embedder, context_embedder, time/guidance/pooled-text MLPs (their first layers and the rest apart)."""
    d = cfg.inner_dim
    first = dense(b, 256, d) * (2 if cfg.guidance_embeds else 1) + dense(b, cfg.pooled_projection_dim, d)
    second = dense(b, d, d) * (3 if cfg.guidance_embeds else 2)
    return {"x_embedder": dense(b * img, cfg.in_channels * cfg.patch_size ** 2, d),
            "context_embedder": dense(b * txt, cfg.joint_attention_dim, d),
            "time_text_embed_in": first, "time_text_embed_out": second}


def flux_head(cfg, b: int, img: int) -> dict[str, Counts]:
    d = cfg.inner_dim
    return {"norm_out": dense(b, d, 2 * d), "proj_out": dense(b * img, d, cfg.output_channels)}


def flux_transformer(cfg, b: int, img: int, txt: int) -> Counts:
    """The whole FLUX transformer forward."""
    e = _sum(flux_embedders(cfg, b, img, txt).values())
    blocks = flux_double_block(cfg, b, img, txt) * cfg.num_layers
    blocks = blocks + flux_single_block(cfg, b, img + txt) * cfg.num_single_layers
    return e + blocks + _sum(flux_head(cfg, b, img).values())


def flux_transformer_parts(cfg, b: int, img: int, txt: int, *, mode: str, residuals: bool = False,
                           scanned: bool = False, prefix: str = "flux") -> list[Part]:
    """FLUX as parts of a step. ``mode="train"``: trained (embedders of data as "leaf"). ``mode="backprop"``: frozen
    under ControlNet residuals (``residuals=True``): the modulations and embedders (functions of frozen inputs) run
    forward only; double block 0 runs forward only unless the blocks are scanned (a scan body is differentiated as
    a whole), and block 1's text-stream projections (inputs not yet touched by a residual) likewise.
    ``mode="forward"``: all forward (sampling)."""
    emb = flux_embedders(cfg, b, img, txt)
    head = flux_head(cfg, b, img)
    n_d, n_s = cfg.num_layers, cfg.num_single_layers
    if mode == "forward":
        return [Part(f"{prefix}", flux_transformer(cfg, b, img, txt), "forward")]
    if mode == "train":
        leaf = emb["x_embedder"] + emb["context_embedder"] + emb["time_text_embed_in"]
        rest = emb["time_text_embed_out"] + _sum(head.values())
        return [Part(f"{prefix} embedders (data inputs)", leaf, "leaf"),
                Part(f"{prefix} double blocks", flux_double_block(cfg, b, img, txt) * n_d, "train"),
                Part(f"{prefix} single blocks", flux_single_block(cfg, b, img + txt) * n_s, "train"),
                Part(f"{prefix} time MLP + head", rest, "train")]
    if mode != "backprop" or not residuals:
        raise ValueError(f"flux_transformer_parts: mode {mode!r} (residuals={residuals}) is not supported")
    fwd = _sum(emb.values()) + head["norm_out"]
    fwd = fwd + flux_double_block(cfg, b, img, txt, streams="adaln") * n_d
    fwd = fwd + flux_single_block(cfg, b, img + txt, adaln=True) * n_s
    inner = lambda s: flux_double_block(cfg, b, img, txt, streams=s)  # noqa: E731
    double_bp = (inner("img") + inner("txt") + inner("attention")) * n_d
    if not scanned and n_d:
        first = inner("img") + inner("txt") + inner("attention")
        fwd, double_bp = fwd + first, double_bp + first * -1.0
        if n_d > 1:  # block 1's text stream enters untouched by residuals: its q/k/v need no input gradient
            txt_qkv = dense(b * txt, cfg.inner_dim, 3 * cfg.inner_dim)
            fwd, double_bp = fwd + txt_qkv, double_bp + txt_qkv * -1.0
    return [Part(f"{prefix} modulations + embedders", fwd, "forward"),
            Part(f"{prefix} double blocks", double_bp, "backprop"),
            Part(f"{prefix} single blocks", flux_single_block(cfg, b, img + txt, adaln=False) * n_s, "backprop"),
            Part(f"{prefix} proj_out", head["proj_out"], "backprop")]


def latent_upsampler(channels: int, grid: Sequence[int], b: int) -> dict[str, Counts]:
    h, w = grid
    return {"upconv": Counts(matmul=2.0 * b * h * w * channels * channels * 4),
            "conv": conv(b, 2 * h, 2 * w, channels, channels, 3)}


def controlnet_parts(cfg, b: int, img: int, txt: int, *, mode: str = "train", prefix: str = "controlnet",
                     condition: bool = True) -> list[Part]:
    """The (latent) ControlNet: FLUX embedders and blocks, condition embedding (upsampler + zero Linear, unless
    ``condition=False``: precomputed once per image when sampling) and the zero heads of every block."""
    flux = cfg.flux
    d = cfg.inner_dim
    emb = flux_embedders(flux, b, img, txt)
    blocks = (flux_double_block(flux, b, img, txt) * cfg.num_layers
              + flux_single_block(flux, b, img + txt) * cfg.num_single_layers)
    heads = dense(b * img, d, d) * (cfg.num_layers + cfg.num_single_layers)
    cond_in, cond_rest = ZERO, ZERO
    if condition:
        if cfg.is_latent:
            up = latent_upsampler(cfg.clip_latent_dim, cfg.clip_grid, b)
            cond_in = up["upconv"]
            cond_rest = up["conv"] + dense(b * img, cfg.clip_latent_dim, d)
        else:
            cond_in = dense(b * img, cfg.in_channels, d)
    if mode == "forward":
        return [Part(prefix, _sum(emb.values()) + blocks + heads + cond_in + cond_rest, "forward")]
    leaf = emb["x_embedder"] + emb["context_embedder"] + emb["time_text_embed_in"] + cond_in
    return [Part(f"{prefix} embedders (data inputs)", leaf, "leaf"),
            Part(f"{prefix} blocks", blocks, mode),
            Part(f"{prefix} time MLP, condition, zero heads", emb["time_text_embed_out"] + cond_rest + heads, mode)]


# ----------------------------------------------------------------------------------------------------------------
# Qwen2.5 decoder (text rows and the generation branch), Qwen2.5-VL ViT

def qwen_layer_matmul(t, tokens: float) -> Counts:
    """q/k/v/o projections and the SwiGLU MLP of one decoder layer over ``tokens`` rows."""
    e, h, k, hd = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim
    return (dense(tokens, e, h * hd) + dense(tokens, e, 2 * k * hd) + dense(tokens, h * hd, e)
            + dense(tokens, e, t.intermediate_size) * 3)


def qwen_text_rows(t, b: int, text_len: int) -> Counts:
    """The frozen language model over a (B, T) prompt (causal attention computed over all T keys)."""
    layer = qwen_layer_matmul(t, b * text_len) + attention(b, text_len, text_len, t.num_attention_heads * t.head_dim)
    return layer * t.num_hidden_layers


def qwen_branch_rows(config, b: int, text_len: int) -> Counts:
    """The generation branch over the N image slots (attending to [T text keys; N image keys]) and the head."""
    t, n = config.text, config.num_image_tokens
    layer = qwen_layer_matmul(t, b * n) + attention(b, n, text_len + n, t.num_attention_heads * t.head_dim)
    return layer * t.num_hidden_layers + dense(b * n, t.hidden_size, config.clip_dim)


def vision_tower(cfg, grid_thw: Sequence[int], b: int) -> Counts:
    """Qwen2.5-VL ViT over (1, H/14, W/14) patches: patch embedding, blocks over the padded window layout (window
    blocks attend within windows, full blocks over every padded token), merger."""

    layout = window_layout(cfg, tuple(grid_thw))
    n_patches = layout.grid_h * layout.grid_w
    n, hid = layout.num_tokens, cfg.hidden_size
    per_block = (dense(b * n, hid, 3 * hid) + dense(b * n, hid, hid) + dense(b * n, hid, cfg.intermediate_size) * 3)
    full = attention(b, n, n, hid)
    windowed = attention(b * layout.num_windows, layout.window_len, layout.window_len, hid)
    blocks = _sum(per_block + (full if cfg.is_full(i) else windowed) for i in range(cfg.depth))
    width = hid * cfg.merge_unit
    merger = dense(b * n / cfg.merge_unit, width, width) + dense(b * n / cfg.merge_unit, width, cfg.out_hidden_size)
    return dense(b * n_patches, cfg.patch_dim, hid) + blocks + merger


# ----------------------------------------------------------------------------------------------------------------
# text encoders, VAE

def t5_encoder(cfg, b: int, length: int) -> Counts:
    inner = cfg.num_heads * cfg.d_kv
    ff = dense(b * length, cfg.d_model, cfg.d_ff) * (3 if cfg.is_gated_act else 2)
    layer = dense(b * length, cfg.d_model, inner) * 4 + ff + attention(b, length, length, inner)
    return layer * cfg.num_layers


def clip_text(cfg, b: int, length: int) -> Counts:
    h = cfg.hidden_size
    layer = dense(b * length, h, h) * 4 + dense(b * length, h, cfg.intermediate_size) * 2 + attention(b, length,
                                                                                                      length, h)
    return layer * cfg.num_hidden_layers


def _resnet(b: int, hw: tuple[int, int], c_in: int, c_out: int) -> Counts:
    h, w = hw
    out = conv(b, h, w, c_in, c_out, 3) + conv(b, h, w, c_out, c_out, 3)
    return out + (conv(b, h, w, c_in, c_out, 1) if c_in != c_out else ZERO)


def _vae_mid(cfg, b: int, hw: tuple[int, int], c: int) -> Counts:
    out = _resnet(b, hw, c, c) * 2
    if cfg.mid_block_add_attention:
        tokens = hw[0] * hw[1]
        out = out + dense(b * tokens, c, c) * 4 + attention(b, tokens, tokens, c)
    return out


def vae_encoder(cfg, b: int, size: tuple[int, int]) -> Counts:
    """AutoencoderKL encoder over (H, W) images (+ quant_conv)."""
    chans = cfg.block_out_channels
    h, w = size
    out = conv(b, h, w, cfg.in_channels, chans[0], 3)
    c_prev = chans[0]
    for i, c in enumerate(chans):
        for _ in range(cfg.layers_per_block):
            out = out + _resnet(b, (h, w), c_prev, c)
            c_prev = c
        if i < len(chans) - 1:  # pad right/bottom by one, stride-2 3x3: ceil halves
            h, w = (h - 2) // 2 + 1, (w - 2) // 2 + 1
            out = out + conv(b, h, w, c, c, 3)
    out = out + _vae_mid(cfg, b, (h, w), chans[-1]) + conv(b, h, w, chans[-1], 2 * cfg.latent_channels, 3)
    if cfg.use_quant_conv:
        out = out + conv(b, h, w, 2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
    return out


def vae_decoder(cfg, b: int, latent_hw: tuple[int, int]) -> dict[str, Counts]:
    """AutoencoderKL decoder from (h, w) latents: {"first": post_quant_conv + conv_in (input = latents), "rest"}."""
    chans = tuple(reversed(cfg.block_out_channels))
    h, w = latent_hw
    first = conv(b, h, w, cfg.latent_channels, chans[0], 3)
    if cfg.use_post_quant_conv:
        first = first + conv(b, h, w, cfg.latent_channels, cfg.latent_channels, 1)
    rest = _vae_mid(cfg, b, (h, w), chans[0])
    c_prev = chans[0]
    for i, c in enumerate(chans):
        for _ in range(cfg.layers_per_block + 1):
            rest = rest + _resnet(b, (h, w), c_prev, c)
            c_prev = c
        if i < len(chans) - 1:
            h, w = 2 * h, 2 * w
            rest = rest + conv(b, h, w, c, c, 3)
    rest = rest + conv(b, h, w, chans[-1], cfg.out_channels, 3)
    return {"first": first, "rest": rest}
