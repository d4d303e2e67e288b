"""The PyTorch official-formulation MAR loop of the benchmarks (benchmarks/torch_reference.py: transformers'
Qwen2.5-VL text model with the generation branch attached, both weight sets on every token, [uncond; cond] every
step) decodes what bifrost-jax's fast ``mar_decode`` decodes, on the same weights (exported through the port's
official key map), orders and schedule -- so the benchmark's speed ratio compares equal outputs."""
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_rel_err

from bifrost_jax.models.bifrost import BifrostConfig, BifrostMLLM, random_orders
from bifrost_jax.models.qwen.decoder import QwenTextConfig
from bifrost_jax.port.base import export_mapped
from bifrost_jax.port.bifrost import TEXT_PREFIX, trained_key_map
from bifrost_jax.port.qwen_text import text_key_map
from bifrost_jax.sample.mar import mar_decode, mar_schedule, order_ranks

N, HIDDEN, T, B, VOCAB = 16, 32, 9, 2, 50
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torch_reference():
    spec = importlib.util.spec_from_file_location("torch_reference",
                                                  os.path.join(REPO, "benchmarks", "torch_reference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def models():
    text = QwenTextConfig(hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=VOCAB, mrope_section=(2, 1, 1))
    cfg = BifrostConfig(text=text, num_image_tokens=N, image_grid=(4, 4))
    module = BifrostMLLM(cfg, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    ids = jnp.zeros((B, T), jnp.int32)
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), ids, ids, jnp.zeros((B, N, HIDDEN)),
                                     jnp.ones((B, N), bool)))
    leaves, tree = jax.tree.flatten(shapes)  # every parameter random (mask token and position embedding too)
    variables = jax.tree.unflatten(tree, [jnp.asarray(rng.standard_normal(x.shape) * 0.3, jnp.float32)
                                          for x in leaves])
    tr = _torch_reference()
    official = tr.OfficialBifrostMLLM(text.to_hf_config(), N).eval()
    official.load_numpy_state(export_mapped(variables["params"], {**trained_key_map(cfg, False),
                                                                  **text_key_map(text, False, TEXT_PREFIX)}))
    return module, variables, tr, official


@pytest.mark.parametrize("num_steps,cfg_weight", [(N, 1.0), (5, 2.5)])
def test_pytorch_official_loop_matches_mar_decode(models, num_steps, cfg_weight):
    module, variables, tr, official = models
    rng = np.random.default_rng(num_steps)
    ids = rng.integers(0, VOCAB, (B, T)).astype(np.int32)
    uids = rng.integers(0, VOCAB, (B, T)).astype(np.int32)
    am = np.ones((B, T), np.int32)
    am[0, :3] = 0  # left padding
    key = jax.random.PRNGKey(num_steps)
    fast = mar_decode(module, variables, ids, am, key, num_steps=num_steps, cfg_weight=cfg_weight,
                      uncond_input_ids=uids, uncond_attention_mask=am)
    ranks = np.asarray(order_ranks(random_orders(key, B, N)))
    out = tr.mar_decode_official(official, ids, am, ranks, mar_schedule(N, num_steps), cfg_weight=cfg_weight,
                                 uncond_input_ids=uids, uncond_attention_mask=am).numpy()
    err = max_rel_err(np.asarray(fast), out)
    assert err <= 1e-4, err
    assert max_rel_err(out, np.broadcast_to(out[:, :1], out.shape)) > 1e-2  # slots differ: a real decode


def test_state_dict_is_strict(models):
    _, variables, tr, official = models
    state = {k: v.numpy() for k, v in official.state_dict().items()}
    state.pop(next(k for k in state if "vision_branch_mlp" in k))
    with pytest.raises(RuntimeError, match="Missing key"):
        official.load_numpy_state(state)
