"""The discrete DDPM noise schedule of the Stable Diffusion family, for training and sampling.

    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps          (``add_noise``)
    v_t = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0          (``get_velocity``)

The UNet predicts eps ("epsilon", SD 1.x, SD 2.x base, SDXL) or v ("v_prediction", SD 2.x 768-v): a scheduler
setting, read from the pipeline's ``scheduler/scheduler_config.json`` like diffusers. ``training_target`` is the
regression target of the denoising loss; ``predict_x0_eps`` turns a model output back into (x_0, eps).

Betas follow diffusers exactly in float32: "linear", "scaled_linear" (SD: linspace of sqrt(beta), squared) or a
``trained_betas`` list. The sampling schedulers (``bifrost_jax.sample.schedulers``) extend ``ScheduleConfig``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# diffusers scheduler fields that only other scheduler classes read: a scheduler_config.json written for one
# class is loaded into another (``DDIMScheduler.from_config(pipe.scheduler.config)``), so these are ignored
OTHER_SCHEDULER_FIELDS = frozenset((
    "skip_prk_steps", "variance_type", "sample_max_value", "dynamic_thresholding_ratio", "clip_sample",
    "clip_sample_range", "set_alpha_to_one", "interpolation_type", "use_karras_sigmas", "use_exponential_sigmas",
    "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas", "flow_shift", "sigma_min", "sigma_max", "timestep_type",
    "solver_order", "algorithm_type", "solver_type", "lower_order_final", "euler_at_final", "final_sigmas_type",
    "lambda_min_clipped", "use_dynamic_shifting", "time_shift_type", "thresholding", "rescale_betas_zero_snr",
    "steps_offset", "timestep_spacing", "prediction_type", "predict_epsilon", "variance_type"))
_META_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """The noise-schedule fields every DDPM-family diffusers scheduler has. Subclasses add their sampling fields and
    list, in ``UNSUPPORTED``, values they refuse (field -> accepted values)."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Optional[tuple[float, ...]] = None
    prediction_type: str = "epsilon"
    rescale_betas_zero_snr: bool = False

    UNSUPPORTED = {"rescale_betas_zero_snr": (False,)}

    def __post_init__(self):
        if self.trained_betas is not None:
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
            if len(self.trained_betas) != self.num_train_timesteps:
                raise ValueError(f"{type(self).__name__}: trained_betas has {len(self.trained_betas)} entries for "
                                 f"num_train_timesteps={self.num_train_timesteps}")
        elif self.beta_schedule not in ("linear", "scaled_linear"):
            raise ValueError(f"{type(self).__name__}: beta_schedule={self.beta_schedule!r} is not supported "
                             "('linear', 'scaled_linear' or trained_betas)")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"{type(self).__name__}: prediction_type={self.prediction_type!r} is not one of "
                             f"{PREDICTION_TYPES}")
        for field, allowed in self.UNSUPPORTED.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"{type(self).__name__}: {field}={getattr(self, field)!r} is not supported (this "
                                 f"port implements {' or '.join(repr(a) for a in allowed)})")

    @classmethod
    def from_hf_config(cls, cfg: dict, **overrides):
        """From a diffusers scheduler_config.json of any DDPM-family scheduler: this class's fields are taken, the
        other schedulers' fields ignored (as diffusers' ``from_config``), anything else is an error."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in cfg if k not in fields and k not in OTHER_SCHEDULER_FIELDS
                         and k not in _META_KEYS)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown scheduler config field(s) {unknown}")
        kw = {k: v for k, v in cfg.items() if k in fields}
        kw.update(overrides)
        return cls(**kw)

    def to_hf_config(self, class_name: str) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if out.get("trained_betas") is not None:
            out["trained_betas"] = list(out["trained_betas"])
        return {"_class_name": class_name, **out}

    # ------------------------------------------------------------------------------------------------------------
    def betas(self) -> np.ndarray:
        """float32 (num_train_timesteps,), computed as diffusers does."""
        n = self.num_train_timesteps
        if self.trained_betas is not None:
            return np.asarray(self.trained_betas, np.float32)
        if self.beta_schedule == "linear":
            return np.linspace(self.beta_start, self.beta_end, n, dtype=np.float64).astype(np.float32)
        root = np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=np.float64).astype(np.float32)
        return root * root

    def alphas_cumprod(self) -> np.ndarray:
        """alpha_bar_t, float32 (num_train_timesteps,): float32 alphas, the product accumulated in float64 and
        rounded once, as torch's CPU ``cumprod`` does (diffusers' table to ~4e-7 relative)."""
        return np.cumprod((np.float32(1.0) - self.betas()).astype(np.float64)).astype(np.float32)

    def train_sigmas(self) -> np.ndarray:
        """sqrt((1 - alpha_bar) / alpha_bar) per training timestep, float32."""
        ac = self.alphas_cumprod()
        return ((1 - ac) / ac) ** 0.5

    def sigmas(self, timesteps, final_sigmas_type: str = "zero") -> np.ndarray:
        """float32 (len(timesteps) + 1,): the training sigmas interpolated at the (possibly fractional) timesteps,
        then the final sigma: 0 ("zero") or that of t = 0 ("sigma_min"), as diffusers' sigma-space schedulers."""
        train = self.train_sigmas()
        sigmas = np.interp(np.asarray(timesteps), np.arange(len(train)), train)
        return self.append_final_sigma(sigmas, final_sigmas_type)

    def append_final_sigma(self, sigmas, final_sigmas_type: str) -> np.ndarray:
        last = self.train_sigmas()[0] if final_sigmas_type == "sigma_min" else 0.0
        return np.concatenate([sigmas, [last]]).astype(np.float32)

    def sigma_to_t(self, sigmas) -> np.ndarray:
        """The fractional timesteps of ``sigmas``: linear interpolation in log sigma between the neighbouring
        training timesteps (diffusers ``_sigma_to_t``)."""
        log_sigmas = np.log(self.train_sigmas())
        log_sigma = np.log(np.maximum(np.asarray(sigmas), 1e-10))
        dists = log_sigma[None, :] - log_sigmas[:, None]
        low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
        w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
        return (1 - w) * low + w * (low + 1)


