"""MAR-style masked decoding of the N patch-level CLIP latents with the Bifrost MLLM (docs/design.md §8.1, §11.3, §12.4).

All N image slots start as the mask token. At every step the MLLM predicts all slots at once; the cosine
schedule decides how many stay masked for the next step, and the slots that leave the mask take their prediction.
Which slots leave first is a random order per image (``models.bifrost.random_orders``, MAR's ``sample_orders``):
slot ``orders[b, k]`` is the k-th to stay masked, so the slots are revealed from the END of the order (with one
token per step, step s reveals ``orders[b, N-1-s]``, as the official loop does).

``mar_decode`` is the fast formulation: the text-prefix keys/values are computed once (``encode_prefix``), every
step runs only the N image queries through the generation branch (``decode_images``), the loop is a static-shape
``lax.fori_loop`` under ``jit``, and the unconditional half is not computed at all when ``cfg_weight == 1``.
``mar_decode_official`` is the official formulation (full text+image sequence every step through both weight
sets, the unconditional half always computed) with the same schedule and orders; it exists to check equivalence
and to measure what the fast path saves (``benchmarks/mar_decode.py``).

CFG: ``pred = uncond + w * (cond - uncond)``, computed on the full (B, N, C) halves BEFORE the slots to update
are selected, which is right for any number of tokens per step (the official code slices the gathered tokens,
which is only right for one token per step, docs/design.md §11.3).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from bifrost_jax.models.bifrost import random_orders


# ----------------------------------------------------------------------------------------------------------------
# schedule and orders

def mar_schedule(num_tokens: int, num_steps: int) -> np.ndarray:
    """int32 (num_steps + 1,): how many slots are still masked before each step (``[0] = N``, ``[-1] = 0``).

    MaskGIT/MAR cosine schedule, as the official loop computes it (float64): after step s,
    ``mask_len = floor(N * cos(pi/2 * (s+1) / S))`` slots stay masked, clipped to ``[1, remaining - 1]`` (at least
    one slot is revealed while more than one is masked; a step reveals nothing once one is left), and the last step
    reveals everything left. With S == N this is exactly one slot per step."""
    if num_tokens < 1 or num_steps < 1:
        raise ValueError(f"mar_schedule: need num_tokens >= 1 and num_steps >= 1, got {num_tokens}, {num_steps}")
    remaining = [num_tokens]
    for step in range(num_steps):
        if step == num_steps - 1:
            remaining.append(0)
            break
        mask_len = math.floor(num_tokens * np.cos(math.pi / 2.0 * (step + 1) / num_steps))
        remaining.append(max(1, min(remaining[-1] - 1, mask_len)))
    return np.asarray(remaining, np.int32)


def tokens_per_step(num_tokens: int, num_steps: int) -> np.ndarray:
    """How many slots each step reveals (sums to ``num_tokens``)."""
    return -np.diff(mar_schedule(num_tokens, num_steps))


def order_ranks(orders):
    """(B, N): ``ranks[b, n]`` = position of slot n in ``orders[b]``; slot n is masked while ``ranks < remaining``."""
    return jnp.argsort(orders, axis=-1).astype(jnp.int32)


def resolve_orders(rng, orders, batch: int, num_tokens: int):
    """int32 (B, N) decoding orders: ``orders`` when given (checked to be permutations' shape), else drawn from
    ``rng`` (``models.bifrost.random_orders``)."""
    if orders is None:
        if rng is None:
            raise ValueError("MAR decoding needs rng (to draw the orders) or orders")
        return random_orders(rng, batch, num_tokens)
    orders = jnp.asarray(orders, jnp.int32)
    if orders.shape != (batch, num_tokens):
        raise ValueError(f"orders: shape {orders.shape}, expected (batch, num_image_tokens) = {(batch, num_tokens)}")
    return orders


def _initial_tokens(model, variables, batch_size):
    """(B, N, C) float32: every slot holds the mask token (what the official loop starts from)."""
    c = model.config
    mask_token = jnp.asarray(variables["params"]["mask_token"], jnp.float32).reshape(c.clip_dim)
    return jnp.broadcast_to(mask_token, (batch_size, c.num_image_tokens, c.clip_dim))


def _check_cfg(cfg_weight, input_ids, uncond_input_ids, uncond_attention_mask):
    guided = float(cfg_weight) != 1.0
    if guided and uncond_input_ids is None:
        raise ValueError("mar_decode: cfg_weight != 1 needs uncond_input_ids (the prompt \"\", see "
                         "data.prompt.build_uncond_prompt)")
    if uncond_input_ids is not None:
        if uncond_attention_mask is None:
            raise ValueError("mar_decode: uncond_input_ids given without uncond_attention_mask")
        if tuple(uncond_input_ids.shape) != tuple(input_ids.shape):
            raise ValueError(f"mar_decode: uncond_input_ids {tuple(uncond_input_ids.shape)} must have the shape of "
                             f"input_ids {tuple(input_ids.shape)} (pad both to the same max_length)")
    return guided


def _guide(pred, cfg_weight):
    """(2B, N, C) predictions, rows [uncond; cond] -> guided (B, N, C)."""
    uncond, cond = jnp.split(pred, 2, axis=0)
    return uncond + cfg_weight * (cond - uncond)


# ----------------------------------------------------------------------------------------------------------------
# the fast formulation

@functools.partial(jax.jit, static_argnames=("model", "num_steps", "guided"))
def _mar_decode(model, variables, input_ids, attention_mask, orders, uncond_input_ids, uncond_attention_mask,
                cfg_weight, *, num_steps, guided):
    batch = input_ids.shape[0]
    num_tokens = model.config.num_image_tokens
    ranks = order_ranks(orders)
    remaining = jnp.asarray(mar_schedule(num_tokens, num_steps))
    if guided:
        input_ids = jnp.concatenate([uncond_input_ids, input_ids], axis=0)
        attention_mask = jnp.concatenate([uncond_attention_mask, attention_mask], axis=0)
    cache = model.apply(variables, input_ids, attention_mask, method=model.encode_prefix)

    def step(s, tokens):
        masked = ranks < remaining[s]
        reveal = masked & (ranks >= remaining[s + 1])
        if guided:
            pred = model.apply(variables, cache, jnp.concatenate([tokens, tokens]), jnp.concatenate([masked, masked]),
                               method=model.decode_images)
            pred = _guide(pred.astype(jnp.float32), cfg_weight)
        else:
            pred = model.apply(variables, cache, tokens, masked, method=model.decode_images).astype(jnp.float32)
        return jnp.where(reveal[..., None], pred, tokens)

    return jax.lax.fori_loop(0, num_steps, step, _initial_tokens(model, variables, batch))


def mar_decode(model, variables, input_ids, attention_mask, rng=None, *, num_steps: int, cfg_weight: float = 1.0,
               uncond_input_ids=None, uncond_attention_mask=None, orders=None):
    """Decode the N CLIP latents (B, N, C) float32 for text prefixes ``input_ids`` / ``attention_mask`` (B, T)
    (``data.prompt.build_t2i_prompt``).

    ``rng`` draws the per-image orders (deterministic given it), or ``orders`` (B, N) gives them (slot
    ``orders[b, k]`` is the k-th to stay masked: see the module docstring). ``num_steps`` can be anything >= 1 (N = one slot
    per step = the official default). With ``cfg_weight != 1`` the unconditional prefixes are required and the
    model runs on [uncond; cond]; with ``cfg_weight == 1`` they are ignored and never run."""
    guided = _check_cfg(cfg_weight, input_ids, uncond_input_ids, uncond_attention_mask)
    if not guided:
        uncond_input_ids = uncond_attention_mask = None
    orders = resolve_orders(rng, orders, np.shape(input_ids)[0], model.config.num_image_tokens)
    return _mar_decode(model, variables, jnp.asarray(input_ids), jnp.asarray(attention_mask), orders,
                       None if uncond_input_ids is None else jnp.asarray(uncond_input_ids),
                       None if uncond_attention_mask is None else jnp.asarray(uncond_attention_mask),
                       jnp.float32(cfg_weight), num_steps=int(num_steps), guided=guided)


# ----------------------------------------------------------------------------------------------------------------
# the official formulation (reference and benchmark baseline)

@functools.partial(jax.jit, static_argnames=("model", "num_steps"))
def _mar_decode_official(model, variables, input_ids, attention_mask, rng, uncond_input_ids, uncond_attention_mask,
                         cfg_weight, *, num_steps):
    batch = input_ids.shape[0]
    num_tokens = model.config.num_image_tokens
    ranks = order_ranks(random_orders(rng, batch, num_tokens))
    remaining = jnp.asarray(mar_schedule(num_tokens, num_steps))
    both_ids = jnp.concatenate([uncond_input_ids, input_ids], axis=0)
    both_mask = jnp.concatenate([uncond_attention_mask, attention_mask], axis=0)

    def step(s, tokens):
        masked = ranks < remaining[s]
        reveal = masked & (ranks >= remaining[s + 1])
        pred = model.apply(variables, both_ids, both_mask, jnp.concatenate([tokens, tokens]),
                           jnp.concatenate([masked, masked]), method=model.official_forward)
        return jnp.where(reveal[..., None], _guide(pred.astype(jnp.float32), cfg_weight), tokens)

    return jax.lax.fori_loop(0, num_steps, step, _initial_tokens(model, variables, batch))


def mar_decode_official(model, variables, input_ids, attention_mask, rng, *, num_steps: int,
                        cfg_weight: float = 1.0, uncond_input_ids=None, uncond_attention_mask=None):
    """``mar_decode`` in the official formulation: each step runs ``official_forward`` (the whole text + image
    sequence, both weight sets on every token, dense mask) on [uncond; cond], even at ``cfg_weight == 1``.
    Same orders (same ``rng``) and schedule as ``mar_decode``. Without ``uncond_input_ids`` the conditional
    prefixes stand in for the unconditional half (it is still computed, as in the official loop)."""
    _check_cfg(cfg_weight, input_ids, uncond_input_ids, uncond_attention_mask)
    if uncond_input_ids is None:
        uncond_input_ids, uncond_attention_mask = input_ids, attention_mask
    return _mar_decode_official(model, variables, jnp.asarray(input_ids), jnp.asarray(attention_mask), rng,
                                jnp.asarray(uncond_input_ids), jnp.asarray(uncond_attention_mask),
                                jnp.float32(cfg_weight), num_steps=int(num_steps))
