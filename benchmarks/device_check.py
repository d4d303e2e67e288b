"""One-call accelerator check: attention paths, full-width training steps, and a FLUX-size denoising step beside
diffusers, written as JSON + markdown.

    python benchmarks/device_check.py --out "$OUT"              # full size, one GPU (H100/H200), <= 8 minutes
    python benchmarks/device_check.py --dry-run --out /tmp/dc    # tiny sizes on CPU, seconds (tests/test_device_check.py)

Sections (each runs on its own; a failure is recorded in the report with its traceback and the next section runs):

1. ``attention``: ``nn.attention.dot_product_attention`` with ``implementation="xla"`` and ``"cudnn"`` on the shapes of
   the full-size models -- FLUX joint attention (4096 image + 512 text tokens, 24 heads x 128), the Qwen2.5-VL decoder
   over the MLLM training sequence (300 left-padded text tokens + 256 image slots, 28 query / 4 KV heads, causal text
   + bidirectional image block + padding: an ``AttentionMask``), and the ViT's windowed attention (8x8-patch windows,
   16 heads x 80) -- in bf16: forward and forward+backward time, and the max relative error of each path's output
   (valid rows) against ``jax.nn.dot_product_attention(implementation="xla")`` in float32, and of cuDNN's gradients
   against the XLA path's.
2. ``generate``: one denoising step (latent ControlNet + FLUX.1-dev-size transformer, guidance embedding, 512 T5
   tokens) at 1024x1024 and 512x512, batch 1, bf16, in JAX (scanned blocks, attention "auto" = cuDNN on GPU) and in
   diffusers (``FluxTransformer2DModel`` + ``FluxControlNetModel``, torch bf16, SDPA) on the same GPU with the SAME
   weights (diffusers' random init, read into the JAX modules through the port key maps). Both start from the
   upsampled CLIP latents, as their pipelines do in the loop (JAX applies the ControlNet's input Linear once per image,
   diffusers inside every step). Reports ms per step and the max relative difference of the velocities.
3. ``train_controlnet``: the ``controlnet`` phase's step (frozen FLUX.1-dev in bf16 under the ControlNet's residuals,
   remat "dots_no_batch"; latent ControlNet 4 double + 1 single blocks trained in fp32 master weights with bf16
   compute, remat "full", BatchNorm batch statistics; flow-matching loss; AdamW) at 512x512 (1024 image tokens, 512
   text tokens) on random inputs standing in for the frozen encoders' outputs; step time, examples and tokens per
   second, MFU from ``parallel/flops.py``'s analytic count of the parts that run (FLUX + ControlNet; the frozen text
   encoders, ViT and VAE of the full phase are not run here), peak memory.
4. ``train_mllm``: the ``mllm`` phase's step at Qwen2.5-VL-7B width with a few layers (scanned, remat
   "dots_no_batch", frozen weights bf16, the generation branch trained in fp32 master weights, MAR masking, MSE loss,
   AdamW) over 300 text tokens + 256 image slots; same figures.

Imports: jax, flax, optax, numpy, safetensors (all on the device image), and torch + diffusers for the PyTorch half of
``generate`` (absent: that half is skipped with the reason; see benchmarks/RESULTS.md for the wheel to carry).
Nothing from the data/train/config layers (no ml_collections, grain, tensorflow-datasets).
"""
from __future__ import annotations

import os

# torch shares the GPU in "generate": JAX allocates on demand (up to 90% of HBM) instead of taking 75% up front
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import traverse_util  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bifrost_jax.models.bifrost import (BifrostConfig, BifrostMLLM, is_trainable, mse_loss,  # noqa: E402
                                        sample_mar_mask_for)
from bifrost_jax.models.flux.controlnet import FluxControlNetConfig, controlnet_module  # noqa: E402
from bifrost_jax.models.flux.transformer import FluxConfig, FluxTransformer2DModel  # noqa: E402
from bifrost_jax.models.flux.vae import latent_image_ids  # noqa: E402
from bifrost_jax.models.qwen.decoder import QwenTextConfig  # noqa: E402
from bifrost_jax.nn.attention import AttentionMask, dot_product_attention  # noqa: E402
from bifrost_jax.parallel import flops  # noqa: E402
from bifrost_jax.parallel.devices import chip_for_device_kind  # noqa: E402
from bifrost_jax.port.base import load_mapped, prefixed  # noqa: E402
from bifrost_jax.port.flux import controlnet_key_map, transformer_key_map  # noqa: E402

SECTIONS = ("attention", "generate", "train_controlnet", "train_mllm")


# ----------------------------------------------------------------------------------------------------------------
# sizes

