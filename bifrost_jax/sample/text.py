"""Text generation (understanding) with Qwen2.5-VL and the Bifrost MLLM's frozen Qwen2.5-VL.

``decode_tokens`` is the core: one ``jax.jit`` program per static shape (batch, prompt length, max new tokens,
sampling mode) that runs the prompt once (prefill, writing every layer's keys/values into a cache of fixed length
``T + max_new_tokens``), then a ``lax.while_loop`` feeding one token per step through
``QwenLanguageModel.forward_cached`` (attention over [cache ; new]), stopping each row at its end-of-sequence token
(later tokens are the pad id, as transformers' ``generate``) and the loop when every row has stopped.

Positions follow transformers exactly: the prompt's 3-D M-RoPE ids come from ``rope_index_per_image`` (images of
different sizes in one batch), and the token generated at step j sits at (last prompt position + 1 + j) on all
three axes, i.e. ``real_length + rope_deltas + j``. Prompts are left-padded.

Greedy (``do_sample=False``: argmax) or sampling: logits / temperature, then top-k, then top-p (transformers'
warper order), one PRNG key per prompt folded with the step, so a prompt's answer depends only on its seed, not
on the batch it was in, the mesh, or the number of hosts.

``TextGenerator`` is the host side: it renders the chat template (``data.chat``), preprocesses images with
Qwen2.5-VL's dynamic resolution (``data.qwen_image``), runs the vision tower once per image grid (batched over all
images of that grid), pads prompt lengths, image counts and batch rows to buckets so that a benchmark compiles a
handful of programs, and shards the batch over the mesh's data axes (weights by ``parallel/rules.py``).
``ImageBuckets`` bounds the number of image grids (one ViT program each) by resizing each image to the closest of
a fixed set of sizes; without it images keep the processor's exact size (one program per distinct grid).

The Bifrost MLLM answers with its frozen Qwen2.5-VL: ``port.load("bifrost-1")`` returns it as ``module.vl``, and
``sample.chat.load_understanding`` builds it from any checkpoint kind (a transformers directory, an official
Bifrost-1 checkpoint, an mllm-phase training run).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bifrost_jax.data.chat import chat_token_ids
from bifrost_jax.data.prompt import IM_END, Tokenizer
from bifrost_jax.data.qwen_image import MAX_PIXELS, MIN_PIXELS, preprocess_image, smart_resize, to_rgb_pil
from bifrost_jax.models.qwen.decoder import causal_padding_mask
from bifrost_jax.models.qwen.vl import QwenVLForConditionalGeneration, rope_index_per_image
from bifrost_jax.parallel.rules import axis_rules, batch_shards, logical_to_mesh_spec


# ----------------------------------------------------------------------------------------------------------------
# sampling

@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """How tokens are chosen. ``top_k`` 0 and ``top_p`` 1 switch those filters off."""
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"DecodeOptions: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1 and self.top_k >= 0):
            raise ValueError(f"DecodeOptions: need temperature > 0, 0 < top_p <= 1, top_k >= 0; got "
                             f"{self.temperature}, {self.top_p}, {self.top_k}")


def filter_logits(logits, temperature, top_p, top_k: int):
    """float32 (B, V) logits / temperature with everything outside the top-k and the top-p nucleus at -inf (the
    most likely token always survives)."""
    x = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(x, min(top_k, x.shape[-1]))[0][:, -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    ordered = jnp.sort(x, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above each sorted token
    kept = jnp.where(before < top_p, ordered, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    return jnp.where(x < threshold, -jnp.inf, x)


def choose_tokens(logits, keys, step, temperature, top_p, *, do_sample: bool, top_k: int):
    """(B,) int32: argmax, or a draw per row with key ``fold_in(keys[b], step)``."""
    if not do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = filter_logits(logits, temperature, top_p, top_k)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
    return jax.vmap(jax.random.categorical)(step_keys, x).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------------------
# the jitted prefill + decode loop

def prompt_keys(seeds: Sequence[int]) -> np.ndarray:
    """(B, 2) uint32: ``jax.random.PRNGKey(seed)`` of every prompt."""
    return np.stack([np.asarray(jax.random.PRNGKey(int(s))) for s in seeds]) if len(seeds) else np.zeros((0, 2))


def _batch_constraint(x):
    return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "do_sample", "top_k", "eos_ids", "pad_id",
                                             "return_logits"))
def _decode(module, variables, input_ids, attention_mask, position_ids, image_features, keys, temperature, top_p, *,
            max_new_tokens, do_sample, top_k, eos_ids, pad_id, return_logits):
    b, t = input_ids.shape
    c = module.config.text
    cache_len = t + max_new_tokens
    embeds = module.apply(variables, input_ids, image_features, method=module.embed_inputs)
    empty = jnp.zeros((c.num_hidden_layers, b, 0, c.num_key_value_heads, c.head_dim), embeds.dtype)
    logits, (k, v) = module.apply(variables, embeds, position_ids, causal_padding_mask(attention_mask), empty, empty,
                                  method=module.forward_cached)
    pad = ((0, 0), (0, 0), (0, max_new_tokens), (0, 0), (0, 0))
    k_cache, v_cache = _batch_constraint(jnp.pad(k, pad)), _batch_constraint(jnp.pad(v, pad))
    valid = jnp.pad(jnp.asarray(attention_mask).astype(bool), ((0, 0), (0, max_new_tokens)))
    last_position = position_ids[:, :, -1]  # (3, B): the last prompt token (left padding)
    eos = jnp.asarray(eos_ids, jnp.int32)
    sample = functools.partial(choose_tokens, temperature=temperature, top_p=top_p, do_sample=do_sample,
                               top_k=top_k)

    token = sample(logits, keys, 0)
    tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
    done = jnp.isin(token, eos)
    all_logits = (jnp.zeros((b, max_new_tokens, logits.shape[-1]), jnp.float32).at[:, 0].set(
        logits.astype(jnp.float32)) if return_logits else jnp.zeros((), jnp.float32))

    def cond(state):
        i, _, done, *_ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, token, done, tokens, k_cache, v_cache, valid, all_logits = state
        slot = t + i - 1  # the cache slot of the token fed now (generated at step i - 1)
        x = module.apply(variables, token[:, None], method=module.embed_inputs)
        pos = (last_position + i)[:, :, None]
        mask = jnp.concatenate([valid, jnp.ones((b, 1), bool)], axis=1)[:, None, None, :]
        logits, (k, v) = module.apply(variables, x, pos, mask, k_cache, v_cache, method=module.forward_cached)
        k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), slot, axis=2)
        v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), slot, axis=2)
        valid = jax.lax.dynamic_update_slice_in_dim(valid, jnp.ones((b, 1), bool), slot, axis=1)
        new = sample(logits, keys, i)
        out = jnp.where(done, pad_id, new)  # finished rows emit (and are next fed) the pad id, as transformers
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, out[:, None], i, axis=1)
        if return_logits:
            all_logits = jax.lax.dynamic_update_slice_in_dim(all_logits, logits.astype(jnp.float32)[:, None], i,
                                                             axis=1)
        return i + 1, out, done | jnp.isin(out, eos), tokens, k_cache, v_cache, valid, all_logits

    state = (jnp.int32(1), token, done, tokens, k_cache, v_cache, valid, all_logits)
    _, _, _, tokens, *_, all_logits = jax.lax.while_loop(cond, body, state)
    return (tokens, all_logits) if return_logits else tokens


def decode_tokens(module: QwenVLForConditionalGeneration, variables, input_ids, attention_mask, position_ids,
                  image_features, keys, options: DecodeOptions, *, eos_ids: Sequence[int], pad_id: int,
                  return_logits: bool = False):
    """Generated tokens (B, max_new_tokens) int32 for left-padded prompts (and with ``return_logits`` the float32
    logits (B, max_new_tokens, vocab) of every step, zeros after the loop stopped).

    ``module``: a ``QwenVLForConditionalGeneration`` (its ``kv_cache`` copy is made here; same parameters).
    ``position_ids`` (3, B, T): ``rope_index_per_image``. ``image_features``: the vision tower's merged tokens of
    every image in order of appearance, (rows >= image tokens, E) or None. ``keys`` (B, 2): one PRNG key per
    prompt (used only when sampling). Call under ``axis_rules(mesh)`` with the batch sharded to shard."""
    if not module.kv_cache:
        module = module.clone(kv_cache=True)
    return _decode(module, variables, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32),
                   jnp.asarray(position_ids, jnp.int32), image_features, keys, jnp.float32(options.temperature),
                   jnp.float32(options.top_p), max_new_tokens=int(options.max_new_tokens),
                   do_sample=bool(options.do_sample), top_k=int(options.top_k),
                   eos_ids=tuple(int(e) for e in eos_ids), pad_id=int(pad_id), return_logits=bool(return_logits))


@functools.partial(jax.jit, static_argnames=("module", "grid"))
def _image_features(module, variables, pixel_values, *, grid):
    return module.apply(variables, pixel_values, grid, method=module.get_image_features)


# ----------------------------------------------------------------------------------------------------------------
# buckets

def round_up(n: int, multiple: int) -> int:
    return max(multiple, int(math.ceil(n / multiple)) * multiple)


def next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class ImageBuckets:
    """A fixed set of image sizes (height, width), multiples of 28: each image is resized to the size whose aspect
    ratio is closest (in log ratio), then whose pixel count is closest to what ``smart_resize`` would give it.
    Bounds the number of vision-tower programs to ``len(sizes)``."""
    sizes: tuple[tuple[int, int], ...]

    def __post_init__(self):
        sizes = tuple((int(h), int(w)) for h, w in self.sizes)
        if not sizes or any(h % 28 or w % 28 or h <= 0 or w <= 0 for h, w in sizes):
            raise ValueError(f"ImageBuckets: sizes must be positive multiples of 28, got {list(self.sizes)}")
        object.__setattr__(self, "sizes", sizes)

    @classmethod
    def default(cls, max_pixels: int = MAX_PIXELS, min_pixels: int = MIN_PIXELS,
                aspects: Sequence[float] = (1 / 3, 1 / 2, 2 / 3, 3 / 4, 1, 4 / 3, 3 / 2, 2, 3),
                areas: Sequence[float] = (0.25, 0.5, 1.0)) -> "ImageBuckets":
        """Aspect ratios (w / h) x fractions of ``max_pixels``: 27 sizes by default."""
        sizes = set()
        for a in aspects:
            for f in areas:
                pixels = max(min_pixels, f * max_pixels)
                h = max(28, int(math.sqrt(pixels / a) / 28) * 28)
                w = max(28, int(math.sqrt(pixels * a) / 28) * 28)
                sizes.add((h, w))
        return cls(tuple(sorted(sizes)))

    def assign(self, height: int, width: int, target_pixels: int) -> tuple[int, int]:
        ratio = math.log(width / height)
        return min(self.sizes, key=lambda s: (round(abs(math.log(s[1] / s[0]) - ratio), 6),
                                              abs(s[0] * s[1] - target_pixels)))


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """Qwen2.5-VL's dynamic resolution (``min_pixels`` <= h*w <= ``max_pixels``), optionally snapped to buckets."""
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    buckets: Optional[ImageBuckets] = None


