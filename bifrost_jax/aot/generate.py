"""``bifrost aot --phase generate``: compile ONE step of each sampling loop of the Bifrost-1 pipeline at full size.

One program holding both steps (their weights are resident together when generating):

* one MAR decode step of the MLLM (``BifrostMLLM.decode_images``): the N image slots of 2B rows ([uncond; cond]
  when ``sample.mllm_cfg != 1``, else B) against a cached text prefix (per-layer K/V of ``max_prompt_length``
  tokens), with the CFG combination, as the body of ``sample.mar._mar_decode``;
* one FLUX + latent-ControlNet Euler step (``sample.pipeline.flux_velocity_fn``): ControlNet residuals from the
  precomputed condition embedding, FLUX with them, ``x + (sigma_next - sigma) * v``.

The config is a generation config (the component sections of ``configs/generate_tiny.py`` / the training configs:
``mllm``, ``flux``, ``controlnet`` with their model configs, dtypes and ``scan_layers``; ``mllm.max_prompt_length``,
``t5.max_length``, ``sample.mllm_cfg``) plus ``mesh`` (``config.mesh`` sizes) and ``generate_batch`` (images per
step; default one per batch shard). ``configs/full/generate_aot.py`` is that config at full size (Qwen2.5-VL-7B + FLUX.1-dev,
512 px). Weights are abstract (``jax.ShapeDtypeStruct`` with their shardings): nothing is allocated.

Listed in ``bifrost_jax/aot/targets.py`` as ``"generate"``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding

from bifrost_jax.aot.report import AotTarget
from bifrost_jax.components import flux_component
from bifrost_jax.components.bifrost import latent_controlnet_component, mllm_component
from bifrost_jax.models import flops as F
from bifrost_jax.models.flux.vae import latent_image_ids
from bifrost_jax.parallel.rules import abstract_variables, logical_to_mesh_spec
from bifrost_jax.sample.pipeline import flux_velocity_fn


def _abstract_variables(init_fn, mesh: Mesh):
    """(abstract variables with shardings, their shardings)."""
    abstract = abstract_variables(init_fn, mesh)
    return abstract, jax.tree.map(lambda a: a.sharding, abstract)


def _sds(mesh: Mesh, shape, dtype, logical):
    sharding = NamedSharding(mesh, logical_to_mesh_spec(logical))
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding), sharding


def batch_size(config: ml_collections.ConfigDict, mesh: Mesh) -> int:
    """``config.generate_batch`` images per step (0: one per batch shard), checked against the mesh."""
    rows = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    b = int(config.get("generate_batch", 0) or rows)
    if b % rows:
        raise ValueError(f"generate_batch={b} does not shard over data*fsdp={rows} devices of this mesh")
    return b


@dataclasses.dataclass
class MarStep:
    """One MAR decode step of the MLLM against a cached text prefix, as the body of ``sample.mar._mar_decode``:
    ``fn(mllm_vars, k, v, attention_mask, tokens, masked) -> new tokens`` with its abstract arguments, their
    shardings, the analytic FLOPs part and a description."""
    fn: Callable
    args: tuple
    shardings: tuple
    tokens_sharding: Any
    analytic: F.Part
    description: str
    config: Any
    weight_dtype: str


def mar_step(config: ml_collections.ConfigDict, mesh: Mesh, b: int) -> MarStep:
    """The MAR decode step of ``config.mllm`` for ``b`` images (2b rows when ``sample.mllm_cfg != 1``)."""
    sample = config.get("sample", ml_collections.ConfigDict())
    cfg_weight = float(sample.get("mllm_cfg", 1.0))
    guided = cfg_weight != 1.0
    mllm_comp = mllm_component(config.mllm)
    mcfg, mllm = mllm_comp.config, mllm_comp.module
    dtype = mllm.dtype
    n, cdim, t = mcfg.num_image_tokens, mcfg.clip_dim, int(config.mllm.get("max_prompt_length", 300))
    mllm_vars, mllm_sh = _abstract_variables(mllm_comp.component.init, mesh)
    tc = mcfg.text
    rows_mar = 2 * b if guided else b
    kv_shape = (tc.num_hidden_layers, rows_mar, t, tc.num_key_value_heads, tc.head_dim)
    kv_axes = (None, "batch", None, "act_heads", None)
    k_arg, k_sh = _sds(mesh, kv_shape, dtype, kv_axes)
    v_arg, v_sh = _sds(mesh, kv_shape, dtype, kv_axes)
    am_arg, am_sh = _sds(mesh, (rows_mar, t), jnp.bool_, ("batch", None))
    tok_arg, tok_sh = _sds(mesh, (b, n, cdim), jnp.float32, ("batch", None, None))
    msk_arg, msk_sh = _sds(mesh, (b, n), jnp.bool_, ("batch", None))

    def fn(mllm_vars, k, v, attention_mask, tokens, masked):
        cache = {"k": k, "v": v, "attention_mask": attention_mask}
        if guided:
            pred = mllm.apply(mllm_vars, cache, jnp.concatenate([tokens, tokens]),
                              jnp.concatenate([masked, masked]), method=mllm.decode_images).astype(jnp.float32)
            uncond, cond_pred = jnp.split(pred, 2, axis=0)
            pred = uncond + cfg_weight * (cond_pred - uncond)
        else:
            pred = mllm.apply(mllm_vars, cache, tokens, masked, method=mllm.decode_images).astype(jnp.float32)
        return jnp.where(masked[..., None], pred, tokens)

    # the branch rows of the MAR step (text K/V cached), forward
    analytic = F.Part("mllm generation branch (decode step)", F.qwen_branch_rows(mcfg, rows_mar, t), "forward")
    desc = (f"one MAR decode step ({rows_mar} rows x {n} slots vs a {t}-token prefix, "
            f"{count_params(mllm_vars['params']) / 1e9:.2f}B params)")
    return MarStep(fn=fn, args=(mllm_vars, k_arg, v_arg, am_arg, tok_arg, msk_arg),
                   shardings=(mllm_sh, k_sh, v_sh, am_sh, tok_sh, msk_sh), tokens_sharding=tok_sh,
                   analytic=analytic, description=desc, config=mcfg,
                   weight_dtype=jnp.dtype(mllm.param_dtype).name)


def count_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def generate_target(config: ml_collections.ConfigDict, mesh: Mesh):
    """(jitted step, abstract args) of one MAR decode step + one FLUX/ControlNet Euler step."""

    for name in ("mllm", "flux", "controlnet"):
        if name not in config:
            raise ValueError(f"--phase generate: the config has no {name} section (use a generation config such as "
                             "configs/full/generate_aot.py or configs/generate_tiny.py)")
    b = batch_size(config, mesh)
    sample = config.get("sample", ml_collections.ConfigDict())
    guidance = float(sample.get("guidance", 3.5))
    cond_scale = float(sample.get("conditioning_scale", 1.0))
    mar = mar_step(config, mesh, b)
    mcfg = mar.config
    dtype = mar.args[1].dtype

    # ---- FLUX + latent ControlNet: one Euler step ----------------------------------------------------------------
    flux_comp = flux_component(config.flux, trainable=False)
    cn_comp = latent_controlnet_component(config.controlnet, flux_comp, mcfg.clip_dim, tuple(mcfg.image_grid))
    flux, cn = flux_comp.module, cn_comp.module
    fcfg, ccfg = flux.config, cn.config
    flux_vars, flux_sh = _abstract_variables(flux_comp.init, mesh)
    cn_vars, cn_sh = _abstract_variables(cn_comp.init, mesh)
    gh, gw = ccfg.clip_grid
    img_len = 4 * gh * gw
    txt_len = int(config.t5.get("max_length", 512)) if "t5" in config else 512
    x_arg, x_sh = _sds(mesh, (b, img_len, fcfg.in_channels), jnp.float32, ("batch", None, None))
    cond_arg, cond_sh = _sds(mesh, (b, img_len, ccfg.inner_dim), dtype, ("batch", None, None))
    pe_arg, pe_sh = _sds(mesh, (b, txt_len, fcfg.joint_attention_dim), dtype, ("batch", None, None))
    po_arg, po_sh = _sds(mesh, (b, fcfg.pooled_projection_dim), dtype, ("batch", None))
    sig_arg, sig_sh = _sds(mesh, (2,), jnp.float32, (None,))
    img_ids = latent_image_ids(2 * gh, 2 * gw)
    n_axes = len(fcfg.axes_dims_rope)

    def step(mllm_vars, k, v, attention_mask, tokens, masked, flux_vars, cn_vars, x, cond, prompt_embeds, pooled,
             sigmas):
        new_tokens = mar.fn(mllm_vars, k, v, attention_mask, tokens, masked)
        txt_ids = jnp.zeros((prompt_embeds.shape[1], n_axes), jnp.float32)
        velocity = flux_velocity_fn(flux, cn, flux_vars, cn_vars, cond, prompt_embeds, pooled, img_ids, txt_ids,
                                    guidance, cond_scale)
        vel = velocity(x, sigmas[0]).astype(jnp.float32)
        return new_tokens, x + (sigmas[1] - sigmas[0]) * vel

    args = mar.args + (flux_vars, cn_vars, x_arg, cond_arg, pe_arg, po_arg, sig_arg)
    in_sh = mar.shardings + (flux_sh, cn_sh, x_sh, cond_sh, pe_sh, po_sh, sig_sh)

    # compile_jitted traces under axis_rules(mesh) (the logical constraints of the models resolve there)
    fn = jax.jit(step, in_shardings=in_sh, out_shardings=(mar.tokens_sharding, x_sh))
    desc = (f"generate: {mar.description} + one FLUX+ControlNet Euler step (batch {b}, "
            f"{img_len} image + {txt_len} text tokens, {count_params(flux_vars) / 1e9:.2f}B + "
            f"{count_params(cn_vars) / 1e9:.2f}B params), {mar.weight_dtype} weights")

    # analytic: the MAR step + FLUX and the ControlNet without its condition embedding (precomputed once per
    # image); all forward
    analytic = F.FlopsBreakdown((
        mar.analytic,
        *F.controlnet_parts(ccfg, b, img_len, txt_len, mode="forward", condition=False),
        F.Part("flux transformer", F.flux_transformer(fcfg, b, img_len, txt_len), "forward")),
        f"generate: one MAR step + one Euler step, batch {b}")
    return AotTarget(fn=fn, args=args, description=desc, analytic=analytic)
