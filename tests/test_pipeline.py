"""The generation pipeline (sample/pipeline.py) on the tiny random pipeline of configs/generate_tiny.py: shapes,
seeding, the once-per-image ControlNet condition, the FLUX sampler against a plain reference loop, MLLM CFG
handling, sharding, reconstruction and ``bifrost generate``."""
import json
import math
import os

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_rel_err
from PIL import Image

import bifrost_jax.sample.pipeline as P
from bifrost_jax.configs import load_config_file
from bifrost_jax.data.prompt import build_t2i_prompt, build_uncond_prompt
from bifrost_jax.models.flux.vae import latent_image_ids
from bifrost_jax.parallel.mesh import make_mesh
from bifrost_jax.sample.mar import mar_decode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "generate_tiny.py")
PROMPTS = ["a red circle", "two blue squares"]
K = 2  # images per prompt (the tiny config's default)


@pytest.fixture(scope="module")
def pipe():
    return P.build_pipeline(load_config_file(TINY))


@pytest.fixture(scope="module")
def generated(pipe):
    images, latents = pipe.generate(PROMPTS, seed=1, return_latents=True)
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
    swapped, swapped_latents = pipe.generate(PROMPTS[::-1], seed=1, return_latents=True)
    assert max_rel_err(swapped_latents[:K], latents[K:]) <= 1e-4
    assert max_rel_err(swapped_latents[K:], latents[:K]) <= 1e-4
    assert np.abs(swapped[:K].astype(int) - images[K:]).max() <= 1
    # ... and the K images of one prompt differ from each other (own MAR orders and noise per row)
    assert max_rel_err(latents[0], latents[1]) > 1e-3


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


def _reference_sigmas(steps, seq_len):
    """FLUX.1-dev's schedule written out: linspace(1, 1/n, n), exponential shift with mu linear in seq_len."""
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq_len - 256)
    s = np.linspace(1.0, 1.0 / steps, steps)
    s = math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0))
    return list(s) + [0.0]


def test_flux_sampling_equals_reference_loop(pipe, generated):
    """The pipeline's sampler == a diffusers-style Python loop that recomputes the ControlNet condition (upsampler
    and all) from the raw CLIP latents at every step."""
    latents, embeds, pooled, noise = _flux_inputs(pipe, generated[1])
    steps, scale, guidance = 3, 0.7, 3.5
    got = pipe.sample_flux(latents, embeds, pooled, noise, flux_steps=steps, guidance=guidance,
                           conditioning_scale=scale)
    h, w = pipe.packed_grid
    img_ids, txt_ids = latent_image_ids(h, w), jnp.zeros((embeds.shape[1], 3))
    b = latents.shape[0]
    cn = jax.jit(lambda x, t: pipe.controlnet.apply(
        pipe.controlnet_variables, x, controlnet_cond=latents, conditioning_scale=scale,
        encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t, img_ids=img_ids, txt_ids=txt_ids,
        guidance=jnp.full((b,), guidance)))
    tr = jax.jit(lambda x, t, blocks, singles: pipe.transformer.apply(
        pipe.transformer_variables, x, embeds, pooled, t, img_ids, txt_ids, guidance=jnp.full((b,), guidance),
        controlnet_block_samples=blocks, controlnet_single_block_samples=singles))
    sigmas = _reference_sigmas(steps, h * w)
    np.testing.assert_allclose(pipe.sigmas(steps), sigmas, rtol=1e-6)
    x = np.asarray(noise, np.float32)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        t = jnp.full((b,), s, jnp.float32)
        blocks, singles = cn(x, t)
        v = np.asarray(tr(x, t, blocks, singles), np.float32)
        x = x + (s_next - s) * v
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
    sharded = P.build_pipeline(load_config_file(TINY), mesh=mesh)  # variables placed on the mesh
    assert sharded._batch_shards() == 2
    images, latents = sharded.generate(PROMPTS, seed=1, return_latents=True)
    assert max_rel_err(latents, generated[1]) <= 1e-4
    assert np.abs(images.astype(int) - generated[0]).max() <= 1


