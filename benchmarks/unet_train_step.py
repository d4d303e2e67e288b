"""Time one SDXL-architecture UNet training step (forward, epsilon MSE, backward, AdamW) in bifrost-jax (jit) and
in diffusers (PyTorch eager), same CPU, same weights (the PyTorch UNet is saved and ported) and same batch.

The model is SDXL's layout at a small width: a plain first block and two cross-attention blocks, transformer layers
(1, 2, 2), 64-wide heads, linear projections, ``text_time`` micro-conditioning (pooled text + 6 time ids); NHWC
in JAX, NCHW in PyTorch. Steps of the two frameworks are interleaved (the CPU is shared); medians are reported with
the ratio jax / torch time (the target is <= 0.8).

    .venv/bin/python benchmarks/unet_train_step.py
    .venv/bin/python benchmarks/unet_train_step.py --torch-threads 1 --jax-single-thread   # 1 thread each
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flux_train_step import jax_step_fn, time_and_report, torch_step_fn  # noqa: E402  (sets XLA flags first)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bifrost_jax import port  # noqa: E402


def build_config(args) -> dict:
    w = args.width
    return dict(sample_size=args.latent, block_out_channels=(w, 2 * w, 4 * w),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 2), attention_head_dim=(w // 64, 2 * w // 64, 4 * w // 64),
                cross_attention_dim=args.text_dim, use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=32, projection_class_embeddings_input_dim=args.pooled_dim + 6 * 32)


def make_batches(cfg, args, seed=0):
    """(torch batch NCHW, jax batch NHWC, torch target, jax target)."""
    rng = np.random.default_rng(seed)
    f = np.float32
    x = rng.standard_normal((args.batch, 4, args.latent, args.latent)).astype(f)
    target = rng.standard_normal(x.shape).astype(f)
    common = dict(timestep=rng.uniform(0, 999, (args.batch,)).astype(f),
                  encoder_hidden_states=rng.standard_normal((args.batch, args.text, args.text_dim)).astype(f),
                  added_cond_kwargs={"text_embeds": rng.standard_normal((args.batch, args.pooled_dim)).astype(f),
                                     "time_ids": np.tile(np.array([[1024, 1024, 0, 0, 1024, 1024]], f),
                                                         (args.batch, 1))})
    nhwc = lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1))  # noqa: E731
    return {"sample": x, **common}, {"sample": nhwc(x), **common}, target, nhwc(target)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=128, help="block_out_channels = (w, 2w, 4w); heads are 64 wide")
    ap.add_argument("--latent", type=int, default=32, help="latent height = width")
    ap.add_argument("--text", type=int, default=77)
    ap.add_argument("--text-dim", type=int, default=256)
    ap.add_argument("--pooled-dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--scan", action="store_true", help="scanned transformer layers in JAX")
    ap.add_argument("--remat", default="none", help="JAX remat policy (bifrost_jax.nn.stack.REMAT_POLICIES)")
    ap.add_argument("--torch-threads", default=str(torch.get_num_threads()),
                    help="comma-separated intra-op thread counts, one PyTorch row each")
    ap.add_argument("--jax-single-thread", action="store_true", help="XLA CPU on one thread")
    args = ap.parse_args()
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    torch.manual_seed(0)
    cfg = build_config(args)
    from diffusers import UNet2DConditionModel
    ref = UNet2DConditionModel(**cfg)
    n_params = sum(p.numel() for p in ref.parameters())
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        module, variables = port.load("unet", d, compute_dtype=jnp.float32, scan_layers=args.scan,
                                      remat_policy=args.remat)
    torch_batch, jax_batch, torch_target, jax_target = make_batches(cfg, args)
    steps = {}
    for n in [int(t) for t in args.torch_threads.split(",")]:
        steps[f"torch fp32 eager, {n} thr"] = torch_step_fn(copy.deepcopy(ref), torch_batch, torch_target, 1e-5, n)
    steps["jax fp32"] = jax_step_fn(module, variables["params"], jax_batch, jax_target, 1e-5)
    title = (f"SDXL-architecture UNet train step: block_out_channels {cfg['block_out_channels']}, transformer "
             f"layers (1, 2, 2), heads of 64, {args.latent}x{args.latent} latents, {args.text} text tokens x "
             f"{args.text_dim}, batch {args.batch}, {n_params / 1e6:.1f}M params, AdamW; JAX scan={args.scan}, "
             f"remat={args.remat}, JAX threads={'1' if args.jax_single_thread else 'all'}")
    time_and_report(steps, args, title, load_before)


if __name__ == "__main__":
    main()
