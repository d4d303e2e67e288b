"""``bifrost aot --phase generate-unet``: one step of each sampling loop of Bifrost-1 with a UNet decoder (SD 1.x /
2.x / SDXL, docs/unet.md), compiled at full size:

* one MAR decode step of the MLLM (``aot.generate.mar_step``, as for ``generate``);
* one UNet sampling step with text classifier-free guidance: the latent UNet ControlNet and the UNet on
  [unconditional; conditional] (2B rows; the ControlNet's condition embedding precomputed once per image, as
  ``sample.unet_decoder.sample_unet_latents`` does), the guided prediction and one update of the sampler
  ``sample.scheduler`` (a class name of ``sample.schedulers.SCHEDULERS``, default DPM-Solver++) on the noise schedule
  ``config.scheduler``. ``sample.guidance`` (the text CFG scale, as for the pipeline) 1 drops the unconditional
  half.

The config is a generation config (``decoder: unet``) with the component sections of the UNet-family training configs
(``unet``, ``vae`` (its downsampling sets the latent size), ``clip`` (its max_length is the text length),
``controlnet``) plus ``mllm``, ``scheduler``, ``data.vae_resolution`` (the VAE view), ``sample`` (the
``SamplingOptions`` fields guidance, conditioning_scale, mllm_cfg, flux_steps = the UNet's steps, and scheduler, as
``sample.build`` reads them with ``decoder: unet``), ``mesh`` and ``generate_batch``.
``configs/full/sdxl_generate_aot.py`` and ``configs/full/sd15_generate_aot.py`` are those at full size. Weights are
abstract: nothing is allocated.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from bifrost_jax.aot.generate import _abstract_variables, _sds, batch_size, count_params, mar_step
from bifrost_jax.aot.report import AotTarget
from bifrost_jax.components import vae_component
from bifrost_jax.components.unet import (latent_unet_controlnet_component,
                                         unet_component)
from bifrost_jax.configs import config_dict
from bifrost_jax.models import flops as F
from bifrost_jax.models.unet import flops as unet_flops
from bifrost_jax.sample.schedulers import SCHEDULERS, cfg_denoise
from bifrost_jax.sample.unet_decoder import unet_model_fn

def generate_unet_target(config: ml_collections.ConfigDict, mesh: Mesh) -> AotTarget:
    """One MAR decode step + one guided UNet/ControlNet sampling step (see the module docstring)."""
    for name in ("mllm", "unet", "vae", "clip", "controlnet", "scheduler"):
        if name not in config:
            raise ValueError(f"--phase generate-unet: the config has no {name} section (use a generation config "
                             "such as configs/full/sdxl_generate_aot.py)")
    b = batch_size(config, mesh)
    sample = config.get("sample", ml_collections.ConfigDict())
    scale = float(sample.get("guidance", 5.0))
    cond_scale = float(sample.get("conditioning_scale", 1.0))
    plan = SCHEDULERS[sample.get("scheduler", "DPMSolverMultistepScheduler")].from_hf_config(
        config_dict(config.scheduler)).set_timesteps(int(sample.get("flux_steps", 50)))
    mar = mar_step(config, mesh, b)
    mcfg = mar.config

    resolution = int(config.data.vae_resolution)
    factor = vae_component(config.vae, trainable=False).module.config.downsample_factor
    if resolution % factor:
        raise ValueError(f"config.data.vae_resolution={resolution} must be a multiple of the VAE downsampling {factor}")
    hw = resolution // factor
    unet_comp = unet_component(config.unet, trainable=False)
    cn_comp = latent_unet_controlnet_component(config.controlnet, unet_comp, mcfg.clip_dim, tuple(mcfg.image_grid),
                                               (hw, hw))
    unet, cn = unet_comp.module, cn_comp.module
    ucfg = unet.config
    unet_vars, unet_sh = _abstract_variables(unet_comp.init, mesh)
    cn_vars, cn_sh = _abstract_variables(cn_comp.init, mesh)
    text_len = int(config.clip.max_length)
    dtype = unet.dtype
    x_arg, x_sh = _sds(mesh, (b, hw, hw, ucfg.in_channels), jnp.float32, ("batch", None, None, None))
    cond_arg, cond_sh = _sds(mesh, (b, hw, hw, ucfg.block_out_channels[0]), dtype, ("batch", None, None, None))
    text = dict(encoder_hidden_states=((b, text_len, ucfg.cross_dims[0]), dtype, ("batch", None, None)))
    if ucfg.addition_embed_type == "text_time":
        text["text_embeds"] = ((b, ucfg.text_embeds_dim), jnp.float32, ("batch", None))
        text["time_ids"] = ((b, ucfg.num_time_ids), jnp.float32, ("batch", None))
    sides = ("cond", "uncond") if scale != 1.0 else ("cond",)
    text_args, text_sh = {}, {}
    for side in sides:
        for k, (shape, dt, axes) in text.items():
            text_args[f"{side}_{k}"], text_sh[f"{side}_{k}"] = _sds(mesh, shape, dt, axes)
    i_arg, i_sh = _sds(mesh, (), jnp.int32, ())
    timesteps = jnp.asarray(plan.timesteps)

    def kwargs_of(text_vals, side, cond):
        added = None
        if f"{side}_text_embeds" in text_vals:
            added = {"text_embeds": text_vals[f"{side}_text_embeds"], "time_ids": text_vals[f"{side}_time_ids"]}
        return dict(encoder_hidden_states=text_vals[f"{side}_encoder_hidden_states"], controlnet_cond_embedding=cond,
                    added_cond_kwargs=added)

    def step(mllm_vars, k, v, attention_mask, tokens, masked, unet_vars, cn_vars, x, cond, text_vals, i):
        new_tokens = mar.fn(mllm_vars, k, v, attention_mask, tokens, masked)
        model_fn = unet_model_fn(unet, unet_vars, cn, cn_vars, conditioning_scale=cond_scale)
        uncond = kwargs_of(text_vals, "uncond", cond) if scale != 1.0 else None
        denoise = cfg_denoise(model_fn, kwargs_of(text_vals, "cond", cond), uncond, scale)
        out = denoise(plan.scale_model_input(x, i), timesteps[i]).astype(jnp.float32)
        x_next, _ = plan.step(out, i, x, plan.init_state(x))
        return new_tokens, x_next

    args = mar.args + (unet_vars, cn_vars, x_arg, cond_arg, text_args, i_arg)
    in_sh = mar.shardings + (unet_sh, cn_sh, x_sh, cond_sh, text_sh, i_sh)
    fn = jax.jit(step, in_shardings=in_sh, out_shardings=(mar.tokens_sharding, x_sh))
    rows = len(sides) * b
    desc = (f"generate-unet: {mar.description} + one UNet+ControlNet sampling step ({rows} rows = batch {b}"
            f"{' x [uncond; cond]' if len(sides) == 2 else ''}, {hw}x{hw} latents, {text_len} text tokens, "
            f"{count_params(unet_vars) / 1e9:.2f}B + {count_params(cn_vars) / 1e9:.2f}B params), "
            f"{mar.weight_dtype} weights")
    # analytic: the MAR step + the ControlNet (without its condition embedding, precomputed once per image) and the
    # UNet on every row; all forward
    enc = unet_flops.encoder(cn.config.unet, rows, (hw, hw), text_len)
    analytic = F.FlopsBreakdown((
        mar.analytic,
        F.Part("controlnet conv_in + embeddings + down + mid blocks, zero convs",
               enc["conv_in"] + unet_flops.embeddings(cn.config.unet, rows) + enc["down"] + enc["mid"]
               + unet_flops.zero_convs(cn.config.unet, rows, (hw, hw)), "forward"),
        F.Part("unet", unet_flops.unet(ucfg, rows, (hw, hw), text_len), "forward")),
        f"generate-unet: one MAR step + one guided UNet step, batch {b}")
    return AotTarget(fn=fn, args=args, description=desc, analytic=analytic)
