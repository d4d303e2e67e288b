"""The UNet decoder end to end against a hand-written diffusers loop (fp32, tiny SDXL-style models): CLIP latents
-> latent UNet ControlNet (torch reference: upsampler + latent embedding + diffusers ControlNetModel body) -> SDXL
UNet with classifier-free guidance and micro-conditioning under the Euler scheduler -> the SD-style VAE (4 latent
channels, quant convs, scaling factor)."""
import jax
import jax.numpy as jnp
import numpy as np
import torch
from conftest import max_rel_err
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers import EulerDiscreteScheduler
from diffusers import UNet2DConditionModel as TorchUNet
from test_flux_parity import randomize_
from test_schedulers import SD_SCHEDULER
from test_unet_controlnet import torch_latent_controlnet, torch_upsampled, write_checkpoint
from test_unet_parity import CASES, nchw, nhwc

from bifrost_jax import port
from bifrost_jax.sample.schedulers import EulerDiscreteConfig
from bifrost_jax.sample.unet_decoder import decode_unet_latents, sample_unet_latents

TOL = 1e-4
B, TXT, STEPS, GUIDANCE, COND_SCALE = 2, 5, 4, 4.0, 0.8
C_CLIP, GRID, LATENT = 6, (2, 3), (8, 12)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16], layers_per_block=1,
           norm_num_groups=4, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
           use_quant_conv=True, use_post_quant_conv=True, scaling_factor=0.13025, sample_size=32)


def test_unet_decoder_matches_diffusers_loop(tmp_path):
    cfg, _ = CASES["sdxl"]
    unet = randomize_(TorchUNet(**cfg), seed=21)
    unet.save_pretrained(str(tmp_path / "unet"))
    body, up, state, cn_config = torch_latent_controlnet(cfg, C_CLIP, GRID, (8, 4), seed=22)
    vae = randomize_(TorchAutoencoderKL(**VAE), seed=23)
    vae.save_pretrained(str(tmp_path / "vae"))

    rng = np.random.default_rng(5)
    tokens = rng.standard_normal((B, GRID[0] * GRID[1], C_CLIP)).astype(np.float32)
    noise = rng.standard_normal((B, *LATENT, 4)).astype(np.float32)
    text, neg = (rng.standard_normal((B, TXT, cfg["cross_attention_dim"])).astype(np.float32) for _ in range(2))
    pooled, neg_pooled = (rng.standard_normal((B, 12)).astype(np.float32) for _ in range(2))
    time_ids = np.tile(np.array([[64, 96, 0, 0, 64, 96]], np.float32), (B, 1))
    scheduler_cfg = {**SD_SCHEDULER, "_class_name": "EulerDiscreteScheduler"}

    # diffusers, by hand (the SDXL ControlNet pipeline's loop)
    scheduler = EulerDiscreteScheduler.from_config(scheduler_cfg)
    scheduler.set_timesteps(STEPS)
    ctx = torch.from_numpy(np.concatenate([neg, text]))
    added = {"text_embeds": torch.from_numpy(np.concatenate([neg_pooled, pooled])),
             "time_ids": torch.from_numpy(np.concatenate([time_ids, time_ids]))}
    cond = torch_upsampled(up, tokens, GRID)
    cond = torch.cat([cond, cond])
    x = nchw(noise) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([x, x]), t)
            down, mid = body(model_in, t, ctx, cond, conditioning_scale=COND_SCALE, added_cond_kwargs=added,
                             return_dict=False)
            out = unet(model_in, t, ctx, added_cond_kwargs=added, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid).sample
            uncond, cond_out = out.chunk(2)
            x = scheduler.step(uncond + GUIDANCE * (cond_out - uncond), t, x).prev_sample
        ref_latents = nhwc(x)
        ref_images = nhwc(vae.decode(x / vae.config.scaling_factor).sample)

    # bifrost-jax
    unet_m, unet_v = port.load("unet", str(tmp_path / "unet"))
    cn_m, cn_v = port.load("latent-unet-controlnet", write_checkpoint(tmp_path / "cn", state, cn_config))
    vae_m, vae_v = port.load("flux-vae", str(tmp_path / "vae"))
    assert vae_m.config.shift_factor is None and vae_m.config.scaling_factor == 0.13025
    plan = EulerDiscreteConfig.from_hf_config(scheduler_cfg).set_timesteps(STEPS)

    @jax.jit
    def run(unet_v, cn_v, vae_v, tokens, noise, text, neg, pooled, neg_pooled, time_ids):
        latents = sample_unet_latents(
            unet_m, unet_v, cn_m, cn_v, plan, tokens, noise, text, neg, guidance_scale=GUIDANCE,
            conditioning_scale=COND_SCALE, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
            negative_added_cond_kwargs={"text_embeds": neg_pooled, "time_ids": time_ids})
        return latents, decode_unet_latents(vae_m, vae_v, latents)

    latents, images = run(unet_v, cn_v, vae_v, *map(jnp.asarray, (tokens, noise, text, neg, pooled, neg_pooled,
                                                                   time_ids)))
    assert max_rel_err(latents, ref_latents) <= TOL
    assert max_rel_err(images, ref_images) <= TOL
