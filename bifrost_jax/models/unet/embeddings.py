"""The UNet's conditioning vector: timestep embedding plus, for SDXL (``addition_embed_type="text_time"``), the pooled
text embedding and the six micro-conditioning time ids (original size, crop top-left, target size).

    emb = time_embedding(sinusoid(t))                                              # (B, time_embed_dim)
    emb += add_embedding(concat[text_embeds, sinusoid(time_ids).reshape(B, -1)])  # SDXL

Shared by the UNet and its ControlNets (same parameter names: ``time_embedding``, ``add_embedding``).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from bifrost_jax.models.flux.transformer import MLPEmbedder, timestep_embedding
from bifrost_jax.models.unet.config import UNet2DConditionConfig

Dtype = Any


def unet_time_embedding(module: nn.Module, cfg: UNet2DConditionConfig, timestep, batch: int,
                        added_cond_kwargs: Optional[dict] = None, dtype: Dtype = jnp.float32,
                        param_dtype: Dtype = jnp.float32):
    """(B, time_embed_dim): defines ``time_embedding`` (and ``add_embedding``) inside ``module``'s compact scope.
    ``timestep``: a scalar or (B,) array; ``added_cond_kwargs``: {"text_embeds": (B, D), "time_ids": (B, 6)} when the
    config has ``addition_embed_type="text_time"``."""
    kw = dict(act_fn=cfg.act_fn, dtype=dtype, param_dtype=param_dtype)
    t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (batch,))
    sinusoid = lambda v, dim: timestep_embedding(v, dim, flip_sin_to_cos=cfg.flip_sin_to_cos,  # noqa: E731
                                                 downscale_freq_shift=cfg.freq_shift)
    emb = MLPEmbedder(cfg.time_embed_dim, name="time_embedding", **kw)(
        sinusoid(t, cfg.block_out_channels[0]).astype(dtype))
    if cfg.addition_embed_type == "text_time":
        added = added_cond_kwargs or {}
        missing = [k for k in ("text_embeds", "time_ids") if added.get(k) is None]
        if missing:
            raise ValueError(f"this UNet has addition_embed_type='text_time' (SDXL): pass added_cond_kwargs with "
                             f"{missing} (text_embeds (B, {cfg.text_embeds_dim}), time_ids (B, {cfg.num_time_ids}))")
        text_embeds, time_ids = jnp.asarray(added["text_embeds"]), jnp.asarray(added["time_ids"])
        if text_embeds.shape != (batch, cfg.text_embeds_dim) or time_ids.shape != (batch, cfg.num_time_ids):
            raise ValueError(f"added_cond_kwargs: text_embeds {text_embeds.shape} and time_ids {time_ids.shape}; "
                             f"expected ({batch}, {cfg.text_embeds_dim}) and ({batch}, {cfg.num_time_ids})")
        time_embeds = sinusoid(time_ids.reshape(-1), cfg.addition_time_embed_dim).reshape(batch, -1)
        add = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1).astype(dtype)
        # diffusers builds add_embedding with TimestepEmbedding's default activation (silu), whatever act_fn is
        emb = emb + MLPEmbedder(cfg.time_embed_dim, name="add_embedding", **{**kw, "act_fn": "silu"})(add)
    return emb
