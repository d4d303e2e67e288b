"""The generation pipeline (sample/pipeline.py, sample/build.py) on the tiny random pipeline of configs/generate_tiny.py: shapes,
seeding, the once-per-image ControlNet condition, the FLUX sampler against a plain reference loop, MLLM CFG
handling, sharding, reconstruction and ``bifrost generate``."""
import json
import os

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_rel_err
from reference_loops import reference_flux_loop, reference_reconstruct, reference_sigmas
from PIL import Image

import bifrost_jax.sample.build as B
import bifrost_jax.generate as C
import bifrost_jax.sample.images as I
import bifrost_jax.sample.pipeline as P
from bifrost_jax.configs import load_config_file
from bifrost_jax.data.prompt import build_t2i_prompt, build_uncond_prompt
from bifrost_jax.models.bifrost import random_orders
from bifrost_jax.models.flux.vae import latent_image_ids
from bifrost_jax.parallel.mesh import make_mesh
from bifrost_jax.sample.mar import mar_decode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "generate_tiny.py")
PROMPTS = ["a red circle", "two blue squares"]
K = 2  # images per prompt (the tiny config's default)


@pytest.fixture(scope="module")
def pipe():
    return B.build_pipeline(load_config_file(TINY))


@pytest.fixture(scope="module")
def generated(pipe):
    out = pipe.generate(PROMPTS, seed=1, return_latents=True)
    images, latents = out.images, out.clip_latents
    return images, latents


def test_generate_shapes_and_seeding(pipe, generated):
    images, latents = generated
    h, w = pipe.image_size
    assert (h, w) == (32, 48)  # CLIP grid 4x6 -> packed 8x12 -> latent 16x24 -> VAE x2
    assert images.shape == (len(PROMPTS) * K, h, w, 3) and images.dtype == np.uint8
    assert latents.shape == (len(PROMPTS) * K, 24, 32)
    assert images.std() > 1.0  # not a constant image
    again = pipe.generate(PROMPTS, seed=1)
    np.testing.assert_array_equal(again, images)  # same seed -> same images
    other = pipe.generate(PROMPTS, seed=2)
    assert np.abs(other.astype(int) - images).mean() > 1.0  # another seed -> other images
    # per-prompt seeding: a prompt's images do not depend on its position in the batch (same shapes: no recompile)
    out = pipe.generate(PROMPTS[::-1], seed=1, return_latents=True)
    swapped, swapped_latents = out.images, out.clip_latents
    assert max_rel_err(swapped_latents[:K], latents[K:]) <= 1e-4
    assert max_rel_err(swapped_latents[K:], latents[:K]) <= 1e-4
    assert np.abs(swapped[:K].astype(int) - images[K:]).max() <= 1
    # ... and the K images of one prompt differ from each other (own MAR orders and noise per row)
    assert max_rel_err(latents[0], latents[1]) > 1e-3


def test_every_random_input_can_be_given_and_every_stage_returned(pipe, generated):
    """generate(seed) == generate(orders, noise) with the orders and noise that seed draws (another seed then
    changes nothing); float images round to the uint8 ones; the returned FLUX latents decode to the images."""
    images, latents = generated
    keys = jax.vmap(jax.random.split)(jnp.stack([jax.random.PRNGKey(1)] * len(PROMPTS)))
    n_tok = pipe.mllm.config.num_image_tokens
    orders = np.concatenate([np.asarray(random_orders(key, K, n_tok)) for key in keys[:, 0]])
    noise = np.asarray(pipe.noise(keys[:, 1], K))
    given = pipe.generate(PROMPTS, seed=999, orders=orders, noise=noise, return_latents=True)
    np.testing.assert_array_equal(given.images, images)
    np.testing.assert_array_equal(given.clip_latents, latents)
    other = pipe.generate(PROMPTS, seed=1, orders=orders[:, ::-1].copy(), return_latents=True)
    assert max_rel_err(other.clip_latents, latents) > 1e-3  # the orders are used
    floats = pipe.generate(PROMPTS, seed=1, output_type="float")
    assert floats.dtype == np.float32 and floats.shape == images.shape
    np.testing.assert_array_equal(np.asarray(P.to_uint8(jnp.asarray(floats))), images)
    np.testing.assert_array_equal(np.asarray(pipe.decode(jnp.asarray(given.flux_latents))), images)
    with pytest.raises(ValueError, match="orders"):
        pipe.generate(PROMPTS, orders=orders[:1])
    with pytest.raises(ValueError, match="noise"):
        pipe.generate(PROMPTS, noise=noise[:, :1])


