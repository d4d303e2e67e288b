"""The UNet family's schedulers against diffusers (fp32): the timesteps and initial noise scale, every step of whole
sampling runs (DDIM, Euler discrete, DPM-Solver++ 2M; epsilon and v-prediction; leading, trailing and linspace
spacings), the training-side noise schedule (add_noise, get_velocity, targets) and guidance with rescale.

The "model" is a fixed nonlinear function of the sample and the timestep, the same in torch and JAX, so that a
wrong coefficient anywhere in a run shows in the trajectory.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_rel_err
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from bifrost_jax.models.unet.noise_schedule import ScheduleConfig, add_noise, get_velocity, training_target
from bifrost_jax.sample.schedulers import (DDIMConfig, DPMSolverMultistepConfig, EulerDiscreteConfig, cfg_denoise,
                                           guided, sample_loop)

TOL = 1e-4
# Stable Diffusion's scheduler_config.json (a PNDM config: the DDIM fields set_alpha_to_one/clip_sample are read by
# DDIM and ignored by the others, as diffusers' from_config does)
SD_SCHEDULER = dict(_class_name="PNDMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                    beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                    skip_prk_steps=True, trained_betas=None)
PAIRS = {"ddim": (DDIMScheduler, DDIMConfig), "euler": (EulerDiscreteScheduler, EulerDiscreteConfig),
         "dpm++2m": (DPMSolverMultistepScheduler, DPMSolverMultistepConfig)}


def fake_model(x, t, lib):
    return 0.8 * lib.tanh(x) + 0.1 * lib.sin(t / 100.0) * x


def run_torch(scheduler, x, steps, eta=0.0, noises=None):
    scheduler.set_timesteps(steps)
    x = torch.from_numpy(x) * scheduler.init_noise_sigma
    out = []
    for i, t in enumerate(scheduler.timesteps):
        model_in = scheduler.scale_model_input(x, t)
        eps = fake_model(model_in, t.float(), torch)
        kw = {} if noises is None else dict(eta=eta, variance_noise=torch.from_numpy(noises[i]))
        x = scheduler.step(eps, t, x, **kw).prev_sample
        out.append(x.numpy().copy())
    return scheduler, out


def run_jax(plan, x, eta=0.0, noises=None):
    x = jnp.asarray(x) * plan.init_noise_sigma
    state = plan.init_state(x)
    out = []
    for i in range(plan.num_steps):
        eps = fake_model(plan.scale_model_input(x, i), jnp.float32(plan.timesteps[i]), jnp)
        kw = {} if noises is None else dict(eta=eta, noise=jnp.asarray(noises[i]))
        x, state = plan.step(eps, i, x, state, **kw)
        out.append(np.asarray(x))
    return out


CASES = [(kind, pred, spacing, steps) for kind in PAIRS for pred in ("epsilon", "v_prediction")
         for spacing, steps in (("leading", 20), ("trailing", 10), ("linspace", 25))]


@pytest.mark.parametrize("kind,prediction_type,spacing,steps", CASES)
def test_sampling_run_matches_diffusers(kind, prediction_type, spacing, steps):
    torch_cls, ours = PAIRS[kind]
    cfg = {**SD_SCHEDULER, "prediction_type": prediction_type, "timestep_spacing": spacing}
    x = np.random.default_rng(0).standard_normal((2, 8, 6, 4)).astype(np.float32)
    scheduler, ref = run_torch(torch_cls.from_config(cfg), x, steps)
    plan = ours.from_hf_config(cfg).set_timesteps(steps)
    np.testing.assert_array_equal(plan.timesteps, scheduler.timesteps.numpy())
    assert abs(plan.init_noise_sigma - float(scheduler.init_noise_sigma)) <= 1e-6 * float(scheduler.init_noise_sigma)
    got = run_jax(plan, x)
    errs = [max_rel_err(g, r) for g, r in zip(got, ref)]
    assert max(errs) <= TOL, f"{kind} {prediction_type} {spacing}: worst step {int(np.argmax(errs))} {max(errs):.2e}"
    # the same run as one fori_loop
    final = jax.jit(lambda z: sample_loop(plan, lambda m, t: fake_model(m, t.astype(jnp.float32), jnp), z))(
        jnp.asarray(x) * plan.init_noise_sigma)
    assert max_rel_err(final, ref[-1]) <= TOL


@pytest.mark.parametrize("solver_type,steps,final", [("heun", 20, "zero"), ("midpoint", 8, "sigma_min"),
                                                     ("midpoint", 16, "sigma_min")])
def test_dpm_solver_variants(solver_type, steps, final):
    """The other DPM-Solver++ settings: heun, and the final-order rules around 15 steps with a sigma_min end."""
    cfg = {**SD_SCHEDULER, "solver_type": solver_type, "final_sigmas_type": final}
    x = np.random.default_rng(1).standard_normal((1, 4, 4, 4)).astype(np.float32)
    _, ref = run_torch(DPMSolverMultistepScheduler.from_config(cfg), x, steps)
    got = run_jax(DPMSolverMultistepConfig.from_hf_config(cfg).set_timesteps(steps), x)
    assert max(max_rel_err(g, r) for g, r in zip(got, ref)) <= TOL


@pytest.mark.parametrize("kind,steps", [("euler", 12), ("dpm++2m", 20), ("dpm++2m", 10)])
def test_karras_sigmas(kind, steps):
    """use_karras_sigmas: the Karras noise levels, fractional (Euler) or rounded (DPM) timesteps, whole runs."""
    torch_cls, ours = PAIRS[kind]
    cfg = {**SD_SCHEDULER, "use_karras_sigmas": True, "timestep_spacing": "leading"}
    x = np.random.default_rng(6).standard_normal((1, 4, 4, 4)).astype(np.float32)
    scheduler, ref = run_torch(torch_cls.from_config(cfg), x, steps)
    plan = ours.from_hf_config(cfg).set_timesteps(steps)
    np.testing.assert_allclose(plan.timesteps, scheduler.timesteps.numpy(), rtol=1e-6)
    got = run_jax(plan, x)
    assert max(max_rel_err(g, r) for g, r in zip(got, ref)) <= TOL


def test_ddim_eta_and_clip():
    cfg = {**SD_SCHEDULER, "clip_sample": True, "set_alpha_to_one": True}
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    noises = rng.standard_normal((10, 1, 4, 4, 4)).astype(np.float32)
    _, ref = run_torch(DDIMScheduler.from_config(cfg), x, 10, eta=0.7, noises=noises)
    got = run_jax(DDIMConfig.from_hf_config(cfg).set_timesteps(10), x, eta=0.7, noises=noises)
    assert max(max_rel_err(g, r) for g, r in zip(got, ref)) <= TOL


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_noise_schedule(prediction_type):
    cfg = {**SD_SCHEDULER, "prediction_type": prediction_type}
    ref = DDPMScheduler.from_config(cfg)
    ours = ScheduleConfig.from_hf_config(cfg)
    np.testing.assert_allclose(ours.alphas_cumprod(), ref.alphas_cumprod.numpy(), rtol=1e-6)
    rng = np.random.default_rng(3)
    x0 = rng.standard_normal((4, 6, 5, 4)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, 17, 500, 999])
    tt = torch.from_numpy(t)
    noisy = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
    velocity = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
    assert max_rel_err(add_noise(ours, x0, noise, t), noisy) <= 1e-6
    assert max_rel_err(get_velocity(ours, x0, noise, t), velocity) <= 1e-6
    expected = noise if prediction_type == "epsilon" else velocity
    assert max_rel_err(training_target(ours, x0, noise, t), expected) <= 1e-6


def test_guidance_matches_diffusers():
    rng = np.random.default_rng(4)
    uncond, cond = (rng.standard_normal((2, 6, 5, 4)).astype(np.float32) for _ in range(2))
    pred = uncond + 7.5 * (cond - uncond)
    ref = rescale_noise_cfg(torch.from_numpy(pred), torch.from_numpy(cond), guidance_rescale=0.7).numpy()
    assert max_rel_err(guided(uncond, cond, 7.5, 0.7), ref) <= 1e-6
    assert max_rel_err(guided(uncond, cond, 7.5), pred) <= 1e-6
    # cfg_denoise: one batched call, [uncond; cond] order, same result as two calls
    model = lambda x, t, context: x * context[:, None, None, :1] + t  # noqa: E731
    ctx_c, ctx_u = rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal((2, 3)).astype(np.float32)
    x = jnp.asarray(uncond)
    out = cfg_denoise(model, {"context": ctx_c}, {"context": ctx_u}, 5.0)(x, 3.0)
    expect = guided(model(x, 3.0, ctx_u), model(x, 3.0, ctx_c), 5.0)
    assert max_rel_err(out, expect) <= 1e-6


def test_scheduler_config_errors():
    with pytest.raises(ValueError, match="algorithm_type"):
        DPMSolverMultistepConfig.from_hf_config({**SD_SCHEDULER, "algorithm_type": "sde-dpmsolver++"})
    with pytest.raises(ValueError, match="not_a_field"):
        EulerDiscreteConfig.from_hf_config({**SD_SCHEDULER, "not_a_field": 1})
    with pytest.raises(ValueError, match="prediction_type"):
        DDIMConfig.from_hf_config({**SD_SCHEDULER, "prediction_type": "flow"})
