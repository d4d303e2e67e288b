"""Training data of the Bifrost phases: the image source named by ``config.data.source``, the per-element
preprocessing (uint8 views of one shared crop, tokenised caption, cached CLIP latents) and the resumable iterator.

Batches hold uint8 image views (converted on device with :func:`pixels_to_unit`) and host-tokenised int32 ids.
"""
from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from bifrost_jax.data import shapes
from bifrost_jax.data.captions import CaptionsOptions, prepare_captions
from bifrost_jax.data.imagenet import ImageNetSource
from bifrost_jax.data.latent_cache import check_cache
from bifrost_jax.data.pipeline import make_train_iterator
from bifrost_jax.data.preprocess import as_text, crop_box, decode_image, element_name, resize_crop
from bifrost_jax.data.shapes_qa import QA_WORDS
from bifrost_jax.data.tokenizers import ensure_word_tokenizer


def shapes_vocabulary() -> list[str]:
    words = ["a", "an"] + list(shapes.COLORS) + list(shapes.SHAPES) + [s + "s" for s in shapes.SHAPES]
    # the understanding phase's questions (data/shapes_qa.py) after the caption words: caption ids stay put
    return words + list(shapes.RELATIONS) + list(shapes.NUMBER_WORDS) + list(QA_WORDS)


def image_source(data):
    """The random-access training source named by ``config.data.source``."""
    if data.source == "shapes":
        options = shapes.ShapesOptions(resolution=data.image_resolution, train_size=data.train_size,
                                       validation_size=0, test_size=0, seed=data.shapes_seed,
                                       layout=data.shapes_layout, jitter=float(data.shapes_jitter))
        return shapes.load_shapes(data.data_dir, "train", options)
    if data.source == "captions":
        builder = prepare_captions(data.data_dir, CaptionsOptions(source=data.captions_source))  # rebuilt if stale
        return builder.as_data_source("train")
    if data.source == "imagenet":
        return ImageNetSource(data.data_dir, "train", class_names_file=data.class_names_file or None)
    raise ValueError(f"config.data.source={data.source!r}: use 'shapes', 'captions' or 'imagenet'")


class IndexedSource:
    """A source whose elements carry their index (to look up precomputed CLIP latents)."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return {**self.source[i], "source_index": np.int64(i)}


def word_tokenizer_dir(data, source) -> str:
    path = os.path.join(os.path.abspath(data.data_dir), f"word_tokenizer_{data.source}")
    if data.source == "shapes":
        words = shapes_vocabulary()
    else:  # a small custom set: its whole caption vocabulary
        words = [as_text(source[i].get("caption", "")) for i in range(len(source))]
    return ensure_word_tokenizer(path, words)


def _caption(element) -> str:
    return as_text(element.get("caption", ""))


def make_image_preprocess(*, vae_resolution: int = 0, vit_resolution: int = 0, random_crop: bool = False,
                          min_crop_scale: float = 1.0, text_dropout: float = 0.0, text_fn=None, clip_cache=None):
    """``fn(element, rng)``: uint8 views of one shared square crop, the caption (dropped to "" with probability
    ``text_dropout``) turned into id arrays by ``text_fn(caption) -> dict``, and cached CLIP latents."""

    def fn(element, rng):
        image = decode_image(element["image"], name=element_name(element))
        box = crop_box(image.width, image.height, random=random_crop, rng=rng, min_scale=min_crop_scale)
        out = {}
        if vae_resolution:
            out["vae_pixels"] = resize_crop(image, box, vae_resolution)
        if vit_resolution:
            out["vit_pixels"] = resize_crop(image, box, vit_resolution)
        if clip_cache is not None:
            out["clip_latents"] = np.asarray(clip_cache[int(element["source_index"])], np.float32)
        if text_fn is not None:
            caption = _caption(element)
            if text_dropout and rng.random() < text_dropout:
                caption = ""
            out.update(text_fn(caption))
        return out

    return fn


def train_iterator(config, source, preprocess, *, global_batch_size, seed, process_index, process_count):
    d = config.data
    return make_train_iterator(source, global_batch_size, seed=seed, process_index=process_index,
                               process_count=process_count, preprocess_fn=preprocess, worker_count=d.worker_count,
                               num_threads=d.num_threads, prefetch_buffer_size=d.prefetch_buffer_size)


def load_clip_cache(path: str, num_tokens: int, dim: int, source_len: int, expected: dict | None = None):
    """The memory-mapped cache, its shape checked, and its sidecar (``data/latent_cache.py``) against
    ``expected`` (``latent_cache.cache_fields`` of this run): errors name the file and the field."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config.data.precomputed_clip_latents={path}: no such file (build it with "
                                "`bifrost cache-latents`)")
    cache = np.load(path, mmap_mode="r")
    if cache.shape != (source_len, num_tokens, dim):
        raise ValueError(f"config.data.precomputed_clip_latents={path}: shape {cache.shape}, expected "
                         f"({source_len}, {num_tokens}, {dim}) (one row per source element, in source order)")
    if expected is not None:
        check_cache(path, cache.shape, expected)
    return cache


def check_cache_crop(config) -> None:
    if config.data.precomputed_clip_latents and config.data.random_crop:
        raise ValueError("config.data.precomputed_clip_latents with data.random_crop=True: random crops cannot use "
                         "a CLIP-latent cache (it holds one latent per image, of its centre crop); set "
                         "data.random_crop=False or drop the cache")


def pixels_to_unit(pixels):
    """uint8 [0, 255] -> float32 [-1, 1] (the VAE range), on device."""
    return jnp.asarray(pixels).astype(jnp.float32) / 127.5 - 1.0