def prepare_image(image, options: ImageOptions, patch_size: int = 14, merge_size: int = 2):
    """(pixel_values (patches, 1176), grid_thw) of one image (PIL or uint8 array)."""
    from PIL import Image

    if options.buckets is None:
        return preprocess_image(image, min_pixels=options.min_pixels, max_pixels=options.max_pixels,
                                patch_size=patch_size, merge_size=merge_size)
    pil = to_rgb_pil(image)
    factor = patch_size * merge_size
    h, w = smart_resize(pil.height, pil.width, factor, options.min_pixels, options.max_pixels)
    bh, bw = options.buckets.assign(pil.height, pil.width, h * w)
    if (bh, bw) != (pil.height, pil.width):
        pil = pil.resize((bw, bh), resample=Image.Resampling.BICUBIC)
    return preprocess_image(pil, do_resize=False, patch_size=patch_size, merge_size=merge_size)


# ----------------------------------------------------------------------------------------------------------------
# host side

@dataclasses.dataclass
class Prompt:
    """One prompt: token ids (images expanded), its images' (pixel_values, grid_thw) in order, a sampling seed."""
    ids: list[int]
    images: list[tuple[np.ndarray, tuple[int, int, int]]]
    seed: int = 0


@dataclasses.dataclass
class TextGenerator:
    """Batched, bucketed, sharded generation for a ``QwenVLForConditionalGeneration`` and its variables.

    ``generate(prompts)`` -> token lists (stopped at EOS, the EOS itself dropped); ``chat(messages, images)`` ->
    the answer text. ``length_bucket``: prompt lengths are padded up to a multiple of it."""
    module: QwenVLForConditionalGeneration
    variables: Any
    tokenizer: Optional[Tokenizer] = None
    mesh: Any = None
    eos_ids: Optional[Sequence[int]] = None
    pad_id: Optional[int] = None
    batch_size: int = 8
    length_bucket: int = 64
    image_options: ImageOptions = ImageOptions()

    def __post_init__(self):
        if not self.module.kv_cache:
            self.module = self.module.clone(kv_cache=True)
        if self.eos_ids is None:
            if self.tokenizer is not None:
                self.eos_ids = (self.tokenizer.token_id(IM_END),)
            elif self.module.config.text.eos_token_id is not None:
                self.eos_ids = (self.module.config.text.eos_token_id,)
            else:
                raise ValueError("TextGenerator: no eos_ids given and neither a tokenizer nor config eos_token_id")
        self.eos_ids = tuple(int(e) for e in np.atleast_1d(self.eos_ids))
        if self.pad_id is None:
            self.pad_id = self.tokenizer.pad_id if self.tokenizer is not None else self.eos_ids[0]

    # -- inputs -------------------------------------------------------------------------------------------------
    def prompt(self, messages, images: Sequence = (), seed: int = 0) -> Prompt:
        """A ``Prompt`` from chat messages (``data.chat``) and their images (PIL or uint8 arrays, in order)."""
        if self.tokenizer is None:
            raise ValueError("TextGenerator.prompt needs a tokenizer")
        prepared = [self.prompt_image(im) for im in images]
        merge = self.module.config.vision.spatial_merge_size
        counts = [g[1] * g[2] // merge ** 2 for _, g in prepared]
        return Prompt(chat_token_ids(self.tokenizer, messages, counts), prepared, int(seed))

    def prompt_image(self, image):
        """(pixel_values, grid_thw) of one image with this generator's ``image_options``."""
        v = self.module.config.vision
        return prepare_image(image, self.image_options, v.patch_size, v.spatial_merge_size)

    def _put(self, x, batch_axis: int = 0):
        if self.mesh is None:
            return jnp.asarray(x)
        from jax.sharding import NamedSharding
        logical = [None] * np.ndim(x)
        logical[batch_axis] = "batch"
        return jax.device_put(x, NamedSharding(self.mesh, logical_to_mesh_spec(tuple(logical))))

    def _features(self, prompts: Sequence[Prompt]):
        """The vision tower's tokens of every image of ``prompts`` in order of appearance (rows padded to a power
        of two), one ViT call per grid; None without images."""
        images = [im for p in prompts for im in p.images]
        if not images:
            return None
        by_grid: dict[tuple, list[int]] = {}
        for j, (_, grid) in enumerate(images):
            by_grid.setdefault(tuple(int(g) for g in grid), []).append(j)
        out: list = [None] * len(images)
        for grid, members in by_grid.items():
            pv = np.stack([images[j][0] for j in members])
            n = next_power_of_two(len(members))
            pv = np.concatenate([pv, np.repeat(pv[-1:], n - len(members), axis=0)])
            feats = _image_features(self.module, self.variables, jnp.asarray(pv), grid=grid)
            for r, j in enumerate(members):
                out[j] = feats[r]
        feats = jnp.concatenate(out, axis=0)
        rows = next_power_of_two(feats.shape[0])
        return jnp.pad(feats, ((0, rows - feats.shape[0]), (0, 0)))

    def batch_arrays(self, prompts: Sequence[Prompt]):
        """(input_ids, attention_mask, position_ids) NumPy for left-padded ``prompts`` (length bucketed)."""
        m = self.module.config.vision.spatial_merge_size
        length = round_up(max(len(p.ids) for p in prompts), self.length_bucket)
        ids = np.full((len(prompts), length), self.pad_id, np.int32)
        mask = np.zeros((len(prompts), length), np.int32)
        for r, p in enumerate(prompts):
            ids[r, length - len(p.ids):] = p.ids
            mask[r, length - len(p.ids):] = 1
        grids = [(g[1] // m, g[2] // m) for p in prompts for _, g in p.images]
        positions, _ = rope_index_per_image(ids, mask, self.module.config.image_token_id, grids)
        return ids, mask, positions

    # -- generation ---------------------------------------------------------------------------------------------
    def generate_batch(self, prompts: Sequence[Prompt], options: DecodeOptions = DecodeOptions(),
                       return_logits: bool = False):
        """One call: tokens (B, max_new) (and logits) for at most a batch of prompts; rows padded to the shards."""
        shards = batch_shards(self.mesh)
        rows = round_up(len(prompts), shards)
        padded = list(prompts) + [prompts[-1]] * (rows - len(prompts))
        ids, mask, positions = self.batch_arrays(padded)
        keys = prompt_keys([p.seed for p in padded])
        with axis_rules(self.mesh):
            feats = self._features(padded)
            out = decode_tokens(self.module, self.variables, self._put(ids), self._put(mask),
                                self._put(positions, 1), feats, self._put(np.asarray(keys)), options,
                                eos_ids=self.eos_ids, pad_id=self.pad_id, return_logits=return_logits)
        if return_logits:
            return np.asarray(out[0])[:len(prompts)], np.asarray(out[1])[:len(prompts)]
        return np.asarray(out)[:len(prompts)]

    def strip(self, row) -> list[int]:
        """A generated row up to (without) its first EOS."""
        row = [int(t) for t in row]
        for i, t in enumerate(row):
            if t in self.eos_ids:
                return row[:i]
        return row

    def generate(self, prompts: Sequence[Prompt], options: DecodeOptions = DecodeOptions()) -> list[list[int]]:
        """Token lists for any number of prompts, in batches of ``batch_size`` grouped by length (so that rows of
        similar length share a bucket; a short last batch is padded to the same row count); the result is in the
        order of ``prompts``."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].ids))
        out: list = [None] * len(prompts)
        for s in range(0, len(order), self.batch_size):
            chunk = order[s:s + self.batch_size]
            rows = [prompts[i] for i in chunk]
            if len(order) > self.batch_size:
                rows += [rows[-1]] * (self.batch_size - len(rows))
            tokens = self.generate_batch(rows, options)
            for i, row in zip(chunk, tokens):
                out[i] = self.strip(row)
        return out

    def decode_text(self, tokens: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise ValueError("TextGenerator.decode_text needs a tokenizer")
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def chat(self, messages, images: Sequence = (), options: DecodeOptions = DecodeOptions(), seed: int = 0) -> str:
        """The answer to a conversation (``data.chat`` messages; images in order of appearance)."""
        return self.decode_text(self.generate([self.prompt(messages, images, seed)], options)[0])
