"""Full-size generation with a UNet decoder for ``bifrost aot --phase generate-unet``: Qwen2.5-VL-7B with its
generation branch (256 CLIP-latent slots, 300-token prompts: one MAR decode step) + the Stable Diffusion v1.5 UNet with
its latent ControlNet at 512 px (one DDIM step with text classifier-free guidance), bf16 weights. Only the model
shapes matter: AOT compiles with abstract weights.

    bifrost aot --config configs/full/sd15_generate_aot.py --topology v5p:2x2x1   # needs libtpu
"""
from bifrost_jax.train.sd_full_configs import full_sd_generate


def get_config():
    return full_sd_generate("sd15")
