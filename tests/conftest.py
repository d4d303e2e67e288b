"""Test set-up: 8 simulated CPU devices and no model hub, set before JAX or transformers are imported."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def max_rel_err(actual, expected) -> float:
    """max |a - e| / max |e|: the parity metric used throughout the tests."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != reference {e.shape}"
    return float(np.max(np.abs(a - e)) / max(np.max(np.abs(e)), 1e-30))


def rel_rms(actual, expected) -> float:
    """||a - e|| / ||e|| over every element: the metric for bf16 error budgets, where one rounding more or less
    shows as a ratio (a maximum over elements is dominated by one unlucky element)."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != reference {e.shape}"
    return float(np.sqrt(np.mean((a - e) ** 2) / max(np.mean(e ** 2), 1e-60)))


def write_sharded_checkpoint(path, tensors, n_shards=2):
    """``tensors`` as HF-sharded safetensors with an index (the official Bifrost-1 checkpoint's layout)."""
    import json

    from bifrost_jax.port.base import write_safetensors

    os.makedirs(path, exist_ok=True)
    keys = sorted(tensors)
    weight_map = {}
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = keys[s::n_shards]
        write_safetensors(os.path.join(path, name), {k: tensors[k] for k in part})
        weight_map.update({k: name for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump({"architectures": ["MultiModalityCausalLM"]}, fh)
