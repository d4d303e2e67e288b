"""The CLIP-latent cache (``bifrost cache-latents``, ``data/latent_cache.py``) on the tiny configs, 8 devices.

Built through the command line over 20 shapes images in batches of 8 (the last one padded): every row equals the
vision tower applied to that element's ViT view; the controlnet and mllm phases trained for a few steps from the
cache give the on-the-fly runs' losses (<= 1e-6, the same cache serving both phases); a cache that does not fit
the run (shape, vision weights, vision config, source) fails naming the file and the field; random crops are
refused.
"""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bifrost_jax import cli
from bifrost_jax.configs import load_config_file
from bifrost_jax.data.latent_cache import sidecar_path
from bifrost_jax.train.cache_latents import build_clip_cache
from bifrost_jax.components import clip_latents_from_pixels
from bifrost_jax.data.sources import image_source, make_image_preprocess
from bifrost_jax.train.registry import get_phase
from bifrost_jax.train.state import split_params

ROOT = os.path.join(os.path.dirname(__file__), "..")
N_IMAGES, STEPS = 20, 3


def cfg(name, data_dir, *extra):
    common = [f"train.steps={STEPS}", "train.log_every=1", "checkpoint.async_save=False", "optim.lr=1e-2",
              "optim.warmup_steps=0", "optim.eps=1e-2", f"checkpoint.every={STEPS}", f"data.data_dir={data_dir}",
              f"data.train_size={N_IMAGES}"]
    return load_config_file(os.path.join(ROOT, "configs", f"{name}.py"), common + list(extra))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent_cache")
    data_dir, out = str(root / "data"), str(root / "cache" / "clip.npy")
    rc = cli.main(["cache-latents", "--config", os.path.join(ROOT, "configs", "controlnet.py"), "--out", out,
                   "--batch-size=8", f"--config.data.data_dir={data_dir}", f"--config.data.train_size={N_IMAGES}"])
    assert rc == 0
    return dict(root=root, data=data_dir, out=out)


def test_cache_rows_are_the_vision_tower_latents(built):
    cache = np.load(built["out"])
    with open(sidecar_path(built["out"])) as fh:
        info = json.load(fh)
    assert cache.shape == (N_IMAGES, 16, 32) and cache.dtype == np.float32
    assert info["shape"] == [N_IMAGES, 16, 32] and info["source_len"] == N_IMAGES
    assert info["vit_resolution"] == 112 and info["vision_weights"] == {"random_init": "fixed key of 'vision'"}
    assert not os.path.exists(built["out"] + ".partial.npy")
    # reference: the phase's own preprocessing and tower, one image at a time, unsharded
    phase = get_phase(cfg("controlnet", built["data"]))
    params = jax.jit(lambda: phase.vision.init(None)["params"])()
    params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params,
                          is_leaf=lambda x: hasattr(x, "value"))
    source = image_source(phase.config.data)
    prep = make_image_preprocess(vit_resolution=112)
    fn = jax.jit(lambda p, x: clip_latents_from_pixels(phase.vision.module, p, x, phase.grid_thw))
    ref = np.concatenate([np.asarray(fn(params, prep(source[i], None)["vit_pixels"][None]))
                          for i in range(N_IMAGES)])
    err = float(np.max(np.abs(cache - ref)) / np.max(np.abs(ref)))
    print(f"cache vs per-image tower: max rel err {err:.2e}")
    assert err <= 1e-6
    assert np.all(np.abs(cache).reshape(N_IMAGES, -1).max(axis=1) > 0)  # every row written (incl. the padded batch)


