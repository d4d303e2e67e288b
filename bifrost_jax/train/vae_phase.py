"""The ``vae`` phase: trains the FLUX-architecture ``AutoencoderKL``. A DEMO AID only: FLUX's real VAE comes from a
port; the tiny default has none offline."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from bifrost_jax.components import load_component, relax_indivisible, vae_component
from bifrost_jax.data.sources import image_source, make_image_preprocess, pixels_to_unit, train_iterator
from bifrost_jax.models import flops
from bifrost_jax.models.flux.vae import sample_posterior_latents
from bifrost_jax.train.phases import Phase
from bifrost_jax.train.state import merge_params


class VaePhase(Phase):
    """DEMO AID: train the FLUX-architecture ``AutoencoderKL`` on images (no pretrained VAE exists offline).
    Loss: reconstruction (``model.recon_loss`` "l1" | "mse", mean over pixels) of the decoded posterior sample
    + ``model.kl_weight`` * KL(q(z|x) || N(0, I)) (summed over latent elements, averaged over the batch)."""

    name = "vae"

    def __init__(self, config):
        super().__init__(config)
        self.vae = vae_component(config.vae, trainable=True)
        self.resolution = int(config.data.vae_resolution)
        f = self.vae.module.config.downsample_factor
        if self.resolution % f:
            raise ValueError(f"config.data.vae_resolution={self.resolution} is not a multiple of the VAE "
                             f"downsampling {f}")
        if config.model.recon_loss not in ("l1", "mse"):
            raise ValueError(f"config.model.recon_loss={config.model.recon_loss!r}: use 'l1' or 'mse'")

    @property
    def new_subtrees(self):
        return () if self.vae.has_source else (("params", "vae"),)

    def init_variables(self, rng):
        return relax_indivisible({"params": {"vae": self.vae.init(rng)["params"]}})

    def load_pretrained(self, abstract_variables, shardings):
        return load_component(self.vae, abstract_variables, shardings) if self.vae.has_source else None

    def is_trainable(self, path):
        return True

    def loss_fn(self, trainable, frozen, mutable, batch, rng):
        vae = self.vae.module
        params = {"params": merge_params(trainable, frozen)["vae"]}
        x = pixels_to_unit(batch["vae_pixels"])
        mean, logvar = vae.apply(params, x, method=vae.encode)
        z = sample_posterior_latents(mean, logvar, rng)
        recon = vae.apply(params, z, method=vae.decode).astype(jnp.float32)
        diff = recon - x
        rec = jnp.mean(jnp.abs(diff)) if self.config.model.recon_loss == "l1" else jnp.mean(jnp.square(diff))
        mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
        kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
        kl = jnp.mean(kl)
        loss = rec + self.config.model.kl_weight * kl
        return loss, ({"recon": rec, "kl": kl}, dict(mutable))

    def batch_spec(self, batch_size):
        r = self.resolution
        return {"vae_pixels": jax.ShapeDtypeStruct((batch_size, r, r, 3), jnp.uint8)}

    def dataset(self, *, global_batch_size, seed, process_index, process_count):
        d = self.config.data
        source = image_source(d)
        preprocess = make_image_preprocess(vae_resolution=self.resolution, random_crop=d.random_crop,
                                           min_crop_scale=d.min_crop_scale)
        return train_iterator(self.config, source, preprocess, global_batch_size=global_batch_size, seed=seed,
                               process_index=process_index, process_count=process_count)

    def tokens_per_example(self):
        return self.resolution * self.resolution

    def analytic_parts(self, batch_size):
        b, cfg, r = batch_size, self.vae.module.config, self.resolution
        enc = flops.vae_encoder(cfg, b, (r, r))
        first = flops.conv(b, r, r, cfg.in_channels, cfg.block_out_channels[0], 3)
        f = cfg.downsample_factor
        dec = flops.vae_decoder(cfg, b, (r // f, r // f))
        return [flops.Part("vae encoder conv_in (pixels)", first, "leaf"),
                flops.Part("vae encoder", enc + first * -1.0, "train"),
                flops.Part("vae decoder", dec["first"] + dec["rest"], "train")]

