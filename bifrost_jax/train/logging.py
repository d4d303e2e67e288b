"""Training metrics: a tqdm progress bar on stdout, TensorBoard event files (tensorboardX) and ``metrics.jsonl``.

Logged every ``train.log_every`` steps: the step's metrics (loss, learning rate, gradient norm and whatever the
phase returns) and throughput over the interval: examples/s, tokens/s, and TFLOP/s per device, the compiled step's
FLOPs per device (XLA ``cost_analysis()`` of the partitioned program, or the phase's analytic count) divided by the
step time. Only process 0 writes.

FLOPs accounting (:class:`StepFlops`, built by :func:`step_flops` once the step is compiled), logged at the start
and on every log line:

* ``model_flops_per_step``: XLA's cost analysis of the compiled step, per device x devices (all devices, one step).
  It counts elementwise work and remat recomputation too, but a while-loop body (scanned layers, gradient
  accumulation) only ONCE, so it undercounts scanned models by about their depth;
* ``analytic_flops_per_step``: ``Phase.analytic_flops`` (``bifrost_jax.models.flops``): matmuls + attention of
  every module, x3 / x2 / x1 by how the step runs it, no remat recomputation: the "model FLOPs" of MFU;
* ``mfu`` = analytic FLOPs per step / (step time x devices x peak bf16 FLOP/s per device), only where a peak is
  known: ``BIFROST_PEAK_TFLOPS`` (env, per device), else ``config.train.peak_tflops_per_device`` (> 0), else the
  device table of ``parallel/devices.py`` (none for CPU: no mfu is logged there). Without an analytic count the
  XLA count stands in.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np

from bifrost_jax.parallel import devices as devspec
from bifrost_jax.train.state import compiled_flops

PEAK_ENV = "BIFROST_PEAK_TFLOPS"


def resolve_peak(config=None, devices: Optional[Sequence] = None) -> tuple[Optional[float], str]:
    """(peak bf16 FLOP/s per device, where it came from): env ``BIFROST_PEAK_TFLOPS``, config
    ``train.peak_tflops_per_device`` (> 0), the device table, else (None, reason)."""
    env = os.environ.get(PEAK_ENV, "").strip()
    if env:
        try:
            value = float(env)
        except ValueError:
            raise ValueError(f"{PEAK_ENV}={env!r} is not a number (peak TFLOP/s per device)") from None
        if value <= 0:
            raise ValueError(f"{PEAK_ENV}={env!r} must be > 0 (peak TFLOP/s per device)")
        return value * 1e12, f"env {PEAK_ENV}"
    train = config.get("train", None) if config is not None else None
    value = float(train.get("peak_tflops_per_device", 0.0) or 0.0) if train is not None else 0.0
    if value > 0:
        return value * 1e12, "config.train.peak_tflops_per_device"
    devices = list(jax.devices()) if devices is None else list(devices)
    spec = devspec.per_device(devices)
    if spec.peak_bf16_flops:
        return spec.peak_bf16_flops, f"device table ({spec.chip.name}, {spec.devices_per_chip} device(s) per chip)"
    kind = spec.device_kind or (devices[0].platform if devices else "?")
    return None, (f"no peak FLOP/s known for device kind {kind!r}: no mfu logged (set {PEAK_ENV} or "
                  "config.train.peak_tflops_per_device)")


@dataclasses.dataclass
class StepFlops:
    """FLOPs of one training step (global: all devices) and the peak they are measured against."""
    devices: int
    model_flops_per_step: Optional[float] = None      # XLA cost analysis x devices
    analytic_flops_per_step: Optional[float] = None   # Phase.analytic_flops(batch).total
    peak_flops_per_device: Optional[float] = None
    peak_source: str = ""
    breakdown: Any = None                              # the FlopsBreakdown, for the start-up table

    @property
    def mfu_flops(self) -> Optional[float]:
        """The FLOPs MFU is computed from: analytic, else XLA's."""
        return self.analytic_flops_per_step or self.model_flops_per_step

    @property
    def flops_per_device(self) -> Optional[float]:
        """For TFLOP/s per device: XLA's count when known (what the hardware executes), else the analytic one."""
        f = self.model_flops_per_step or self.analytic_flops_per_step
        return None if not f else f / self.devices

    def mfu(self, step_seconds: float) -> Optional[float]:
        if not (self.mfu_flops and self.peak_flops_per_device and step_seconds > 0):
            return None
        return self.mfu_flops / (step_seconds * self.devices * self.peak_flops_per_device)

    def summary(self) -> str:
        g = lambda x: "unknown" if not x else f"{x:.4g}"  # noqa: E731
        lines = [f"FLOPs per step (all {self.devices} devices): XLA cost analysis {g(self.model_flops_per_step)}, "
                 f"analytic {g(self.analytic_flops_per_step)}"]
        if self.model_flops_per_step and self.analytic_flops_per_step:
            lines[0] += (f" (XLA / analytic = {self.model_flops_per_step / self.analytic_flops_per_step:.3f}; XLA "
                         "adds elementwise work and remat recomputation, and counts scanned layers once)")
        if self.peak_flops_per_device:
            lines.append(f"peak {self.peak_flops_per_device / 1e12:.1f} TFLOP/s per device from {self.peak_source}")
        else:
            lines.append(f"peak unknown: {self.peak_source}")
        if self.breakdown is not None:
            lines.append(self.breakdown.table())
        return "\n".join(lines)


