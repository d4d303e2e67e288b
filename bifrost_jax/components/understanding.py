"""The understanding model: a Qwen2.5-VL (ViT + merger + language model, LM head) built from two config sections,
``vision`` (the vision tower, the same section the controlnet and mllm phases read) and ``language`` (the language
model's ``QwenTextConfig`` fields), with the special-token ids of its tokenizer (a word tokenizer's ids are not
Qwen's).

Its parameters are stored the way the other phases look for them: ``{"vision": <the ViT>, "language_model": <the
language model>}`` (+ ``"lm_head"`` when the embeddings are not tied). A phase that takes the pretrained ViT names
the understanding checkpoint in ``vision.init_from``; the mllm phase names it in ``mllm.base_init_from`` for its
frozen language model (``components/bifrost.py``). ``vl_params`` turns the stored tree into the module's.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from bifrost_jax.components.component import module_kwargs, section_model_config, vision_grid
from bifrost_jax.components.model_config import resolve_model_config
from bifrost_jax.data.prompt import IMAGE_PAD, VISION_END, VISION_START, Tokenizer
from bifrost_jax.models.qwen.decoder import QwenTextConfig
from bifrost_jax.models.qwen.vision import QwenVisionConfig
from bifrost_jax.models.qwen.vl import QwenVLConfig, QwenVLForConditionalGeneration

VIDEO_PAD = "<|video_pad|>"


@dataclasses.dataclass
class UnderstandingModel:
    """The module, its config, the static patch grid of the square ViT view and its number of merged tokens."""
    module: QwenVLForConditionalGeneration
    config: QwenVLConfig
    grid_thw: tuple[int, int, int]

    @property
    def num_image_tokens(self) -> int:
        m = self.config.vision.spatial_merge_size
        return (self.grid_thw[1] // m) * (self.grid_thw[2] // m)


def understanding_model(vision_section, language_section, tokenizer: Tokenizer) -> UnderstandingModel:
    """``QwenVLForConditionalGeneration`` of ``config.vision`` + ``config.language`` for ``tokenizer``; the ViT
    view is ``vision.resolution`` pixels square. Errors name the config key that disagrees."""
    vision = QwenVisionConfig.from_hf_config(section_model_config(vision_section, "vision", "vision"))
    text = QwenTextConfig(**resolve_model_config(language_section.config, key="config.language.config",
                                                 kind="qwen_text"))
    if vision.out_hidden_size != text.hidden_size:
        raise ValueError(f"config.vision.config.out_hidden_size={vision.out_hidden_size} must equal "
                         f"config.language.config.hidden_size={text.hidden_size} (the merger feeds the language "
                         "model)")
    if tokenizer.vocab_size > text.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids but "
                         f"config.language.config.vocab_size is {text.vocab_size}")
    config = QwenVLConfig(vision=vision, text=text, image_token_id=tokenizer.token_id(IMAGE_PAD),
                          video_token_id=tokenizer.token_id(VIDEO_PAD),
                          vision_start_token_id=tokenizer.token_id(VISION_START),
                          vision_end_token_id=tokenizer.token_id(VISION_END))
    kw = module_kwargs(language_section)
    if module_kwargs(vision_section) != kw:
        raise ValueError(f"config.vision and config.language must agree on dtype / param_dtype / scan_layers / "
                         f"remat_policy (one module): {module_kwargs(vision_section)} vs {kw}")
    module = QwenVLForConditionalGeneration(config, **kw)
    return UnderstandingModel(module, config, vision_grid(vision, vision_section.resolution))


def init_inputs(model: UnderstandingModel):
    """Dummy (input_ids, pixel_values, image_grid_thw) of one prompt holding one image."""
    n = model.num_image_tokens
    ids = jnp.full((1, n + 2), model.config.image_token_id, jnp.int32)
    ids = ids.at[0, 0].set(model.config.vision_start_token_id).at[0, -1].set(model.config.vision_end_token_id)
    patches = model.grid_thw[1] * model.grid_thw[2]
    return ids, jnp.zeros((1, patches, model.config.vision.patch_dim), jnp.float32), model.grid_thw


def stored_params(vl_tree) -> dict:
    """The module's ``{"visual", "language_model"[, "lm_head"]}`` -> the stored ``{"vision", "language_model"[,
    "lm_head"]}`` (see the module docstring)."""
    out = {("vision" if k == "visual" else k): v for k, v in vl_tree.items()}
    unknown = set(out) - {"vision", "language_model", "lm_head"}
    if unknown:
        raise ValueError(f"unexpected understanding-model parameters {sorted(unknown)}")
    return out


def vl_params(stored) -> dict:
    """The stored tree -> the module's (no copies)."""
    return {("visual" if k == "vision" else k): v for k, v in stored.items()}
