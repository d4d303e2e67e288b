"""The four measurements of ``benchmarks/device_check.py`` (attention paths, the FLUX-size denoising step beside
diffusers, the controlnet and mllm training steps), their sizes (full and tiny) and shared helpers. Each ``run_*``
returns a JSON-able dict; the driver writes the report. See ``device_check.py`` for what each section measures.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import platform
import sys
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bifrost_jax.models.bifrost import (BifrostConfig, BifrostMLLM, is_trainable, mse_loss,  # noqa: E402
                                        sample_mar_mask_for)
from bifrost_jax.models.flux.controlnet import FluxControlNetConfig, controlnet_module  # noqa: E402
from bifrost_jax.models.flux.transformer import FluxConfig, FluxTransformer2DModel  # noqa: E402
from bifrost_jax.models.flux.vae import latent_image_ids  # noqa: E402
from bifrost_jax.models.qwen.decoder import QwenTextConfig  # noqa: E402
from bifrost_jax.nn.attention import AttentionMask, dot_product_attention  # noqa: E402
from bifrost_jax.models import flops  # noqa: E402
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


def device_info() -> dict:
    d = jax.devices()[0]
    chip = chip_for_device_kind(getattr(d, "device_kind", ""))
    return dict(backend=jax.default_backend(), device_kind=getattr(d, "device_kind", ""),
                device_count=jax.device_count(),
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

    def dtype(self, key):
        """The numpy dtype ``get`` returns (bf16 as ml_dtypes' bfloat16), without copying the tensor."""
        import torch
        t = self.state[key]
        return np.dtype(jnp.bfloat16) if t.dtype == torch.bfloat16 else np.dtype(str(t.dtype).removeprefix("torch."))

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
    peak = device_info()["peak_bf16_flops"]
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
