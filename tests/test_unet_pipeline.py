"""The UNet decoder end to end on tiny configs, 8 simulated CPU devices: the ``unet`` phase, the ``controlnet``
phase with ``decoder: unet`` (the latent UNet ControlNet, started from the trained UNet), resumption, and generation
through the Bifrost pipeline built from the workdir (``pipeline_from_workdir``) and through ``bifrost generate
--checkpoint``."""
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from flax import traverse_util
from PIL import Image

from bifrost_jax import cli
from bifrost_jax.configs import load_config_file
from bifrost_jax.models.unet.controlnet import copied_from_unet
from bifrost_jax.sample.pipeline import SamplingOptions
from bifrost_jax.sample.unet_decoder import sample_unet_latents
from bifrost_jax.sample.unet_pipeline import UNetBifrostPipeline
from bifrost_jax.train.export import pipeline_from_workdir
from bifrost_jax.train.loop import train
from bifrost_jax.train.phase_configs import TINY_CLIP, section
from bifrost_jax.train.registry import get_phase
from bifrost_jax.train.state import split_params

ROOT = os.path.join(os.path.dirname(__file__), "..")
CACHE_OPTIONS = {"jax_compilation_cache_dir": None, "jax_persistent_cache_min_compile_time_secs": 0.0,
                 "jax_persistent_cache_min_entry_size_bytes": 0}
SAMPLING = dict(num_images_per_prompt=1, seed=3, mar_steps=4, mllm_cfg=1.0, flux_steps=3, guidance=2.0,
                conditioning_scale=1.0)


def run(name, work, data, steps, *extra):
    common = [f"train.steps={steps}", "train.log_every=1", "checkpoint.async_save=False", "checkpoint.every=2",
              "optim.lr=1e-2", "optim.warmup_steps=0", "optim.decay_steps=4", "optim.eps=1e-2",
              f"data.data_dir={data}", "data.train_size=32", "train.tensorboard=False"]
    config = load_config_file(os.path.join(ROOT, "configs", f"{name}.py"), common + list(extra))
    result = train(config, work, progress_bar=False)
    assert result.step == steps and np.isfinite(result.last_metrics["loss"])
    return config, result


def flat(tree):
    return {"/".join(map(str, k)): np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("unet_runs")
    data, work, other = str(base / "data"), str(base / "work"), str(base / "resumed")
    # the resumed run compiles the same train step as the uninterrupted one: let it hit the compilation cache
    # (most of this test's time is XLA compiling the UNet's step on CPU)
    saved = {k: getattr(jax.config, k) for k in CACHE_OPTIONS}
    for k, v in CACHE_OPTIONS.items():
        jax.config.update(k, str(base / "xla_cache") if v is None else v)
    try:
        out = {"work": work, "unet": run("unet", work, data, 3)}  # checkpoints at steps 2 and 3
        # the interrupted run: the same run stopped after its step-2 checkpoint, resumed
        shutil.copytree(os.path.join(work, "unet", "checkpoints"), os.path.join(other, "unet", "checkpoints"),
                        ignore=shutil.ignore_patterns("3"))
        out["unet_resumed"] = run("unet", other, data, 3)
        ckpt = os.path.join(work, "unet", "checkpoints")
        out["controlnet"] = run("unet_controlnet", work, data, 2, f"unet.init_from={ckpt}")
        out["mllm"] = run("mllm", work, data, 1)
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)
    return out


@pytest.fixture(scope="module")
def pipe(runs):
    return pipeline_from_workdir(runs["work"], options=SamplingOptions(**SAMPLING))


def test_unet_resume_continues_exactly(runs):
    (_, straight), (_, resumed) = runs["unet"], runs["unet_resumed"]
    with open(os.path.join(runs["work"], "..", "resumed", "unet", "metrics.jsonl")) as fh:
        assert [json.loads(line)["step"] for line in fh] == [3]  # only step 3 ran there
    a, b = flat(straight.state.params), flat(resumed.state.params)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert straight.last_metrics["loss"] == pytest.approx(resumed.last_metrics["loss"], rel=1e-6)


