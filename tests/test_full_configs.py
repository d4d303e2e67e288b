"""The full-size configs (configs/full/*.py) load, name only known remat policies, and build the full-size models:
parameter counts from abstract shapes (``jax.eval_shape``: nothing allocated) against the released models'
(Qwen2.5-VL-7B: 7.07B language model + 0.68B ViT; FLUX.1-dev 11.90B; T5-XXL encoder 4.76B; CLIP-L text 0.12B; the
FLUX VAE 0.08B), and the full-size generation config of ``bifrost aot --phase generate``."""
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

import bifrost_jax.train.phase_configs  # noqa: F401  (registers the phases)
from bifrost_jax.configs import load_config_file
from bifrost_jax.nn.stack import REMAT_POLICIES
from bifrost_jax.train.registry import get_phase

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _counts(name):
    config = load_config_file(os.path.join(ROOT, "configs", "full", f"{name}.py"))
    for section in config.values():
        if hasattr(section, "get") and section.get("remat_policy"):
            assert section.remat_policy in REMAT_POLICIES, section.remat_policy
    phase = get_phase(config)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(phase.init_variables(jax.random.PRNGKey(0))))
    counts: dict = {}
    for k, v in traverse_util.flatten_dict(shapes["params"]).items():
        key = (str(k[0]), bool(phase.is_trainable(tuple(str(p) for p in k))))
        counts[key] = counts.get(key, 0) + int(np.prod(v.shape))
    return config, {k: v / 1e9 for k, v in counts.items()}


def test_full_mllm_config():
    config, b = _counts("mllm")
    assert b[("mllm", False)] == pytest.approx(7.071, abs=0.002)   # frozen Qwen2.5-VL-7B language model
    assert b[("mllm", True)] == pytest.approx(6.539, abs=0.002)    # the generation branch (+ head, mask token)
    assert b[("vision", False)] == pytest.approx(0.677, abs=0.002)
    assert config.mesh.tensor == 4 and config.mllm.remat_policy == "dots_no_batch"
    assert config.train.frozen_param_dtype == "bfloat16"


def test_full_controlnet_config():
    config, b = _counts("controlnet")
    assert b[("transformer", False)] == pytest.approx(11.901, abs=0.002)   # FLUX.1-dev, frozen
    assert b[("t5", False)] == pytest.approx(4.762, abs=0.002)
    assert b[("clip", False)] == pytest.approx(0.123, abs=0.002)
    assert b[("controlnet", True)] == pytest.approx(1.771, abs=0.002)      # 4 double + 1 single blocks + upsampler
    assert not any(trainable for (comp, trainable) in b if comp != "controlnet")
    assert config.mesh.tensor == 1 and config.flux.remat_policy == "dots_no_batch"


def test_full_flux_config():
    config, b = _counts("flux")
    assert b[("transformer", True)] == pytest.approx(11.901, abs=0.002)   # FLUX.1-dev, trained
    assert b[("t5", False)] == pytest.approx(4.762, abs=0.002)
    assert b[("clip", False)] == pytest.approx(0.123, abs=0.002)
    assert b[("vae", False)] == pytest.approx(0.084, abs=0.001)           # FLUX VAE encoder + decoder
    assert set(b) == {("transformer", True), ("t5", False), ("clip", False), ("vae", False)}
    assert config.phase == "flux" and config.train.batch_size == 64


def test_full_generate_aot_config():
    """configs/full/generate_aot.py builds the ``generate`` AOT target's abstract weights (nothing allocated) on an
    8-device mesh: the Bifrost MLLM (7.07B frozen Qwen2.5-VL-7B language model + 6.54B branch), FLUX.1-dev and the
    4 double / 1 single latent ControlNet, in bf16; one image per batch shard."""
    import math

    from bifrost_jax import aot
    from bifrost_jax.aot.generate import generate_target

    config = load_config_file(os.path.join(ROOT, "configs", "full", "generate_aot.py"))
    assert aot.resolve_target(None, config)[0] == "generate"
    mesh = aot.make_topology_mesh("cpu:8", dict(config.mesh))
    target = generate_target(config, mesh)
    billions = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree)) / 1e9  # noqa: E731
    mllm, flux, controlnet = target.args[0], target.args[6], target.args[7]
    assert billions(mllm) == pytest.approx(7.071 + 6.539, abs=0.003)
    assert billions(flux) == pytest.approx(11.901, abs=0.002)
    assert billions(controlnet) == pytest.approx(1.771, abs=0.002)
    weights = (mllm["params"], flux["params"], controlnet["params"])  # (the ControlNet's BatchNorm statistics: fp32)
    assert {x.dtype.name for x in jax.tree.leaves(weights)} == {"bfloat16"}
    assert "8 rows x 256 slots vs a 300-token prefix" in target.description  # batch 8 = fsdp 8, no MLLM CFG
    assert "1024 image + 512 text tokens" in target.description
    assert target.analytic is not None and target.analytic.total > 0