def karras_sigmas(in_sigmas, n: int, sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
                  rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels: ``n`` points evenly spaced in sigma^(1/rho) from sigma_max (default
    ``in_sigmas[0]``) down to sigma_min (default ``in_sigmas[-1]``) (diffusers ``_convert_to_karras``)."""
    lo = float(in_sigmas[-1]) if sigma_min is None else sigma_min
    hi = float(in_sigmas[0]) if sigma_max is None else sigma_max
    ramp = np.linspace(0, 1, n)
    return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def _per_example(values, like):
    """(B,) schedule values broadcast against (B, ...) ``like``."""
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def _alphas(config: ScheduleConfig, timesteps, like):
    ac = jnp.asarray(config.alphas_cumprod())[jnp.asarray(timesteps, jnp.int32)]
    return _per_example(jnp.sqrt(ac), like).astype(like.dtype), _per_example(jnp.sqrt(1.0 - ac), like).astype(
        like.dtype)


def add_noise(config: ScheduleConfig, original_samples, noise, timesteps):
    """x_t for integer ``timesteps`` (B,) (diffusers ``add_noise``)."""
    a, s = _alphas(config, timesteps, original_samples)
    return a * original_samples + s * noise


def get_velocity(config: ScheduleConfig, sample, noise, timesteps):
    """The v target sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (diffusers ``get_velocity``)."""
    a, s = _alphas(config, timesteps, sample)
    return a * noise - s * sample


def training_target(config: ScheduleConfig, original_samples, noise, timesteps):
    """What the UNet regresses: eps, v or x_0, per ``prediction_type``."""
    if config.prediction_type == "epsilon":
        return noise
    if config.prediction_type == "v_prediction":
        return get_velocity(config, original_samples, noise, timesteps)
    return original_samples


def predict_x0_eps(prediction_type: str, model_output, sample, alpha, sigma):
    """(x_0, eps) from a model output at noise level x_t = alpha x_0 + sigma eps (alpha = sqrt(alpha_bar))."""
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha, model_output
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output, alpha * model_output + sigma * sample
    return model_output, (sample - alpha * model_output) / sigma

