"""Full-size Stable Diffusion decoders for Bifrost-1 (docs/unet.md): the model fields of SDXL base 1.0 and Stable
Diffusion v1.5 as their diffusers config.json files state them (``unet``, ``vae``, ``text_encoder``,
``text_encoder_2``), and the sections the ``controlnet`` phase with ``decoder: unet`` and ``bifrost aot --phase
generate-unet`` read. Used by ``configs/full/sdxl_*.py`` and ``configs/full/sd15_*.py``.

Geometry with the Qwen2.5-VL-7B vision tower: a 448 px ViT view -> 16x16 CLIP latents -> 2x upsampler 32x32 -> the
condition embedding's 2x stages to the UNet latents: SDXL 1024 px / 8 = 128x128 (2 stages), SD1.5 512 px / 8 = 64x64
(1 stage).
"""
from __future__ import annotations

import ml_collections

from bifrost_jax.train.phase_configs import (CLIP_L, QWEN_VL_7B_TEXT, add_unet_family, full_base, full_vision_section,
                                             section, unet_controlnet_section)

# unet/config.json of stabilityai/stable-diffusion-xl-base-1.0 (fields that differ from diffusers' defaults)
SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
# unet/config.json of Stable Diffusion v1.5 (the UNet2DConditionModel defaults otherwise)
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
# vae/config.json: the SD VAE (4 latent channels, quant convs, no shift)
SD_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215, shift_factor=None,
              use_quant_conv=True, use_post_quant_conv=True)
SDXL_VAE = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025)
# text_encoder_2/config.json of SDXL: OpenCLIP ViT-bigG/14 text tower (CLIPTextModelWithProjection)
CLIP_BIGG = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 hidden_act="gelu", projection_dim=1280)

SD_PORTS = {
    "sdxl": "checkpoints/stable-diffusion-xl-base-1.0",
    "sd15": "checkpoints/stable-diffusion-v1-5",
}
# (UNet fields, VAE fields, second text encoder or None, VAE resolution in px)
SD_FAMILY = {"sdxl": (SDXL_UNET, SDXL_VAE, CLIP_BIGG, 1024), "sd15": (SD15_UNET, SD_VAE, None, 512)}

_BIG = dict(dtype="bfloat16", param_dtype="bfloat16", scan_layers=True)


def _family(name: str):
    if name not in SD_FAMILY:
        raise ValueError(f"unknown Stable Diffusion decoder {name!r}; known: {sorted(SD_FAMILY)}")
    return SD_FAMILY[name]


def add_sd_family(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """``unet``, ``vae``, ``clip`` (and SDXL's ``clip_2``) sections of the full-size decoder ``name``, frozen in
    bf16, with the port directories of its diffusers download (``unet/``, ``vae/``, ``text_encoder*/``,
    ``tokenizer*/``)."""
    unet, vae, clip_2, _ = _family(name)
    root = SD_PORTS[name]
    add_unet_family(c, unet=unet, vae=vae, clip=CLIP_L, clip_2=clip_2, clip_max_length=77,
                    unet_kw=dict(_BIG, port_dir=f"{root}/unet"),
                    text_kw=dict(_BIG),
                    vae_kw=dict(dtype="bfloat16", param_dtype="bfloat16", port_dir=f"{root}/vae"))
    c.clip.port_dir, c.clip.tokenizer_dir = f"{root}/text_encoder", f"{root}/tokenizer"
    if clip_2 is not None:
        c.clip_2.port_dir, c.clip_2.tokenizer_dir = f"{root}/text_encoder_2", f"{root}/tokenizer_2"
    return c


def full_sd_controlnet(name: str) -> ml_collections.ConfigDict:
    """Stage A with the full-size decoder ``name``: the latent UNet ControlNet (a copy of the UNet's encoder,
    fp32 master weights, bf16 compute) on the frozen UNet, CLIP latents from the frozen Qwen2.5-VL-7B tower."""
    _, _, _, resolution = _family(name)
    c = add_sd_family(full_base("controlnet"), name)
    c.decoder = "unet"
    c.vision = full_vision_section()
    # scanned transformer layers in the UNet and its ControlNet (same layout: the ControlNet copies the encoder)
    c.controlnet = unet_controlnet_section(dtype="bfloat16", param_dtype="float32", scan_layers=True,
                                           remat_policy="full")
    # activations of 1024 px SDXL are the memory: every UNet / ControlNet block is recomputed in the backward
    c.unet.remat_policy = "full"
    c.data.update(image_resolution=resolution, vae_resolution=resolution)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.optim.update(lr=1e-5, warmup_steps=500)
    return c


def full_sd_generate(name: str) -> ml_collections.ConfigDict:
    """``bifrost aot --phase generate-unet``: the Qwen2.5-VL-7B MLLM with its generation branch (one MAR step) and
    the decoder ``name`` with its latent ControlNet (one guided sampling step), bf16 weights."""
    _, _, _, resolution = _family(name)
    c = add_sd_family(ml_collections.ConfigDict(), name)
    c.phase = "generate-unet"
    c.decoder = "unet"
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
    c.generate_batch = 0  # 0: one image per batch shard (data * fsdp)
    c.mllm = section(dict(text=QWEN_VL_7B_TEXT, num_image_tokens=256, image_grid=(16, 16)), base_dir="",
                     max_prompt_length=300, **_BIG)
    c.controlnet = unet_controlnet_section(**_BIG)
    c.data = ml_collections.ConfigDict(dict(vae_resolution=resolution))
    # SamplingOptions as the pipeline reads them with decoder=unet: text CFG 5.0 (SDXL's pipeline default) over 50
    # DDIM steps; no MLLM-side CFG (docs/design.md §8.2)
    c.sample = ml_collections.ConfigDict(dict(mllm_cfg=1.0, guidance=5.0, conditioning_scale=0.7, flux_steps=50,
                                              scheduler="DDIMScheduler"))
    return c