def test_raw_prompt_to_text_encoders_chat_prompt_to_mllm(pipe, monkeypatch):
    seen_text, seen_mllm = [], []
    encode = pipe.encode_text
    monkeypatch.setattr(pipe, "encode_text", lambda prompts: (seen_text.append(list(prompts)), encode(prompts))[1])
    real = P.build_t2i_prompt

    def spy(tokenizer, prompts, **kw):
        ids, am = real(tokenizer, prompts, **kw)
        seen_mllm.append(tokenizer.decode(ids[0][am[0] == 1]))
        return ids, am
    monkeypatch.setattr(P, "build_t2i_prompt", spy)
    pipe.generate(PROMPTS, seed=1)
    assert seen_text == [PROMPTS]
    assert "generate an image of a red circle" in seen_mllm[0].lower()
    assert "<|vision_start|>" in seen_mllm[0]


def _jaxpr_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _jaxpr_eqns(sub)


def _count(jaxpr, prim):
    return sum(e.primitive.name == prim for e in _jaxpr_eqns(jaxpr))


def _flux_inputs(pipe, latents, seed=0):
    b = latents.shape[0]
    embeds, pooled = pipe.encode_text(["a red circle"] * b)
    h, w = pipe.packed_grid
    noise = jax.random.normal(jax.random.PRNGKey(seed), (b, h * w, pipe.transformer.config.in_channels))
    return jnp.asarray(latents), embeds, pooled, noise


def test_controlnet_condition_computed_once(pipe, generated):
    latents, embeds, pooled, noise = _flux_inputs(pipe, generated[1])
    h, w = pipe.packed_grid
    args = (pipe.transformer, pipe.controlnet, pipe.transformer_variables, pipe.controlnet_variables, latents, embeds,
            pooled, noise, jnp.asarray(pipe.sigmas(3)), latent_image_ids(h, w), jnp.zeros((embeds.shape[1], 3)),
            jnp.float32(3.5), jnp.float32(0.7))
    jaxpr = jax.make_jaxpr(P._flux_stage.__wrapped__, static_argnums=(0, 1))(*args).jaxpr
    scans = [e for e in _jaxpr_eqns(jaxpr) if e.primitive.name == "scan"]
    assert scans, "the Euler loop should be a lax.scan"
    in_loop = sum(_count(e.params["jaxpr"].jaxpr, "conv_general_dilated") for e in scans)
    # the upsampler's 3x3 conv (the only conv of FLUX + ControlNet) runs once, outside the denoising loop
    assert in_loop == 0
    cond_jaxpr = jax.make_jaxpr(lambda v, x: pipe.controlnet.apply(v, x, method=pipe.controlnet.embed_condition))(
        pipe.controlnet_variables, latents).jaxpr
    assert _count(cond_jaxpr, "conv_general_dilated") >= 1
    assert _count(jaxpr, "conv_general_dilated") == _count(cond_jaxpr, "conv_general_dilated")


def test_flux_sampling_equals_reference_loop(pipe, generated):
    """The pipeline's sampler == a diffusers-style Python loop that recomputes the ControlNet condition (upsampler
    and all) from the raw CLIP latents at every step."""
    latents, embeds, pooled, noise = _flux_inputs(pipe, generated[1])
    steps, scale, guidance = 3, 0.7, 3.5
    got = pipe.sample_flux(latents, embeds, pooled, noise, flux_steps=steps, guidance=guidance,
                           conditioning_scale=scale)
    h, w = pipe.packed_grid
    np.testing.assert_allclose(pipe.sigmas(steps), reference_sigmas(steps, h * w), rtol=1e-6)
    x = reference_flux_loop(pipe, latents, embeds, pooled, noise, steps=steps, guidance=guidance, scale=scale)
    err = max_rel_err(got, x)
    assert err <= 1e-4, err
    # the ControlNet residuals matter: scale 0 gives another result
    plain = pipe.sample_flux(latents, embeds, pooled, noise, flux_steps=steps, guidance=guidance,
                             conditioning_scale=0.0)
    assert max_rel_err(plain, got) > 1e-3


