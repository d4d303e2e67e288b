"""Sharding must never change values: every model family, params sharded by the logical rules on a
data=2 x fsdp=2 x tensor=2 mesh and run under ``axis_rules(mesh)`` (so every ``nn.with_logical_constraint`` is
live), equals the unsharded run.

Guards the XLA SPMD-partitioner miscompile worked around by ``nn.layers.fsdp_gathered`` (repro:
tests/repro_xla_spmd_3axis.py): without it the FLUX transformer with 3 or 4 heads was ~0.5 off.
Widths are >= 48 on purpose: the miscompile only shows once the partitioner picks the bad strategy (D=32 hides it).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_rel_err
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from bifrost_jax.nn import layers
from bifrost_jax.parallel.mesh import make_mesh
from bifrost_jax.parallel.rules import axis_rules, fit_sharding, tree_shardings

B = 4  # divisible by data * fsdp


def _random_variables(boxed_shapes):
    """Random values for every leaf (zero-init layers included; norm scales and BatchNorm variances around 1),
    drawn from the shapes alone: no init computation to compile."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(boxed_shapes))
    r = np.random.default_rng(1)
    leaves = []
    for path, x in flat:
        name = str(getattr(path[-1], "key", path[-1]))
        if not jnp.issubdtype(x.dtype, jnp.floating):
            leaves.append(jnp.zeros(x.shape, x.dtype))
            continue
        if name in ("scale", "var"):
            v = 1.0 + 0.1 * r.normal(size=x.shape)
        else:
            fan_in = int(np.prod(x.shape[:-1])) if len(x.shape) >= 2 else 1
            v = r.normal(size=x.shape) / np.sqrt(fan_in)
        leaves.append(jnp.asarray(v, x.dtype))
    return treedef.unflatten(leaves)


def _flux(heads, scan=False, single=1):
    from bifrost_jax.models.flux.transformer import FluxConfig, FluxTransformer2DModel
    cfg = FluxConfig(patch_size=1, in_channels=8, num_layers=1, num_single_layers=single, attention_head_dim=16,
                     num_attention_heads=heads, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True,
                     axes_dims_rope=(4, 6, 6))
    r = np.random.default_rng(0)
    s, t = 24, 7
    inp = dict(hidden_states=r.normal(size=(B, s, 8)), encoder_hidden_states=r.normal(size=(B, t, 16)),
               pooled_projections=r.normal(size=(B, 8)), timestep=np.array([0.3, 0.7, 0.1, 0.9]),
               img_ids=r.integers(0, 5, size=(s, 3)).astype(np.float64), txt_ids=np.zeros((t, 3)),
               guidance=np.full((B,), 3.5))
    return FluxTransformer2DModel(cfg, dtype=jnp.float32, scan_layers=scan), inp, None


def _controlnet():
    from bifrost_jax.models.flux.controlnet import FluxControlNetConfig, LatentControlNet
    cfg = FluxControlNetConfig(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
                               num_attention_heads=4, joint_attention_dim=16, pooled_projection_dim=8,
                               guidance_embeds=True, axes_dims_rope=(4, 6, 6), clip_latent_dim=32, clip_grid=(2, 3))
    module = LatentControlNet(cfg, dtype=jnp.float32)
    r = np.random.default_rng(0)
    inp = {k: (None if v is None else np.asarray(r.normal(size=v.shape)))
           for k, v in module.dummy_inputs(batch=B, txt_len=5).items()}
    inp["img_ids"] = r.integers(0, 5, size=inp["img_ids"].shape).astype(np.float64)
    return module, inp, None


def _qwen_text_config():
    from bifrost_jax.models.qwen.decoder import QwenTextConfig
    return QwenTextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=96, mrope_section=(2, 3, 3))


def _padded_mask(length):
    mask = np.ones((B, length), np.int32)
    mask[1, :3] = 0  # one left-padded row
    return mask


def _qwen_decoder():
    from bifrost_jax.models.qwen.decoder import QwenLanguageModel
    r = np.random.default_rng(0)
    inp = dict(input_ids=r.integers(0, 96, size=(B, 10)), attention_mask=_padded_mask(10))
    return QwenLanguageModel(_qwen_text_config(), dtype=jnp.float32), inp, None


def _bifrost():
    from bifrost_jax.models.bifrost import BifrostConfig, BifrostMLLM
    cfg = BifrostConfig(text=_qwen_text_config(), num_image_tokens=6, image_grid=(2, 3))
    r = np.random.default_rng(0)
    inp = dict(input_ids=r.integers(0, 96, size=(B, 8)), attention_mask=_padded_mask(8),
               clip_latents=r.normal(size=(B, 6, 64)), mask=r.random((B, 6)) < 0.6)
    return BifrostMLLM(cfg, dtype=jnp.float32), inp, None


def _vision():
    from bifrost_jax.models.qwen.vision import QwenVisionConfig, QwenVisionTransformer
    cfg = QwenVisionConfig(depth=2, hidden_size=64, num_heads=4, intermediate_size=96, out_hidden_size=64,
                           window_size=56, fullatt_block_indexes=(1,))
    r = np.random.default_rng(0)
    inp = dict(pixel_values=r.normal(size=(B, 4 * 8, cfg.patch_dim)), grid_thw=(1, 4, 8))
    return QwenVisionTransformer(cfg, dtype=jnp.float32), inp, ("grid_thw",)


