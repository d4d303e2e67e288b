"""Host-side tokenisers for the FLUX text encoders: fixed-length int32 ids, as diffusers' FluxPipeline makes them.

FLUX gets the RAW caption (not the chat-formatted Bifrost prompt, docs/design.md §8.2): T5 ids padded to
``max_length`` (512 for FLUX.1-dev) and CLIP ids padded to 77, both ``padding="max_length", truncation=True`` as
``FluxPipeline._get_{t5,clip}_prompt_embeds``.

* :class:`PaddedTokenizer`: a ``tokenizer.json`` directory (a diffusers FLUX download has ``tokenizer/`` and
  ``tokenizer_2/``; the slow sentencepiece-only T5 tokenizer must first be saved as a fast one). Training and
  generation both use it.
* :func:`ensure_word_tokenizer`: the word-level tokenizer of a dataset vocabulary (tiny configs, the demo).
* :func:`hash_tokenizer`: a file-free word tokenizer for tiny test encoders (generation configs without files).
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from typing import Callable, Iterable, Optional, Sequence

import zlib

import numpy as np
from tokenizers import Tokenizer

from bifrost_jax.data.prompt import build_word_tokenizer


class PaddedTokenizer:
    """A ``tokenizer.json`` tokenizer that returns fixed-length int32 ids, like a transformers fast tokenizer
    called with ``padding="max_length", max_length=L, truncation=True`` (its post-processor adds the special
    tokens, e.g. T5's ``</s>`` and CLIP's BOS/EOS, and truncation keeps them)."""

    def __init__(self, path: str, max_length: int, pad_token: str | None = None):
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
    """``directory`` holding the word-level tokenizer of ``words`` (tiny configs and demos): built if absent, and
    rebuilt if it was built from another vocabulary (a workdir made before words were added; words are appended,
    so the ids of the old ones stay put). The build is deterministic, so concurrent or repeated builds write the
    same file."""
    tmp = f"{directory}.tmp{os.getpid()}-{threading.get_ident()}"  # processes and threads
    build_word_tokenizer(list(words), tmp)
    current = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(current) and _same_file(current, os.path.join(tmp, "tokenizer.json")):
        shutil.rmtree(tmp, ignore_errors=True)
        return directory
    os.makedirs(os.path.dirname(os.path.abspath(directory)), exist_ok=True)
    stale = f"{directory}.stale{os.getpid()}-{threading.get_ident()}"
    if os.path.isdir(directory):
        os.replace(directory, stale)
    try:
        os.replace(tmp, directory)
    except OSError:  # another process won the race: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(stale, ignore_errors=True)
    return directory


def _same_file(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def hf_tokenizer(path: str, max_length: int) -> Callable[[Sequence[str]], np.ndarray]:
    """``fn(prompts) -> int32 (B, max_length)`` with a transformers tokenizer directory (FLUX.1-dev's ``tokenizer``
    (CLIP, 77) or ``tokenizer_2`` (T5, 512)): padded to max_length, truncated, as FluxPipeline does."""
    from transformers import AutoTokenizer  # optional heavy dependency (the port extra)

    tok = AutoTokenizer.from_pretrained(path)

    def tokenize(prompts):
        out = tok(list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="np")
        return np.asarray(out["input_ids"], np.int32)
    return tokenize


def hash_tokenizer(vocab_size: int, max_length: int, *, eos_token_id: int, pad_token_id: int,
                   bos_token_id: Optional[int] = None) -> Callable[[Sequence[str]], np.ndarray]:
    """A file-free word tokenizer for tiny test/demo encoders: each lower-cased word -> a stable id (crc32) among
    the ids that are not special; then EOS, padding with ``pad_token_id``, truncated to ``max_length`` (EOS kept)."""
    special = {i for i in (eos_token_id, pad_token_id, bos_token_id) if i is not None}
    free = [i for i in range(vocab_size) if i not in special]

    def tokenize(prompts):
        out = np.full((len(prompts), max_length), pad_token_id, np.int32)
        for b, p in enumerate(prompts):
            ids = ([] if bos_token_id is None else [bos_token_id])
            ids += [free[zlib.crc32(w.encode()) % len(free)] for w in p.lower().split()]
            ids = ids[:max_length - 1] + [eos_token_id]
            out[b, :len(ids)] = ids
        return out
    return tokenize