def test_mllm_cfg_one_skips_uncond(pipe, monkeypatch):
    calls = []
    real = P.build_uncond_prompt
    monkeypatch.setattr(P, "build_uncond_prompt", lambda *a, **k: (calls.append(a), real(*a, **k))[1])
    keys = jnp.stack([jax.random.PRNGKey(3), jax.random.PRNGKey(4)])
    plain = pipe.decode_latents(PROMPTS, keys, num_images_per_prompt=K, mar_steps=4, mllm_cfg=1.0)
    assert calls == []  # no unconditional prompt built (nor run) without CFG
    ids, am = build_t2i_prompt(pipe.tokenizer, PROMPTS, max_length=pipe.max_prompt_length)
    for p in range(len(PROMPTS)):
        rows = (np.repeat(ids[p:p + 1], K, 0), np.repeat(am[p:p + 1], K, 0))
        want = mar_decode(pipe.mllm, pipe.mllm_variables, *rows, keys[p], num_steps=4)
        assert max_rel_err(plain[p], want) <= 1e-5
    guided = pipe.decode_latents(PROMPTS, keys, num_images_per_prompt=K, mar_steps=4, mllm_cfg=3.0)
    assert len(calls) == 1
    uids, uam = build_uncond_prompt(pipe.tokenizer, K, max_length=pipe.max_prompt_length)
    want = mar_decode(pipe.mllm, pipe.mllm_variables, np.repeat(ids[:1], K, 0), np.repeat(am[:1], K, 0), keys[0],
                      num_steps=4, cfg_weight=3.0, uncond_input_ids=uids, uncond_attention_mask=uam)
    assert max_rel_err(guided[0], want) <= 1e-5
    assert max_rel_err(guided[0], plain[0]) > 1e-3


def test_sharded_equals_unsharded(pipe, generated):
    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:2])
    sharded = B.build_pipeline(load_config_file(TINY), mesh=mesh)  # variables placed on the mesh
    assert sharded._batch_shards() == 2
    out = sharded.generate(PROMPTS, seed=1, return_latents=True)
    images, latents = out.images, out.clip_latents
    assert max_rel_err(latents, generated[1]) <= 1e-4
    assert np.abs(images.astype(int) - generated[0]).max() <= 1


def test_reconstruct(pipe):
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (4, 70, 90, 3), dtype=np.uint8)  # any size: centre-cropped and resized
    out = pipe.reconstruct(real, indices=[0, 1, 2, 3])
    assert out.shape == (4,) + pipe.image_size + (3,) and out.dtype == np.uint8
    np.testing.assert_array_equal(pipe.reconstruct(real, indices=[0, 1, 2, 3]), out)
    # image i's noise comes from its index, so the order of a batch does not matter
    flipped = pipe.reconstruct(real[::-1], indices=[3, 2, 1, 0])
    assert np.abs(flipped[::-1].astype(int) - out).max() <= 1
    lat = np.asarray(pipe.clip_latents_of(real))
    assert lat.shape == (4, 24, 32) and max_rel_err(lat[0], lat[1]) > 1e-3
    assert I.fit_images(real, pipe.vision_size).shape == (4, 112, 168, 3)


@pytest.fixture(scope="module")
def vit_views():
    """Two smooth, clearly different images at the ViT view size (resizing is not part of what is compared), as a
    batch of 4 (a, b, b, a): the shapes test_reconstruct compiled."""
    h, w = 112, 168
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    a = np.stack([255 * xx, 255 * yy, 128 + 0 * xx], -1)
    b = np.stack([255 * (1 - yy), 60 + 0 * xx, 255 * xx * yy], -1)
    return np.round(np.stack([a, b, b, a])).astype(np.uint8)


def test_reconstruct_equals_reference_loop_and_depends_on_the_image(pipe, vit_views):
    """Reconstruction == the written-out ViT -> ControlNet + FLUX Euler loop -> VAE decode; the image reaches the
    output: two images with the SAME noise (same index) give different reconstructions, and so does ControlNet
    scale 0."""
    o = pipe.options
    assert pipe.vision_size == vit_views.shape[1:3]
    same = [5, 5, 5, 5]
    got = pipe.reconstruct(vit_views, seed=3, indices=same)
    want = reference_reconstruct(pipe, vit_views, seed=3, indices=same, steps=o.flux_steps, guidance=o.guidance,
                                 scale=o.conditioning_scale)
    assert np.abs(got.astype(int) - want).max() <= 1
    assert np.abs(got[0].astype(int) - got[3]).max() <= 1  # same image, same noise
    assert np.abs(got[0].astype(int) - got[1]).mean() > 2.0  # same noise, different image
    plain = pipe.reconstruct(vit_views, seed=3, indices=same, conditioning_scale=0.0)
    assert np.abs(plain[0].astype(int) - plain[1]).max() <= 1  # without the ControlNet the image has no say
    assert np.abs(plain.astype(int) - got).mean() > 2.0


