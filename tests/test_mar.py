"""MAR decoding (docs/design.md §8.1, §11.3, §12.4): schedule, equivalence with the official formulation, CFG."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_rel_err

from bifrost_jax.models.bifrost import BifrostConfig, BifrostMLLM, random_orders
from bifrost_jax.models.qwen.decoder import QwenTextConfig
from bifrost_jax.sample.mar import mar_decode, mar_decode_official, mar_schedule, tokens_per_step

N, HIDDEN, T, B = 16, 32, 9, 2


@pytest.fixture(scope="module")
def model():
    text = QwenTextConfig(hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=50, mrope_section=(2, 1, 1))
    module = BifrostMLLM(BifrostConfig(text=text, num_image_tokens=N, image_grid=(4, 4)), dtype=jnp.float32)
    rng = np.random.default_rng(0)
    ids, am = _prompts(rng)
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), ids, am, jnp.zeros((B, N, HIDDEN)),
                                     jnp.ones((B, N), bool)))
    # every parameter random (the real init zeroes the mask token and position embedding)
    leaves, tree = jax.tree.flatten(shapes)
    leaves = [jnp.asarray(rng.standard_normal(x.shape) * 0.3, jnp.float32) for x in leaves]
    return module, jax.tree.unflatten(tree, leaves)


def _prompts(rng, seed_shift=0):
    ids = rng.integers(0, 50, (B, T)).astype(np.int32)
    am = np.ones((B, T), np.int32)
    am[0, :3 + seed_shift] = 0  # left padding of different amounts
    return ids, am


@pytest.mark.parametrize("num_steps", [1, 4, 7, 16, 40])
def test_schedule(num_steps):
    remaining = mar_schedule(N, num_steps)
    per_step = tokens_per_step(N, num_steps)
    assert remaining[0] == N and remaining[-1] == 0 and len(per_step) == num_steps
    assert per_step.sum() == N and (per_step >= 0).all()
    if num_steps <= N:
        assert (per_step >= 1).all()  # every step reveals at least one slot
    if num_steps == N:
        assert (per_step == 1).all()
    # the cosine rule, computed independently
    for s in range(num_steps - 1):
        want = max(1, min(int(remaining[s]) - 1, int(np.floor(N * np.cos(math.pi / 2 * (s + 1) / num_steps)))))
        assert remaining[s + 1] == want


def test_one_token_per_step_at_full_size():
    assert (tokens_per_step(256, 256) == 1).all()  # the released setting: 256 slots, 256 steps
    assert tokens_per_step(256, 64).sum() == 256


def test_fast_equals_official_one_token_per_step(model):
    module, variables = model
    ids, am = _prompts(np.random.default_rng(1))
    uids, uam = _prompts(np.random.default_rng(2), seed_shift=2)
    rng = jax.random.PRNGKey(7)
    fast = mar_decode(module, variables, ids, am, rng, num_steps=N)
    official = mar_decode_official(module, variables, ids, am, rng, num_steps=N, uncond_input_ids=uids,
                                   uncond_attention_mask=uam)
    err = max_rel_err(fast, official)
    assert err <= 1e-4, err
    # deterministic given rng; another rng gives other orders and other latents
    np.testing.assert_array_equal(np.asarray(mar_decode(module, variables, ids, am, rng, num_steps=N)),
                                  np.asarray(fast))
    other = mar_decode(module, variables, ids, am, jax.random.PRNGKey(8), num_steps=N)
    assert max_rel_err(other, fast) > 1e-3
    # guided, one token per step: the official formulation agrees too
    fast_cfg = mar_decode(module, variables, ids, am, rng, num_steps=N, cfg_weight=3.0, uncond_input_ids=uids,
                          uncond_attention_mask=uam)
    official_cfg = mar_decode_official(module, variables, ids, am, rng, num_steps=N, cfg_weight=3.0,
                                       uncond_input_ids=uids, uncond_attention_mask=uam)
    assert max_rel_err(fast_cfg, official_cfg) <= 1e-4
    assert max_rel_err(fast_cfg, fast) > 1e-3


def _reference_decode(module, variables, ids, am, uids, uam, orders, num_steps, cfg_weight):
    """A plain Python MAR loop: full forward every step, masks from the orders, CFG on the (B, N, C) halves."""
    forward = jax.jit(lambda i, a, z, m: module.apply(variables, i, a, z, m))
    orders = np.asarray(orders)
    tokens = np.broadcast_to(np.asarray(variables["params"]["mask_token"]), (B, N, HIDDEN)).copy()
    masked = np.ones((B, N), bool)
    for step in range(num_steps):
        cond = np.asarray(forward(ids, am, tokens, masked))
        uncond = np.asarray(forward(uids, uam, tokens, masked))
        guided = uncond + cfg_weight * (cond - uncond)
        if step == num_steps - 1:
            still = np.zeros((B, N), bool)
        else:
            keep = int(np.floor(N * np.cos(math.pi / 2 * (step + 1) / num_steps)))
            keep = max(1, min(int(masked[0].sum()) - 1, keep))
            still = np.zeros((B, N), bool)
            for b in range(B):
                still[b, orders[b, :keep]] = True
        reveal = masked & ~still
        tokens[reveal] = guided[reveal]
        masked = still
    return tokens


@pytest.mark.parametrize("num_steps", [4, 7])
def test_cfg_with_fewer_steps_matches_reference(model, num_steps):
    module, variables = model
    ids, am = _prompts(np.random.default_rng(3))
    uids, uam = _prompts(np.random.default_rng(4), seed_shift=1)
    rng = jax.random.PRNGKey(11)
    got = mar_decode(module, variables, ids, am, rng, num_steps=num_steps, cfg_weight=2.5, uncond_input_ids=uids,
                     uncond_attention_mask=uam)
    orders = random_orders(rng, B, N)  # the orders mar_decode draws from this rng
    want = _reference_decode(module, variables, ids, am, uids, uam, orders, num_steps, 2.5)
    err = max_rel_err(got, want)
    assert err <= 1e-4, err


def test_cfg_weight_one_skips_uncond(model):
    module, variables = model
    ids, am = _prompts(np.random.default_rng(5))
    uids, uam = _prompts(np.random.default_rng(6), seed_shift=2)
    rng = jax.random.PRNGKey(3)
    plain = mar_decode(module, variables, ids, am, rng, num_steps=5)
    with_uncond = mar_decode(module, variables, ids, am, rng, num_steps=5, cfg_weight=1.0, uncond_input_ids=uids,
                             uncond_attention_mask=uam)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(with_uncond))
    # ... and equals the official loop, which does compute (and then cancel) the uncond half
    official = mar_decode_official(module, variables, ids, am, rng, num_steps=5, uncond_input_ids=uids,
                                   uncond_attention_mask=uam)
    assert max_rel_err(plain, official) <= 1e-4
    # no uncond pass at weight 1: half the decode FLOPs of a guided run
    from bifrost_jax.sample import mar
    flops = lambda guided: mar._mar_decode.lower(  # noqa: E731  (HLO cost before XLA optimisation: no compile)
        module, variables, jnp.asarray(ids), jnp.asarray(am),
        mar.resolve_orders(rng, None, len(ids), module.config.num_image_tokens),
        jnp.asarray(uids) if guided else None, jnp.asarray(uam) if guided else None, jnp.float32(2.0), num_steps=5,
        guided=guided
    ).cost_analysis()["flops"]
    assert flops(True) > 1.8 * flops(False)
    with pytest.raises(ValueError, match="uncond_input_ids"):
        mar_decode(module, variables, ids, am, rng, num_steps=5, cfg_weight=2.0)
