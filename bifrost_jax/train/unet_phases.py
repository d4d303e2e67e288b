"""The UNet-family training phases (docs/unet.md): ``unet`` and ``controlnet`` with ``decoder: unet``.

* ``controlnet`` (``config.decoder = "unet"``): the latent UNet ControlNet learns to steer a FROZEN
  ``UNet2DConditionModel`` (SD 1.x / 2.x / SDXL) with the patch-level CLIP latents of the image (from the frozen
  Qwen2.5-VL vision tower on the ViT view of the same crop, or a cache). It starts as a copy of the UNet's encoder
  (``controlnet.from_unet``, diffusers ``ControlNetModel.from_unet``), zero convolutions at zero; its BatchNorm
  statistics (the upsampler's) are carried as ``batch_stats``.
* ``unet``: trains (from scratch or a port) the UNet itself with the same loss and no ControlNet: the embedded
  default has no pretrained UNet offline.

The loss is the DDPM denoising loss of Stable Diffusion: VAE latents x_0 (posterior sample or mean, times the VAE's
``scaling_factor``), a uniform integer timestep, x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps, and the mean
squared error to eps or v per ``config.scheduler.prediction_type``. The text conditioning is the frozen CLIP text
encoder's (SD 1.x / 2.x), or both of SDXL's with the pooled text and the micro-conditioning time ids (original
size = target size = the VAE view, crop (0, 0)) when the UNet has ``addition_embed_type="text_time"``.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bifrost_jax.components import (clip_component, merge_trees, place_partial, rebox, relax_indivisible,
                                    vae_component)
from bifrost_jax.components.unet import (clip_projection_component, controlnet_params_from_unet,
                                         latent_unet_controlnet_component, unet_component)
from bifrost_jax.configs import config_dict
from bifrost_jax.data.sources import pixels_to_unit, word_tokenizer_dir
from bifrost_jax.data.tokenizers import PaddedTokenizer
from bifrost_jax.models import flops
from bifrost_jax.models.flux.vae import sample_posterior_latents
from bifrost_jax.models.unet import flops as unet_flops
from bifrost_jax.models.unet.noise_schedule import ScheduleConfig, add_noise, training_target
from bifrost_jax.sample.unet_decoder import encode_unet_text, sdxl_time_ids
from bifrost_jax.train.component_phase import ClipLatentCondition, ComponentPhase


def text_encoders_match(unet_cfg, clip_cfg, clip_2_cfg) -> None:
    """Raise unless the text encoders feed this UNet: the token width (one encoder, or SDXL's two concatenated) is
    its cross_attention_dim, and SDXL's ``text_time`` has the second encoder's pooled projection."""
    width = clip_cfg.hidden_size + (clip_2_cfg.hidden_size if clip_2_cfg is not None else 0)
    if width != unet_cfg.cross_dims[0]:
        which = "config.clip" + (" + config.clip_2" if clip_2_cfg is not None else "")
        raise ValueError(f"config.unet.config.cross_attention_dim={unet_cfg.cross_dims[0]} but {which} "
                         f"hidden_size gives {width}-wide text tokens")
    text_time = unet_cfg.addition_embed_type == "text_time"
    if text_time != (clip_2_cfg is not None):
        raise ValueError("config.clip_2 (SDXL's CLIPTextModelWithProjection) must be given exactly when the UNet has "
                         f"addition_embed_type='text_time' (it has {unet_cfg.addition_embed_type!r})")
    if text_time and clip_2_cfg.projection_dim != unet_cfg.text_embeds_dim:
        raise ValueError(f"config.clip_2.config.projection_dim={clip_2_cfg.projection_dim} but the UNet's "
                         f"text_time embedding takes {unet_cfg.text_embeds_dim}-wide pooled text")


class _UNetFamily(ComponentPhase):
    """Shared parts of the UNet-family phases: UNet, VAE, text encoders, the denoising loss."""

    train_unet = False

    def __init__(self, config):
        super().__init__(config)
        self.unet = unet_component(config.unet, trainable=self.train_unet)
        self.vae = vae_component(config.vae, trainable=False)
        self.clip = clip_component(config.clip)
        self.clip_2 = clip_projection_component(config.clip_2) if "clip_2" in config else None
        self.schedule = ScheduleConfig.from_hf_config(config_dict(config.scheduler))
        ucfg, vcfg = self.unet.module.config, self.vae.module.config
        if ucfg.in_channels != vcfg.latent_channels or ucfg.out_channels != vcfg.latent_channels:
            raise ValueError(f"config.unet.config in_channels={ucfg.in_channels} / out_channels={ucfg.out_channels} "
                             f"must be config.vae.config.latent_channels={vcfg.latent_channels}")
        text_encoders_match(ucfg, self.clip.module.config, self.clip_2 and self.clip_2.module.config)
        self.resolution = int(config.data.vae_resolution)
        f = vcfg.downsample_factor
        if self.resolution % f:
            raise ValueError(f"config.data.vae_resolution={self.resolution} must be a multiple of the VAE "
                             f"downsampling {f}")
        self.latent_hw = self.resolution // f

    def components(self):
        return [self.unet, self.vae, self.clip] + ([self.clip_2] if self.clip_2 is not None else [])

    # text / latents ---------------------------------------------------------------------------------------------
    def text_conditioning(self, frozen, batch):
        """(prompt_embeds, added_cond_kwargs or None) of the frozen text encoders (gradients stopped)."""
        clip_2 = self.clip_2.module if self.clip_2 is not None else None
        embeds, pooled = encode_unet_text(self.clip.module, {"params": frozen["clip"]}, batch["clip_ids"], clip_2,
                                          {"params": frozen.get("clip_2")}, batch.get("clip_2_ids"))
        added = None
        if self.clip_2 is not None:
            r = self.resolution
            added = {"text_embeds": jax.lax.stop_gradient(pooled.astype(jnp.float32)),
                     "time_ids": sdxl_time_ids(embeds.shape[0], (r, r))}
        return jax.lax.stop_gradient(embeds), added

    def image_latents(self, vae_params, vae_pixels, rng):
        """x_0 = (z - shift) * scaling of the VAE view (NHWC), z the posterior sample (``model.latent_sample``) or
        mean."""
        vae = self.vae.module
        mean, logvar = vae.apply({"params": vae_params}, pixels_to_unit(vae_pixels), method=vae.encode)
        z = sample_posterior_latents(mean, logvar, rng) if self.config.model.latent_sample else mean
        return jax.lax.stop_gradient(vae.config.latents_to_diffusion(z.astype(jnp.float32)))

    def denoising_inputs(self, frozen, batch, rng):
        """Noisy latents, integer timesteps, the regression target and the text conditioning of one batch."""
        k_lat, k_noise, k_t = jax.random.split(rng, 3)
        x0 = self.image_latents(frozen["vae"], batch["vae_pixels"], k_lat)
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        t = jax.random.randint(k_t, (x0.shape[0],), 0, self.schedule.num_train_timesteps)
        embeds, added = self.text_conditioning(frozen, batch)
        return dict(x_t=add_noise(self.schedule, x0, noise, t), t=t.astype(jnp.float32), embeds=embeds,
                    added=added, target=training_target(self.schedule, x0, noise, t))

    def unet_forward(self, params, f, **residuals):
        return self.unet.module.apply({"params": params}, f["x_t"], f["t"], f["embeds"], f["added"], **residuals)

    @staticmethod
    def mse(pred, f):
        return jnp.mean(jnp.square(pred.astype(jnp.float32) - f["target"]))

    # data -------------------------------------------------------------------------------------------------------
    def text_encoders(self):
        return [(self.clip, "clip_ids")] + ([(self.clip_2, "clip_2_ids")] if self.clip_2 is not None else [])

    def batch_spec(self, batch_size):
        r = self.resolution
        spec = {"vae_pixels": jax.ShapeDtypeStruct((batch_size, r, r, 3), jnp.uint8)}
        for comp, key in self.text_encoders():
            spec[key] = jax.ShapeDtypeStruct((batch_size, int(comp.section.max_length)), jnp.int32)
        return spec

    def text_fn(self, source):
        """caption -> {"clip_ids"(, "clip_2_ids")} with the configured tokenizers (a word tokenizer if none)."""
        toks = []
        for comp, key in self.text_encoders():
            s = comp.section
            tok = PaddedTokenizer(s.tokenizer_dir or word_tokenizer_dir(self.config.data, source), s.max_length)
            if tok.vocab_size > comp.module.config.vocab_size:
                raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} ids but config.{comp.name}.config."
                                 f"vocab_size is {comp.module.config.vocab_size}")
            toks.append((key, tok))
        return lambda caption: {key: tok(caption)[0] for key, tok in toks}

    # FLOPs --------------------------------------------------------------------------------------------------------
    def tokens_per_example(self):
        return self.latent_hw * self.latent_hw

    def frozen_conditioning_parts(self, b: int) -> list[flops.Part]:
        """Text encoders and VAE encoder (frozen, forward only)."""
        r = self.resolution
        parts = [flops.Part(f"{comp.name} text encoder", flops.clip_text(comp.module.config, b,
                                                                         int(comp.section.max_length)), "forward")
                 for comp, _ in self.text_encoders()]
        return parts + [flops.Part("vae encoder", flops.vae_encoder(self.vae.module.config, b, (r, r)), "forward")]

    def text_len(self) -> int:
        return int(self.clip.section.max_length)


class UNetPhase(_UNetFamily):
    """Train (or fine-tune) a ``UNet2DConditionModel`` with the denoising loss; VAE and text encoders frozen.

    Config: ``unet``, ``vae``, ``clip`` (``clip_2`` for SDXL) sections, ``scheduler`` (noise schedule and
    ``prediction_type``), ``model.latent_sample``, ``data``."""

    name = "unet"
    train_unet = True

    def is_trainable(self, path):
        return path[0] == "unet"

    def loss_fn(self, trainable, frozen, mutable, batch, rng):
        f = self.denoising_inputs(frozen, batch, rng)
        loss = self.mse(self.unet_forward(trainable["unet"], f), f)
        return loss, ({"mse": loss, "t_mean": jnp.mean(f["t"])}, dict(mutable))

    def analytic_parts(self, batch_size):
        b, hw, cfg = batch_size, (self.latent_hw, self.latent_hw), self.unet.module.config
        enc = unet_flops.encoder(cfg, b, hw, self.text_len())
        return self.frozen_conditioning_parts(b) + [
            flops.Part("unet conv_in (data input)", enc["conv_in"], "leaf"),
            flops.Part("unet time embedding", unet_flops.embeddings(cfg, b), "leaf"),
            flops.Part("unet down + mid blocks", enc["down"] + enc["mid"], "train"),
            flops.Part("unet up blocks + conv_out", unet_flops.decoder(cfg, b, hw, self.text_len()), "train")]


class UNetControlNetPhase(ClipLatentCondition, _UNetFamily):
    """Stage A with a UNet decoder: only the latent UNet ControlNet trains; UNet, VAE, text encoders and the vision
    tower are frozen.

    Config adds ``decoder = "unet"``, ``controlnet`` (from_unet, conditioning_embedding_out_channels, dtypes,
    port_dir / init_from), ``vision`` (module config, ``resolution`` of the ViT view, port_dir),
    ``data.precomputed_clip_latents`` and ``model.conditioning_scale``."""

    name = "controlnet"

    def __init__(self, config):
        super().__init__(config)
        self.setup_clip_latents(config)
        self.controlnet = latent_unet_controlnet_component(config.controlnet, self.unet, self.clip_latent_dim,
                                                           self.clip_grid, (self.latent_hw, self.latent_hw))

    def components(self):
        comps = super().components() + [self.controlnet]
        return comps if self.use_cache else comps + [self.vision]

    @property
    def new_subtrees(self):
        # the ControlNet's non-copied parts (upsampler, condition embedding, zero convs) keep their init
        return tuple(sorted(set(super().new_subtrees) | {("params", "controlnet"), ("batch_stats", "controlnet")}))

    def init_variables(self, rng):
        variables = self._init_components(rng)
        if self.config.controlnet.from_unet:
            values = nn.meta.unbox(variables)["params"]
            cn = dict(values["controlnet"])
            # the UNet may be stored in bf16 while the trained ControlNet keeps fp32 master weights
            for k, v in controlnet_params_from_unet(values["unet"]).items():
                cn[k] = jax.tree.map(lambda new, old: new.astype(old.dtype), v, cn[k])
            variables["params"]["controlnet"] = rebox(variables["params"]["controlnet"], cn)
        return relax_indivisible(variables)

    def load_pretrained(self, abstract_variables, shardings):
        out = super().load_pretrained(abstract_variables, shardings) or {}
        cn = self.controlnet
        if not cn.has_source and self.config.controlnet.from_unet and "unet" in out.get("params", {}):
            # the ControlNet starts from the LOADED UNet (diffusers from_unet): copy after loading
            copied = controlnet_params_from_unet(out["params"]["unet"])
            copied = place_partial(copied, abstract_variables["params"]["controlnet"],
                                   shardings["params"]["controlnet"])
            out = merge_trees(out, {"params": {"controlnet": copied}})
        return out or None

    def is_trainable(self, path):
        return path[0] == "controlnet"

    def loss_fn(self, trainable, frozen, mutable, batch, rng):
        f = self.denoising_inputs(frozen, batch, rng)
        cn = self.controlnet.module
        (down, mid), new_mutable = cn.apply(
            {"params": trainable["controlnet"], "batch_stats": mutable["batch_stats"]["controlnet"]},
            f["x_t"], f["t"], f["embeds"], controlnet_cond=self.clip_latents(frozen, batch),
            conditioning_scale=self.config.model.conditioning_scale, added_cond_kwargs=f["added"], train=True,
            mutable=["batch_stats"])
        pred = self.unet_forward(frozen["unet"], f, down_block_additional_residuals=down,
                                 mid_block_additional_residual=mid)
        loss = self.mse(pred, f)
        mutable = {**mutable, "batch_stats": {**mutable["batch_stats"], "controlnet": new_mutable["batch_stats"]}}
        return loss, ({"mse": loss, "t_mean": jnp.mean(f["t"])}, mutable)

    def batch_spec(self, batch_size):
        return {**super().batch_spec(batch_size), **self.clip_latent_spec(batch_size)}

    def analytic_parts(self, batch_size):
        b, hw, lt = batch_size, (self.latent_hw, self.latent_hw), self.text_len()
        ucfg, cn_cfg = self.unet.module.config, self.controlnet.module.config
        enc, cn_enc = unet_flops.encoder(ucfg, b, hw, lt), unet_flops.encoder(cn_cfg.unet, b, hw, lt)
        cond = unet_flops.condition_embedding(cn_cfg, b)
        return self.frozen_conditioning_parts(b) + self.vision_parts(b) + [
            flops.Part("controlnet conv_in + upsampler input (data)", cn_enc["conv_in"] + cond["first"], "leaf"),
            flops.Part("controlnet embeddings + condition", unet_flops.embeddings(cn_cfg.unet, b) + cond["rest"],
                       "train"),
            flops.Part("controlnet down + mid blocks, zero convs",
                       cn_enc["down"] + cn_enc["mid"] + unet_flops.zero_convs(cn_cfg.unet, b, hw), "train"),
            # the residuals enter after the mid block: the UNet's encoder is off the gradient path
            flops.Part("unet embeddings + down + mid blocks", unet_flops.embeddings(ucfg, b) + enc["conv_in"]
                       + enc["down"] + enc["mid"], "forward"),
            flops.Part("unet up blocks + conv_out", unet_flops.decoder(ucfg, b, hw, lt), "backprop")]
