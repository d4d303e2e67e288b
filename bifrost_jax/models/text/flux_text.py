"""FLUX's frozen text conditioning: T5 ``last_hidden_state`` and CLIP ``pooler_output``, no attention masks.

Both encoders run WITHOUT an attention mask, as diffusers' FluxPipeline does (the pad tokens are attended to):
``prompt_embeds`` = T5's last hidden state, ``pooled_prompt_embeds`` = CLIP's pooled output (docs/design.md §8.2).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def encode_flux_text(t5, t5_params, clip, clip_params, t5_ids, clip_ids):
    """(prompt_embeds (B, L_t5, d_t5), pooled_prompt_embeds (B, d_clip)) from the frozen encoders, no masks
    (FluxPipeline). Gradients are stopped: the encoders are never trained here."""
    prompt_embeds = t5.apply({"params": t5_params}, jnp.asarray(t5_ids, jnp.int32))
    _, pooled = clip.apply({"params": clip_params}, jnp.asarray(clip_ids, jnp.int32))
    return jax.lax.stop_gradient(prompt_embeds), jax.lax.stop_gradient(pooled)