def test_main_writes_pngs_grid_and_config(tmp_path):
    out = tmp_path / "gen"
    code = C.main(["--config", TINY, "--random-weights", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--num-images", "2",
                   "--seed", "5", "--out", str(out), "--batch-size", "2", "--config.sample.flux_steps=3"])
    assert code == 0
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png") and p != "grid.png")
    assert pngs == ["000_00.png", "000_01.png", "001_00.png", "001_01.png"]
    im = np.asarray(Image.open(out / "000_00.png"))
    assert im.shape == (32, 48, 3) and im.dtype == np.uint8
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (2 * 32 + 2, 2 * 48 + 2, 3)
    np.testing.assert_array_equal(grid[:32, :48], im)
    record = json.loads((out / "config.json").read_text())
    assert record["prompts"] == PROMPTS and record["seed"] == 5 and record["num_images_per_prompt"] == 2
    assert record["config"]["sample"]["flux_steps"] == 3
    assert (out / "seed.txt").read_text().strip() == "5"
    with pytest.raises(ValueError, match="no_such_key"):
        C.main(["--config", TINY, "--random-weights", "--prompt", "x", "--out", str(out), "--config.no_such_key=1"])


def test_build_from_ports_and_a_training_checkpoint(pipe, tmp_path):
    """``build_pipeline`` loads each component the way training does: ``port_dir`` (a ``bifrost port`` output or a
    diffusers directory) and ``init_from`` (a training checkpoint: the component's saved variables by name, strictly;
    the other components' entries are left alone)."""
    import orbax.checkpoint as ocp

    from bifrost_jax.port.orbax_io import save_ported
    from bifrost_jax.checkpoint import CheckpointMismatchError

    vae_vars = jax.tree.map(lambda x: np.asarray(x) * 1.5, pipe.vae_variables)
    save_ported(str(tmp_path / "vae_port"), "flux-vae", vae_vars, str(tmp_path))
    cn = jax.tree.map(lambda x: np.asarray(x) + 1.0, pipe.controlnet_variables)
    root = tmp_path / "work" / "controlnet" / "checkpoints"
    tree = {"params": {"controlnet": cn["params"], "other": {"w": np.ones(3, np.float32)}},
            "batch_stats": {"controlnet": cn["batch_stats"]}}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(root / "7" / "params", tree)
        ckptr.wait_until_finished()
    overrides = [f"vae.port_dir={tmp_path / 'vae_port'}", f"controlnet.init_from={root}"]
    built = B.build_pipeline(load_config_file(TINY, overrides))
    for got, want in ((built.vae_variables, vae_vars), (built.controlnet_variables, cn)):
        flat_got, flat_want = jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves_with_path(want)
        assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
        for (path, g), (_, w) in zip(flat_got, flat_want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w).astype(np.asarray(g).dtype), err_msg=str(path))
    # a PyTorch-format directory through bifrost_jax.port (here one written by our own exporter)
    from bifrost_jax import port
    port.save("flux-vae", pipe.vae, vae_vars, str(tmp_path / "vae_diffusers"))
    ported = B.build_pipeline(load_config_file(TINY, [f"vae.port_dir={tmp_path / 'vae_diffusers'}"]))
    assert ported.vae.config == pipe.vae.config
    np.testing.assert_allclose(ported.vae_variables["params"]["decoder"]["conv_out"]["kernel"],
                               vae_vars["params"]["decoder"]["conv_out"]["kernel"], rtol=1e-6)
    # without a source the configured (synthetic) weights stay
    plain = B.build_pipeline(load_config_file(TINY, overrides[:1]))
    np.testing.assert_array_equal(plain.controlnet_variables["params"]["x_embedder"]["kernel"],
                                  pipe.controlnet_variables["params"]["x_embedder"]["kernel"])
    # strict: a checkpoint without the component's weights is an error naming them
    with pytest.raises(CheckpointMismatchError, match="transformer_blocks_0"):
        B.build_pipeline(load_config_file(TINY, [f"flux.init_from={root}"]))