def test_controlnet_phase_steers_the_trained_unet(runs, pipe):
    config, result = runs["controlnet"]
    phase = get_phase(config)
    assert type(phase).__name__ == "UNetControlNetPhase" and phase.analytic_flops(8).total > 0
    trained = flat(result.state.params["controlnet"])
    assert trained and not [k for k in flat(result.frozen) if k.startswith("controlnet")]
    # the pipeline holds the unet phase's final weights (frozen in the controlnet phase) and the trained ControlNet
    unet = flat(runs["unet"][1].state.params["unet"])
    got = flat(pipe.transformer_variables["params"])
    assert got.keys() == unet.keys() and all(np.array_equal(got[k], unet[k]) for k in unet)
    cn = flat(pipe.controlnet_variables["params"])
    assert all(np.array_equal(cn[k], trained[k]) for k in trained)
    # started as a copy of the UNet's encoder (from_unet) and trained away from it
    copied = [k for k in trained if copied_from_unet(k.split("/")[0])]
    assert copied and any(not np.array_equal(trained[k], unet[k]) for k in copied)
    heads = [k for k in trained if k.startswith("controlnet_down_blocks_") or k.startswith("controlnet_mid_block")]
    assert heads and all(np.abs(trained[k]).max() > 0 for k in heads)  # the zero convs learned


def _unzeroed(variables):
    """The ControlNet's zero-initialised layers (condition embedding conv_out, zero convs) set to N(0, 0.05)."""
    flat_vars = traverse_util.flatten_dict(variables)
    rng = np.random.default_rng(7)
    zero_init = ("conv_out", "controlnet_down_blocks_", "controlnet_mid_block")
    out = {k: (jnp.asarray(0.05 * rng.standard_normal(v.shape), v.dtype)
               if any(z in "/".join(map(str, k)) for z in zero_init) else v) for k, v in flat_vars.items()}
    assert sum(any(z in "/".join(map(str, k)) for z in zero_init) for k in out) >= 4
    return traverse_util.unflatten_dict(out)


def _sample(pipe, latents, scale, noise, embeds, pooled):
    return pipe.sample_flux(latents, embeds, pooled, noise, flux_steps=3, guidance=2.0, conditioning_scale=scale)


def test_generation_uses_the_condition_and_scale_zero_is_the_unet_alone(pipe):
    assert isinstance(pipe, UNetBifrostPipeline)
    prompts = ["a red circle", "two blue squares"]
    latents = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 32)), jnp.float32)
    embeds, pooled = pipe.encode_prompts(prompts)
    noise = pipe.noise(jnp.stack([jax.random.PRNGKey(1), jax.random.PRNGKey(2)]), 1)
    assert noise.shape == (2, 16 * 16, 4)
    x = _sample(pipe, latents, 1.0, noise, embeds, pooled)
    other = _sample(pipe, latents[::-1], 1.0, noise, embeds, pooled)
    images = np.asarray(pipe.decode(x, output_type="float"))
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    # a different condition gives a different result. After two training steps the condition reaches the latents
    # only through two barely-trained zero-initialised layers (the embedding's conv_out, then the zero convs), so
    # the difference is small, but it is exactly zero if the condition is not used (the run is deterministic)
    barely = np.abs(np.asarray(other) - np.asarray(x)).max()
    assert barely > 0
    # with those zero-initialised layers given weights of a trained size, the condition steers the sample: the
    # path from the condition to the latents is whole (measured: 0.42 against 6e-6 barely trained, max |x| 54)
    steered = dataclasses.replace(pipe, controlnet_variables=_unzeroed(pipe.controlnet_variables))
    a = np.asarray(_sample(steered, latents, 1.0, noise, embeds, pooled))
    b = np.asarray(_sample(steered, latents[::-1], 1.0, noise, embeds, pooled))
    steer = np.abs(a - b).max()
    assert steer > 1e-3 * np.abs(a).max() and steer > 1e3 * barely
    # conditioning_scale=0: exactly the UNet alone, with the same text CFG
    off = _sample(pipe, latents, 0.0, noise, embeds, pooled)
    neg, _ = pipe.negative_text(2)
    alone = sample_unet_latents(pipe.unet, pipe.transformer_variables, None, None, pipe.scheduler.set_timesteps(3),
                                None, noise.reshape(2, 16, 16, 4), embeds, neg, guidance_scale=2.0)
    np.testing.assert_allclose(np.asarray(off), np.asarray(alone).reshape(2, -1, 4), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(off) - np.asarray(x)).max() > 1e-4


def test_generate_command_with_checkpoint(runs, pipe, tmp_path):
    want = pipe.generate(["a red circle"])
    assert want.shape == (1, 32, 32, 3) and want.dtype == np.uint8
    flags = ["--num-images", "1", "--seed", "3", "--mar-steps", "4", "--mllm-cfg", "1", "--flux-steps", "3",
             "--guidance", "2", "--conditioning-scale", "1"]
    assert cli.main(["generate", "--checkpoint", runs["work"], "--prompt", "a red circle", "--out",
                     str(tmp_path)] + flags) == 0
    got = np.asarray(Image.open(tmp_path / "000_00.png"))
    assert np.abs(got.astype(int) - want[0]).max() <= 1


