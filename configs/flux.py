"""Tiny ``flux`` phase: train a small FLUX-architecture transformer from scratch with flow matching (no pretrained
FLUX exists offline) on the shapes data. VAE (from the ``vae`` phase when ``vae.init_from`` is set) and the tiny
T5/CLIP text encoders (fixed random init, word tokenizer built from the data vocabulary) are frozen.

    bifrost train --config configs/flux.py --workdir runs/demo --config.vae.init_from=runs/demo/vae/checkpoints
"""
from bifrost_jax.train.phase_configs import tiny_flux_family


def get_config():
    return tiny_flux_family("flux")
