"""The full Qwen2.5-VL model (transformers ``Qwen2_5_VLForConditionalGeneration``): vision tower + language model
+ LM head, returning logits for prompts that contain images.

Static shapes: all images share one grid ``image_grid_thw = (1, H/14, W/14)`` (so every image contributes
(H/28)*(W/28) ``<|image_pad|>`` tokens), and the number of image tokens in the batch must equal
``num_images * tokens_per_image``. Image features replace the ``<|image_pad|>`` embeddings in order of appearance
(row-major over (batch, position), as PyTorch's ``masked_scatter``). Positions are 3-D M-RoPE ids from
``get_rope_index`` (text: one id on all three axes; an image: t = start, h = start + row, w = start + col; the text
after it continues at start + max(rows, cols)); padded tokens get 0, as in transformers.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bifrost_jax.models.qwen.decoder import QwenLanguageModel, QwenTextConfig
from bifrost_jax.models.qwen.vision import QwenVisionConfig, QwenVisionTransformer, normalize_grid_thw
from bifrost_jax.nn.layers import Dense

Dtype = Any


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
    """A transformers ``Qwen2_5_VLConfig`` (defaults: the special token ids of Qwen2.5-VL)."""
    vision: QwenVisionConfig
    text: QwenTextConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text.tie_word_embeddings

    @classmethod
    def from_hf_config(cls, d: Mapping[str, Any]) -> "QwenVLConfig":
        """From config.json: transformers 5.x nesting (``text_config`` / ``vision_config``) or the hub's flat layout
        (text fields at top level, ``vision_config`` nested)."""
        d = dict(d)
        model_type = d.get("model_type", "qwen2_5_vl")
        if model_type != "qwen2_5_vl":
            raise ValueError(f"Qwen2.5-VL config: model_type {model_type!r} is not 'qwen2_5_vl'")
        if not d.get("vision_config"):
            raise ValueError("Qwen2.5-VL config: no vision_config")
        vision = QwenVisionConfig.from_hf_config(d["vision_config"])
        text = QwenTextConfig.from_hf_config({k: v for k, v in d.items() if k != "vision_config"})
        ids = {k: int(d[k]) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                      "vision_end_token_id") if d.get(k) is not None}
        cfg = cls(vision=vision, text=text, **ids)
        if vision.out_hidden_size != text.hidden_size:
            raise ValueError(f"Qwen2.5-VL config: vision_config.out_hidden_size {vision.out_hidden_size} != text "
                             f"hidden_size {text.hidden_size}")
        return cfg

    def to_hf_config(self) -> dict:
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "text_config": self.text.to_hf_config(),
            "vision_config": self.vision.to_hf_config(),
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
        }


def llm_grid(vision: QwenVisionConfig, image_grid_thw) -> tuple[int, int]:
    """(rows, cols) of merged image tokens for a static patch grid."""
    _, gh, gw = normalize_grid_thw(image_grid_thw)
    m = vision.spatial_merge_size
    return gh // m, gw // m


def get_rope_index(input_ids, image_token_id: int, grid_hw: tuple[int, int], attention_mask=None):
    """3-D M-RoPE positions (3, B, L) int32 for prompts whose images all have the merged grid ``grid_hw``.

    Equals transformers' ``Qwen2_5_VLModel.get_rope_index`` (images only) with ``mm_token_type_ids = input_ids ==
    image_token_id``: each run of rows*cols image tokens is one image. Vectorised (no Python loop over tokens),
    so it traces under jit."""
    rows, cols = grid_hw
    per_image = rows * cols
    input_ids = jnp.asarray(input_ids)
    valid = jnp.ones(input_ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    is_img = (input_ids == image_token_id) & valid
    is_txt = valid & ~is_img
    text_before = jnp.cumsum(is_txt, axis=-1, dtype=jnp.int32) - is_txt
    img_before = jnp.cumsum(is_img, axis=-1, dtype=jnp.int32) - is_img
    images_done, k = jnp.divmod(img_before, per_image)
    start = text_before + images_done * max(rows, cols)
    row, col = jnp.divmod(k, cols)
    t = start
    h = jnp.where(is_img, start + row, start)
    w = jnp.where(is_img, start + col, start)
    pos = jnp.stack([t, h, w])
    return jnp.where(valid[None], pos, 0).astype(jnp.int32)


def rope_index_per_image(input_ids, attention_mask, image_token_id: int, image_grids_hw):
    """Host-side (NumPy) M-RoPE positions (3, B, L) int32 and ``rope_deltas`` (B,) for prompts whose images have
    DIFFERENT merged grids: ``image_grids_hw`` lists (rows, cols) per image in order of appearance over the batch
    (row-major, as ``image_grid_thw`` in transformers). transformers' ``get_rope_index`` for images: text counts
    on from the previous position; an image at start s takes (s, s + row, s + col) and the text after it resumes
    at s + max(rows, cols); pads get 0. ``rope_deltas[b]`` = max position + 1 - real length: a token generated at
    step j (0-based) then sits at ``real_length + rope_deltas + j`` on all three axes (``position of the last
    prompt token + 1 + j``)."""
    ids = np.asarray(input_ids)
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = iter([tuple(int(v) for v in g) for g in image_grids_hw])
    pos = np.zeros((3,) + ids.shape, np.int64)
    deltas = np.zeros(ids.shape[0], np.int64)
    for b in range(ids.shape[0]):
        real = ids[b][mask[b]]
        out = np.zeros((3, len(real)), np.int64)
        i, current = 0, 0
        while i < len(real):
            if real[i] != image_token_id:
                out[:, i] = current
                current += 1
                i += 1
                continue
            try:
                rows, cols = next(grids)
            except StopIteration:
                raise ValueError("rope_index_per_image: more images in input_ids than grids given") from None
            n = rows * cols
            if not (real[i:i + n] == image_token_id).all():
                raise ValueError(f"rope_index_per_image: row {b}: an image of grid {rows}x{cols} needs {n} "
                                 "consecutive image tokens")
            r, c = np.divmod(np.arange(n), cols)
            out[0, i:i + n] = current
            out[1, i:i + n] = current + r
            out[2, i:i + n] = current + c
            current += max(rows, cols)
            i += n
        pos[:, b, mask[b]] = out
        deltas[b] = (out.max() + 1 if len(real) else 0) - len(real)
    if next(grids, None) is not None:
        raise ValueError("rope_index_per_image: more grids given than images in input_ids")
    return pos.astype(np.int32), deltas


def scatter_image_features(inputs_embeds, input_ids, image_token_id: int, image_features):
    """Replace the ``image_token_id`` embeddings by ``image_features`` (N, tokens, E), in order of appearance over
    the flattened (batch, position) axis (PyTorch ``masked_scatter``)."""
    b, length, e = inputs_embeds.shape
    feats = image_features.reshape(-1, e).astype(inputs_embeds.dtype)
    if not isinstance(input_ids, jax.core.Tracer):  # concrete ids (not under jit): check the count
        count = int((np.asarray(input_ids) == image_token_id).sum())
        if count != feats.shape[0]:
            raise ValueError(f"{count} image tokens (id {image_token_id}) in input_ids but the images give "
                             f"{feats.shape[0]} features")
    is_img = (input_ids == image_token_id).reshape(-1)
    rank = jnp.clip(jnp.cumsum(is_img) - 1, 0, feats.shape[0] - 1)
    gathered = jnp.take(feats, rank, axis=0)
    out = jnp.where(is_img[:, None], gathered, inputs_embeds.reshape(-1, e))
    return out.reshape(b, length, e)


class QwenVLForConditionalGeneration(nn.Module):
    """``__call__(input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, position_ids=None) ->
    logits (B, L, vocab)``.

    pixel_values: (num_images, patches, 1176) or the processor's flat (num_images * patches, 1176);
    image_grid_thw: static, (1, H/14, W/14) or an (num_images, 3) NumPy array of equal rows.
    position_ids: optional (3, B, L); by default ``get_rope_index`` with images, else text positions."""
    config: QwenVLConfig
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: Optional[str] = None
    kv_cache: bool = False  # the language model's layers for ``forward_cached`` (text decoding, same parameters)

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, scan_layers=self.scan_layers,
                  remat_policy=self.remat_policy)
        self.visual = QwenVisionTransformer(cfg.vision, attention_impl=self.attention_impl, **kw)
        self.language_model = QwenLanguageModel(cfg.text, kv_cache=self.kv_cache, **kw)
        if not cfg.tie_word_embeddings:
            self.lm_head = Dense(cfg.text.vocab_size, use_bias=False, kernel_axes=("embed", "vocab"),
                                 dtype=self.dtype, param_dtype=self.param_dtype)

    def get_image_features(self, pixel_values, image_grid_thw):
        """(num_images, tokens_per_image, hidden): the vision tower's merged tokens, row-major per image."""
        grid = normalize_grid_thw(image_grid_thw)
        patches = grid[1] * grid[2]
        if pixel_values.ndim == 2:
            if pixel_values.shape[0] % patches:
                raise ValueError(f"pixel_values {pixel_values.shape}: {pixel_values.shape[0]} patches is not a "
                                 f"multiple of {patches} per image (grid {grid})")
            pixel_values = pixel_values.reshape(-1, patches, pixel_values.shape[-1])
        return self.visual(pixel_values, grid)

    def get_rope_index(self, input_ids, image_grid_thw, attention_mask=None):
        return get_rope_index(input_ids, self.config.image_token_id, llm_grid(self.config.vision, image_grid_thw),
                              attention_mask)

    def logits(self, hidden_states):
        if self.config.tie_word_embeddings:
            table = nn.meta.unbox(self.language_model.embed_tokens.variables["params"]["embedding"])
            return jnp.dot(hidden_states, table.astype(self.dtype).T)
        return self.lm_head(hidden_states)

    def embed_inputs(self, input_ids, image_features=None):
        """Token embeddings with ``image_features`` (N, tokens, E) or (tokens, E) in the image-pad slots."""
        embeds = self.language_model.embed(input_ids)
        if image_features is not None:
            embeds = scatter_image_features(embeds, input_ids, self.config.image_token_id, image_features)
        return embeds

    def forward_cached(self, inputs_embeds, position_ids, mask, past_k, past_v):
        """``QwenLanguageModel.forward_cached`` and the LM head on the LAST position only (what decoding needs):
        (logits (B, vocab), (k, v) (layers, B, L, K, D))."""
        hidden, kv = self.language_model.forward_cached(inputs_embeds, position_ids, mask, past_k, past_v)
        return self.logits(hidden[:, -1]), kv

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, position_ids=None):
        embeds = self.language_model.embed(input_ids)
        if pixel_values is not None:
            if image_grid_thw is None:
                raise ValueError("QwenVLForConditionalGeneration: pixel_values without image_grid_thw")
            feats = self.get_image_features(pixel_values, image_grid_thw)
            embeds = scatter_image_features(embeds, input_ids, self.config.image_token_id, feats)
            if position_ids is None:
                position_ids = self.get_rope_index(input_ids, image_grid_thw, attention_mask)
        hidden = self.language_model(inputs_embeds=embeds, position_ids=position_ids,
                                     attention_mask=attention_mask)
        return self.logits(hidden)
