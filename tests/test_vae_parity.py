"""FLUX VAE (diffusers AutoencoderKL): encode/decode parity with a tiny random diffusers model, export round trip,
port errors, old attention key names, config handling, and FLUX latent packing against FluxPipeline."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_rel_err
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

import bifrost_jax.port as port
from bifrost_jax.models.flux.vae import (AutoencoderKL, AutoencoderKLConfig, latent_image_ids, pack_latents,
                                         sample_posterior_latents, unpack_latents)
from bifrost_jax.port.base import PortError, SafetensorsReader, write_safetensors

TINY = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[32, 64], layers_per_block=2,
            norm_num_groups=8, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
            use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
            sample_size=32)
IMG_H, IMG_W, BATCH = 24, 40, 2  # non-square; latents 12x20


def _torch_vae(seed=0, **overrides):
    torch.manual_seed(seed)
    model = TorchAutoencoderKL(**{**TINY, **overrides}).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norm scales/biases and conv/linear biases: make none of them trivial
                base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            else:  # keep default fan-in scaling so activations stay O(1), but re-draw
                p.copy_(torch.randn(p.shape, generator=g) * p.std())
    return model


@pytest.fixture(scope="module")
def flux_like(tmp_path_factory):
    model = _torch_vae()
    path = str(tmp_path_factory.mktemp("vae"))
    model.save_pretrained(path)
    module, variables = port.load("flux-vae", path, dtype=jnp.float32)
    return model, path, module, variables


def _image(seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, (BATCH, IMG_H, IMG_W, 3)).astype(np.float32)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t):
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def _check_encode_decode(model, module, variables, tag):
    x = _image()
    with torch.no_grad():
        post = model.encode(_nchw(x)).latent_dist
        ref_mean, ref_logvar = _nhwc(post.mean), _nhwc(post.logvar)
    mean, logvar = module.apply(variables, jnp.asarray(x), method=module.encode)
    e_mean, e_logvar = max_rel_err(mean, ref_mean), max_rel_err(logvar, ref_logvar)
    z = np.random.default_rng(2).standard_normal((BATCH, IMG_H // 2, IMG_W // 2, 16)).astype(np.float32)
    with torch.no_grad():
        ref_img = _nhwc(model.decode(_nchw(z)).sample)
    img = module.apply(variables, jnp.asarray(z), method=module.decode)
    e_dec = max_rel_err(img, ref_img)
    with torch.no_grad():
        ref_full = _nhwc(model(_nchw(x)).sample)
    e_full = max_rel_err(module.apply(variables, jnp.asarray(x)), ref_full)
    print(f"[{tag}] encode mean {e_mean:.2e} logvar {e_logvar:.2e} decode {e_dec:.2e} forward {e_full:.2e}")
    assert e_mean <= 1e-4 and e_logvar <= 1e-4 and e_dec <= 1e-4 and e_full <= 1e-4
    return ref_img


def test_encode_decode_parity(flux_like):
    model, _, module, variables = flux_like
    assert module.config.scaling_factor == 0.3611 and module.config.shift_factor == 0.1159
    _check_encode_decode(model, module, variables, "flux-like")


def test_general_config_quant_convs_no_attention(tmp_path):
    model = _torch_vae(3, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=False,
                       block_out_channels=[16, 32, 32], latent_channels=4,
                       down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3)
    model.save_pretrained(str(tmp_path))
    module, variables = port.load("flux-vae", str(tmp_path))
    assert "quant_conv" in variables["params"] and "attentions_0" not in variables["params"]["decoder"]["mid_block"]
    x = _image(5)
    with torch.no_grad():
        post = model.encode(_nchw(x)).latent_dist
        ref_img = _nhwc(model.decode(post.mean).sample)
    mean, logvar = module.apply(variables, jnp.asarray(x), method=module.encode)
    errs = (max_rel_err(mean, _nhwc(post.mean)), max_rel_err(logvar, _nhwc(post.logvar)),
            max_rel_err(module.apply(variables, mean, method=module.decode), ref_img))
    print("[quant convs, no attention] encode mean %.2e logvar %.2e decode %.2e" % errs)
    assert max(errs) <= 1e-4


def test_export_round_trip(flux_like, tmp_path):
    model, _, module, variables = flux_like
    out = str(tmp_path / "exported")
    port.save("flux-vae", module, variables, out)
    reloaded = TorchAutoencoderKL.from_pretrained(out).eval()
    sd0, sd1 = model.state_dict(), reloaded.state_dict()
    assert set(sd0) == set(sd1)
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k
    assert dict(reloaded.config)["shift_factor"] == 0.1159
    z = _nchw(np.random.default_rng(7).standard_normal((1, 12, 20, 16)).astype(np.float32))
    with torch.no_grad():
        assert torch.equal(model.decode(z).sample, reloaded.decode(z).sample)


def _rewrite(src_dir, dst_dir, edit):
    os.makedirs(dst_dir, exist_ok=True)
    reader = SafetensorsReader(src_dir, prefix="diffusion_pytorch_model")
    tensors = edit({k: np.array(reader.get(k)) for k in reader.keys()})
    write_safetensors(os.path.join(dst_dir, "diffusion_pytorch_model.safetensors"), tensors)
    with open(os.path.join(src_dir, "config.json")) as f, open(os.path.join(dst_dir, "config.json"), "w") as g:
        g.write(f.read())
    return dst_dir


def test_port_errors_name_the_keys(flux_like, tmp_path):
    _, path, _, _ = flux_like
    gone = "decoder.up_blocks.1.resnets.2.norm2.weight"
    missing = _rewrite(path, str(tmp_path / "missing"), lambda t: {k: v for k, v in t.items() if k != gone})
    with pytest.raises(PortError, match=r"missing keys \(1\): " + gone.replace(".", r"\.")):
        port.load("flux-vae", missing)
    extra = _rewrite(path, str(tmp_path / "extra"), lambda t: {**t, "encoder.stray.weight": np.zeros(3, np.float32)})
    with pytest.raises(PortError, match=r"unexpected keys \(1\): encoder\.stray\.weight"):
        port.load("flux-vae", extra)
    shape_key = "encoder.conv_in.weight"
    wrong = _rewrite(path, str(tmp_path / "wrong"), lambda t: {**t, shape_key: np.zeros((32, 3, 1, 1), np.float32)})
    with pytest.raises(PortError, match=r"wrong-shape keys.*encoder\.conv_in\.weight"):
        port.load("flux-vae", wrong)


@pytest.mark.parametrize("conv1x1", [False, True])
def test_old_attention_key_names(flux_like, tmp_path, conv1x1):
    model, path, module, variables = flux_like
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def rename(tensors):
        out = {}
        for k, v in tensors.items():
            for new, old in names.items():
                if ".attentions.0." in k and f".{new}." in k:
                    k = k.replace(f".{new}.", f".{old}.")
                    if conv1x1 and v.ndim == 2:
                        v = v[:, :, None, None]
            out[k] = v
        return out

    old_dir = _rewrite(path, str(tmp_path / "old"), rename)
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in SafetensorsReader(old_dir).keys()
    _, old_vars = port.load("flux-vae", old_dir)
    for a, b in zip(jax.tree.leaves(old_vars), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(a, b)


def test_config_rejects_unsupported_fields():
    with pytest.raises(ValueError, match="unsupported field.*'foo'"):
        AutoencoderKLConfig.from_hf_config({**TINY, "foo": 1})
    with pytest.raises(ValueError, match="down_block_types.*AttnDownEncoderBlock2D"):
        AutoencoderKLConfig.from_hf_config({**TINY, "down_block_types": ["DownEncoderBlock2D",
                                                                          "AttnDownEncoderBlock2D"]})
    with pytest.raises(ValueError, match="norm_num_groups"):
        AutoencoderKLConfig.from_hf_config({**TINY, "norm_num_groups": 5})
    cfg = AutoencoderKLConfig.from_hf_config({**TINY, "_class_name": "AutoencoderKL", "_diffusers_version": "0.30"})
    back = cfg.to_hf_config()
    assert back["block_out_channels"] == [32, 64] and back["use_quant_conv"] is False
    assert AutoencoderKLConfig.from_hf_config(back) == cfg
    # The default config is FLUX.1's VAE.
    flux = AutoencoderKLConfig()
    assert flux.block_out_channels == (128, 256, 512, 512) and flux.latent_channels == 16
    assert not flux.use_quant_conv and not flux.use_post_quant_conv and flux.downsample_factor == 8


def test_latent_normalisation():
    cfg = AutoencoderKLConfig()
    z = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 6, 16)), jnp.float32)
    x = cfg.latents_to_diffusion(z)
    np.testing.assert_allclose(x, (z - 0.1159) * 0.3611, rtol=1e-6)
    np.testing.assert_allclose(cfg.diffusion_to_latents(x), z, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="latents_mean"):
        AutoencoderKLConfig(latents_mean=(0.0,) * 16).latents_to_diffusion(z)


def test_remat_and_bf16():
    # Remat changes what the backward pass recomputes, never the values; a smaller model keeps compiles short.
    small = AutoencoderKLConfig(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4, latent_channels=4)
    plain = AutoencoderKL(small, dtype=jnp.float32)
    remat = AutoencoderKL(AutoencoderKLConfig(**{**small.__dict__, "remat_policy": "full"}), dtype=jnp.float32)
    z = jnp.asarray(np.random.default_rng(3).standard_normal((1, 4, 6, 4)), jnp.float32)
    shapes = nn.meta.unbox(jax.eval_shape(plain.init, jax.random.PRNGKey(0), jnp.zeros((1, 4, 6, 3))))["params"]
    rng = np.random.default_rng(4)
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32), shapes)

    def loss(p, m):
        return jnp.sum(m.apply({"params": p}, z, method=m.decode) ** 2)

    (l0, g0), (l1, g1) = (jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, m) for m in (plain, remat))
    assert abs(float(l1 - l0)) <= 1e-6 * abs(float(l0))
    # Relative to the largest gradient: the to_k bias has a (mathematically) zero gradient, pure rounding noise.
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g0))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale)
    # bf16 compute with fp32 parameters stays close to fp32.
    bf16 = AutoencoderKL(small, dtype=jnp.bfloat16)
    out = bf16.apply({"params": params}, z, method=bf16.decode)
    ref = plain.apply({"params": params}, z, method=plain.decode)
    assert out.dtype == jnp.bfloat16 and max_rel_err(out, ref) < 5e-2


def test_sample_posterior(flux_like):
    _, _, module, variables = flux_like
    x = jnp.asarray(_image(9))
    mean, logvar = module.apply(variables, x, method=module.encode)
    rng = jax.random.PRNGKey(4)
    z = sample_posterior_latents(mean, logvar, rng)
    eps = jax.random.normal(rng, mean.shape)
    np.testing.assert_allclose(z, mean + jnp.exp(0.5 * logvar) * eps, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(z - mean))) > 1e-3
    sampled = module.apply(variables, x, sample_posterior=True, rng=rng)
    np.testing.assert_allclose(sampled, module.apply(variables, z, method=module.decode), rtol=1e-5, atol=1e-5)


def test_pack_unpack_ids_match_diffusers():
    b, c, h, w = 2, 16, 6, 10
    z = np.random.default_rng(0).standard_normal((b, h, w, c)).astype(np.float32)
    ref = FluxPipeline._pack_latents(_nchw(z), b, c, h, w).numpy()
    packed = pack_latents(jnp.asarray(z))
    np.testing.assert_array_equal(packed, ref)
    vae_scale = 8
    ref_unpacked = _nhwc(FluxPipeline._unpack_latents(torch.from_numpy(ref), h * vae_scale, w * vae_scale,
                                                      vae_scale))
    np.testing.assert_array_equal(unpack_latents(packed, h, w), ref_unpacked)
    np.testing.assert_array_equal(unpack_latents(packed, h, w), z)
    ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(latent_image_ids(h // 2, w // 2), ids)
    with pytest.raises(ValueError, match="must be even"):
        pack_latents(jnp.zeros((1, 3, 4, 16)))


def test_sharded_load(flux_like):
    from bifrost_jax.parallel.mesh import make_mesh

    _, path, _, variables = flux_like
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, sharded = port.load("flux-vae", path, mesh=mesh)
    enc = sharded["params"]["encoder"]
    assert enc["down_blocks_1"]["resnets_0"]["conv1"]["kernel"].sharding.spec[3] == "tensor"
    to_q = enc["mid_block"]["attentions_0"]["to_q"]["kernel"]
    assert to_q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
