"""Full-size ``controlnet`` phase with a UNet decoder (docs/unet.md): the latent UNet ControlNet on the frozen
Stable Diffusion v1.5 UNet (bf16), 512 px VAE view (64x64 latents), CLIP latents from the frozen Qwen2.5-VL-7B
vision tower (448 px ViT view -> 16x16 latents). The ControlNet starts as a copy of the UNet's encoder
(``controlnet.from_unet``).
Model fields, port directories and the remat choice: ``bifrost_jax/train/sd_full_configs.py``.

    bifrost train --config configs/full/sd15_controlnet.py --workdir gs://bucket/run \
        --config.data.captions_source=/data/my_images --config.unet.port_dir=/ckpt/sd15/unet ...
    bifrost aot --config configs/full/sd15_controlnet.py --topology v5p:2x2x1       # memory, step time, MFU
"""
from bifrost_jax.train.sd_full_configs import full_sd_controlnet


def get_config():
    c = full_sd_controlnet("sd15")
    c.train.update(batch_size=64)
    return c
