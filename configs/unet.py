"""Tiny ``unet`` phase: train a small SD-architecture ``UNet2DConditionModel`` from scratch with the DDPM denoising
loss (epsilon; ``--config.scheduler.prediction_type=v_prediction`` for v) on the shapes data: no pretrained UNet
exists offline. The VAE (from the ``vae`` phase when ``vae.init_from`` is set) and the CLIP text encoder (fixed
random init, word tokenizer built from the data vocabulary) are frozen. Fine-tuning a real one:
``--config.unet.port_dir=checkpoints/stable-diffusion-v1-5/unet`` (its config.json sets the sizes).

    bifrost train --config configs/unet.py --workdir runs/demo --config.vae.init_from=runs/demo/vae/checkpoints
"""
from bifrost_jax.train.phase_configs import tiny_unet_family


def get_config():
    return tiny_unet_family("unet")
