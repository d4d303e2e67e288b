"""diffusers ``EulerDiscreteScheduler`` (sigma-space Euler, ``s_churn=0``): sigmas = sqrt((1 - alpha_bar) /
alpha_bar) interpolated at the (float) timesteps (or Karras levels, ``use_karras_sigmas``), a final 0; the model
input is x / sqrt(sigma^2 + 1)."""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp
import numpy as np

from bifrost_jax.models.unet.noise_schedule import ScheduleConfig, karras_sigmas
from bifrost_jax.sample.schedulers.base import Plan, table


def euler_timesteps(num_train: int, n: int, spacing: str, steps_offset: int) -> np.ndarray:
    """float32 timesteps, descending, by diffusers' Euler rules (linspace is not rounded here)."""
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = num_train // n
        return (np.arange(0, n) * ratio).round()[::-1].astype(np.float32) + steps_offset
    if spacing == "trailing":
        return np.arange(num_train, 0, -num_train / n).round().astype(np.float32) - 1
    raise ValueError(f"timestep_spacing={spacing!r} is not one of 'linspace', 'leading', 'trailing'")


@dataclasses.dataclass(frozen=True)
class EulerDiscreteConfig(ScheduleConfig):
    interpolation_type: str = "linear"
    use_karras_sigmas: bool = False
    sigma_min: Optional[float] = None
    sigma_max: Optional[float] = None
    timestep_spacing: str = "linspace"
    timestep_type: str = "discrete"
    steps_offset: int = 0
    final_sigmas_type: str = "zero"

    UNSUPPORTED = {**ScheduleConfig.UNSUPPORTED, "interpolation_type": ("linear",),
                   "timestep_type": ("discrete",), "final_sigmas_type": ("zero", "sigma_min")}

    def set_timesteps(self, num_inference_steps: int) -> "EulerPlan":
        return EulerPlan(self, num_inference_steps)


class EulerPlan(Plan):
    def __init__(self, config: EulerDiscreteConfig, n: int):
        self.config = config
        self.timesteps = euler_timesteps(config.num_train_timesteps, n, config.timestep_spacing, config.steps_offset)
        sigmas = config.sigmas(self.timesteps, config.final_sigmas_type)
        if config.use_karras_sigmas:  # Karras levels between the spaced ones' ends; fractional timesteps
            karras = karras_sigmas(sigmas[:-1], n, config.sigma_min, config.sigma_max)
            self.timesteps = config.sigma_to_t(karras).astype(np.float32)
            sigmas = config.append_final_sigma(karras, config.final_sigmas_type)
        self._sigmas = table(sigmas)
        top = float(sigmas.max())
        self.init_noise_sigma = top if config.timestep_spacing in ("linspace", "trailing") else (top ** 2 + 1) ** 0.5

    def scale_model_input(self, sample, i):
        return sample / jnp.sqrt(self._sigmas[i] ** 2 + 1).astype(sample.dtype)

    def step(self, model_output, i, sample, state, noise=None):
        del noise
        sigma, sigma_next = self._sigmas[i], self._sigmas[i + 1]
        x = sample.astype(jnp.float32)
        if self.config.prediction_type == "epsilon":
            x0 = x - sigma * model_output
        elif self.config.prediction_type == "v_prediction":
            x0 = model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + x / (sigma ** 2 + 1)
        else:
            x0 = model_output
        derivative = (x - x0) / sigma
        return (x + derivative * (sigma_next - sigma)).astype(model_output.dtype), state