def _sdxl_config(**unet):
    """The tiny controlnet (decoder unet) config made SDXL-shaped: two text encoders (32 + 32 = 64-wide tokens),
    ``text_time`` with the second encoder's 32-wide pooled projection and 8-wide time-id embeddings."""
    c = load_config_file(os.path.join(ROOT, "configs", "unet_controlnet.py"), ["scheduler.prediction_type=v_prediction"])
    with c.unlocked():
        c.unet.config.update(dict(cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                                  projection_class_embeddings_input_dim=32 + 6 * 8, **unet))
        c.clip_2 = section(TINY_CLIP, tokenizer_dir="", max_length=16)
    return c


def test_sdxl_shaped_phase_traces_with_pooled_text_and_time_ids():
    phase = get_phase(_sdxl_config())
    abstract = jax.eval_shape(phase.init_variables, jax.random.PRNGKey(0))
    params = nn.meta.unbox(abstract["params"])
    trainable, frozen = split_params(params, phase.is_trainable)
    assert set(trainable) == {"controlnet"} and {"unet", "clip", "clip_2", "vae", "vision"} <= set(frozen)
    batch = phase.batch_spec(2)
    assert batch["clip_2_ids"].shape == (2, 16)
    embeds, added = jax.eval_shape(phase.text_conditioning, frozen, batch)
    assert embeds.shape == (2, 16, 64)
    assert added["text_embeds"].shape == (2, 32) and added["time_ids"].shape == (2, 6)
    mutable = {"batch_stats": nn.meta.unbox(abstract["batch_stats"])}
    loss, (metrics, _) = jax.eval_shape(phase.loss_fn, trainable, frozen, mutable, batch, jax.random.PRNGKey(1))
    assert loss.shape == () and phase.schedule.prediction_type == "v_prediction"
    assert phase.analytic_flops(2).total > 0


def test_text_encoders_must_fit_the_unet():
    c = _sdxl_config()
    with c.unlocked():
        del c["clip_2"]
        c.unet.config.cross_attention_dim = 32
    with pytest.raises(ValueError, match="config.clip_2"):
        get_phase(c)
    wide = _sdxl_config()
    wide.unet.config.cross_attention_dim = 96
    with pytest.raises(ValueError, match="cross_attention_dim=96 but config.clip \\+ config.clip_2"):
        get_phase(wide)


def test_sampler_choice_from_the_workdir(runs, pipe):
    from bifrost_jax.sample.schedulers import DDIMConfig, DPMSolverMultistepConfig
    assert isinstance(pipe.scheduler, DPMSolverMultistepConfig)  # the default
    ddim = pipeline_from_workdir(runs["work"], options=SamplingOptions(**SAMPLING), sampler="DDIMScheduler")
    assert isinstance(ddim.scheduler, DDIMConfig)
    # the same trained noise schedule, another sampler: another image from the same seed
    a, b = pipe.generate(["a red circle"]), ddim.generate(["a red circle"])
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() > 0
    with pytest.raises(ValueError, match="not one of"):
        pipeline_from_workdir(runs["work"], sampler="PNDMScheduler")


def test_eval_geneval_and_dpg_run_on_the_unet_workdir(runs, tmp_path):
    """``bifrost eval geneval`` / ``dpg`` take a UNet-decoder workdir unchanged (``--sampler`` picks its scheduler):
    the GenEval layout and the image of the prompt's seed, the DPG-Bench 2x2 grid."""
    meta = tmp_path / "evaluation_metadata.jsonl"
    line = json.dumps({"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a red circle"})
    meta.write_text(line + "\n")
    out = tmp_path / "geneval"
    assert cli.main(["eval", "geneval", "--checkpoint", runs["work"], "--prompts", str(meta), "--out", str(out),
                     "--num-images", "1", "--batch-size", "1", "--seed", "5", "--sampler", "EulerDiscreteScheduler"]) == 0
    assert (out / "00000" / "metadata.jsonl").read_text() == line + "\n"
    got = np.asarray(Image.open(out / "00000" / "samples" / "0000.png"))
    euler = pipeline_from_workdir(runs["work"], sampler="EulerDiscreteScheduler")
    want = euler.generate(["a red circle"], num_images_per_prompt=1, seed=5)
    assert got.shape == (32, 32, 3) and np.abs(got.astype(int) - want[0].astype(int)).max() <= 1

    prompts = tmp_path / "dpg_prompts"
    prompts.mkdir()
    (prompts / "p0.txt").write_text("two blue squares")
    out = tmp_path / "dpg"
    assert cli.main(["eval", "dpg", "--checkpoint", runs["work"], "--prompts", str(prompts), "--out", str(out),
                     "--batch-size", "1"]) == 0
    grid = np.asarray(Image.open(out / "p0.png"))
    assert grid.shape == (64, 64, 3)  # DPG-Bench's 2x2 grid of 32 px images
