"""FLUX text conditioning for training: host-side T5/CLIP tokenisation and the frozen-encoder forward.

FLUX gets the RAW caption (not the chat-formatted Bifrost prompt, spec 8.2): T5 ids padded to ``max_length``
(512 for FLUX.1-dev) and CLIP ids padded to 77, both ``padding="max_length", truncation=True`` as diffusers'
``FluxPipeline._get_{t5,clip}_prompt_embeds``, and both encoders run WITHOUT an attention mask (as the pipeline:
the pad tokens are attended to). ``prompt_embeds`` = T5 ``last_hidden_state``; ``pooled_prompt_embeds`` = CLIP
``pooler_output``.

Tokenizers are ``tokenizer.json`` directories (a diffusers FLUX download has ``tokenizer/`` and ``tokenizer_2/``;
the slow sentencepiece-only T5 tokenizer must first be saved as a fast one). Tiny configs use the word-level
tokenizer of ``data/prompt.build_word_tokenizer`` built from the dataset vocabulary (``ensure_word_tokenizer``).
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class PaddedTokenizer:
    """A ``tokenizer.json`` tokenizer that returns fixed-length int32 ids, like a transformers fast tokenizer
    called with ``padding="max_length", max_length=L, truncation=True`` (its post-processor adds the special
    tokens, e.g. T5's ``</s>`` and CLIP's BOS/EOS, and truncation keeps them)."""

    def __init__(self, path: str, max_length: int, pad_token: str | None = None):
        from tokenizers import Tokenizer

        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no tokenizer.json at {path!r} (a FLUX download has tokenizer/ (CLIP) and "
                                    f"tokenizer_2/ (T5); save a slow tokenizer as a fast one first)")
        self.path, self.max_length = path, int(max_length)
        self.backend = Tokenizer.from_file(file)
        if pad_token is None:
            pad_token = _configured_pad_token(os.path.dirname(file))
        pad_id = self.backend.token_to_id(pad_token) if pad_token else None
        if pad_id is None:
            raise KeyError(f"tokenizer {path}: pad token {pad_token!r} is not in the vocabulary")
        self.pad_token, self.pad_id = pad_token, int(pad_id)
        self.backend.enable_truncation(self.max_length)
        self.backend.enable_padding(length=self.max_length, pad_id=self.pad_id, pad_token=self.pad_token)

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=True)
        return np.asarray([e.ids for e in encodings], np.int32).reshape(len(texts), self.max_length)


def _configured_pad_token(directory: str) -> str | None:
    """``pad_token`` of ``tokenizer_config.json`` (a string or a serialised AddedToken), or None."""
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        value = json.load(fh).get("pad_token")
    if isinstance(value, dict):
        value = value.get("content")
    return value or None


def ensure_word_tokenizer(directory: str, words: Iterable[str]) -> str:
    """``directory`` holding the word-level tokenizer of ``words`` (built if absent; tiny configs and demos).
    The build is deterministic, so concurrent or repeated builds write the same file."""
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        from bifrost_jax.data.prompt import build_word_tokenizer

        tmp = f"{directory}.tmp{os.getpid()}"
        build_word_tokenizer(list(words), tmp)
        os.makedirs(os.path.dirname(os.path.abspath(directory)), exist_ok=True)
        try:
            os.replace(tmp, directory)
        except OSError:  # another process won the race: keep its copy
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def encode_flux_text(t5, t5_params, clip, clip_params, t5_ids, clip_ids):
    """(prompt_embeds (B, L_t5, d_t5), pooled_prompt_embeds (B, d_clip)) from the frozen encoders, no masks
    (FluxPipeline). Gradients are stopped: the encoders are never trained here."""
    prompt_embeds = t5.apply({"params": t5_params}, jnp.asarray(t5_ids, jnp.int32))
    _, pooled = clip.apply({"params": clip_params}, jnp.asarray(clip_ids, jnp.int32))
    return jax.lax.stop_gradient(prompt_embeds), jax.lax.stop_gradient(pooled)
