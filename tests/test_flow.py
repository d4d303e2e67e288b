"""The FLUX flow-matching sampler against diffusers' FlowMatchEulerDiscreteScheduler (FLUX.1-dev settings)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_shift

from bifrost_jax.sample import flow

FLUX_DEV_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                          num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


def _reference_scheduler(num_steps, seq_len):
    sched = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    mu = diffusers_shift(seq_len, 256, 4096, 0.5, 1.15)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return sched


@pytest.mark.parametrize("num_steps,seq_len", [(28, 1024), (4, 64), (10, 4096)])
def test_sigmas_match_diffusers(num_steps, seq_len):
    ref = _reference_scheduler(num_steps, seq_len).sigmas.numpy()
    np.testing.assert_allclose(flow.flux_sigmas(num_steps, seq_len), ref, rtol=1e-6, atol=1e-7)
    assert flow.calculate_shift(seq_len) == pytest.approx(diffusers_shift(seq_len))


def test_spec_schedule_values():
    # docs/design.md §8.2: 512 px (1024 tokens), 28 steps: mu = 0.63 (rounded), sigmas 1.000, 0.981, ..., 0.065, 0
    s = flow.flux_sigmas(28, 1024)
    assert flow.calculate_shift(1024) == pytest.approx(0.63, abs=1e-6)
    np.testing.assert_allclose([s[0], s[1], s[-2], s[-1]], [1.0, 0.981, 0.065, 0.0], atol=1e-3)


def test_euler_matches_scheduler_steps(rng):
    num_steps, seq_len = 6, 32
    w = rng.normal(size=(8, 8)).astype(np.float32) * 0.3
    x0 = rng.normal(size=(2, seq_len, 8)).astype(np.float32)

    def velocity_np(x, sigma):
        return np.tanh(x @ w) * (1.0 + sigma)

    sched = _reference_scheduler(num_steps, seq_len)
    x = torch.from_numpy(x0.copy())
    for t in sched.timesteps:
        sigma = float(t) / 1000.0
        v = torch.from_numpy(velocity_np(x.numpy(), np.float32(sigma)))
        x = sched.step(v, t, x, return_dict=False)[0]

    out = jax.jit(lambda x: flow.euler_sample(lambda x, s: jnp.tanh(x @ w) * (1.0 + s), x,
                                              flow.flux_sigmas(num_steps, seq_len)))(jnp.asarray(x0))
    np.testing.assert_allclose(np.asarray(out), x.numpy(), rtol=1e-5, atol=1e-5)


def test_training_sigmas_on_grid():
    s = np.asarray(flow.sample_training_sigmas(jax.random.PRNGKey(0), 4096))
    assert s.min() > 0 and s.max() <= 1.0
    np.testing.assert_allclose(s * 1000, np.round(s * 1000), atol=1e-3)
    # logit-normal(0, 1) is symmetric around 0.5
    assert abs(float(np.median(s)) - 0.5) < 0.03
    x0, eps = jnp.ones((4, 3)), jnp.zeros((4, 3))
    np.testing.assert_allclose(flow.add_noise(x0, eps, jnp.asarray([0.0, 0.25, 0.5, 1.0])),
                               np.repeat([[1.0], [0.75], [0.5], [0.0]], 3, axis=1))