def step_flops(phase, compiled, batch_size: int, devices: int, config=None,
               device_list: Optional[Sequence] = None) -> StepFlops:
    """The :class:`StepFlops` of a compiled train step of ``phase`` at global ``batch_size`` over ``devices``."""
    per_device = compiled_flops(compiled) if compiled is not None else None
    breakdown = phase.analytic_flops(batch_size)
    analytic = breakdown.total if breakdown is not None else None
    if analytic is None:  # a phase that only overrides flops_per_example
        per_example = phase.flops_per_example()
        analytic = None if per_example is None else per_example * batch_size
    peak, source = resolve_peak(config, device_list)
    return StepFlops(devices=devices, model_flops_per_step=None if per_device is None else per_device * devices,
                     analytic_flops_per_step=analytic, peak_flops_per_device=peak, peak_source=source,
                     breakdown=breakdown)


class MetricsLogger:
    def __init__(self, logdir: str, *, total_steps: int, initial_step: int, examples_per_step: int,
                 tokens_per_example: int, flops_per_step_per_device: float | None = None,
                 flops: StepFlops | None = None, enabled: bool | None = None, progress_bar: bool = True,
                 tensorboard: bool = True, description: str | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.examples_per_step = examples_per_step
        self.tokens_per_example = tokens_per_example
        self.step_flops = flops
        self.flops = flops_per_step_per_device if flops is None else flops.flops_per_device
        self._last_step, self._last_time = initial_step, time.perf_counter()
        self._writer = self._bar = self._jsonl = None
        if not self.enabled:
            return
        os.makedirs(logdir, exist_ok=True)
        if tensorboard:
            from tensorboardX import SummaryWriter  # imports torch when it is installed: seconds
            self._writer = SummaryWriter(os.path.join(logdir, "tensorboard"))
        self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a")
        if progress_bar:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                             desc=description)

    def restart_clock(self, step: int) -> None:
        """Exclude compilation or checkpoint time from the next throughput figure."""
        self._last_step, self._last_time = step, time.perf_counter()

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Log ``metrics`` (device arrays are fetched here) at ``step`` (steps done so far)."""
        values = {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}
        now = time.perf_counter()
        steps, elapsed = step - self._last_step, now - self._last_time
        if steps > 0 and elapsed > 0:
            step_time = elapsed / steps
            values["step_time_s"] = step_time
            values["examples_per_s"] = self.examples_per_step / step_time
            values["tokens_per_s"] = values["examples_per_s"] * self.tokens_per_example
            if self.flops:
                values["tflops_per_s_per_device"] = self.flops / step_time / 1e12
            sf = self.step_flops
            if sf is not None:
                if sf.model_flops_per_step:
                    values["model_flops_per_step"] = sf.model_flops_per_step
                if sf.analytic_flops_per_step:
                    values["analytic_flops_per_step"] = sf.analytic_flops_per_step
                mfu = sf.mfu(step_time)
                if mfu is not None:
                    values["mfu"] = mfu
        self._last_step, self._last_time = step, now
        if not self.enabled:
            return values
        if self._writer is not None:
            for k, v in values.items():
                self._writer.add_scalar(f"train/{k}", v, step)
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            shown = {k: values[k] for k in ("loss", "lr", "grad_norm", "examples_per_s", "mfu") if k in values}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=True)
        return values

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._bar is not None:
            self._bar.close()
