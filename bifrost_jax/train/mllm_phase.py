"""The ``mllm`` phase (stage B, docs/design.md §6): ``BifrostMLLM``'s generation branch regresses the frozen vision
tower's CLIP latents of the image from the prompt and a MAR-masked copy of them (MSE over ALL slots). Only the
branch, ``vision_branch_norm``, ``vision_head``, ``mask_token`` and ``learnable_pos_emb`` train."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from bifrost_jax import port
from bifrost_jax.components import (Component, abstract_dtype, bifrost1_layout, clip_latents_from_pixels,
                                    flat_paths, has_key_prefix, is_orbax_port, load_component, merge_trees,
                                    module_kwargs, place, rebox, relax_indivisible, restore_orbax_port,
                                    restore_phase_checkpoint, vision_component, vision_grid)
from bifrost_jax.components.model_config import resolve_model_config
from bifrost_jax.configs import config_dict
from bifrost_jax.data.latent_cache import cache_fields
from bifrost_jax.data.prompt import build_t2i_prompt, load_tokenizer
from bifrost_jax.data.sources import (IndexedSource, check_cache_crop, image_source, load_clip_cache,
                                      make_image_preprocess, train_iterator, word_tokenizer_dir)
from bifrost_jax.models import flops
from bifrost_jax.models.bifrost import BifrostConfig, BifrostMLLM, init_branch_from_original, mse_loss
from bifrost_jax.models.bifrost import is_trainable as mllm_is_trainable
from bifrost_jax.models.bifrost import sample_mar_mask
from bifrost_jax.models.qwen.decoder import QwenTextConfig
from bifrost_jax.port.base import SafetensorsReader, load_mapped
from bifrost_jax.port.qwen_text import text_key_map
from bifrost_jax.train.phases import Phase
from bifrost_jax.train.state import merge_params


class MllmPhase(Phase):
    """Stage B (docs/design.md §6): ``BifrostMLLM``'s generation branch regresses the frozen vision tower's CLIP latents.

    Config: ``mllm`` (config: {text: QwenTextConfig fields, num_image_tokens, image_grid, mask_ratio_*};
    tokenizer_dir, max_prompt_length, dtypes, scan_layers, remat_policy, port_dir: a transformers Qwen2.5-VL
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
        s = c.mllm
        self.base_dir = s.get("base_dir", "") or ""
        self.official = bifrost1_layout(s.port_dir) if s.port_dir else None
        if self.official == "official" and not self.base_dir:
            raise ValueError(f"config.mllm.port_dir={s.port_dir} is an official Bifrost-1 checkpoint: set "
                             "config.mllm.base_dir to the Qwen2.5-VL directory it was built on (its config.json "
                             "describes the backbone; it also holds what the checkpoint omits)")
        d = config_dict(s.config)
        # the language model's sizes: the Qwen2.5-VL checkpoint's config.json (the base of an official Bifrost-1
        # checkpoint) completes and checks config.mllm.config.text
        text_source = self.base_dir if self.official == "official" else (s.port_dir or "")
        d["text"] = QwenTextConfig(**resolve_model_config(d.get("text"), key="config.mllm.config.text",
                                                          kind="qwen_text", port_dir=text_source))
        self.mllm_config = BifrostConfig.from_dict(d)
        module = BifrostMLLM(self.mllm_config, **module_kwargs(s))
        n, cdim = self.mllm_config.num_image_tokens, self.mllm_config.clip_dim
        init_args = (jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32), jnp.zeros((1, n, cdim)),
                     jnp.ones((1, n), bool))
        # The frozen language model dominates; it starts from the fixed key like every frozen component.
        self.mllm = Component("mllm", module, init_args, {}, s, ("qwen2.5-vl",), trainable=False)
        vision_section = c.vision
        if not (c.vision.port_dir or c.vision.init_from) and s.port_dir:
            # the ViT of the same Qwen2.5-VL directory (or port, or Bifrost-1 checkpoint) as the language model
            vision_section = ml_collections.ConfigDict(c.vision.to_dict())
            vision_section.port_dir = s.port_dir
            if self.official == "official" and not has_key_prefix(s.port_dir, "vision_language_model.visual."):
                vision_section.port_dir = self.base_dir  # the official loader's rule: a missing ViT is the base's
        self.vision = vision_component(vision_section)
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
        if not self.mllm.has_source:
            out.append(("params", "mllm"))
        if not self.use_cache and not self.vision.has_source:
            out.append(("params", "vision"))
        return tuple(out)

    def init_variables(self, rng):
        v = self.mllm.init(rng)
        params = nn.meta.unbox(v["params"])
        branch = init_branch_from_original(params)
        variables = {"params": {"mllm": rebox(v["params"], branch)}}
        if not self.use_cache:
            variables["params"]["vision"] = self.vision.init(rng)["params"]
        return relax_indivisible(variables)

    def load_pretrained(self, abstract_variables, shardings):
        out = {}
        s = self.config.mllm
        a_mllm = abstract_variables["params"]["mllm"]
        sh_mllm = shardings["params"]["mllm"]
        if s.port_dir and self.official:
            out = merge_trees(out, {"params": {"mllm": self._load_official(s.port_dir, a_mllm, sh_mllm)}})
        elif s.port_dir:
            out = merge_trees(out, {"params": {"mllm": self._load_text(s.port_dir, a_mllm, sh_mllm)}})
        if s.init_from:
            # another mllm run's checkpoint: its TRAINED weights (branch, head, mask token, position embedding)
            trained = {k: v for k, v in flat_paths(a_mllm).items() if mllm_is_trainable(k)}
            sub = {"params": {"mllm": traverse_util.unflatten_dict(trained)}}
            out = merge_trees(out, restore_phase_checkpoint(s.init_from, int(s.get("init_step", -1)),
                                                        {"params": ("mllm",)}, sub, shardings))
        if not self.use_cache and self.vision.has_source:
            out = merge_trees(out, load_component(self.vision, abstract_variables, shardings))
        return out or None

    def _load_official(self, path, abstract, shardings):
        """Every BifrostMLLM weight (frozen text model, generation branch, head, mask token, position embedding)
        from an official Bifrost-1 checkpoint (+ ``mllm.base_dir``) or a ``bifrost-1`` Orbax port."""
        what = f"config.mllm.port_dir={path}"
        if self.official == "orbax":
            return restore_orbax_port(path, ("bifrost-1",), ("mllm", "params"), abstract, shardings, what)
        mesh = jax.tree.leaves(shardings)[0].mesh
        _, variables = port.load("bifrost-1", path, base=self.base_dir, dtype=abstract_dtype({"params": abstract}),
                                 mesh=mesh, scan_layers=bool(self.config.mllm.scan_layers),
                                 image_grid=tuple(self.mllm_config.image_grid))
        return place(variables["mllm"]["params"], abstract, shardings, f"{what} (base {self.base_dir})")

    def _load_text(self, path, abstract, shardings):
        """The frozen language model (original weights) from a Qwen2.5-VL directory or port, then the branch
        copied from it."""

        flat_a = traverse_util.flatten_dict(abstract)
        orig = {k: v for k, v in flat_a.items() if not mllm_is_trainable(tuple(k))}
        orig_a, orig_s = traverse_util.unflatten_dict(orig), traverse_util.unflatten_dict({k: traverse_util.flatten_dict(shardings)[k] for k in orig})
        if is_orbax_port(path):
            loaded = restore_orbax_port(path, ("qwen2.5-vl",), ("params", "language_model"), orig_a, orig_s,
                                         f"config.mllm.port_dir")
        else:
            reader = SafetensorsReader(path)
            prefix = "model.language_model." if any(k.startswith("model.language_model.") for k in reader.keys()) \
                else "model."
            key_map = text_key_map(self.mllm_config.text, self.mllm.module.scan_layers, prefix)
            loaded = load_mapped(reader, key_map, orig_a, dtype=abstract_dtype({"params": orig_a}),
                                 shardings=orig_s, what=f"config.mllm.port_dir={path}",
                                 ignore_unused=lambda k: not k.startswith(prefix) or k.startswith(f"{prefix}visual."))
        with_branch = init_branch_from_original(dict(loaded))
        flat = traverse_util.flatten_dict(with_branch)
        flat_s = traverse_util.flatten_dict(shardings)
        return traverse_util.unflatten_dict({k: jax.device_put(v, flat_s[k]) for k, v in flat.items()})

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

