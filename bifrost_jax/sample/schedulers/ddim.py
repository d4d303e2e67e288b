"""diffusers ``DDIMScheduler`` (deterministic with ``eta=0``; ``eta > 0`` takes the noise as an argument).

The previous timestep is always t - num_train_timesteps // num_steps, whatever the spacing (diffusers' rule), with
``final_alpha_cumprod`` (1 with ``set_alpha_to_one``, else alpha_bar_0) below zero.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from bifrost_jax.models.unet.noise_schedule import ScheduleConfig, predict_x0_eps
from bifrost_jax.sample.schedulers.base import Plan, table


def spaced_timesteps(num_train: int, n: int, spacing: str, steps_offset: int) -> np.ndarray:
    """Integer timesteps, descending, by diffusers' "linspace", "leading" (+ steps_offset) or "trailing" rule."""
    if n > num_train:
        raise ValueError(f"{n} sampling steps exceed num_train_timesteps={num_train}")
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        ratio = num_train // n
        return (np.arange(0, n) * ratio).round()[::-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(num_train, 0, -num_train / n)).astype(np.int64) - 1
    raise ValueError(f"timestep_spacing={spacing!r} is not one of 'linspace', 'leading', 'trailing'")


@dataclasses.dataclass(frozen=True)
class DDIMConfig(ScheduleConfig):
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    timestep_spacing: str = "leading"
    thresholding: bool = False

    UNSUPPORTED = {**ScheduleConfig.UNSUPPORTED, "thresholding": (False,)}

    def set_timesteps(self, num_inference_steps: int) -> "DDIMPlan":
        return DDIMPlan(self, num_inference_steps)


class DDIMPlan(Plan):
    def __init__(self, config: DDIMConfig, n: int):
        self.config = config
        ac = config.alphas_cumprod()
        final = np.float32(1.0) if config.set_alpha_to_one else ac[0]
        self.timesteps = spaced_timesteps(config.num_train_timesteps, n, config.timestep_spacing, config.steps_offset)
        prev = self.timesteps - config.num_train_timesteps // n
        alpha_t = ac[self.timesteps]
        alpha_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(np.float32)
        beta_t, beta_prev = 1 - alpha_t, 1 - alpha_prev
        self._alpha_t, self._alpha_prev = table(alpha_t), table(alpha_prev)
        self._variance = table((beta_prev / beta_t) * (1 - alpha_t / alpha_prev))

    def step(self, model_output, i, sample, state, noise=None, eta: float = 0.0):
        cfg = self.config
        alpha_t, alpha_prev = self._alpha_t[i], self._alpha_prev[i]
        x0, eps = predict_x0_eps(cfg.prediction_type, model_output, sample, alpha_t ** 0.5, (1 - alpha_t) ** 0.5)
        if cfg.clip_sample:
            x0 = jnp.clip(x0, -cfg.clip_sample_range, cfg.clip_sample_range)
        std = eta * self._variance[i] ** 0.5
        prev = alpha_prev ** 0.5 * x0 + (1 - alpha_prev - std ** 2) ** 0.5 * eps
        if eta > 0:
            if noise is None:
                raise ValueError("DDIM with eta > 0: pass the step's noise")
            prev = prev + std * noise
        return prev.astype(model_output.dtype), state
