"""Sampling schedulers for the UNet family, pure JAX, diffusers' semantics: DDIM, Euler discrete, DPM-Solver++
(2M), the loop that drives them, and classifier-free guidance. The noise schedule (training targets, add_noise)
is ``bifrost_jax.models.unet.noise_schedule``."""
from bifrost_jax.sample.schedulers.base import Plan, sample_loop  # noqa: F401
from bifrost_jax.sample.schedulers.ddim import DDIMConfig  # noqa: F401
from bifrost_jax.sample.schedulers.dpm_solver import DPMSolverMultistepConfig  # noqa: F401
from bifrost_jax.sample.schedulers.euler import EulerDiscreteConfig  # noqa: F401
from bifrost_jax.sample.schedulers.guidance import cfg_denoise, guided  # noqa: F401

SCHEDULERS = {"DDIMScheduler": DDIMConfig, "EulerDiscreteScheduler": EulerDiscreteConfig,
              "DPMSolverMultistepScheduler": DPMSolverMultistepConfig}
# what a UNet decoder samples with unless told otherwise (a generation config's sample.scheduler, --sampler)
DEFAULT_SAMPLER = "DPMSolverMultistepScheduler"
