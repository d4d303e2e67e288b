"""Tiny ``vae`` phase (DEMO AID): train a small FLUX-architecture AutoencoderKL on the shapes data, because no
pretrained FLUX VAE exists offline. Seconds per step on CPU; the ``flux`` and ``controlnet`` phases start from its
checkpoint (``--config.vae.init_from=WORKDIR/vae/checkpoints``).

    bifrost train --config configs/vae.py --workdir runs/demo [--config.train.steps=500 ...]
"""
import ml_collections

from bifrost_jax.train.phase_configs import TINY_VAE, section, tiny_base


def get_config():
    c = tiny_base("vae")
    c.vae = section(TINY_VAE)
    c.model = ml_collections.ConfigDict(dict(recon_loss="l1", kl_weight=1e-6))
    return c
