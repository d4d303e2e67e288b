"""benchmarks/device_check.py's CPU dry run (tiny sizes): every section runs and the report holds what the GPU run
will be read for -- the attention paths' errors against a float32 reference, the JAX denoising step beside diffusers
on the same weights, the training steps' times and analytic FLOPs (cuDNN is skipped on CPU, with the reason)."""
import importlib.util
import json
import math
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script():
    spec = importlib.util.spec_from_file_location("device_check", os.path.join(REPO, "benchmarks", "device_check.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("device_check"))
    _load_script().main(["--dry-run", "--out", out])
    with open(os.path.join(out, "device_check.json")) as fh:
        data = json.load(fh)
    with open(os.path.join(out, "device_check.md")) as fh:
        return data, fh.read()


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_every_section_ran(report):
    data, md = report
    assert data["size"] == "tiny"
    assert set(data["sections"]) == {"attention", "generate", "train_controlnet", "train_mllm"}
    errors = {k: v["error"] for k, v in data["sections"].items() if "error" in v}
    assert not errors, errors
    assert data["device"]["backend"] == "cpu" and not data["skipped"]
    for heading in ("attention case", "denoising step", "train_controlnet:", "train_mllm:"):
        assert heading in md


def test_attention_paths(report):
    cases = report[0]["sections"]["attention"]
    assert set(cases) == {"flux_joint", "qwen_decoder_gqa_padded", "vit_windowed"}
    for case in cases.values():
        xla = case["implementations"]["xla"]
        assert _positive(xla["fwd_ms"]) and _positive(xla["fwd_bwd_ms"])
        assert xla["max_rel_err_vs_reference"] <= 1e-5  # float32 on CPU: the XLA path equals jax.nn's
        assert "GPU" in case["implementations"]["cudnn"]["skipped"]
    assert cases["qwen_decoder_gqa_padded"]["kv"][2] < cases["qwen_decoder_gqa_padded"]["q"][2]  # GQA


def test_generation_step_beside_diffusers(report):
    gen = report[0]["sections"]["generate"]
    assert len(gen["resolutions"]) == 1  # the tiny size has one resolution (full size: 1024 and 512 px)
    for r in gen["resolutions"].values():
        assert _positive(r["jax"]["ms_per_step"]) and _positive(r["torch"]["ms_per_step"])
        assert _positive(r["torch_over_jax"])
        # same weights (diffusers' init read through the port key maps), float32: the velocities agree
        assert r["velocity_max_rel_diff"] <= 1e-4


@pytest.mark.parametrize("name", ["train_controlnet", "train_mllm"])
def test_training_steps(report, name):
    r = report[0]["sections"][name]
    for key in ("step_ms", "examples_per_s", "tokens_per_s", "analytic_flops_per_step", "achieved_tflops"):
        assert _positive(r[key]), (key, r[key])
    assert math.isfinite(r["loss"])
    assert r["mfu"] is None and "peak" in r["mfu_note"]  # no peak FLOP/s for a CPU
