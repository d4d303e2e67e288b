"""Start-up validation of a training config: every value checked before anything is built, each bad one named
with its key, its value and the allowed range (``ConfigError`` lists them all at once).

Covers the keys of ``configs.base_config`` (mesh, train, optim, checkpoint), every ``dtype`` / ``param_dtype`` /
``*_dtype`` key anywhere in the config (a floating dtype name), and the data keys the phases share when present.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import jax.numpy as jnp
import ml_collections


class ConfigError(ValueError):
    """One or more config values are out of range; the message names each key."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# key -> (check, allowed range in words); checked only when the key exists
_INT_MIN = {
    "seed": 0, "train.steps": 1, "train.batch_size": 1, "train.grad_accum_steps": 1, "train.log_every": 1,
    "train.max_bad_steps": 1, "checkpoint.every": 1, "checkpoint.init_step": -1, "optim.warmup_steps": 0,
    "optim.decay_steps": -1, "mesh.dcn_data": 1, "mesh.dcn_fsdp": 1, "mesh.dcn_tensor": 1,
    "data.train_size": 1, "data.image_resolution": 1, "data.vae_resolution": 0, "data.worker_count": 0,
    "data.num_threads": 1, "data.prefetch_buffer_size": 0, "data.num_examples": 1,
}
_REAL_RANGE = {  # key -> (low, high, low inclusive, high inclusive)
    "optim.lr": (0.0, math.inf, True, False), "optim.end_lr_ratio": (0.0, 1.0, True, True),
    "optim.b1": (0.0, 1.0, True, False), "optim.b2": (0.0, 1.0, True, False),
    "optim.eps": (0.0, math.inf, False, False),
    "optim.weight_decay": (0.0, math.inf, True, False), "optim.clip_grad_norm": (0.0, math.inf, True, False),
    "optim.ema_decay": (0.0, 1.0, True, False), "train.peak_tflops_per_device": (0.0, math.inf, True, False),
    "data.text_dropout": (0.0, 1.0, True, True), "data.min_crop_scale": (0.0, 1.0, False, True),
    "data.delay_s": (0.0, math.inf, True, False),
}
_CHOICES = {"optim.name": ("adamw", "sgd")}


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def _walk(node, prefix="") -> Iterator[tuple[str, Any]]:
    for key in node.keys():
        value = node[key]
        path = f"{prefix}{key}"
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            yield from _walk(value, path + ".")
        else:
            yield path, value


def _range_words(low, high, low_inc, high_inc) -> str:
    left = f"{'>=' if low_inc else '>'} {low:g}"
    return left if math.isinf(high) else f"in {'[' if low_inc else '('}{low:g}, {high:g}{']' if high_inc else ')'}"


def problems(config: ml_collections.ConfigDict) -> list[str]:
    """Every out-of-range value of ``config``, as ``"key=value: must be ..."``."""
    out = []
    for key, low in _INT_MIN.items():
        v = _get(config, key)
        if v is not _MISSING and (not _is_int(v) or v < low):
            out.append(f"{key}={v!r}: must be an integer >= {low}")
    for key, (low, high, low_inc, high_inc) in _REAL_RANGE.items():
        v = _get(config, key)
        if v is _MISSING:
            continue
        ok = _is_num(v) and (v >= low if low_inc else v > low) and (v <= high if high_inc else v < high)
        if not ok:
            out.append(f"{key}={v!r}: must be a finite number {_range_words(low, high, low_inc, high_inc)}")
    for key, choices in _CHOICES.items():
        v = _get(config, key)
        if v is not _MISSING and v not in choices:
            out.append(f"{key}={v!r}: must be one of {list(choices)}")
    for axis in ("data", "fsdp", "tensor"):
        v = _get(config, f"mesh.{axis}")
        if v is not _MISSING and (not _is_int(v) or not (v >= 1 or v == -1)):
            out.append(f"mesh.{axis}={v!r}: must be an integer >= 1, or -1 (the remaining devices)")
    if sum(_get(config, f"mesh.{a}") == -1 for a in ("data", "fsdp", "tensor")) > 1:
        out.append("mesh: at most one of data, fsdp, tensor may be -1")
    keep, keep_all = _get(config, "checkpoint.keep"), _get(config, "checkpoint.keep_all")
    if keep is not _MISSING and keep_all is not True and (not _is_int(keep) or keep < 1):
        out.append(f"checkpoint.keep={keep!r}: must be an integer >= 1 (the newest checkpoints kept); to keep every "
                   f"checkpoint set checkpoint.keep_all=True")
    b, k = _get(config, "train.batch_size"), _get(config, "train.grad_accum_steps")
    if _is_int(b) and _is_int(k) and b >= 1 and k >= 1 and b % k:
        out.append(f"train.batch_size={b} does not divide into train.grad_accum_steps={k} micro-batches")
    for key, v in _walk(config):
        name = key.rsplit(".", 1)[-1]
        if (name in ("dtype", "param_dtype") or name.endswith("_dtype")) and isinstance(v, str):
            if v == "" and key == "train.frozen_param_dtype":
                continue
            try:
                ok = jnp.issubdtype(jnp.dtype(v), jnp.floating)
            except TypeError:
                ok = False
            if not ok:
                out.append(f"{key}={v!r}: not a floating dtype name (use 'float32', 'bfloat16' or 'float16')")
    return out


def validate_train_config(config: ml_collections.ConfigDict) -> None:
    """Raise ``ConfigError`` listing every out-of-range value (see the module docstring)."""
    found = problems(config)
    if found:
        raise ConfigError("invalid config value(s):\n  " + "\n  ".join(found))


def keep_count(config: ml_collections.ConfigDict):
    """The number of checkpoints to keep, or None to keep them all."""
    return None if config.checkpoint.get("keep_all", False) else int(config.checkpoint.keep)