@dataclasses.dataclass(frozen=True)
class Sizes:
    name: str
    dtype: Any                      # compute dtype of every section
    repeats: int
    flux: dict                      # diffusers FluxTransformer2DModel fields
    controlnet_layers: tuple        # (double, single) blocks of the latent ControlNet
    clip_dim: int                   # CLIP-latent width (Qwen2.5-VL hidden size)
    text_tokens: int                # T5 tokens
    generate_grids: tuple           # CLIP grids of the generation step (packed FLUX grid = 2x)
    train_grid: tuple               # CLIP grid of the controlnet step
    qwen: dict                      # QwenTextConfig fields of the mllm step
    prompt_len: int
    image_grid: tuple               # MAR image-slot grid
    vit: dict                       # windowed-attention shape: heads, head_dim, windows per image, window_len
    attention_batch: int            # images/prompts per attention call (decoder, ViT)


FULL = Sizes(
    name="full", dtype=jnp.bfloat16, repeats=5,
    flux=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
              num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
              axes_dims_rope=(16, 56, 56)),
    controlnet_layers=(4, 1), clip_dim=3584, text_tokens=512, generate_grids=((32, 32), (16, 16)),
    train_grid=(16, 16),
    qwen=dict(num_hidden_layers=4), prompt_len=300, image_grid=(16, 16),
    vit=dict(heads=16, head_dim=80, windows=16, window_len=64), attention_batch=4)

TINY = Sizes(  # one generation resolution and one repeat: the dry run checks the code paths, quickly
    name="tiny", dtype=jnp.float32, repeats=1,
    flux=dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True,
              axes_dims_rope=(4, 6, 6)),
    controlnet_layers=(1, 1), clip_dim=32, text_tokens=8, generate_grids=((2, 3),), train_grid=(2, 2),
    qwen=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=64, mrope_section=(2, 1, 1)),
    prompt_len=10, image_grid=(2, 3),
    vit=dict(heads=2, head_dim=16, windows=4, window_len=16), attention_batch=2)


# ----------------------------------------------------------------------------------------------------------------
# helpers

def _median_ms(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """(first call s (compile + run), median ms of ``repeats`` further calls, last output); blocks on each."""
    t0 = time.perf_counter()
    out = _block(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = _block(fn())
        times.append(time.perf_counter() - t0)
    return first, 1e3 * float(np.median(times)), out


def _block(x):
    """Wait for JAX arrays (torch results are synchronised by their caller)."""
    return jax.block_until_ready(x) if not type(x).__module__.startswith("torch") else x


def _rel_err(a, b, rows=None) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if rows is not None:
        a, b = a[rows], b[rows]
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def _device_info() -> dict:
    d = jax.devices()[0]
    chip = chip_for_device_kind(getattr(d, "device_kind", ""))
    return dict(backend=jax.default_backend(), device_kind=getattr(d, "device_kind", ""), device_count=jax.device_count(),
                jax=jax.__version__, peak_bf16_flops=chip.peak_bf16_flops if chip else None,
                chip=chip.name if chip else None, host=platform.node(), cpu_count=os.cpu_count(),
                python=platform.python_version())


def _peak_memory_gib() -> Optional[float]:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2 ** 30


def _mfu(flops_per_step: float, step_ms: float, peak: Optional[float]) -> Optional[float]:
    return None if not peak else flops_per_step / (step_ms / 1e3) / peak


def _abstract_variables(module, *args, **kwargs):
    """ShapeDtypeStructs of ``module.init``'s variables (nothing allocated)."""
    return nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *args, **kwargs))


