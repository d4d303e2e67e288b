"""What the diffusion-decoder phases (FLUX family, UNet family) share: a phase made of components
(``bifrost_jax/components``), trained on images and captions, and the CLIP-latent condition of a ControlNet phase.

* :class:`ComponentPhase`: variables ``{collection: {component: tree}}`` from ``components()`` (each its own init,
  frozen ones from their fixed key), pretrained weights through ``load_component``, components without a source as
  new subtrees; the dataset of VAE-view crops + tokenized captions (``text_fn``) + ``extra_views``.
* :class:`ClipLatentCondition`: the patch-level CLIP latents of the image that condition a latent ControlNet, from
  the frozen Qwen2.5-VL vision tower on the ViT view of the same crop, or from a cache
  (``data.precomputed_clip_latents``, centre crops only).
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from bifrost_jax.components import (Component, clip_latents_from_pixels, load_component, merge_trees,
                                    relax_indivisible, vision_component, vision_grid)
from bifrost_jax.data.latent_cache import cache_fields
from bifrost_jax.data.sources import (IndexedSource, check_cache_crop, image_source, load_clip_cache,
                                      make_image_preprocess, train_iterator)
from bifrost_jax.models import flops
from bifrost_jax.train.phases import Phase

log = logging.getLogger(__name__)


class ComponentPhase(Phase):
    """A phase of components on image + caption data. Subclasses set ``self.resolution`` (the VAE view) and define
    ``components()`` and ``text_fn(source)``; ``extra_views(source)`` adds views (ViT pixels, cached latents)."""

    def components(self) -> list[Component]:
        raise NotImplementedError

    @property
    def new_subtrees(self):
        # components without a configured source keep their (deterministic) random init
        out = []
        for comp in self.components():
            if not comp.has_source:
                out += [("params", comp.name), ("batch_stats", comp.name)]
        return tuple(out)

    def _init_components(self, rng):
        variables: dict = {}
        for comp in self.components():
            v = comp.init(rng)
            for c, tree in v.items():
                variables.setdefault(c, {})[comp.name] = tree
        return variables

    def init_variables(self, rng):
        return relax_indivisible(self._init_components(rng))

    def load_pretrained(self, abstract_variables, shardings):
        out = {}
        random = []
        for comp in self.components():
            if comp.has_source:
                out = merge_trees(out, load_component(comp, abstract_variables, shardings,
                                                      collections=tuple(c for c in abstract_variables
                                                                        if comp.name in abstract_variables[c])))
            else:
                random.append(comp.name)
        if random and out:
            log.warning("phase %s: no port_dir/init_from for %s: random init (fixed key)", self.name, random)
        return out or None

    # data -------------------------------------------------------------------------------------------------------
    def text_fn(self, source):
        raise NotImplementedError

    def extra_views(self, source) -> dict:
        return {}

    def dataset(self, *, global_batch_size, seed, process_index, process_count):
        d = self.config.data
        source = image_source(d)
        extra = self.extra_views(source)
        if extra.get("clip_cache") is not None:
            source = IndexedSource(source)
        preprocess = make_image_preprocess(vae_resolution=self.resolution, random_crop=d.random_crop,
                                           min_crop_scale=d.min_crop_scale, text_dropout=d.text_dropout,
                                           text_fn=self.text_fn(source), **extra)
        return train_iterator(self.config, source, preprocess, global_batch_size=global_batch_size, seed=seed,
                              process_index=process_index, process_count=process_count)


class ClipLatentCondition:
    """The CLIP-latent condition of a ControlNet phase (mixed into a :class:`ComponentPhase`): ``config.vision``
    (module config, ``resolution`` of the ViT view, port_dir) or ``config.data.precomputed_clip_latents``."""

    def setup_clip_latents(self, config) -> None:
        self.use_cache = bool(config.data.precomputed_clip_latents)
        check_cache_crop(config)
        self.vision = vision_component(config.vision)
        vcfg = self.vision.module.config
        self.grid_thw = vision_grid(vcfg, config.vision.resolution)
        m = vcfg.spatial_merge_size
        self.clip_grid = (self.grid_thw[1] // m, self.grid_thw[2] // m)
        self.clip_latent_dim = vcfg.out_hidden_size

    def clip_latents(self, frozen, batch):
        if self.use_cache:
            return jnp.asarray(batch["clip_latents"], jnp.float32)
        return clip_latents_from_pixels(self.vision.module, frozen["vision"], batch["vit_pixels"], self.grid_thw)

    def clip_latent_spec(self, batch_size) -> dict:
        if self.use_cache:
            n = self.clip_grid[0] * self.clip_grid[1]
            return {"clip_latents": jax.ShapeDtypeStruct((batch_size, n, self.clip_latent_dim), jnp.float32)}
        r = int(self.config.vision.resolution)
        return {"vit_pixels": jax.ShapeDtypeStruct((batch_size, r, r, 3), jnp.uint8)}

    def extra_views(self, source):
        if self.use_cache:
            check_cache_crop(self.config)
            return {"clip_cache": load_clip_cache(self.config.data.precomputed_clip_latents,
                                                  self.clip_grid[0] * self.clip_grid[1], self.clip_latent_dim,
                                                  len(source), cache_fields(self.config, self.vision, len(source)))}
        return {"vit_resolution": int(self.config.vision.resolution)}

    def vision_parts(self, b: int) -> list[flops.Part]:
        if self.use_cache:
            return []
        return [flops.Part("vision tower (ViT)", flops.vision_tower(self.vision.module.config, self.grid_thw, b),
                           "forward")]
