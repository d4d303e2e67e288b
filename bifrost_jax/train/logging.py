"""Training metrics: a tqdm progress bar on stdout, TensorBoard event files (tensorboardX) and ``metrics.jsonl``.

Logged every ``train.log_every`` steps: the step's metrics (loss, learning rate, gradient norm and whatever the
phase returns) and throughput over the interval: examples/s, tokens/s, and TFLOP/s per device, the compiled step's
FLOPs per device (XLA ``cost_analysis()`` of the partitioned program, or the phase's analytic count) divided by the
step time. Only process 0 writes.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import jax
import numpy as np


class MetricsLogger:
    def __init__(self, logdir: str, *, total_steps: int, initial_step: int, examples_per_step: int,
                 tokens_per_example: int, flops_per_step_per_device: float | None, enabled: bool | None = None,
                 progress_bar: bool = True, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.examples_per_step = examples_per_step
        self.tokens_per_example = tokens_per_example
        self.flops = flops_per_step_per_device
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
            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

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
            shown = {k: values[k] for k in ("loss", "lr", "grad_norm", "examples_per_s") if k in values}
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