def _t5():
    from bifrost_jax.models.text.t5 import T5EncoderConfig, T5EncoderModel
    cfg = T5EncoderConfig(vocab_size=96, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                          feed_forward_proj="gated-gelu")
    r = np.random.default_rng(0)
    inp = dict(input_ids=r.integers(0, 96, size=(B, 10)), attention_mask=_padded_mask(10))
    return T5EncoderModel(cfg, dtype=jnp.float32), inp, None


def _clip():
    from bifrost_jax.models.text.clip import CLIPTextConfig, CLIPTextModel
    cfg = CLIPTextConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, eos_token_id=95)
    r = np.random.default_rng(0)
    ids = r.integers(0, 95, size=(B, 10))
    ids[:, 7] = 95
    return CLIPTextModel(cfg, dtype=jnp.float32), dict(input_ids=ids), None


def _vae():
    from bifrost_jax.models.flux.vae import AutoencoderKL, AutoencoderKLConfig
    cfg = AutoencoderKLConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4)
    r = np.random.default_rng(0)
    return AutoencoderKL(cfg, dtype=jnp.float32), dict(sample=r.normal(size=(B, 8, 12, 3))), None


_UNET = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             layers_per_block=1, cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
             transformer_layers_per_block=2)


def _unet_inputs():
    r = np.random.default_rng(0)
    return dict(sample=r.normal(size=(B, 8, 12, 4)), timestep=r.uniform(0, 999, size=(B,)),
                encoder_hidden_states=r.normal(size=(B, 6, 32)))


def _unet(scan):
    from bifrost_jax.models.unet import UNet2DConditionConfig, UNet2DConditionModel
    cfg = UNet2DConditionConfig(**_UNET, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                use_linear_projection=scan)
    return UNet2DConditionModel(cfg, dtype=jnp.float32, scan_layers=scan), _unet_inputs(), None


def _unet_controlnet():
    from bifrost_jax.models.unet import LatentUNetControlNet, UNetControlNetConfig
    cfg = UNetControlNetConfig(**_UNET, conditioning_embedding_out_channels=(16, 8), clip_latent_dim=8,
                               clip_grid=(2, 3))
    inp = {**_unet_inputs(), "controlnet_cond": np.random.default_rng(1).normal(size=(B, 6, 8))}
    return LatentUNetControlNet(cfg, dtype=jnp.float32), inp, None


CASES = {"flux_3_heads": lambda: _flux(3, single=0), "flux_4_heads": lambda: _flux(4),
         "flux_4_heads_scanned": lambda: _flux(4, scan=True), "latent_controlnet": _controlnet,
         "qwen_decoder": _qwen_decoder, "bifrost_mllm": _bifrost, "qwen_vit": _vision, "t5": _t5, "clip": _clip,
         "vae": _vae, "unet_scanned": lambda: _unet(True), "latent_unet_controlnet": _unet_controlnet}


def _as_arrays(inp, static, mesh=None):
    """float64 -> float32 jnp arrays; with a mesh, batch-leading inputs go in batch-sharded over (data, fsdp)."""
    out = {}
    for k, v in inp.items():
        if v is None or k in (static or ()):
            out[k] = v
            continue
        v = np.asarray(v)
        v = v.astype(np.float32) if v.dtype == np.float64 else v
        if mesh is not None and v.ndim >= 1 and v.shape[0] == B:
            out[k] = jax.device_put(v, NamedSharding(mesh, P(("data", "fsdp"))))
        else:
            out[k] = jnp.asarray(v)
    return out


def sharded_vs_unsharded(name: str) -> float:
    module, inp, static = CASES[name]()
    ref_inp = _as_arrays(inp, static)
    dyn = lambda d: {k: v for k, v in d.items() if k not in (static or ())}
    with_static = lambda kw: {**kw, **{k: inp[k] for k in (static or ())}}
    # shapes and logical axis names only (init itself would be one more compile)
    boxed = jax.eval_shape(lambda r, kw: module.init(r, **with_static(kw)), jax.random.PRNGKey(0), dyn(ref_inp))
    variables = _random_variables(boxed)

    def apply(v, kw):
        return module.apply(v, **with_static(kw))

    ref = jax.jit(apply)(variables, dyn(ref_inp))

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = tree_shardings(nn.get_partition_spec(boxed), mesh)
    sharded = jax.tree.map(lambda x, s: jax.device_put(x, fit_sharding(s, x.shape)), variables, shardings)
    with axis_rules(mesh):
        out = jax.jit(apply)(sharded, dyn(_as_arrays(inp, static, mesh)))
    return max(max_rel_err(o, r) for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_equals_unsharded(name):
    err = sharded_vs_unsharded(name)
    assert err <= 1e-5, f"{name}: sharded on a 2x2x2 mesh under the rules differs from unsharded by {err:.3g}"


def test_fsdp_gathered_is_noop_without_mesh():
    x = jnp.arange(8.0).reshape(2, 4)
    assert layers.fsdp_gathered(x, ("embed", "mlp")) is x
    with axis_rules():  # rules but no mesh
        assert layers.fsdp_gathered(x, ("embed", "mlp")) is x
