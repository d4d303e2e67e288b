"""Tiny ``controlnet`` phase with a UNet decoder (docs/unet.md): train the latent UNet ControlNet on a frozen
SD-architecture UNet, with CLIP latents of a frozen (tiny, random) Qwen2.5-VL vision tower computed on the fly from
the ViT view of the same crop. The ControlNet starts as a copy of the UNet's encoder (``controlnet.from_unet``).

Geometry: ViT view 112 px -> 4x4 CLIP latents -> 2x upsampler 8x8 -> one 2x stage of the condition embedding ->
16x16 latents = the 32 px VAE view (VAE downsampling 2).

    bifrost train --config configs/unet_controlnet.py --workdir runs/demo \
        --config.unet.init_from=runs/demo/unet/checkpoints --config.vae.init_from=runs/demo/vae/checkpoints
"""
from bifrost_jax.train.phase_configs import tiny_unet_family, tiny_vision_section, unet_controlnet_section


def get_config():
    c = tiny_unet_family("controlnet")
    c.decoder = "unet"
    c.vision = tiny_vision_section()
    # tiny widths (the default 256-wide embedding would cost more than the whole tiny UNet)
    c.controlnet = unet_controlnet_section(conditioning_embedding_out_channels=(32, 32))
    return c