def _random_variables(module, *args, **kwargs):
    """Random variables with the shapes of ``module.init`` (traced abstractly: a real init compiles the whole forward,
    and drawing every leaf on the device compiles one kernel per leaf, minutes on a CPU). Matrices are windows of a
    host pool of N(0, 1/fan_in) samples (one pool per fan-in and dtype, up to 2^24 values, each leaf from its own
    offset), norm scales and variances 1, other vectors 0: fast at any size, enough for speed and agreement checks."""
    shapes = _abstract_variables(module, *args, **kwargs)
    rng = np.random.default_rng(0)
    pools: dict = {}

    def fill(i, path, leaf):
        dtype = np.dtype(leaf.dtype)  # host arrays only: an eager jnp.full compiles a kernel per shape
        if not np.issubdtype(dtype, np.floating) and dtype != np.dtype(jnp.bfloat16):
            return np.zeros(leaf.shape, dtype)
        if len(leaf.shape) < 2:
            return np.full(leaf.shape, 1.0 if path[-1] in ("scale", "var") else 0.0, dtype)
        key = (leaf.shape[-2], dtype)
        if key not in pools:
            pools[key] = (rng.standard_normal(2 * sizes[key]) / math.sqrt(leaf.shape[-2])).astype(dtype)
        pool = pools[key]
        start = (i * 7919) % (pool.size // 2)
        return np.resize(pool[start:], leaf.shape)

    flat = traverse_util.flatten_dict(shapes)
    sizes: dict = {}  # per pool: the largest leaf it serves, up to 2^23 (then windows repeat)
    for leaf in flat.values():
        if len(leaf.shape) >= 2:
            key = (leaf.shape[-2], np.dtype(leaf.dtype))
            sizes[key] = min(max(sizes.get(key, 0), math.prod(leaf.shape)), 1 << 23)
    return traverse_util.unflatten_dict({p: jax.device_put(fill(i, p, leaf))
                                         for i, (p, leaf) in enumerate(sorted(flat.items()))})


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


# ----------------------------------------------------------------------------------------------------------------
# 1. attention

def attention_cases(s: Sizes) -> dict:
    """name -> (q shape, kv shape, mask factory (or None))."""
    f = s.flux
    heads, d = f["num_attention_heads"], f["attention_head_dim"]
    img = 4 * s.generate_grids[0][0] * s.generate_grids[0][1]
    q = QwenTextConfig(**s.qwen)
    n = s.image_grid[0] * s.image_grid[1]
    length = s.prompt_len + n
    b = s.attention_batch

    def decoder_mask():
        valid = np.ones((b, length), bool)
        for i in range(b):  # left padding of different amounts (a third of the prompt at most)
            valid[i, :(i * s.prompt_len) // (3 * b)] = False
        return AttentionMask.padded_self_attention(jnp.asarray(valid), causal=True, full_suffix=n)

    v = s.vit
    return {
        "flux_joint": ((1, img + s.text_tokens, heads, d), (1, img + s.text_tokens, heads, d), None),
        "qwen_decoder_gqa_padded": ((b, length, q.num_attention_heads, q.head_dim),
                                    (b, length, q.num_key_value_heads, q.head_dim), decoder_mask),
        "vit_windowed": ((b * v["windows"], v["window_len"], v["heads"], v["head_dim"]),
                         (b * v["windows"], v["window_len"], v["heads"], v["head_dim"]), None),
    }


def _reference_attention(q, k, v, mask):
    """jax.nn.dot_product_attention (XLA) in float32 (rows that see no key are excluded from the comparison)."""
    dense = None if mask is None else mask.dense(q.shape[1], k.shape[1])
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    return jax.nn.dot_product_attention(f32(q), f32(k), f32(v), mask=dense, implementation="xla")


def run_attention(s: Sizes) -> dict:
    on_gpu = jax.default_backend() == "gpu"
    out = {}
    for name, (q_shape, kv_shape, make_mask) in attention_cases(s).items():
        keys = jax.random.split(jax.random.PRNGKey(len(name)), 4)
        q = jax.random.normal(keys[0], q_shape, s.dtype)
        k = jax.random.normal(keys[1], kv_shape, s.dtype)
        v = jax.random.normal(keys[2], kv_shape, s.dtype)
        ct = jax.random.normal(keys[3], q_shape, jnp.float32)
        mask = make_mask() if make_mask else None
        rows = None if mask is None else mask.row_has_key(q_shape[1], kv_shape[1])
        rows = None if rows is None else np.broadcast_to(np.asarray(rows), q_shape[:2])
        ref = jax.jit(_reference_attention)(q, k, v, mask)
        case = dict(q=list(q_shape), kv=list(kv_shape), dtype=jnp.dtype(s.dtype).name,
                    mask="AttentionMask(causal, full_suffix, padding)" if mask is not None else "none",
                    implementations={})
        grads = {}
        for impl in ("xla", "cudnn"):
            if impl == "cudnn" and not on_gpu:
                case["implementations"][impl] = dict(skipped=f"cuDNN flash attention needs a CUDA GPU (backend: "
                                                             f"{jax.default_backend()})")
                continue
            try:
                fwd = jax.jit(lambda q, k, v, impl=impl: dot_product_attention(q, k, v, mask=mask,
                                                                             implementation=impl))

                def loss(q, k, v, impl=impl):
                    o = dot_product_attention(q, k, v, mask=mask, implementation=impl)
                    return jnp.sum(o.astype(jnp.float32) * ct)
                bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
                first_f, fwd_ms, o = _median_ms(lambda: fwd(q, k, v), s.repeats)
                first_b, bwd_ms, g = _median_ms(lambda: bwd(q, k, v), s.repeats)
                grads[impl] = g
                case["implementations"][impl] = dict(
                    fwd_ms=fwd_ms, fwd_bwd_ms=bwd_ms, compile_and_first_s=first_f + first_b,
                    max_rel_err_vs_reference=_rel_err(o, ref, rows))
            except Exception as e:  # noqa: BLE001  (a path that fails on this device is a result)
                case["implementations"][impl] = dict(error=f"{type(e).__name__}: {e}"[:2000])
        if "xla" in grads and "cudnn" in grads:
            case["implementations"]["cudnn"]["grad_max_rel_err_vs_xla"] = max(
                _rel_err(a, b) for a, b in zip(grads["cudnn"], grads["xla"]))
        out[name] = case
    return out


# ----------------------------------------------------------------------------------------------------------------
# 2. generation step, JAX beside diffusers

class TorchStateReader:
    """The reader interface of ``port.base.load_mapped`` over a live PyTorch state dict (any device): one tensor at a
    time to host numpy, bf16 kept bf16 (bit-cast through int16: no float32 copy of a 12B-parameter model)."""
    path = "PyTorch state dict"

    def __init__(self, state: dict):
        self.state = state

    def keys(self):
        return list(self.state)

    def __contains__(self, key):
        return key in self.state

    def shape(self, key):
        return tuple(self.state[key].shape)

    def get(self, key):
        import torch
        t = self.state[key].detach().cpu()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(jnp.bfloat16)
        return t.numpy()


def _random_diffusers_pair(flux_config: dict, controlnet_layers: tuple[int, int], clip_dim: int, *, device: str,
                           dtype, seed: int = 0, head_std: float = 0.02):
    """(diffusers FluxTransformer2DModel, FluxControlNetModel with a ``clip_dim``-wide controlnet_x_embedder), eval
    mode, created directly on ``device`` in ``dtype`` with diffusers' own random init; the zero-initialised
    ControlNet input and output projections are redrawn (N(0, head_std)) so that the residuals are not zero."""
    import torch
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**flux_config)
            cn_config = {k: v for k, v in flux_config.items() if k != "out_channels"}
            controlnet = FluxControlNetModel(**{**cn_config, "num_layers": controlnet_layers[0],
                                                "num_single_layers": controlnet_layers[1]})
            controlnet.controlnet_x_embedder = torch.nn.Linear(clip_dim, controlnet.inner_dim)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if name.startswith(("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")):
                p.normal_(0.0, head_std)
    return transformer.eval(), controlnet.eval()


def _flux_modules(s: Sizes, grid, *, scan: bool, remat: str = "none", cn_remat: str = "none", cn_dtype=None):
    tr = FluxTransformer2DModel(FluxConfig(**s.flux), dtype=s.dtype, param_dtype=s.dtype, scan_layers=scan,
                                remat_policy=remat)
    cn_fields = {k: v for k, v in s.flux.items() if k != "out_channels"}
    cn_cfg = FluxControlNetConfig(**{**cn_fields, "num_layers": s.controlnet_layers[0],
                                     "num_single_layers": s.controlnet_layers[1]},
                                  clip_latent_dim=s.clip_dim, clip_grid=tuple(grid))
    cn = controlnet_module(cn_cfg, dtype=s.dtype, param_dtype=cn_dtype or s.dtype, scan_layers=scan,
                           remat_policy=cn_remat)
    return tr, cn


def _flux_inputs(s: Sizes, grid, batch: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    h, w = 2 * grid[0], 2 * grid[1]
    f = np.float32
    return dict(hidden_states=rng.standard_normal((batch, h * w, s.flux["in_channels"])).astype(f),
                encoder_hidden_states=rng.standard_normal((batch, s.text_tokens, s.flux["joint_attention_dim"])
                                                          ).astype(f),
                pooled_projections=rng.standard_normal((batch, s.flux["pooled_projection_dim"])).astype(f),
                timestep=np.full((batch,), 0.7, f), guidance=np.full((batch,), 3.5, f),
                img_ids=np.asarray(latent_image_ids(h, w)), txt_ids=np.zeros((s.text_tokens, 3), f),
                cond=rng.standard_normal((batch, h * w, s.clip_dim)).astype(f))


def _jax_velocity(tr, cn, x_embed):
    """One denoising step's velocity; ``emb`` = the ControlNet's input Linear on the upsampled latents (once)."""
    def velocity(tr_vars, cn_vars, emb, inp):
        blocks, singles = cn.apply(cn_vars, inp["hidden_states"], conditioning_scale=1.0,
                                   encoder_hidden_states=inp["encoder_hidden_states"],
                                   pooled_projections=inp["pooled_projections"], timestep=inp["timestep"],
                                   img_ids=inp["img_ids"], txt_ids=inp["txt_ids"], guidance=inp["guidance"],
                                   controlnet_cond_embedding=emb)
        return tr.apply(tr_vars, inp["hidden_states"], inp["encoder_hidden_states"], inp["pooled_projections"],
                        inp["timestep"], inp["img_ids"], inp["txt_ids"], guidance=inp["guidance"],
                        controlnet_block_samples=blocks, controlnet_single_block_samples=singles)
    return jax.jit(velocity), jax.jit(lambda cn_vars, c: cn.apply(cn_vars, c, method=x_embed))


def run_generate(s: Sizes) -> dict:
    try:
        import torch
        from diffusers import FluxControlNetModel  # noqa: F401  (presence check)
    except ImportError as e:
        torch = None
        torch_missing = f"PyTorch side skipped: {e}"
    on_gpu = jax.default_backend() == "gpu"
    device = "cuda" if on_gpu else "cpu"
    torch_dtype = None if torch is None else {jnp.dtype(jnp.bfloat16): torch.bfloat16,
                                               jnp.dtype(jnp.float32): torch.float32}[jnp.dtype(s.dtype)]
    out = dict(batch=1, text_tokens=s.text_tokens, dtype=jnp.dtype(s.dtype).name, resolutions={})
    if torch is None:
        out["torch"] = torch_missing
    else:
        t0 = time.perf_counter()
        t_tr, t_cn = _random_diffusers_pair(s.flux, s.controlnet_layers, s.clip_dim, device=device,
                                            dtype=torch_dtype)
        out["torch_build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tr0, cn0 = _flux_modules(s, s.generate_grids[0], scan=True)
    tr_shapes = _abstract_variables(tr0, **tr0.dummy_inputs())
    cn_shapes = _abstract_variables(cn0, **cn0.dummy_inputs())
    cn_shapes = {"params": {k: v for k, v in cn_shapes["params"].items() if k != "up_sampling_block"}}
    if torch is not None:  # the SAME weights: diffusers' init read through the port key maps
        tr_vars = load_mapped(TorchStateReader(t_tr.state_dict()),
                              prefixed(("params",), transformer_key_map(tr0.config, True)),
                              {"params": tr_shapes["params"]}, dtype=s.dtype, what="diffusers transformer")
        cn_vars = load_mapped(TorchStateReader(t_cn.state_dict()),
                              prefixed(("params",), controlnet_key_map(cn0.config, True)), cn_shapes,
                              dtype=s.dtype, what="diffusers controlnet")
    else:
        tr_vars = {"params": _random_variables(tr0, **tr0.dummy_inputs())["params"]}
        cn_vars = {"params": {k: v for k, v in _random_variables(cn0, **cn0.dummy_inputs())["params"].items()
                              if k != "up_sampling_block"}}
    out["weights_to_jax_s"] = time.perf_counter() - t0
    for grid in s.generate_grids:
        tr, cn = _flux_modules(s, grid, scan=True)
        inp = _flux_inputs(s, grid, 1)
        # CLIP grid (h, w) -> FLUX packed grid (2h, 2w) -> VAE latent (4h, 4w) -> pixels (32h, 32w)
        res = dict(image_px=32 * grid[0] if grid[0] == grid[1] else [32 * grid[0], 32 * grid[1]],
                   image_tokens=4 * grid[0] * grid[1])
        velocity, embed = _jax_velocity(tr, cn, lambda m, c: m.controlnet_x_embedder(c))
        j_inp = {k: jnp.asarray(v, s.dtype if k not in ("img_ids", "txt_ids") else jnp.float32)
                 for k, v in inp.items() if k != "cond"}
        emb = embed(cn_vars, jnp.asarray(inp["cond"], s.dtype))
        first, ms, v_jax = _median_ms(lambda: velocity(tr_vars, cn_vars, emb, j_inp), s.repeats)
        res["jax"] = dict(ms_per_step=ms, compile_and_first_s=first)
        if torch is not None:
            t_inp = {k: torch.tensor(v).to(device=device, dtype=torch_dtype if k not in ("img_ids", "txt_ids")
                                                else torch.float32) for k, v in inp.items()}

            def torch_step():
                with torch.no_grad():
                    blocks, singles = t_cn(hidden_states=t_inp["hidden_states"], controlnet_cond=t_inp["cond"],
                                           conditioning_scale=1.0, encoder_hidden_states=t_inp["encoder_hidden_states"],
                                           pooled_projections=t_inp["pooled_projections"], timestep=t_inp["timestep"],
                                           img_ids=t_inp["img_ids"], txt_ids=t_inp["txt_ids"],
                                           guidance=t_inp["guidance"], return_dict=False)
                    v = t_tr(hidden_states=t_inp["hidden_states"], encoder_hidden_states=t_inp["encoder_hidden_states"],
                             pooled_projections=t_inp["pooled_projections"], timestep=t_inp["timestep"],
                             img_ids=t_inp["img_ids"], txt_ids=t_inp["txt_ids"], guidance=t_inp["guidance"],
                             controlnet_block_samples=blocks, controlnet_single_block_samples=singles,
                             return_dict=False)[0]
                if on_gpu:
                    torch.cuda.synchronize()
                return v
            first_t, t_ms, v_torch = _median_ms(torch_step, s.repeats)  # torch_step synchronises itself
            res["torch"] = dict(ms_per_step=t_ms, first_s=first_t, attention="SDPA (diffusers default processor)")
            res["torch_over_jax"] = t_ms / ms
            res["velocity_max_rel_diff"] = _rel_err(v_jax, v_torch.float().cpu().numpy())
        out["resolutions"][f"{res['image_px']}px"] = res
    if torch is not None:
        del t_tr, t_cn
        if on_gpu:
            torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------------------------------------------
# 3. controlnet phase step

def _adamw_step(loss_fn, tx):
    @functools.partial(jax.jit, donate_argnums=(0, 1))  # trained weights and moments updated in place
    def step(train, opt_state, *rest):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(train, *rest)
        updates, opt_state = tx.update(grads, opt_state, train)
        return optax.apply_updates(train, updates), opt_state, loss, aux
    return step


def _timed_steps(step, state, args, repeats):
    """Run ``step`` once to compile, then ``repeats`` times, threading the (donated) state through."""
    t0 = time.perf_counter()
    train, opt_state, loss, aux = jax.block_until_ready(step(*state, *args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        train, opt_state, loss, aux = jax.block_until_ready(step(train, opt_state, *args))
        times.append(time.perf_counter() - t0)
    return first, 1e3 * float(np.median(times)), float(loss)


def run_train_controlnet(s: Sizes, batch: int) -> dict:
    grid = s.train_grid
    tr, cn = _flux_modules(s, grid, scan=True, remat="dots_no_batch", cn_remat="full", cn_dtype=jnp.float32)
    frozen = {"params": _random_variables(tr, **tr.dummy_inputs())["params"]}
    cn_vars = _random_variables(cn, **cn.dummy_inputs())
    inp = {k: jnp.asarray(v) for k, v in _flux_inputs(s, grid, batch).items()}
    clip = jax.random.normal(jax.random.PRNGKey(1), (batch, grid[0] * grid[1], s.clip_dim), jnp.float32)
    noise = jax.random.normal(jax.random.PRNGKey(2), inp["hidden_states"].shape, jnp.float32)
    sigma = jnp.linspace(0.2, 0.9, batch)

    def loss_fn(params, batch_stats, frozen, inp, clip, noise, sigma):
        emb, updates = cn.apply({"params": params, "batch_stats": batch_stats}, clip, train=True,
                                method=cn.embed_condition, mutable=["batch_stats"])
        x0 = inp["hidden_states"]
        x_t = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        blocks, singles = cn.apply({"params": params}, x_t, conditioning_scale=1.0,
                                   encoder_hidden_states=inp["encoder_hidden_states"],
                                   pooled_projections=inp["pooled_projections"], timestep=sigma,
                                   img_ids=inp["img_ids"], txt_ids=inp["txt_ids"], guidance=inp["guidance"],
                                   controlnet_cond_embedding=emb)
        pred = tr.apply(frozen, x_t, inp["encoder_hidden_states"], inp["pooled_projections"], sigma, inp["img_ids"],
                        inp["txt_ids"], guidance=inp["guidance"], controlnet_block_samples=blocks,
                        controlnet_single_block_samples=singles)
        return jnp.mean(jnp.square(pred.astype(jnp.float32) - (noise - x0))), updates["batch_stats"]

    tx = optax.adamw(1e-5)
    params = cn_vars["params"]
    step = _adamw_step(loss_fn, tx)  # the updated BatchNorm statistics come back as aux (not threaded: timing only)
    first, ms, loss = _timed_steps(step, (params, tx.init(params)),
                                   (cn_vars["batch_stats"], frozen, inp, clip, noise, sigma), s.repeats)
    img, txt = 4 * grid[0] * grid[1], s.text_tokens
    parts = (flops.controlnet_parts(cn.config, batch, img, txt, mode="train")
             + flops.flux_transformer_parts(tr.config, batch, img, txt, mode="backprop", residuals=True,
                                            scanned=True))
    total = flops.FlopsBreakdown(tuple(parts)).total
    return _train_report(dict(batch=batch, image_tokens=img, text_tokens=txt,
                              flux_blocks=[tr.config.num_layers, tr.config.num_single_layers],
                              controlnet_blocks=list(s.controlnet_layers)),
                         first, ms, loss, total, batch, batch * (img + txt))


def _train_report(what, first, ms, loss, flops_per_step, examples, tokens) -> dict:
    peak = _device_info()["peak_bf16_flops"]
    mfu = _mfu(flops_per_step, ms, peak)
    return dict(**what, compile_and_first_s=first, step_ms=ms, examples_per_s=examples / (ms / 1e3),
                tokens_per_s=tokens / (ms / 1e3), analytic_flops_per_step=flops_per_step,
                achieved_tflops=flops_per_step / (ms / 1e3) / 1e12, mfu=mfu,
                mfu_note=None if mfu is not None else "no peak FLOP/s known for this device",
                peak_memory_gib=_peak_memory_gib(), loss=loss)


# ----------------------------------------------------------------------------------------------------------------
# 4. mllm phase step

def _split(params):
    flat = traverse_util.flatten_dict(params)
    train = {k: v for k, v in flat.items() if is_trainable(k)}
    frozen = {k: v for k, v in flat.items() if not is_trainable(k)}
    return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def _merge(a, b):
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(a), **traverse_util.flatten_dict(b)})


def run_train_mllm(s: Sizes, batch: int) -> dict:
    text = QwenTextConfig(**s.qwen)
    cfg = BifrostConfig(text=text, num_image_tokens=s.image_grid[0] * s.image_grid[1], image_grid=s.image_grid)
    module = BifrostMLLM(cfg, dtype=s.dtype, param_dtype=jnp.float32, scan_layers=True, remat_policy="dots_no_batch")
    t, n = s.prompt_len, cfg.num_image_tokens
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, text.vocab_size, (batch, t)), jnp.int32)
    am = np.ones((batch, t), np.int32)
    am[:, : t // 3] = 0
    am = jnp.asarray(am)
    clip = jax.random.normal(jax.random.PRNGKey(3), (batch, n, cfg.clip_dim), jnp.float32)
    params = _random_variables(module, ids, am, clip, jnp.ones((batch, n), bool))["params"]
    train, frozen = _split(params)
    frozen = _cast(frozen, s.dtype)  # train.frozen_param_dtype = bf16, as configs/full/mllm.py

    def loss_fn(train, frozen, ids, am, clip, key):
        mask = sample_mar_mask_for(cfg, key, ids.shape[0])
        pred = module.apply({"params": _merge(train, frozen)}, ids, am, clip, mask)
        return mse_loss(pred, clip), None

    tx = optax.adamw(1e-5)
    step = _adamw_step(loss_fn, tx)
    first, ms, loss = _timed_steps(step, (train, tx.init(train)), (frozen, ids, am, clip, jax.random.PRNGKey(4)),
                                   s.repeats)
    parts = [flops.Part("qwen text rows (frozen)", flops.qwen_text_rows(text, batch, t), "forward"),
             flops.Part("generation branch + head", flops.qwen_branch_rows(cfg, batch, t), "train")]
    total = flops.FlopsBreakdown(tuple(parts)).total
    return _train_report(dict(batch=batch, text_tokens=t, image_slots=n, layers=text.num_hidden_layers,
                              hidden=text.hidden_size), first, ms, loss, total, batch, batch * (t + n))


# ----------------------------------------------------------------------------------------------------------------
# the report

def _fmt(x, spec=".3g") -> str:
    if x is None:
        return "-"
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def markdown(report: dict) -> str:
    d = report["device"]
    lines = [f"## Device check ({report['size']} size)", "",
             f"Device: {d['device_kind']} x{d['device_count']} ({d['backend']}), jax {d['jax']}, peak bf16 "
             f"{_fmt(d['peak_bf16_flops'])} FLOP/s; command `{report['command']}`; total {report['total_s']:.0f} s.",
             ""]
    att = report["sections"].get("attention", {})
    if "error" in att:
        lines += [f"attention: ERROR {att['error'].splitlines()[-1]}", ""]
    elif att:
        lines += ["| attention case | q / kv | impl | fwd ms | fwd+bwd ms | max rel err vs f32 ref | grad err vs xla |",
                  "|---|---|---|---|---|---|---|"]
        for name, case in att.items():
            for impl, r in case["implementations"].items():
                shape = f"{case['q']} / {case['kv']}"
                if "skipped" in r or "error" in r:
                    lines.append(f"| {name} | {shape} | {impl} | {r.get('skipped') or r.get('error')[:120]} | | | |")
                else:
                    lines.append(f"| {name} | {shape} | {impl} | {_fmt(r['fwd_ms'])} | {_fmt(r['fwd_bwd_ms'])} | "
                                 f"{_fmt(r['max_rel_err_vs_reference'], '.2e')} | "
                                 f"{_fmt(r.get('grad_max_rel_err_vs_xla'), '.2e')} |")
        lines.append("")
    gen = report["sections"].get("generate", {})
    if "error" in gen:
        lines += [f"generate: ERROR {gen['error'].splitlines()[-1]}", ""]
    elif gen:
        lines += ["| denoising step (FLUX + latent ControlNet, batch 1) | JAX ms | diffusers ms | diffusers / JAX | "
                  "velocity max rel diff | JAX compile s |", "|---|---|---|---|---|---|"]
        for res_name, r in gen["resolutions"].items():
            t = r.get("torch", {})
            lines.append(f"| {res_name} ({r['image_tokens']} image tokens) | {_fmt(r['jax']['ms_per_step'])} | "
                         f"{_fmt(t.get('ms_per_step'))} | {_fmt(r.get('torch_over_jax'))} | "
                         f"{_fmt(r.get('velocity_max_rel_diff'), '.2e')} | {_fmt(r['jax']['compile_and_first_s'])} |")
        if "torch" in gen and isinstance(gen["torch"], str):
            lines.append(f"\n{gen['torch']}")
        lines.append("")
    for name in ("train_controlnet", "train_mllm"):
        r = report["sections"].get(name)
        if r is None:
            continue
        if "error" in r:
            lines += [f"{name}: ERROR {r['error'].splitlines()[-1]}", ""]
            continue
        lines += [f"{name}: batch {r['batch']}, step {_fmt(r['step_ms'])} ms (compile+first {_fmt(r['compile_and_first_s'])}"
                  f" s), {_fmt(r['examples_per_s'])} examples/s, {_fmt(r['tokens_per_s'])} tokens/s, analytic "
                  f"{_fmt(r['analytic_flops_per_step'])} FLOP/step = {_fmt(r['achieved_tflops'])} TFLOP/s, MFU "
                  f"{_fmt(None if r['mfu'] is None else 100 * r['mfu'], '.1f')}%, peak memory "
                  f"{_fmt(r['peak_memory_gib'])} GiB, loss {_fmt(r['loss'], '.4f')}", ""]
    for name, why in report.get("skipped", {}).items():
        lines.append(f"{name}: skipped ({why})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "device_check_out"), help="folder for the report")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes (CPU): checks the script, not the device")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="skip sections not yet started once this many seconds have passed")
    p.add_argument("--controlnet-batch", type=int, default=None,
                   help="default: 4 where JAX may use >= 100 GiB (H200), else 2 (tiny: 2)")
    p.add_argument("--mllm-batch", type=int, default=None, help="default 8 (tiny: 2)")
    p.add_argument("--mllm-layers", type=int, default=None, help="Qwen2.5-VL-7B layers in the mllm step (default 4)")
    p.add_argument("--flux-blocks", default=None, help="double,single FLUX blocks (default: FLUX.1-dev's 19,38)")
    args = p.parse_args(argv)
    s = TINY if args.dry_run else FULL
    if args.mllm_layers:
        s = dataclasses.replace(s, qwen={**s.qwen, "num_hidden_layers": args.mllm_layers})
    if args.flux_blocks:
        d, sg = (int(x) for x in args.flux_blocks.split(","))
        s = dataclasses.replace(s, flux={**s.flux, "num_layers": d, "num_single_layers": sg})
    sections = [x for x in args.sections.split(",") if x]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"device_check: unknown section(s) {unknown}; choose from {SECTIONS}")
    stats = jax.devices()[0].memory_stats() or {}
    hbm = stats.get("bytes_limit", 0) / 2 ** 30
    cn_batch = args.controlnet_batch or (2 if s is TINY or hbm < 100 else 4)
    mllm_batch = args.mllm_batch or (2 if s is TINY else 8)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    report = dict(size=s.name, command=" ".join(["python benchmarks/device_check.py"] + list(argv or sys.argv[1:])),
                  device=_device_info(), sections={}, skipped={}, timings_s={})
    runners = {"attention": lambda: run_attention(s), "generate": lambda: run_generate(s),
               "train_controlnet": lambda: run_train_controlnet(s, cn_batch),
               "train_mllm": lambda: run_train_mllm(s, mllm_batch)}
    for name in sections:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            report["skipped"][name] = f"time budget: {elapsed:.0f} s > {args.budget_s:.0f} s"
            continue
        t0 = time.perf_counter()
        try:
            report["sections"][name] = runners[name]()
        except Exception:  # noqa: BLE001  (record and go on: one failing section must not cost the others)
            report["sections"][name] = dict(error=traceback.format_exc()[-4000:])
        report["timings_s"][name] = time.perf_counter() - t0
        print(f"[device_check] {name}: {report['timings_s'][name]:.1f} s", flush=True)
        _write(args.out, report, start)  # partial results survive a timeout
    _write(args.out, report, start)
    print(markdown(report))
    return report


def _write(out: str, report: dict, start: float) -> None:
    report["total_s"] = time.perf_counter() - start
    with open(os.path.join(out, "device_check.json"), "w") as fh:
        json.dump(report, fh, indent=1, default=str)
    with open(os.path.join(out, "device_check.md"), "w") as fh:
        fh.write(markdown(report))


if __name__ == "__main__":
    main()
