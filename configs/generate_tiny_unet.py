"""``configs/generate_tiny.py`` with a UNet decoder (docs/unet.md): the same tiny MLLM, CLIP text encoder, VAE and
ViT, a tiny SD-architecture UNet and its latent ControlNet in place of FLUX, T5 and the FLUX ControlNet. Seeded
synthetic weights; the 4x6 CLIP grid -> 8x12 upsampled -> one 2x stage -> 16x24 latents -> 32x48 px.

    bifrost generate --config configs/generate_tiny_unet.py --random-weights --prompt "a red circle" --out /tmp/gen
    bifrost eval geneval --config configs/generate_tiny_unet.py --random-weights --prompts evaluation_metadata.jsonl \
        --out /tmp/geneval
"""
import os

import ml_collections

from bifrost_jax.configs import load_config_file
from bifrost_jax.train.phase_configs import SD_SCHEDULE, TINY_UNET


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "generate_tiny.py"))
    with c.unlocked():
        del c["flux"], c["t5"]
        c.decoder = "unet"
        c.unet = ml_collections.ConfigDict(c.vae.to_dict())  # a section of the same shape
        c.unet.config = ml_collections.ConfigDict({k: v for k, v in TINY_UNET.items() if k != "sample_size"})
        c.controlnet.conditioning_embedding_out_channels = (16, 16)
        c.scheduler = ml_collections.ConfigDict(SD_SCHEDULE)
        c.sample.scheduler = "DPMSolverMultistepScheduler"
        c.sample.guidance = 2.0  # the text CFG scale of the UNet
    return c