@pytest.mark.parametrize("name", ["controlnet", "mllm"])
def test_phase_losses_with_cache_equal_on_the_fly(built, name):
    """The phase's loss on the first STEPS batches of its data stream (step i: batch i, rng fold_in(0, i)), from
    the on-the-fly phase's fixed-seed initial weights, with and without the cache (the cached phase gets the same
    weights minus the vision tower; its batches come from its own data pipeline). Both losses are computed in one
    program so that XLA shares their common parts (one compilation instead of two)."""
    fly = get_phase(cfg(name, built["data"]))
    cached = get_phase(cfg(name, built["data"], f"data.precomputed_clip_latents={built['out']}"))
    assert "vision" not in [c.name for c in cached.components()]
    # random weights everywhere (a fresh ControlNet's zero heads would make the conditioning irrelevant), made on
    # the host from the abstract init: compiling the real init costs more than the rest of the test
    r = np.random.default_rng(0)
    shapes = nn.meta.unbox(jax.eval_shape(fly.init_variables, jax.random.PRNGKey(0)))
    variables = jax.tree.map(lambda a: jnp.asarray(r.normal(size=a.shape) * 0.1, a.dtype)
                             if jnp.issubdtype(a.dtype, jnp.floating) else jnp.zeros(a.shape, a.dtype), shapes)
    # ...except the vision tower, which must be the (fixed-key) one the cache was built with
    variables["params"]["vision"] = jax.jit(lambda: nn.meta.unbox(fly.vision.init(None))["params"])()
    trainable, frozen = split_params(variables["params"], fly.is_trainable)
    frozen_cached = {k: v for k, v in frozen.items() if k != "vision"}
    mutable = {k: v for k, v in variables.items() if k != "params"}

    @jax.jit
    def both(shared, vit_pixels, clip_latents, i):
        rng = jax.random.fold_in(jax.random.PRNGKey(0), i)
        return (fly.loss_fn(trainable, frozen, mutable, {**shared, "vit_pixels": vit_pixels}, rng)[0],
                cached.loss_fn(trainable, frozen_cached, mutable, {**shared, "clip_latents": clip_latents}, rng)[0],
                cached.loss_fn(trainable, frozen_cached, mutable, {**shared, "clip_latents": 0 * clip_latents},
                               rng)[0])

    it_fly, it_cached = (p.dataset(global_batch_size=8, seed=0, process_index=0, process_count=1)
                         for p in (fly, cached))
    losses = []
    for i in range(STEPS):
        b_fly, b_cached = next(it_fly), next(it_cached)
        shared = {k: v for k, v in b_fly.items() if k != "vit_pixels"}
        assert set(b_cached) == set(shared) | {"clip_latents"}
        for k in shared:  # the same elements, in the same order, from both pipelines
            np.testing.assert_array_equal(b_cached[k], shared[k])
        losses.append([float(x) for x in both(shared, b_fly["vit_pixels"], b_cached["clip_latents"], i)])
    fly_l, cached_l, blank_l = np.array(losses).T
    err = float(np.max(np.abs(cached_l - fly_l) / np.abs(fly_l)))
    print(f"{name}: losses on the fly {fly_l}, from the cache {cached_l}, max rel diff {err:.2e}")
    assert len(set(fly_l.tolist())) == STEPS  # different batches
    assert np.min(np.abs(blank_l - fly_l) / np.abs(fly_l)) > 1e-3  # the latents matter to the loss
    assert err <= 1e-6


def _first_batch(config):
    phase = get_phase(config)
    return next(phase.dataset(global_batch_size=4, seed=0, process_index=0, process_count=1))


