"""Training infrastructure on the toy phase, in process (8 simulated CPU devices): the sharded step, frozen
weights, gradient accumulation, configs, checkpoints (other mesh, mismatches, params-only restore accounting)."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import max_rel_err
from flax import traverse_util
from jax.sharding import PartitionSpec

from bifrost_jax.configs import load_config_file
from bifrost_jax.parallel.mesh import make_mesh
from bifrost_jax.parallel.rules import axis_rules
from bifrost_jax import checkpoint as ckpt
from bifrost_jax.train.loop import initial_state, parse_train_args, train
from bifrost_jax.train.registry import get_phase
from bifrost_jax.train.state import (StateBuilder, global_batch, jit_train_step, make_optimizer, make_train_step,
                                     split_params)

TOY = os.path.join(os.path.dirname(__file__), "..", "configs", "toy.py")
FAST = ["train.log_every=1", "checkpoint.async_save=False"]


def toy_config(*overrides):
    return load_config_file(TOY, list(overrides))


def single_device_mesh():
    return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def run_steps(config, mesh, n, batches=None):
    """n train steps on ``mesh``; returns (state, frozen, [metrics], builder)."""
    phase = get_phase(config)
    tx, schedule = make_optimizer(config.optim, config.train.steps)
    builder = StateBuilder(phase, tx, mesh, seed=config.seed, ema=config.optim.ema_decay > 0)
    state, frozen = builder.init()
    bs = config.train.batch_size
    step = jit_train_step(make_train_step(phase, tx, schedule, grad_accum_steps=config.train.grad_accum_steps,
                                          ema_decay=config.optim.ema_decay), builder, bs)
    if batches is None:
        it = phase.dataset(global_batch_size=bs, seed=0, process_index=0, process_count=1)
        batches = [next(it) for _ in range(n)]
    metrics = []
    with axis_rules(mesh):
        for b in batches[:n]:
            state, m = step(state, frozen, global_batch(b, builder.abstract_batch(bs)))
            metrics.append(jax.device_get(m))
    return jax.device_get(state), jax.device_get(frozen), metrics, builder


def assert_trees_close(a, b, tol, what):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert fa.keys() == fb.keys(), what
    for k in fa:
        err = max_rel_err(fa[k], fb[k])
        assert err <= tol, f"{what} {'.'.join(map(str, k))}: rel err {err:.3g} > {tol}"


def test_sharded_step_equals_single_device():
    config = toy_config("optim.ema_decay=0.9")
    mesh8 = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    s1, f1, m1, _ = run_steps(config, single_device_mesh(), 3)
    s8, f8, m8, b8 = run_steps(config, mesh8, 3)
    # Parameters really are sharded over fsdp and tensor.
    assert b8.state_shardings.params["block_0"]["fc1"]["kernel"].spec == PartitionSpec("fsdp", "tensor")
    for a, b in zip(m1, m8):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * abs(a["grad_norm"])
    assert_trees_close(s8.params, s1.params, 1e-5, "params")
    assert_trees_close(s8.ema_params, s1.ema_params, 1e-5, "ema")
    assert_trees_close(s8.mutable["batch_stats"], s1.mutable["batch_stats"], 1e-5, "batch_stats")
    mu8 = s8.opt_state[1][0].mu
    mu1 = s1.opt_state[1][0].mu
    assert_trees_close(mu8, mu1, 1e-5, "adam mu")
    # The step did something (the comparison is not between two unchanged inits).
    assert m1[-1]["loss"] != m1[0]["loss"]


def test_grad_accumulation_equals_big_batch():
    # BatchNorm in train mode normalises each micro-batch with its own statistics, so it is off here.
    # On the 8-device mesh, so the micro-batch split is also checked against the batch sharding.
    over = ["model.use_batchnorm=False", "model.input_noise=0.0", "train.batch_size=16"]
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    big, _, mb, _ = run_steps(toy_config(*over), mesh, 2)
    acc, _, ma, _ = run_steps(toy_config(*over, "train.grad_accum_steps=4"), mesh, 2)
    assert_trees_close(acc.params, big.params, 1e-5, "params")
    assert abs(ma[0]["loss"] - mb[0]["loss"]) <= 1e-6 * mb[0]["loss"]
    assert abs(ma[1]["grad_norm"] - mb[1]["grad_norm"]) <= 1e-5 * mb[1]["grad_norm"]


def test_remat_policy_from_config_reaches_the_model_and_keeps_the_gradients():
    def grads_and_matmuls(config):
        phase = get_phase(config)
        variables = nn.meta.unbox(phase.init_variables(jax.random.PRNGKey(0)))
        trainable, frozen = split_params(variables["params"], phase.is_trainable)
        batch = {k: jax.random.normal(jax.random.PRNGKey(2), v.shape, v.dtype)
                 for k, v in phase.batch_spec(4).items()}
        loss = lambda t: phase.loss_fn(t, frozen, {"batch_stats": variables["batch_stats"]}, batch,
                                       jax.random.PRNGKey(1))[0]
        lowered = jax.jit(jax.grad(loss)).lower(trainable)
        # Rematerialisation recomputes some forward matmuls in the backward pass.
        return jax.device_get(lowered.compile()(trainable)), lowered.as_text().count("dot_general")

    g_none, n_none = grads_and_matmuls(toy_config())
    g_remat, n_remat = grads_and_matmuls(toy_config("model.remat_policy=save_block_out"))
    assert n_remat > n_none
    assert_trees_close(g_remat, g_none, 1e-6, "grads")


def test_config_errors(tmp_path):
    config, workdir = parse_train_args(["--config", TOY, "--workdir", str(tmp_path), "--config.optim.lr=0.5"])
    assert config.optim.lr == 0.5 and workdir == str(tmp_path)
    with pytest.raises(ValueError, match="lrr"):
        parse_train_args(["--config", TOY, "--workdir", "x", "--config.optim.lrr=0.5"])
    with pytest.raises(ValueError, match="bogus"):
        parse_train_args(["--config", TOY, "--workdir", "x", "--bogus=1"])
    with pytest.raises(ValueError, match="--workdir"):
        parse_train_args(["--config", TOY])
    with pytest.raises(ValueError, match="nope.py"):
        parse_train_args(["--config", str(tmp_path / "nope.py"), "--workdir", "x"])
    with pytest.raises(ValueError, match="not_a_phase"):
        get_phase(toy_config("phase=not_a_phase"))
    with pytest.raises(AttributeError, match="stepz"):
        toy_config().train.stepz  # locked: reading a key that does not exist fails too
    with pytest.raises(ValueError, match="grad_accum_steps=3"):
        train(toy_config("train.grad_accum_steps=3"), str(tmp_path), progress_bar=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short toy run (8-device mesh data=2 x fsdp=2 x tensor=2, EMA on) shared by the checkpoint tests."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    config = toy_config(*FAST, "train.steps=3", "optim.ema_decay=0.5")
    return config, workdir, train(config, workdir, progress_bar=False)


def test_frozen_bit_identical_and_without_optimizer_state(trained):
    config, _, result = trained
    phase = get_phase(config)
    tx, _ = make_optimizer(config.optim, config.train.steps)
    builder = StateBuilder(phase, tx, make_mesh(dict(config.mesh)), seed=config.seed, ema=True)
    init_state, init_frozen = builder.init()
    # Frozen weights: bit-identical after training.
    for (k, a), b in zip(traverse_util.flatten_dict(jax.device_get(result.frozen)).items(),
                         traverse_util.flatten_dict(jax.device_get(init_frozen)).values()):
        np.testing.assert_array_equal(a, b, err_msg=f"frozen {k} changed")
    assert set(result.frozen) == {"encoder"}
    # The trainable ones did change; BatchNorm statistics were updated.
    assert not np.array_equal(jax.device_get(result.state.params["head"]["kernel"]),
                              jax.device_get(init_state.params["head"]["kernel"]))
    assert not np.array_equal(jax.device_get(result.state.mutable["batch_stats"]["bn"]["mean"]),
                              jax.device_get(init_state.mutable["batch_stats"]["bn"]["mean"]))
    # Optimizer state covers exactly the trainable tree: Adam's mu and nu, no entry for the frozen encoder.
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(result.state.opt_state)[0]]
    assert not any("encoder" in p for p in paths)
    n_opt = sum(x.size for x in jax.tree.leaves(result.state.opt_state))
    n_train = sum(x.size for x in jax.tree.leaves(result.state.params))
    assert n_opt == 2 * n_train + 2  # mu, nu, and the two step counters (adam, schedule)


def test_metrics_logged_to_jsonl_and_tensorboard(trained):
    _, workdir, result = trained
    run_dir = os.path.join(workdir, "toy")
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("loss", "lr", "grad_norm", "examples_per_s", "tokens_per_s", "tflops_per_s_per_device"):
        assert np.isfinite(records[-1][key]) and records[-1][key] >= 0, key
    assert records[0]["lr"] == 0.0 and records[1]["lr"] > 0  # warm-up starts at 0
    assert records[-1]["loss"] == pytest.approx(result.last_metrics["loss"])
    events = os.listdir(os.path.join(run_dir, "tensorboard"))
    assert any(e.startswith("events.out.tfevents") for e in events)
    assert os.path.getsize(os.path.join(run_dir, "tensorboard", events[0])) > 100


def test_checkpoint_restores_onto_other_meshes_and_rejects_mismatch(trained, tmp_path):
    config, workdir, result = trained
    saved = jax.device_get(result.state)
    manager = ckpt.make_manager(ckpt.checkpoint_dir(workdir, "toy"))
    phase = get_phase(config)
    tx, _ = make_optimizer(config.optim, config.train.steps)
    for mesh in (make_mesh({"fsdp": 8}), single_device_mesh()):
        builder = StateBuilder(phase, tx, mesh, seed=config.seed, ema=True)
        state, data_state = ckpt.restore_state(manager, builder.abstract_state)
        assert state.params["block_0"]["fc1"]["kernel"].sharding == \
            builder.state_shardings.params["block_0"]["fc1"]["kernel"]
        for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(saved)):
            np.testing.assert_array_equal(a, b)
        assert data_state is not None and data_state != {}
    manager.close()
    # Resuming with a different model in the same workdir names the problem.
    with pytest.raises(ckpt.CheckpointMismatchError, match="does not match"):
        train(toy_config(*FAST, "train.steps=5", "optim.ema_decay=0.5", "model.hidden=48"), workdir,
              progress_bar=False)


def test_params_only_restore_accounting(trained, tmp_path):
    _, workdir, source = trained
    src_ckpt = ckpt.checkpoint_dir(workdir, "toy")
    # A model with one more block: the new block is missing from the source.
    with pytest.raises(ckpt.CheckpointMismatchError) as e:
        train(toy_config(*FAST, "train.steps=1", "model.num_blocks=3", f"checkpoint.init_from={src_ckpt}"),
              str(tmp_path / "a"), progress_bar=False)
    msg = str(e.value)
    assert "params.block_2.fc1.kernel" in msg and "params.block_2.fc2.bias" in msg
    assert "block_0" not in msg and "encoder" not in msg  # the toy's frozen encoder is a declared new subtree
    # Allowing the new subtree restores everything else.
    cfg = toy_config(*FAST, "train.steps=1", "model.num_blocks=3", f"checkpoint.init_from={src_ckpt}",
                     "optim.lr=0.0")
    cfg.checkpoint.init_allow_missing = ("params.block_2",)
    phase = get_phase(cfg)
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps)
    builder = StateBuilder(phase, tx, make_mesh({"fsdp": 8}), seed=cfg.seed, ema=False)
    state, _ = initial_state(builder, phase, cfg)
    for name in ("block_0", "block_1", "head", "bn"):
        for a, b in zip(jax.tree.leaves(jax.device_get(state.params[name])),
                        jax.tree.leaves(jax.device_get(source.state.params[name]))):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(jax.device_get(state.mutable["batch_stats"]["bn"]["var"]),
                                  jax.device_get(source.state.mutable["batch_stats"]["bn"]["var"]))
    # From the EMA weights instead.
    cfg.checkpoint.init_use_ema = True
    state, _ = initial_state(builder, phase, cfg)
    np.testing.assert_array_equal(jax.device_get(state.params["head"]["kernel"]),
                                  jax.device_get(source.state.ema_params["head"]["kernel"]))
    # Fewer blocks: the source has weights the model does not use.
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"not expected:\s+params.block_1.fc1.bias"):
        train(toy_config(*FAST, "train.steps=1", "model.num_blocks=1", f"checkpoint.init_from={src_ckpt}"),
              str(tmp_path / "c"), progress_bar=False)
    # Wrong shapes are named with both shapes.
    cfg = toy_config(*FAST, "train.steps=1", "model.mlp=48", f"checkpoint.init_from={src_ckpt}")
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"params.block_0.fc1.kernel: checkpoint \(32, 64\), "
                                                             r"expected \(32, 48\)"):
        train(cfg, str(tmp_path / "d"), progress_bar=False)


def test_pretrained_weights_from_the_phase_are_accounted():
    """A phase's ``load_pretrained`` (ports) must cover every weight outside its ``new_subtrees``."""
    from bifrost_jax.train.toy import ToyPhase

    encoder = {"kernel": np.full((16, 32), 0.5, np.float32), "bias": np.full((32,), -1.0, np.float32)}

    class PortedEncoderPhase(ToyPhase):
        new_subtrees = (("params", "block_0"), ("params", "block_1"), ("params", "bn"), ("batch_stats",))

        def load_pretrained(self, abstract_variables, shardings):
            enc = shardings["params"]["encoder"]
            return {"params": {"encoder": {k: jax.device_put(v, enc[k]) for k, v in encoder.items()}}}

    class IncompletePhase(PortedEncoderPhase):
        new_subtrees = (("params", "block_0"), ("params", "bn"), ("batch_stats",))

    cfg = toy_config()
    mesh = make_mesh({"fsdp": 8})
    for cls in (PortedEncoderPhase, IncompletePhase):
        phase = cls(cfg)
        tx, _ = make_optimizer(cfg.optim, cfg.train.steps)
        builder = StateBuilder(phase, tx, mesh, seed=cfg.seed, ema=False)
        if cls is IncompletePhase:
            with pytest.raises(ckpt.CheckpointMismatchError) as e:
                initial_state(builder, phase, cfg)
            # "head" is neither ported nor a new subtree; block_1 no longer is one either.
            assert "params.head.kernel" in str(e.value) and "params.block_1.fc2.kernel" in str(e.value)
            assert "params.block_0" not in str(e.value) and "params.encoder" not in str(e.value)
        else:
            with pytest.raises(ckpt.CheckpointMismatchError, match="params.head.bias"):
                initial_state(builder, phase, cfg)
            phase.new_subtrees += (("params", "head"),)
            state, frozen = initial_state(builder, phase, cfg)
            np.testing.assert_array_equal(jax.device_get(frozen["encoder"]["kernel"]), encoder["kernel"])
            np.testing.assert_array_equal(jax.device_get(frozen["encoder"]["bias"]), encoder["bias"])
