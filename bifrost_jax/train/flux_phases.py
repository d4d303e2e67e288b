"""The FLUX-family training phases: ``controlnet`` (stage A, docs/design.md §9) and ``flux``.

* ``controlnet``: the latent ControlNet learns to steer a FROZEN FLUX with the patch-level CLIP latents of the
  image. Flow matching on packed VAE latents; CLIP latents from the frozen Qwen2.5-VL vision tower on the fly (ViT
  view of the same crop) or from a cache. The ControlNet's BatchNorm runs in training mode and its running
  statistics are carried (and checkpointed) as the ``batch_stats`` collection.
* ``flux``: trains (from scratch or a port) a FLUX-architecture transformer with the same flow-matching loss and
  no ControlNet: the embedded/tiny default has no pretrained FLUX offline.

Components and their weight sources: ``bifrost_jax/components``.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bifrost_jax.components import (Component, clip_component, flux_component, merge_trees, place_partial, rebox,
                                    relax_indivisible, t5_component, vae_component)
from bifrost_jax.components.bifrost import latent_controlnet_component
from bifrost_jax.data.sources import pixels_to_unit, word_tokenizer_dir
from bifrost_jax.data.tokenizers import PaddedTokenizer
from bifrost_jax.models import flops
from bifrost_jax.models.flux.controlnet import copy_transformer_into_controlnet
from bifrost_jax.models.flux.vae import latent_image_ids, pack_latents, sample_posterior_latents
from bifrost_jax.models.text.flux_text import encode_flux_text
from bifrost_jax.sample.flow import add_noise, sample_training_sigmas
from bifrost_jax.train.component_phase import ClipLatentCondition, ComponentPhase


class _FluxFamily(ComponentPhase):
    """Shared parts of the ``controlnet`` and ``flux`` phases: FLUX, VAE and text encoders, the flow loss."""

    train_transformer = False

    def __init__(self, config):
        super().__init__(config)
        self.transformer = flux_component(config.flux, trainable=self.train_transformer)
        self.vae = vae_component(config.vae, trainable=False)
        self.t5 = t5_component(config.t5)
        self.clip = clip_component(config.clip)
        fcfg = self.transformer.module.config
        vcfg = self.vae.module.config
        if fcfg.in_channels != 4 * vcfg.latent_channels:
            raise ValueError(f"config.flux.config.in_channels={fcfg.in_channels} must be 4 * "
                             f"config.vae.config.latent_channels={4 * vcfg.latent_channels} (2x2 packing)")
        if fcfg.joint_attention_dim != self.t5.module.config.d_model:
            raise ValueError(f"config.flux.config.joint_attention_dim={fcfg.joint_attention_dim} != "
                             f"config.t5.config.d_model={self.t5.module.config.d_model}")
        if fcfg.pooled_projection_dim != self.clip.module.config.hidden_size:
            raise ValueError(f"config.flux.config.pooled_projection_dim={fcfg.pooled_projection_dim} != "
                             f"config.clip.config.hidden_size={self.clip.module.config.hidden_size}")
        self.resolution = int(config.data.vae_resolution)
        f = vcfg.downsample_factor
        if self.resolution % (2 * f):
            raise ValueError(f"config.data.vae_resolution={self.resolution} must be a multiple of 2 * VAE "
                             f"downsampling ({2 * f})")
        self.latent_hw = self.resolution // f
        self.num_img_tokens = (self.latent_hw // 2) ** 2

    # components -------------------------------------------------------------------------------------------------
    def components(self) -> list[Component]:
        return [self.transformer, self.vae, self.t5, self.clip]

    # text / latents ---------------------------------------------------------------------------------------------
    def text_embeddings(self, frozen, batch):
        return encode_flux_text(self.t5.module, frozen["t5"], self.clip.module, frozen["clip"], batch["t5_ids"],
                                batch["clip_ids"])

    def image_latents(self, vae_params, vae_pixels, rng):
        """Packed flow-matching latents x0 = pack((z - shift) * scale) of the VAE view, z the posterior sample
        (``model.latent_sample``) or mean."""
        vae = self.vae.module
        mean, logvar = vae.apply({"params": vae_params}, pixels_to_unit(vae_pixels), method=vae.encode)
        z = sample_posterior_latents(mean, logvar, rng) if self.config.model.latent_sample else mean
        return jax.lax.stop_gradient(pack_latents(vae.config.latents_to_diffusion(z.astype(jnp.float32))))

    def flow_inputs(self, frozen, batch, rng):
        """Everything the FLUX call needs for one batch: noisy latents, sigmas, target, text, ids, guidance."""
        k_lat, k_noise, k_sigma = jax.random.split(rng, 3)
        m = self.config.model
        x0 = self.image_latents(frozen["vae"], batch["vae_pixels"], k_lat)
        b = x0.shape[0]
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        sigmas = sample_training_sigmas(k_sigma, b, weighting=m.weighting, logit_mean=m.logit_mean,
                                        logit_std=m.logit_std)
        x_s = add_noise(x0, noise, sigmas)
        prompt_embeds, pooled = self.text_embeddings(frozen, batch)
        fcfg = self.transformer.module.config
        guidance = jnp.full((b,), m.guidance, jnp.float32) if fcfg.guidance_embeds else None
        return dict(x_s=x_s, sigmas=sigmas, target=noise - x0, prompt_embeds=prompt_embeds, pooled=pooled,
                    img_ids=latent_image_ids(self.latent_hw // 2, self.latent_hw // 2),
                    txt_ids=jnp.zeros((prompt_embeds.shape[1], len(fcfg.axes_dims_rope)), jnp.float32),
                    guidance=guidance)

    def transformer_forward(self, params, f, **residuals):
        return self.transformer.module.apply(
            {"params": params}, f["x_s"], f["prompt_embeds"], f["pooled"], f["sigmas"], f["img_ids"], f["txt_ids"],
            guidance=f["guidance"], **residuals)

    # data -------------------------------------------------------------------------------------------------------
    def text_lengths(self) -> tuple[int, int]:
        return int(self.config.t5.max_length), int(self.config.clip.max_length)

    def batch_spec(self, batch_size):
        r = self.resolution
        lt, lc = self.text_lengths()
        return {"vae_pixels": jax.ShapeDtypeStruct((batch_size, r, r, 3), jnp.uint8),
                "t5_ids": jax.ShapeDtypeStruct((batch_size, lt), jnp.int32),
                "clip_ids": jax.ShapeDtypeStruct((batch_size, lc), jnp.int32)}

    def text_fn(self, source):
        """caption -> {"t5_ids", "clip_ids"} with the configured tokenizers (a word tokenizer if none)."""
        c = self.config
        fallback = None
        if not c.t5.tokenizer_dir or not c.clip.tokenizer_dir:
            fallback = word_tokenizer_dir(c.data, source)
        t5_tok = PaddedTokenizer(c.t5.tokenizer_dir or fallback, c.t5.max_length)
        clip_tok = PaddedTokenizer(c.clip.tokenizer_dir or fallback, c.clip.max_length)
        for tok, comp in ((t5_tok, self.t5), (clip_tok, self.clip)):
            if tok.vocab_size > comp.module.config.vocab_size:
                raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} ids but config.{comp.name}.config."
                                 f"vocab_size is {comp.module.config.vocab_size}")

        def fn(caption):
            return {"t5_ids": t5_tok(caption)[0], "clip_ids": clip_tok(caption)[0]}

        return fn

    # FLOPs --------------------------------------------------------------------------------------------------------
    def tokens_per_example(self):
        return self.num_img_tokens

    def frozen_conditioning_parts(self, b: int) -> list[flops.Part]:
        """Text encoders and VAE encoder (frozen, forward only)."""
        lt, lc = self.text_lengths()
        r = self.resolution
        return [flops.Part("t5 encoder", flops.t5_encoder(self.t5.module.config, b, lt), "forward"),
                flops.Part("clip text encoder", flops.clip_text(self.clip.module.config, b, lc), "forward"),
                flops.Part("vae encoder", flops.vae_encoder(self.vae.module.config, b, (r, r)), "forward")]


class FluxPhase(_FluxFamily):
    """Train (or fine-tune) a FLUX-architecture transformer with flow matching; VAE and text encoders frozen.

    Config: ``flux``, ``vae``, ``t5``, ``clip`` sections (module config, dtypes, port_dir / init_from), ``model``
    (guidance, weighting, logit_mean, logit_std, latent_sample), ``data``."""

    name = "flux"
    train_transformer = True

    def is_trainable(self, path):
        return path[0] == "transformer"

    def loss_fn(self, trainable, frozen, mutable, batch, rng):
        f = self.flow_inputs(frozen, batch, rng)
        pred = self.transformer_forward(trainable["transformer"], f)
        loss = jnp.mean(jnp.square(pred.astype(jnp.float32) - f["target"]))
        return loss, ({"mse": loss, "sigma_mean": jnp.mean(f["sigmas"])}, dict(mutable))

    def analytic_parts(self, batch_size):
        lt, _ = self.text_lengths()
        return self.frozen_conditioning_parts(batch_size) + flops.flux_transformer_parts(
            self.transformer.module.config, batch_size, self.num_img_tokens, lt, mode="train")


class ControlNetPhase(ClipLatentCondition, _FluxFamily):
    """Stage A (docs/design.md §9): only the latent ControlNet trains; FLUX, VAE, T5/CLIP and the vision tower are frozen.

    Config adds ``controlnet`` (num_layers, num_single_layers, from_transformer, dtypes, port_dir, scan_layers,
    remat_policy), ``vision`` (module config, resolution of the ViT view, port_dir: a Qwen2.5-VL directory), and
    ``data.precomputed_clip_latents`` (a .npy of (source_len, N, C) latents, centre crops only) replacing the
    on-the-fly vision tower; ``model.conditioning_scale`` (1.0 in training)."""

    name = "controlnet"

    def __init__(self, config):
        super().__init__(config)
        c = config
        self.setup_clip_latents(c)
        gh, gw = self.clip_grid
        if (2 * gh) * (2 * gw) != self.num_img_tokens:
            raise ValueError(f"the ViT view (config.vision.resolution={c.vision.resolution}: {gh}x{gw} CLIP latents, "
                             f"upsampled to {2 * gh}x{2 * gw}) must match the FLUX token grid of "
                             f"config.data.vae_resolution={self.resolution} ({self.latent_hw // 2}x"
                             f"{self.latent_hw // 2})")
        self.controlnet = latent_controlnet_component(c.controlnet, self.transformer, self.clip_latent_dim,
                                                      self.clip_grid)

    def components(self):
        comps = [self.transformer, self.controlnet, self.vae, self.t5, self.clip]
        return comps if self.use_cache else comps + [self.vision]

    @property
    def new_subtrees(self):
        out = set(super().new_subtrees)
        # the ControlNet's non-copied parts (upsampler, zero heads) keep their init
        out |= {("params", "controlnet"), ("batch_stats", "controlnet")}
        return tuple(sorted(out))

    def init_variables(self, rng):
        variables = self._init_components(rng)
        if self.config.controlnet.from_transformer:
            values = nn.meta.unbox(variables)
            cn = copy_transformer_into_controlnet(values["params"]["controlnet"], values["params"]["transformer"],
                                                  self.controlnet.module, self.transformer.module)
            # FLUX may be stored in bf16 while the trained ControlNet keeps fp32 master weights
            cn = jax.tree.map(lambda new, old: new.astype(old.dtype), cn, values["params"]["controlnet"])
            variables["params"]["controlnet"] = rebox(variables["params"]["controlnet"], cn)
        return relax_indivisible(variables)

    def load_pretrained(self, abstract_variables, shardings):
        out = super().load_pretrained(abstract_variables, shardings) or {}
        cn = self.controlnet
        if (not cn.has_source and self.config.controlnet.from_transformer
                and "transformer" in out.get("params", {})):
            # the ControlNet starts from the LOADED FLUX (diffusers from_transformer): copy after loading
            copied = copy_transformer_into_controlnet({}, out["params"]["transformer"], cn.module,
                                                      self.transformer.module, only_copied=True)
            shard = shardings["params"]["controlnet"]
            copied = place_partial(copied, abstract_variables["params"]["controlnet"], shard)
            out = merge_trees(out, {"params": {"controlnet": copied}})
        return out or None

    def is_trainable(self, path):
        return path[0] == "controlnet"

    def loss_fn(self, trainable, frozen, mutable, batch, rng):
        f = self.flow_inputs(frozen, batch, rng)
        cond = self.clip_latents(frozen, batch)
        cn = self.controlnet.module
        (blocks, singles), new_mutable = cn.apply(
            {"params": trainable["controlnet"], "batch_stats": mutable["batch_stats"]["controlnet"]},
            f["x_s"], controlnet_cond=cond, conditioning_scale=self.config.model.conditioning_scale,
            encoder_hidden_states=f["prompt_embeds"], pooled_projections=f["pooled"], timestep=f["sigmas"],
            img_ids=f["img_ids"], txt_ids=f["txt_ids"], guidance=f["guidance"], train=True,
            mutable=["batch_stats"])
        pred = self.transformer_forward(frozen["transformer"], f, controlnet_block_samples=blocks,
                                        controlnet_single_block_samples=singles)
        loss = jnp.mean(jnp.square(pred.astype(jnp.float32) - f["target"]))
        mutable = {**mutable, "batch_stats": {**mutable["batch_stats"], "controlnet": new_mutable["batch_stats"]}}
        return loss, ({"mse": loss, "sigma_mean": jnp.mean(f["sigmas"])}, mutable)

    def batch_spec(self, batch_size):
        return {**super().batch_spec(batch_size), **self.clip_latent_spec(batch_size)}

    def analytic_parts(self, batch_size):
        b, (lt, _), img = batch_size, self.text_lengths(), self.num_img_tokens
        parts = self.frozen_conditioning_parts(b) + self.vision_parts(b)
        parts += flops.controlnet_parts(self.controlnet.module.config, b, img, lt, mode="train")
        tr = self.transformer.module
        return parts + flops.flux_transformer_parts(tr.config, b, img, lt, mode="backprop", residuals=True,
                                                    scanned=bool(tr.scan_layers))