def test_reconstruct(pipe, generated):
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (4, 70, 90, 3), dtype=np.uint8)  # any size: centre-cropped and resized
    out = pipe.reconstruct(real, indices=[0, 1, 2, 3])
    assert out.shape == (4,) + pipe.image_size + (3,) and out.dtype == np.uint8
    np.testing.assert_array_equal(pipe.reconstruct(real, indices=[0, 1, 2, 3]), out)
    # image i's noise comes from its index, so the order of a batch does not matter
    flipped = pipe.reconstruct(real[::-1], indices=[3, 2, 1, 0])
    assert np.abs(flipped[::-1].astype(int) - out).max() <= 1
    # the output depends on the input image (through the ViT latents and the ControlNet)
    lat = np.asarray(pipe.clip_latents_of(real))
    assert lat.shape == (4, 24, 32) and max_rel_err(lat[0], lat[1]) > 1e-3
    assert P.fit_images(real, pipe.vision_size).shape == (4, 112, 168, 3)


def test_main_writes_pngs_grid_and_config(tmp_path):
    out = tmp_path / "gen"
    code = P.main(["--config", TINY, "--random-weights", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                   "--num-images", "2",
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
        P.main(["--config", TINY, "--prompt", "x", "--out", str(out), "--config.no_such_key=1"])


def test_build_from_orbax_port_and_phase_checkpoint(pipe, tmp_path):
    """``build_pipeline`` sources: a ``bifrost port`` Orbax directory, and a phase checkpoint under the WORKDIR that
    replaces the configured weights (component under ``phase_subtree``; other components' entries ignored)."""
    import orbax.checkpoint as ocp

    from bifrost_jax.port.orbax_io import save_ported
    from bifrost_jax.train.checkpoint import CheckpointMismatchError

    vae_vars = jax.tree.map(lambda x: np.asarray(x) * 1.5, pipe.vae_variables)
    save_ported(str(tmp_path / "vae_port"), "flux-vae", vae_vars, str(tmp_path))
    cn = jax.tree.map(lambda x: np.asarray(x) + 1.0, pipe.controlnet_variables)
    step = tmp_path / "work" / "controlnet" / "checkpoints" / "7"
    tree = {"params": {"controlnet": cn["params"], "other": {"w": np.ones(3, np.float32)}},
            "batch_stats": {"controlnet": cn["batch_stats"]}}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(step / "params", tree)
        ckptr.wait_until_finished()
    overrides = ["vae.source=orbax", f"vae.path={tmp_path / 'vae_port'}", "controlnet.phase=controlnet",
                 "controlnet.phase_subtree=controlnet"]
    built = P.build_pipeline(load_config_file(TINY, overrides), str(tmp_path / "work"))
    for got, want in ((built.vae_variables, vae_vars), (built.controlnet_variables, cn)):
        flat_got, flat_want = jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves_with_path(want)
        assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
        for (path, g), (_, w) in zip(flat_got, flat_want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w).astype(np.asarray(g).dtype), err_msg=str(path))
    # a PyTorch-format directory through bifrost_jax.port (here one written by our own exporter)
    from bifrost_jax import port
    port.save("flux-vae", pipe.vae, vae_vars, str(tmp_path / "vae_diffusers"))
    ported = P.build_pipeline(load_config_file(TINY, ["vae.source=port", f"vae.path={tmp_path / 'vae_diffusers'}"]))
    assert ported.vae.config == pipe.vae.config
    np.testing.assert_allclose(ported.vae_variables["params"]["decoder"]["conv_out"]["kernel"],
                               vae_vars["params"]["decoder"]["conv_out"]["kernel"], rtol=1e-6)
    # without the WORKDIR the configured (random) weights stay
    plain = P.build_pipeline(load_config_file(TINY, overrides[:2]))
    np.testing.assert_array_equal(plain.controlnet_variables["params"]["x_embedder"]["kernel"],
                                  pipe.controlnet_variables["params"]["x_embedder"]["kernel"])
    # strict phase source: a checkpoint without the component's weights is an error naming them
    with pytest.raises(CheckpointMismatchError, match="transformer_blocks_0"):
        P.build_pipeline(load_config_file(TINY, ["transformer.source=phase", "transformer.phase=controlnet"]),
                         str(tmp_path / "work"))
