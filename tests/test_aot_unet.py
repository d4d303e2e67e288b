"""The full-size Stable Diffusion decoder configs (configs/full/sdxl_*.py, sd15_*.py) and ``bifrost aot --phase
generate-unet``: parameter counts of the full-size models from abstract shapes (nothing allocated) against the
released checkpoints' (SDXL base 1.0 UNet 2,567,463,684; SD1.5 UNet 859,520,964; CLIP ViT-L text 123,060,480;
OpenCLIP bigG text with projection 694,659,840; SD VAE 83,653,863), and the generation target on a tiny config:
its analytic FLOPs equal the traced program's (CPU mesh), and it compiles for a TPU topology where libtpu is
importable."""
import importlib.util
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

import bifrost_jax.train.phase_configs as pc
from bifrost_jax import aot
from bifrost_jax.aot.generate_unet import generate_unet_target
from bifrost_jax.configs import load_config_file
from bifrost_jax.parallel.rules import axis_rules
from bifrost_jax.train.registry import get_phase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def _counts(name):
    config = load_config_file(os.path.join(ROOT, "configs", "full", f"{name}.py"))
    phase = get_phase(config)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(phase.init_variables(jax.random.PRNGKey(0))))
    counts: dict = {}
    for k, v in traverse_util.flatten_dict(shapes["params"]).items():
        key = (str(k[0]), bool(phase.is_trainable(tuple(str(p) for p in k))))
        counts[key] = counts.get(key, 0) + int(np.prod(v.shape))
    return config, phase, counts, shapes["params"]


def _copied_encoder(counts_tree) -> int:
    return sum(int(np.prod(v.shape)) for k, v in traverse_util.flatten_dict(counts_tree).items()
               if k[0] in ("conv_in", "time_embedding", "add_embedding", "mid_block") or k[0].startswith("down_"))


@pytest.mark.parametrize("name,unet,clip_2", [("sdxl", 2_567_463_684, 694_659_840), ("sd15", 859_520_964, None)])
def test_full_sd_controlnet_configs(name, unet, clip_2):
    config, phase, n, shapes = _counts(f"{name}_controlnet")
    assert config.decoder == "unet" and config.phase == "controlnet"
    assert n[("unet", False)] == unet
    assert n[("clip", False)] == 123_060_480
    assert n.get(("clip_2", False)) == clip_2
    assert n[("vae", False)] == 83_653_863
    assert n[("vision", False)] == pytest.approx(0.677e9, abs=2e6)
    assert not any(trainable for (comp, trainable) in n if comp != "controlnet")
    # the ControlNet: a copy of the UNet's encoder + zero convs, condition embedding and upsampler
    assert n[("controlnet", True)] > _copied_encoder(shapes["unet"]) == _copied_encoder(shapes["controlnet"])
    # latents: SDXL 1024 px / 8 = 128 (2 condition stages from the 32x32 upsampled grid), SD1.5 512 / 8 = 64 (1)
    assert phase.latent_hw == {"sdxl": 128, "sd15": 64}[name]
    assert len(phase.controlnet.module.config.conditioning_embedding_out_channels) - 1 == {"sdxl": 2, "sd15": 1}[name]


def _tiny_generate_unet_config(mesh: dict, guidance_scale: float = 5.0, sdxl: bool = True):
    """A tiny SDXL-style (text_time, two text encoders) generation config as ``--phase generate-unet`` reads it."""
    c = ml_collections.ConfigDict(dict(mesh=mesh, generate_batch=0))
    unet = dict(pc.TINY_UNET)
    clip_2 = None
    if sdxl:
        clip_2 = dict(pc.TINY_CLIP, projection_dim=16)
        unet.update(cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=16 + 6 * 8)
    pc.add_unet_family(c, unet=unet, vae=pc.TINY_VAE, clip=pc.TINY_CLIP, clip_2=clip_2, clip_max_length=8,
                       unet_kw=dict(dtype="bfloat16"))
    c.mllm = pc.tiny_mllm_section()
    c.controlnet = pc.unet_controlnet_section(conditioning_embedding_out_channels=(16, 16))
    # tiny MLLM 4x4 grid -> upsampler 8x8 -> one 2x stage -> 16x16 latents = the 32 px VAE view
    c.data = ml_collections.ConfigDict(dict(vae_resolution=32))
    c.sample = ml_collections.ConfigDict(dict(mllm_cfg=2.0, guidance=guidance_scale, conditioning_scale=0.7,
                                              flux_steps=10))  # the default sampler, DPM-Solver++
    return c


@pytest.mark.parametrize("scale,sdxl", [(5.0, True), (1.0, False)])
def test_generate_unet_target_tiny_traces_on_cpu_mesh(scale, sdxl):
    """Built on a CPU mesh: its analytic FLOPs (the MAR branch rows, the ControlNet without its precomputed
    condition and the UNet on [uncond; cond] with guidance, on cond alone at scale 1) equal the traced matmul and
    convolution FLOPs."""
    config = _tiny_generate_unet_config({"data": 1, "fsdp": 2, "tensor": 1}, scale, sdxl)
    mesh = aot.make_topology_mesh("cpu:2", dict(config.mesh))
    target = generate_unet_target(config, mesh)
    with axis_rules(mesh):
        counted = aot.count_flops(target.fn.trace(*target.args).jaxpr).flops
    assert counted == pytest.approx(target.analytic.total, rel=1e-6)
    assert ("[uncond; cond]" in target.description) == (scale != 1.0)


def test_generate_unet_target_refuses_a_flux_config():
    config = load_config_file(os.path.join(ROOT, "configs", "full", "generate_aot.py"))
    mesh = aot.make_topology_mesh("cpu:2", {"fsdp": 2})
    with pytest.raises(ValueError, match="no unet section"):
        generate_unet_target(config, mesh)


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_tpu_generate_unet_tiny_compiles():
    config = _tiny_generate_unet_config({"data": 1, "fsdp": -1, "tensor": 1})
    report = aot.compile_target("generate-unet", config, "v5p:2x2x1")
    assert report.platform == "tpu" and report.fits is True and report.xla_seconds and report.mfu is not None
