"""The sampling-scheduler interface and the loop that drives it.

A scheduler config (``DDIMConfig``, ``EulerDiscreteConfig``, ``DPMSolverMultistepConfig``: diffusers' fields and
defaults) gives, for a number of steps, a ``Plan``: static numpy tables and pure functions of the step INDEX ``i``
(which may be traced, so a whole run is one ``lax.fori_loop``)::

    plan = DDIMConfig.from_hf_config(scheduler_config_json).set_timesteps(50)
    x = noise * plan.init_noise_sigma
    state = plan.init_state(x)
    for i in range(plan.num_steps):                                   # or sample_loop(plan, denoise, x)
        eps = unet(plan.scale_model_input(x, i), plan.timesteps[i], ...)
        x, state = plan.step(eps, i, x, state)

``step`` equals diffusers' ``scheduler.step(...).prev_sample`` at ``scheduler.timesteps[i]``.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


class Plan:
    """A scheduler set to a number of steps. Subclasses fill ``timesteps`` (numpy, what the model is given) and
    ``init_noise_sigma`` and implement ``step``."""
    timesteps: np.ndarray
    init_noise_sigma: float = 1.0

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def scale_model_input(self, sample, i):
        del i
        return sample

    def init_state(self, sample) -> Any:
        del sample
        return ()

    def step(self, model_output, i, sample, state, noise=None):
        raise NotImplementedError


def table(values) -> jax.Array:
    """A per-step float32 table indexed by a (possibly traced) step index."""
    return jnp.asarray(np.asarray(values, np.float32))


def sample_loop(plan: Plan, denoise: Callable, latents, *, start: int = 0):
    """Run ``plan`` from step ``start`` on ``latents`` (already multiplied by ``init_noise_sigma``):
    ``denoise(model_input, timestep) -> model_output`` (the UNet with guidance). A ``lax.fori_loop``."""
    timesteps = jnp.asarray(plan.timesteps)

    def body(i, carry):
        x, state = carry
        out = denoise(plan.scale_model_input(x, i), timesteps[i])
        return plan.step(out, i, x, state)

    x, _ = jax.lax.fori_loop(start, plan.num_steps, body, (latents, plan.init_state(latents)))
    return x
