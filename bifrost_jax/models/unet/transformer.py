"""The UNet's spatial transformer, NHWC: diffusers ``Transformer2DModel`` (continuous input) holding
``BasicTransformerBlock`` s: LayerNorm -> self-attention, LayerNorm -> cross-attention on the text, LayerNorm ->
GEGLU feed-forward, each residual.

GroupNorm (eps 1e-6) -> proj_in (a 1x1 conv for SD1.x, a Linear with ``use_linear_projection`` for SD2.x/SDXL) ->
blocks over the H*W tokens -> proj_out -> + input. The blocks of one transformer (SDXL has up to 10) run as a Python
loop (``transformer_blocks_{i}``) or one ``nn.scan`` (``transformer_blocks``, stacked parameters); both give the same
outputs and both layouts port. Attention goes through ``nn.attention.dot_product_attention``.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from bifrost_jax.models.flux.vae import IMAGE_AXES, Conv2d
from bifrost_jax.nn.attention import dot_product_attention
from bifrost_jax.nn.layers import Dense, GroupNorm, LayerNorm
from bifrost_jax.nn.stack import maybe_remat, scanned, stack_name

Dtype = Any
TOKEN_AXES = ("batch", "length", "act_embed")


class Attention(nn.Module):
    """diffusers ``Attention`` as the UNet uses it: q/k/v without bias, ``to_out.0`` with bias, scale
    1/sqrt(head_dim). Self-attention without ``context``; cross-attention on ``context`` otherwise. ``mask``:
    (B, S) key validity for the cross-attention (True = attend)."""
    heads: int
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    implementation: Optional[str] = None

    @nn.compact
    def __call__(self, x, context=None, mask=None):
        b, l, c = x.shape
        d = c // self.heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        kv_in = x if context is None else context.astype(self.dtype)
        proj = lambda n: Dense(c, use_bias=False, kernel_axes=("embed", "heads"), name=n, **kw)  # noqa: E731
        split = lambda t: nn.with_logical_constraint(  # noqa: E731
            t.reshape(b, t.shape[1], self.heads, d), ("batch", "length", "act_heads", "act_kv"))
        q, k, v = split(proj("to_q")(x)), split(proj("to_k")(kv_in)), split(proj("to_v")(kv_in))
        dense_mask = None if mask is None else jnp.asarray(mask).astype(bool)[:, None, None, :]
        o = dot_product_attention(q, k, v, mask=dense_mask, scale=d ** -0.5, implementation=self.implementation)
        o = checkpoint_name(o, "attn_out")
        return Dense(c, kernel_axes=("heads", "embed"), name="to_out_0", **kw)(o.reshape(b, l, c))


class GEGLU(nn.Module):
    """diffusers ``GEGLU``: ``proj`` (C -> 2 * inner), value * gelu(gate) (exact gelu)."""
    inner: int
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = Dense(2 * self.inner, kernel_axes=("embed", "mlp"), name="proj", dtype=self.dtype,
                  param_dtype=self.param_dtype)(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return nn.with_logical_constraint(value * jax.nn.gelu(gate, approximate=False), ("batch", "length", "act_mlp"))


class GEGLUFeedForward(nn.Module):
    """diffusers ``FeedForward(activation_fn="geglu")``: ``net.0`` the GEGLU (C -> 4C), ``net.2`` (4C -> C)."""
    mult: int = 4
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(self.mult * c, name="net_0", **kw)(x)
        return Dense(c, kernel_axes=("mlp", "embed"), name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
    """x + attn1(LN1(x)); x + attn2(LN2(x), context); x + ff(LN3(x)). Returns ``(x, None)`` for nn.scan."""
    heads: int
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    implementation: Optional[str] = None

    @nn.compact
    def __call__(self, x, context, mask):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(heads=self.heads, implementation=self.implementation, **kw)
        norm = lambda n: LayerNorm(eps=1e-5, name=n, **kw)  # noqa: E731
        x = x + Attention(**attn, name="attn1")(norm("norm1")(x))
        x = x + Attention(**attn, name="attn2")(norm("norm2")(x), context, mask)
        x = x + GEGLUFeedForward(name="ff", **kw)(norm("norm3")(x))
        return checkpoint_name(nn.with_logical_constraint(x, TOKEN_AXES), "block_out"), None


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in -> ``num_layers`` blocks -> proj_out, + the input (NHWC in and out)."""
    heads: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    implementation: Optional[str] = None

    @nn.compact
    def __call__(self, x, context, mask=None):
        b, hh, ww, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GroupNorm(self.groups, 1e-6, name="norm", **kw)(x)
        if self.use_linear_projection:
            h = Dense(c, kernel_axes=("embed", "mlp"), name="proj_in", **kw)(h.reshape(b, hh * ww, c))
        else:
            h = Conv2d(c, 1, name="proj_in", **kw)(h).reshape(b, hh * ww, c)
        h = nn.with_logical_constraint(h, TOKEN_AXES)
        block_kw = dict(heads=self.heads, implementation=self.implementation, **kw)
        if self.scan_layers:
            h, _ = scanned(BasicTransformerBlock, self.num_layers, remat=self.remat_policy)(
                **block_kw, name="transformer_blocks")(h, context, mask)
        else:
            block = maybe_remat(BasicTransformerBlock, self.remat_policy)
            for i in range(self.num_layers):
                h, _ = block(**block_kw, name=stack_name("transformer_blocks", i))(h, context, mask)
        if self.use_linear_projection:
            h = Dense(c, kernel_axes=("mlp", "embed"), name="proj_out", **kw)(h).reshape(b, hh, ww, c)
        else:
            h = Conv2d(c, 1, name="proj_out", **kw)(h.reshape(b, hh, ww, c))
        return nn.with_logical_constraint(h + x.astype(self.dtype), IMAGE_AXES)
