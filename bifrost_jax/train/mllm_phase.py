"""The ``mllm`` phase (stage B, docs/design.md §6): ``BifrostMLLM``'s generation branch regresses the frozen vision
tower's CLIP latents of the image from the prompt and a MAR-masked copy of them (MSE over ALL slots). Only the
branch, ``vision_branch_norm``, ``vision_head``, ``mask_token`` and ``learnable_pos_emb`` train."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from bifrost_jax.components import (clip_latents_from_pixels, load_component, merge_trees, relax_indivisible,
                                    vision_grid)
from bifrost_jax.components.bifrost import load_mllm, mllm_component, mllm_init, mllm_vision_component
from bifrost_jax.data.latent_cache import cache_fields
from bifrost_jax.data.prompt import build_t2i_prompt, load_tokenizer
from bifrost_jax.data.sources import (IndexedSource, check_cache_crop, image_source, load_clip_cache,
                                      make_image_preprocess, train_iterator, word_tokenizer_dir)
from bifrost_jax.models import flops
from bifrost_jax.models.bifrost import is_trainable as mllm_is_trainable
from bifrost_jax.models.bifrost import mse_loss, sample_mar_mask
from bifrost_jax.train.phases import Phase
from bifrost_jax.train.state import merge_params


class MllmPhase(Phase):
    """Stage B (docs/design.md §6): ``BifrostMLLM``'s generation branch regresses the frozen vision tower's CLIP latents.

    Config: ``mllm`` (config: {text: QwenTextConfig fields, num_image_tokens, image_grid, mask_ratio_*};
    tokenizer_dir, max_prompt_length, dtypes, scan_layers, remat_policy, base_init_from: the understanding
    phase's checkpoint (its frozen language model, the branch its copy), port_dir: a transformers Qwen2.5-VL
    directory (text weights) or a ``bifrost port`` Orbax dir, init_from), ``vision`` (as the controlnet phase;
    its port_dir defaults to mllm.port_dir), ``model.per_example_ratio``, ``data`` (text_dropout: probability of the
    "" caption, precomputed_clip_latents). The branch is a copy of the original weights AFTER they are loaded.

    Starting from the OFFICIAL Bifrost-1 checkpoint: ``mllm.port_dir`` = its directory (recognised by its
    ``learnable_pos_emb`` tensor) and ``mllm.base_dir`` = the Qwen2.5-VL directory it was built on (the
    ``bifrost-1`` port's ``base``), or ``mllm.port_dir`` = a ``bifrost port --kind bifrost-1`` Orbax output. Then
    EVERY mllm weight comes from it (branch, head, mask token, position embedding included: nothing is new), and
    the vision tower too unless ``vision.port_dir``/``init_from`` say otherwise (from the checkpoint's
    ``vision_language_model.visual.*`` if present, else from ``base_dir``)."""

    name = "mllm"

    def __init__(self, config):
        super().__init__(config)
        c = config
        self.use_cache = bool(c.data.precomputed_clip_latents)
        check_cache_crop(c)
        self.mllm_component = mllm_component(c.mllm)
        self.mllm, self.mllm_config = self.mllm_component.component, self.mllm_component.config
        self.official, self.base_dir = self.mllm_component.official, self.mllm_component.base_dir
        cdim = self.mllm_config.clip_dim
        self.vision = mllm_vision_component(c.vision, self.mllm_component)
        self.grid_thw = vision_grid(self.vision.module.config, c.vision.resolution)
        m = self.vision.module.config.spatial_merge_size
        gh, gw = self.grid_thw[1] // m, self.grid_thw[2] // m
        if (gh, gw) != tuple(self.mllm_config.image_grid):
            raise ValueError(f"config.vision.resolution={c.vision.resolution} gives a {gh}x{gw} latent grid but "
                             f"config.mllm.config.image_grid is {self.mllm_config.image_grid}")
        if self.vision.module.config.out_hidden_size != cdim:
            raise ValueError(f"vision out_hidden_size {self.vision.module.config.out_hidden_size} != mllm clip_dim "
                             f"{cdim}")

    def components(self):
        return [self.mllm] if self.use_cache else [self.mllm, self.vision]

    @property
    def new_subtrees(self):
        # a Bifrost-1 checkpoint holds the head, mask token and position embedding too
        out = [] if self.official else [("params", "mllm", k) for k in ("vision_head", "mask_token",
                                                                         "learnable_pos_emb")]
        if not self.mllm_component.has_source:
            out.append(("params", "mllm"))
        if not self.use_cache and not self.vision.has_source:
            out.append(("params", "vision"))
        return tuple(out)

    def init_variables(self, rng):
        variables = {"params": {"mllm": mllm_init(self.mllm_component, rng)["params"]}}
        if not self.use_cache:
            variables["params"]["vision"] = self.vision.init(rng)["params"]
        return relax_indivisible(variables)

    def load_pretrained(self, abstract_variables, shardings):
        mllm = load_mllm(self.mllm_component, abstract_variables["params"]["mllm"], shardings["params"]["mllm"])
        out = {"params": {"mllm": mllm}} if mllm else {}
        if not self.use_cache and self.vision.has_source:
            out = merge_trees(out, load_component(self.vision, abstract_variables, shardings))
        return out or None

    def is_trainable(self, path):
        return path[0] == "mllm" and mllm_is_trainable(tuple(path[1:]))

    def targets(self, frozen, batch):
        if self.use_cache:
            return jnp.asarray(batch["clip_latents"], jnp.float32)
        return clip_latents_from_pixels(self.vision.module, frozen["vision"], batch["vit_pixels"], self.grid_thw)

    def sample_mask(self, rng, batch_size):
        c = self.mllm_config
        return sample_mar_mask(rng, batch_size, c.num_image_tokens, ratio_min=c.mask_ratio_min,
                               ratio_max=c.mask_ratio_max, mean=c.mask_ratio_mean, std=c.mask_ratio_std,
                               per_example=bool(self.config.model.per_example_ratio))

    def loss_fn(self, trainable, frozen, mutable, batch, rng):
        params = merge_params(trainable, frozen)["mllm"]
        target = self.targets(frozen, batch)
        mask = self.sample_mask(rng, target.shape[0])
        pred = self.mllm.module.apply({"params": params}, batch["input_ids"], batch["attention_mask"], target, mask)
        loss = mse_loss(pred, target)  # every slot, visible and masked (docs/design.md §6.1)
        sq = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
        m = mask.astype(jnp.float32)
        metrics = {"mse": loss, "mask_ratio": jnp.mean(m),
                   "mse_masked": jnp.sum(sq * m) / jnp.maximum(jnp.sum(m), 1.0),
                   "mse_visible": jnp.sum(sq * (1 - m)) / jnp.maximum(jnp.sum(1 - m), 1.0)}
        return loss, (metrics, dict(mutable))

    def batch_spec(self, batch_size):
        t = int(self.config.mllm.max_prompt_length)
        spec = {"input_ids": jax.ShapeDtypeStruct((batch_size, t), jnp.int32),
                "attention_mask": jax.ShapeDtypeStruct((batch_size, t), jnp.int32)}
        if self.use_cache:
            c = self.mllm_config
            spec["clip_latents"] = jax.ShapeDtypeStruct((batch_size, c.num_image_tokens, c.clip_dim), jnp.float32)
        else:
            r = int(self.config.vision.resolution)
            spec["vit_pixels"] = jax.ShapeDtypeStruct((batch_size, r, r, 3), jnp.uint8)
        return spec

    def dataset(self, *, global_batch_size, seed, process_index, process_count):

        c = self.config
        d = c.data
        source = image_source(d)
        tok = load_tokenizer(c.mllm.tokenizer_dir or word_tokenizer_dir(d, source))
        if tok.vocab_size > self.mllm_config.text.vocab_size:
            raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} ids but config.mllm.config.text.vocab_size "
                             f"is {self.mllm_config.text.vocab_size}")
        max_len = int(c.mllm.max_prompt_length)

        def text_fn(caption):
            ids, mask = build_t2i_prompt(tok, [caption], max_length=max_len)
            return {"input_ids": ids[0], "attention_mask": mask[0]}

        extra = {}
        if self.use_cache:
            check_cache_crop(c)
            extra["clip_cache"] = load_clip_cache(d.precomputed_clip_latents, self.mllm_config.num_image_tokens,
                                                   self.mllm_config.clip_dim, len(source),
                                                   cache_fields(c, self.vision, len(source)))
            source = IndexedSource(source)
        else:
            extra["vit_resolution"] = int(c.vision.resolution)
        preprocess = make_image_preprocess(random_crop=d.random_crop, min_crop_scale=d.min_crop_scale,
                                           text_dropout=d.text_dropout, text_fn=text_fn, **extra)
        return train_iterator(c, source, preprocess, global_batch_size=global_batch_size, seed=seed,
                               process_index=process_index, process_count=process_count)

    def tokens_per_example(self):
        return int(self.config.mllm.max_prompt_length) + self.mllm_config.num_image_tokens

    def analytic_parts(self, batch_size):
        b, cfg = batch_size, self.mllm_config
        t = int(self.config.mllm.max_prompt_length)
        parts = [] if self.use_cache else [flops.Part("vision tower (ViT)", flops.vision_tower(
            self.vision.module.config, self.grid_thw, b), "forward")]
        # text rows: frozen weights, and the image rows read their K/V without a gradient: forward only
        parts.append(flops.Part("qwen text rows (frozen)", flops.qwen_text_rows(cfg.text, b, t), "forward"))
        parts.append(flops.Part("generation branch + head", flops.qwen_branch_rows(cfg, b, t), "train"))
        return parts