def test_mismatched_cache_fails_naming_file_and_field(built):
    out, data = built["out"], built["data"]
    # the sidecar is checked field by field
    cases = {"vision_weights.port_dir": ["vision.port_dir=/somewhere/else"],
             "vision_config.num_heads": ["vision.config.num_heads=4"]}
    for field, extra in cases.items():
        for name in ("controlnet", "mllm"):
            with pytest.raises(ValueError) as e:
                _first_batch(cfg(name, data, f"data.precomputed_clip_latents={out}", *extra))
            assert out in str(e.value) and field in str(e.value), str(e.value)
    # a wrong-shape file (no sidecar needed): named with its shape
    bad = str(built["root"] / "bad.npy")
    np.save(bad, np.zeros((N_IMAGES, 16, 31), np.float32))
    with pytest.raises(ValueError, match=r"precomputed_clip_latents=.*bad\.npy: shape \(20, 16, 31\)"):
        _first_batch(cfg("controlnet", data, f"data.precomputed_clip_latents={bad}"))
    # a file swapped under its sidecar
    swapped = str(built["root"] / "swapped.npy")
    np.save(swapped, np.zeros((N_IMAGES, 16, 32), np.float32))
    info = json.load(open(sidecar_path(out)))
    info["shape"] = [N_IMAGES + 1, 16, 32]
    json.dump(info, open(sidecar_path(swapped), "w"))
    with pytest.raises(ValueError, match=r"swapped\.npy[\s\S]*shape: sidecar says"):
        _first_batch(cfg("mllm", data, f"data.precomputed_clip_latents={swapped}"))


def test_random_crop_cannot_use_a_cache(built):
    config = cfg("controlnet", built["data"], "data.random_crop=True", "data.min_crop_scale=0.5")
    with pytest.raises(ValueError, match="random crops cannot use"):
        build_clip_cache(config, str(built["root"] / "never.npy"))
    assert not os.path.exists(str(built["root"] / "never.npy.partial.npy"))
    for name in ("controlnet", "mllm"):
        with pytest.raises(ValueError, match="random crops cannot use"):
            get_phase(cfg(name, built["data"], "data.random_crop=True",
                          f"data.precomputed_clip_latents={built['out']}"))


def test_cache_uses_the_phase_vision_weights(built, tmp_path):
    """With a Qwen2.5-VL port (mllm.port_dir, which the mllm phase's vision tower defaults to) the cache holds that
    ViT's latents, and the phase started from the same port accepts it (one from the random tower it refuses)."""
    from bifrost_jax.models.qwen.vl import QwenVLConfig, QwenVLForConditionalGeneration
    from bifrost_jax.port.qwen import abstract_vl, save_qwen_vl

    phase = get_phase(cfg("mllm", built["data"]))
    vl = QwenVLForConditionalGeneration(QwenVLConfig(vision=phase.vision.module.config, text=phase.mllm_config.text),
                                        dtype=jnp.float32)
    r = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (r.normal(size=s.shape) * 0.2).astype(np.float32), abstract_vl(vl)[0]["params"])
    qwen = str(tmp_path / "qwen")
    save_qwen_vl(vl, {"params": params}, qwen)
    out = str(tmp_path / "ported.npy")
    config = cfg("mllm", built["data"], f"mllm.port_dir={qwen}")
    info = build_clip_cache(config, out, batch_size=8)
    assert info["vision_weights"] == {"port_dir": qwen}
    source = image_source(config.data)
    pixels = np.stack([make_image_preprocess(vit_resolution=112)(source[i], None)["vit_pixels"] for i in range(8)])
    ref = np.asarray(jax.jit(lambda p, x: clip_latents_from_pixels(phase.vision.module, p, x, phase.grid_thw))(
        params["visual"], pixels))
    cache = np.load(out)
    err = float(np.max(np.abs(cache[:8] - ref)) / np.max(np.abs(ref)))
    assert err <= 1e-6, err
    assert not np.allclose(cache, np.load(built["out"]), atol=1e-3)  # not the random tower's
    # the phase from the same port takes it; the random-tower cache is refused, naming the field
    batch = _first_batch(cfg("mllm", built["data"], f"mllm.port_dir={qwen}", f"data.precomputed_clip_latents={out}"))
    assert batch["clip_latents"].shape == (4, 16, 32)
    with pytest.raises(ValueError, match=r"vision_weights\.(port_dir|random_init)"):
        _first_batch(cfg("mllm", built["data"], f"mllm.port_dir={qwen}",
                         f"data.precomputed_clip_latents={built['out']}"))
