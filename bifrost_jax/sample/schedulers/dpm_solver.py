"""diffusers ``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"`` (DPM-Solver++ 1S/2M, midpoint or
heun), the scheduler SD and SDXL pipelines default to for fast sampling, with Karras sigmas
(``use_karras_sigmas``: "DPM++ 2M Karras") or the spaced timesteps.

The model output is turned into x_0; step i uses x_0 at i (and at i-1 for the second order). diffusers' order
rules: the first step, and the last one with ``lower_order_final`` when there are fewer than 15 steps,
``euler_at_final`` or a final sigma of 0, are first order. The per-step coefficients are fixed by the plan, so a
step is a few fused multiply-adds; the carried state is the previous x_0.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from bifrost_jax.models.unet.noise_schedule import ScheduleConfig, karras_sigmas, predict_x0_eps
from bifrost_jax.sample.schedulers.base import Plan, table


def dpm_timesteps(num_train: int, n: int, spacing: str, steps_offset: int) -> np.ndarray:
    """Integer timesteps by the DPM-Solver rules (n + 1 points, the last dropped, for linspace and leading)."""
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = num_train // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.arange(num_train, 0, -num_train / n).round().astype(np.int64) - 1
    raise ValueError(f"timestep_spacing={spacing!r} is not one of 'linspace', 'leading', 'trailing'")


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepConfig(ScheduleConfig):
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    thresholding: bool = False

    UNSUPPORTED = {**ScheduleConfig.UNSUPPORTED, "solver_order": (1, 2), "algorithm_type": ("dpmsolver++",),
                   "solver_type": ("midpoint", "heun"),
                   "final_sigmas_type": ("zero", "sigma_min"), "lambda_min_clipped": (-float("inf"),),
                   "thresholding": (False,)}

    def set_timesteps(self, num_inference_steps: int) -> "DPMSolverPlan":
        return DPMSolverPlan(self, num_inference_steps)


class DPMSolverPlan(Plan):
    def __init__(self, config: DPMSolverMultistepConfig, n: int):
        self.config = config
        if config.use_karras_sigmas:  # "DPM++ 2M Karras": Karras levels over the whole range, timesteps rounded
            karras = karras_sigmas(config.train_sigmas()[::-1], n)
            self.timesteps = config.sigma_to_t(karras).round().astype(np.int64)
            sigmas = config.append_final_sigma(karras, config.final_sigmas_type)
        else:
            self.timesteps = dpm_timesteps(config.num_train_timesteps, n, config.timestep_spacing,
                                           config.steps_offset)
            sigmas = config.sigmas(self.timesteps, config.final_sigmas_type)
        steps = len(self.timesteps)
        with np.errstate(divide="ignore"):
            alpha = (1 / (sigmas.astype(np.float64) ** 2 + 1) ** 0.5)
            sigma_t = sigmas * alpha
            lam = np.log(alpha) - np.log(sigma_t)  # +inf at a final sigma of 0
        idx = np.arange(steps)
        h = lam[idx + 1] - lam[idx]
        e = np.exp(-h) - 1.0  # -1 at the final zero sigma
        first = np.zeros(steps, bool)
        first[0] = True
        last_low = (config.euler_at_final or (config.lower_order_final and steps < 15)
                    or config.final_sigmas_type == "zero")
        first[-1] |= last_low
        first |= config.solver_order == 1
        h0 = np.where(idx > 0, lam[idx] - lam[np.maximum(idx - 1, 0)], 1.0)
        r0 = np.where(first, 1.0, h0 / np.where(np.isfinite(h), h, 1.0))
        if config.solver_type == "midpoint":
            d1 = -0.5 * alpha[idx + 1] * e
        else:
            d1 = alpha[idx + 1] * (np.where(np.isfinite(h), e / np.where(h == 0, 1.0, h), 0.0) + 1.0)
        self._alpha, self._sigma = table(alpha[:-1]), table(sigma_t[:-1])
        self._ratio = table(np.where(np.isfinite(h), sigma_t[idx + 1] / sigma_t[idx], 0.0))
        self._phi = table(alpha[idx + 1] * e)
        self._d1 = table(np.where(first, 0.0, d1))
        self._inv_r0 = table(1.0 / r0)
        self.first_order = first

    def init_state(self, sample):
        return sample * 0  # x_0 of the previous step (unused at step 0)

    def step(self, model_output, i, sample, state, noise=None):
        del noise
        x0, _ = predict_x0_eps(self.config.prediction_type, model_output, sample, self._alpha[i], self._sigma[i])
        d1 = (x0 - state) * self._inv_r0[i]
        x = sample.astype(x0.dtype)
        prev = self._ratio[i] * x - self._phi[i] * x0 + self._d1[i] * d1
        return prev.astype(model_output.dtype), x0
