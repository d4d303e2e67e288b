"""``bifrost aot --phase text-decode``: one KV-cached decode step of the understanding path at full size.

The body of ``sample/text.py``'s decode loop: B rows each feed one token through the Qwen2.5-VL language model
(``QwenVLForConditionalGeneration.forward_cached``) against a cache of ``cache_length`` keys/values per layer, and
update the cache in place (donated). Per-chip memory (weights + cache) and the compiler's step time give
tokens/s = B / step time. The vision tower runs once per image before decoding and is not part of the step.

Config (``configs/full/text_decode_aot.py``): an ``mllm`` component section (``config.text``: the language model;
``vision``: the ViT config the module is built with; dtypes, ``scan_layers``), ``decode.batch`` (rows per step;
default one per batch shard) and ``decode.cache_length`` (prompt + generated tokens), ``mesh``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding

from bifrost_jax.aot.report import AotTarget
from bifrost_jax.components import module_kwargs
from bifrost_jax.components.model_config import resolve_model_config
from bifrost_jax.models import flops as F
from bifrost_jax.models.qwen.decoder import QwenTextConfig
from bifrost_jax.models.qwen.vision import QwenVisionConfig
from bifrost_jax.models.qwen.vl import QwenVLConfig, QwenVLForConditionalGeneration
from bifrost_jax.parallel.rules import abstract_variables, logical_to_mesh_spec


def _sds(mesh: Mesh, shape, dtype, logical):
    sharding = NamedSharding(mesh, logical_to_mesh_spec(logical))
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding), sharding


def text_decode_target(config: ml_collections.ConfigDict, mesh: Mesh) -> AotTarget:
    """(jitted step, abstract args) of one cached decode step of the Qwen2.5-VL language model."""
    s = config.mllm
    text = QwenTextConfig(**resolve_model_config(s.config.text, key="config.mllm.config.text", kind="qwen_text",
                                                 port_dir=s.get("port_dir", "") or ""))
    vision = QwenVisionConfig.from_hf_config(dict(config.vision.config))
    module = QwenVLForConditionalGeneration(QwenVLConfig(vision=vision, text=text), kv_cache=True,
                                            **module_kwargs(s))
    rows = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    d = config.get("decode", ml_collections.ConfigDict())
    b, length = int(d.get("batch", 0) or rows), int(d.get("cache_length", 1024))
    if b % rows:
        raise ValueError(f"decode.batch={b} does not shard over data*fsdp={rows} devices of this mesh")

    m = vision.spatial_merge_size
    dummy = (jnp.full((1, 1), module.config.image_token_id, jnp.int32), None,
             jnp.zeros((1, m * m, vision.patch_dim), jnp.float32), (1, m, m))
    plain = module.clone(kv_cache=False)  # the same parameters; the cached layers are only for forward_cached
    params = abstract_variables(lambda r: plain.init(r, *dummy[:3], dummy[3]), mesh)
    param_sh = jax.tree.map(lambda a: a.sharding, params)
    dtype = jnp.dtype(module.dtype)
    cache_shape = (text.num_hidden_layers, b, length, text.num_key_value_heads, text.head_dim)
    cache_axes = (None, "batch", None, "act_heads", None)
    k_arg, k_sh = _sds(mesh, cache_shape, dtype, cache_axes)
    v_arg, v_sh = _sds(mesh, cache_shape, dtype, cache_axes)
    tok_arg, tok_sh = _sds(mesh, (b, 1), jnp.int32, ("batch", None))
    pos_arg, pos_sh = _sds(mesh, (3, b, 1), jnp.int32, (None, "batch", None))
    valid_arg, valid_sh = _sds(mesh, (b, length), jnp.bool_, ("batch", None))
    slot_arg, slot_sh = _sds(mesh, (), jnp.int32, ())

    def step(variables, token, position, valid, k_cache, v_cache, slot):
        x = module.apply(variables, token, method=module.embed_inputs)
        mask = jnp.concatenate([valid, jnp.ones((b, 1), bool)], axis=1)[:, None, None, :]
        logits, (k, v) = module.apply(variables, x, position, mask, k_cache, v_cache, method=module.forward_cached)
        k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), slot, axis=2)
        v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), slot, axis=2)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), k_cache, v_cache

    fn = jax.jit(step, in_shardings=(param_sh, tok_sh, pos_sh, valid_sh, k_sh, v_sh, slot_sh),
                 out_shardings=(NamedSharding(mesh, logical_to_mesh_spec(("batch",))), k_sh, v_sh),
                 donate_argnums=(4, 5))
    # analytic: every layer's projections and MLP on the B new tokens, attention over the cache (+ the new key), the
    # LM head; the vision tower is not in the step
    width = text.num_attention_heads * text.head_dim
    layer = F.qwen_layer_matmul(text, b) + F.attention(b, 1, length + 1, width)
    analytic = F.FlopsBreakdown((F.Part("qwen layers (decode step)", layer * text.num_hidden_layers, "forward"),
                                 F.Part("lm head", F.dense(b, text.hidden_size, text.vocab_size), "forward")),
                                f"text-decode, batch {b}, cache {length}")
    n_params = sum(x.size for x in jax.tree.leaves(params["params"]["language_model"]))
    return AotTarget(fn=fn, args=(params, tok_arg, pos_arg, valid_arg, k_arg, v_arg, slot_arg),
                     description=f"text-decode: one cached decode step of {b} rows against {length} cached tokens "
                                 f"({n_params / 1e9:.2f}B language-model params, "
                                 f"{jnp.dtype(module.param_dtype).name} weights): tokens/s = {b} / step time",
                     analytic=analytic)
