"""``config.train.frozen_param_dtype``: frozen weights stored narrower than the trained ones.

With frozen weights in bf16 the toy phase trains through the real loop (``train.loop.train``, 8 simulated
devices): every frozen leaf is bf16, every trainable leaf and its AdamW moments stay fp32, the loss is finite, and
the frozen weights after training are bit-identical to the fp32 init rounded to bf16 (the same model, only stored
narrower; never updated). The real phases' abstract states (what ports, restores and the AOT memory figures use)
carry the same dtypes; ``test_train_multiprocess.py`` trains and resumes the mllm phase with bf16 frozen weights.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from bifrost_jax.configs import load_config_file
from bifrost_jax.parallel.multislice import mesh_from_config
from bifrost_jax.train.loop import _override, train
from bifrost_jax.train.registry import get_phase
from bifrost_jax.train.state import StateBuilder, cast_floating, frozen_param_dtype, make_optimizer

ROOT = os.path.join(os.path.dirname(__file__), "..")
TOY = os.path.join(ROOT, "configs", "toy.py")


def flat(tree):
    return {".".join(map(str, k)): v for k, v in traverse_util.flatten_dict(tree).items()}


def test_frozen_param_dtype_values():
    assert frozen_param_dtype("") is None and frozen_param_dtype(None) is None
    assert frozen_param_dtype("bfloat16") == jnp.bfloat16
    with pytest.raises(ValueError, match="frozen_param_dtype='int8' is not a floating dtype"):
        frozen_param_dtype("int8")
    with pytest.raises(ValueError, match="frozen_param_dtype='bf17' is not a dtype"):
        frozen_param_dtype("bf17")
    tree = {"w": jnp.ones((2,), jnp.float32), "ids": jnp.arange(3)}
    cast = cast_floating(tree, jnp.bfloat16)
    assert cast["w"].dtype == jnp.bfloat16 and cast["ids"].dtype == tree["ids"].dtype
    # A pretrained source in another dtype (a trained branch copied from a bf16 frozen backbone) takes the dtype
    # of the leaf it replaces.
    out = _override({"a": {"w": jnp.zeros((2,), jnp.float32)}}, {("params", "a", "w"): jnp.ones((2,), jnp.bfloat16)},
                    ("params",))
    assert out["a"]["w"].dtype == jnp.float32 and np.array_equal(np.asarray(out["a"]["w"]), [1.0, 1.0])


def test_bf16_frozen_weights_train_and_stay_the_rounded_init(tmp_path):
    overrides = ["train.steps=3", "train.log_every=1", "checkpoint.every=3", "checkpoint.async_save=False",
                 "train.tensorboard=False", "train.frozen_param_dtype=bfloat16"]
    config = load_config_file(TOY, overrides)
    result = train(config, str(tmp_path / "work"), progress_bar=False)
    assert result.step == 3 and np.isfinite(result.last_metrics["loss"])

    frozen, trainable = flat(result.frozen), flat(result.state.params)
    assert frozen and all(k.startswith("encoder.") for k in frozen)
    wrong = {k: v.dtype for k, v in frozen.items() if v.dtype != jnp.bfloat16}
    assert not wrong, f"frozen leaves not stored in bf16: {wrong}"
    wrong = {k: v.dtype for k, v in trainable.items() if v.dtype != jnp.float32}
    assert not wrong, f"trainable leaves not fp32: {wrong}"
    moments = [x for x in jax.tree.leaves(result.state.opt_state) if x.ndim > 0]
    assert moments and all(x.dtype == jnp.float32 for x in moments)

    # After training the frozen weights == the fp32 init (same key, no frozen dtype) rounded to bf16, bit for bit.
    phase = get_phase(config)
    tx, _ = make_optimizer(config.optim, config.train.steps)
    fp32 = StateBuilder(phase, tx, mesh_from_config(dict(config.mesh)), seed=config.seed, ema=False,
                        frozen_dtype="").init_frozen()
    assert {x.dtype for x in jax.tree.leaves(fp32)} == {jnp.dtype(jnp.float32)}
    expected = flat(cast_floating(fp32, jnp.bfloat16))
    assert expected.keys() == frozen.keys()
    for k in frozen:
        assert np.array_equal(np.asarray(frozen[k]), np.asarray(expected[k])), f"frozen {k} changed"
    # bf16 storage really rounds (the check above is not fp32 == fp32 in disguise)
    assert any(not np.array_equal(np.asarray(v, np.float32), np.asarray(flat(fp32)[k])) for k, v in frozen.items())


@pytest.mark.parametrize("name, trained_prefix", [("mllm", "mllm."), ("controlnet", "controlnet.")])
def test_real_phases_store_frozen_weights_in_the_frozen_dtype(name, trained_prefix):
    """Abstract state only (eval_shape): the frozen backbone is bf16, every trained weight and moment fp32.
    (A 2-process mllm run with bf16 frozen weights trains and resumes exactly in test_train_multiprocess.py.)"""
    config = load_config_file(os.path.join(ROOT, "configs", f"{name}.py"), ["train.frozen_param_dtype=bfloat16"])
    phase = get_phase(config)
    tx, _ = make_optimizer(config.optim, config.train.steps)
    builder = StateBuilder(phase, tx, mesh_from_config(dict(config.mesh)), seed=config.seed, ema=False)
    frozen, trainable = flat(builder.abstract_frozen), flat(builder.abstract_state.params)
    assert frozen and {v.dtype for v in frozen.values()} == {jnp.dtype(jnp.bfloat16)}
    assert trainable and all(k.startswith(trained_prefix) for k in trainable)
    assert {v.dtype for v in trainable.values()} == {jnp.dtype(jnp.float32)}
    moments = [x for x in jax.tree.leaves(builder.abstract_state.opt_state) if x.ndim > 0]
    assert {x.dtype for x in moments} == {jnp.dtype(jnp.float32)}
    # the default ("") leaves the frozen tree in the modules' param_dtype (fp32 in the tiny configs)
    config.train.frozen_param_dtype = ""
    default = StateBuilder(get_phase(config), tx, mesh_from_config(dict(config.mesh)), seed=config.seed, ema=False)
    assert {v.dtype for v in jax.tree.leaves(default.abstract_frozen)} == {jnp.dtype(jnp.float32)}
