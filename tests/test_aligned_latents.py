"""``benchmarks/aligned_latents.py`` (no training): each variant's controlnet / mllm configs take their latents
from the ViT it names, and variant (c)'s cache holds the VAE's latents on the CLIP grid, readable by both phases."""
import importlib.util
import json
import os

import flax.linen as nn
import numpy as np
import pytest

from bifrost_jax import demo
from bifrost_jax.data.latent_cache import cache_fields
from bifrost_jax.data.sources import image_source, load_clip_cache
from bifrost_jax.data.preprocess import crop_box, decode_image, resize_crop
from bifrost_jax.train.flux_phases import ControlNetPhase
from bifrost_jax.train.mllm_phase import MllmPhase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("aligned_latents", os.path.join(REPO, "benchmarks",
                                                                               "aligned_latents.py"))
al = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(al)

SMALL = ["--config.data.train_size=8", "--config.phases.controlnet.batch_size=8"]


def test_each_variant_reads_the_latents_it_names(tmp_path):
    d = demo.load_demo_config(["--config.cache_clip_latents=False"])
    und = os.path.join(str(tmp_path), "understanding", "checkpoints")
    for variant in al.VARIANTS.values():
        configs = al.variant_configs(d, str(tmp_path), variant, fast=True)
        vision = [configs[n].vision.init_from for n in ("controlnet", "mllm")]
        assert vision == ([und, und] if variant == "pretrained_vit" else ["", ""]), variant
        # the generation branch starts from the understanding language model in every variant
        assert configs["mllm"].mllm.base_init_from == und
        assert configs["controlnet"].flux.init_from == os.path.join(str(tmp_path), "flux", "checkpoints")
        cached = [configs[n].data.precomputed_clip_latents for n in ("controlnet", "mllm")]
        # (c) always goes through the cache (the only way the phases read the VAE grid); (a), (b) as configured
        assert cached == ([demo.clip_cache_path(str(tmp_path))] * 2 if variant == "vae_latents" else ["", ""])
    with pytest.raises(ValueError, match="variant"):
        al.variant_configs(d, str(tmp_path), "clip", fast=True)


def test_vae_grid_is_space_to_depth_of_the_posterior_mean():
    rng = np.random.default_rng(0)
    configs = demo.phase_configs(demo.load_demo_config([]), "/nonexistent-demo-workdir")
    configs["controlnet"].vae.init_from = ""
    cn = ControlNetPhase(configs["controlnet"])
    vae = cn.vae.module
    variables = {"params": nn.meta.unbox(cn.vae.init(None))["params"]}
    pixels = rng.integers(0, 256, (2, cn.resolution, cn.resolution, 3), dtype=np.uint8)
    got = np.asarray(al.vae_grid_latents(vae, variables, pixels, cn.clip_grid))
    assert got.shape == (2, cn.clip_grid[0] * cn.clip_grid[1], cn.clip_latent_dim)  # (2, 16, 64): the ViT's N x C
    mean, _ = vae.apply(variables, al.pixels_to_unit(pixels), method=vae.encode)
    z = np.asarray(vae.config.latents_to_diffusion(mean))  # (2, 16, 16, 4)
    k = z.shape[1] // cn.clip_grid[0]
    for i, j in ((0, 0), (1, 2), (3, 3)):
        np.testing.assert_allclose(got[:, i * cn.clip_grid[1] + j], z[:, i * k:(i + 1) * k, j * k:(j + 1) * k]
                                   .reshape(2, -1), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="channels per token"):
        al.check_vae_grid(vae.config, cn.resolution, cn.clip_grid, cn.clip_latent_dim + 1)


def test_vae_grid_cache_is_read_by_both_phases(tmp_path):
    w = str(tmp_path)
    configs = al.variant_configs(demo.load_demo_config(SMALL), w, "vae_latents", fast=True)
    configs["controlnet"].vae.init_from = ""  # the fixed-key VAE (no vae phase trained here)
    info = al.build_vae_grid_cache(configs["mllm"], configs["controlnet"])
    path = configs["mllm"].data.precomputed_clip_latents
    assert info["latent_source"].startswith("VAE") and info["shape"] == [8, 16, 64]
    with open(path + ".json") as fh:
        assert json.load(fh)["latent_source"] == info["latent_source"]
    # row i = the VAE grid of training image i's VAE view (the phases look rows up by source index)
    cn = ControlNetPhase(configs["controlnet"])
    source = image_source(configs["controlnet"].data)
    image = decode_image(source[5]["image"])
    view = resize_crop(image, crop_box(image.width, image.height), cn.resolution)[None]
    variables = {"params": nn.meta.unbox(cn.vae.init(None))["params"]}
    expect = np.asarray(al.vae_grid_latents(cn.vae.module, variables, view, cn.clip_grid))[0]
    cache = np.load(path)
    np.testing.assert_allclose(cache[5], expect, rtol=1e-5, atol=1e-5)
    assert not np.allclose(cache[5], cache[6])
    # both phases accept it (shape and sidecar checks of data.precomputed_clip_latents)
    for name, cls in (("controlnet", ControlNetPhase), ("mllm", MllmPhase)):
        phase = cls(configs[name])
        load_clip_cache(path, 16, 64, len(source), cache_fields(configs[name], phase.vision, len(source)))
