"""The toy phase: a tiny MLP with a frozen encoder, a BatchNorm and trainable residual blocks, regressing a fixed
random function of its input. It exercises every part of the training infrastructure (frozen/trainable split,
BatchNorm statistics in the train state, RNG use, a resumable grain pipeline) in milliseconds per step; the tests
and ``configs/toy.py`` use it.
"""
from __future__ import annotations

import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from bifrost_jax.data.pipeline import make_train_iterator
from bifrost_jax.models import flops
from bifrost_jax.nn.layers import Dense
from bifrost_jax.nn.stack import maybe_remat, stack_name
from bifrost_jax.train.phases import Phase
from bifrost_jax.train.state import merge_params

Dtype = Any


class ToyBlock(nn.Module):
    mlp: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = Dense(self.mlp, kernel_axes=("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype,
                  name="fc1")(x)
        h = nn.with_logical_constraint(jax.nn.gelu(h, approximate=False), ("batch", "act_mlp"))
        h = Dense(x.shape[-1], kernel_axes=("mlp", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                  name="fc2")(h)
        return x + h


class ToyModel(nn.Module):
    """encoder (frozen in the toy phase) -> silu -> BatchNorm -> residual MLP blocks -> head."""
    hidden: int = 32
    mlp: int = 64
    out_features: int = 8
    num_blocks: int = 2
    use_batchnorm: bool = True
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        h = Dense(self.hidden, kernel_axes=("cond", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype,
                  name="encoder")(x)
        h = jax.nn.silu(h)
        if self.use_batchnorm:
            h = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=jnp.float32,
                             param_dtype=self.param_dtype,
                             scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                             bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                             name="bn")(h.astype(jnp.float32)).astype(self.dtype)
        h = nn.with_logical_constraint(h, ("batch", "act_embed"))
        block = maybe_remat(ToyBlock, self.remat_policy)
        for i in range(self.num_blocks):
            h = block(self.mlp, dtype=self.dtype, param_dtype=self.param_dtype, name=stack_name("block", i))(h)
            h = checkpoint_name(nn.with_logical_constraint(h, ("batch", "act_embed")), "block_out")
        return Dense(self.out_features, kernel_axes=("embed", None), dtype=self.dtype,
                     param_dtype=self.param_dtype, name="head")(h)


class ToySource:
    """``num_examples`` fixed examples: x ~ N(0, 1), y = sin(x @ W) with W fixed by ``seed``."""

    def __init__(self, num_examples: int, in_features: int, out_features: int, seed: int = 1234):
        r = np.random.default_rng(seed)
        self.x = r.normal(size=(num_examples, in_features)).astype(np.float32)
        w = r.normal(size=(in_features, out_features)).astype(np.float32) / np.sqrt(in_features)
        self.y = np.sin(self.x @ w).astype(np.float32)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class ToyPhase(Phase):
    """Config keys: ``model.{in_features, hidden, mlp, out_features, num_blocks, use_batchnorm, remat_policy,
    dtype, input_noise}``, ``data.{num_examples, delay_s}``."""

    name = "toy"
    # The frozen encoder is always a (deterministic) random init; checkpoints hold only trainable weights.
    new_subtrees = (("params", "encoder"),)

    def __init__(self, config):
        super().__init__(config)
        m = config.model
        self.in_features = m.in_features
        self.input_noise = m.input_noise
        self.model = ToyModel(hidden=m.hidden, mlp=m.mlp, out_features=m.out_features, num_blocks=m.num_blocks,
                              use_batchnorm=m.use_batchnorm, remat_policy=m.remat_policy,
                              dtype=jnp.dtype(m.dtype), param_dtype=jnp.float32)

    def init_variables(self, rng):
        x = jnp.zeros((2, self.in_features), jnp.float32)
        return self.model.init({"params": rng}, x, train=False)

    def is_trainable(self, path):
        return path[0] != "encoder"

    def loss_fn(self, trainable, frozen, mutable, batch, rng):
        x = batch["x"]
        if self.input_noise:
            # Uses the step RNG, so a resumed run must restore it to reproduce the trajectory.
            x = x + self.input_noise * jax.random.normal(rng, x.shape, x.dtype)
        variables = {"params": merge_params(trainable, frozen), **mutable}
        pred, new_mutable = self.model.apply(variables, x, train=True, mutable=list(mutable))
        loss = jnp.mean(jnp.square(pred.astype(jnp.float32) - batch["y"]))
        return loss, ({"mse": loss}, dict(new_mutable))

    def batch_spec(self, batch_size):
        return {"x": jax.ShapeDtypeStruct((batch_size, self.in_features), jnp.float32),
                "y": jax.ShapeDtypeStruct((batch_size, self.config.model.out_features), jnp.float32)}

    def dataset(self, *, global_batch_size, seed, process_index, process_count):
        d = self.config.data
        source = ToySource(d.num_examples, self.in_features, self.config.model.out_features)
        # delay_s per batch simulates a slow input pipeline (the kill/resume tests need a run that takes a while).
        delay = float(d.delay_s) * process_count / global_batch_size

        def preprocess(element, rng):
            del rng
            if delay:
                time.sleep(delay)
            return dict(element)

        # One reader thread and a tiny prefetch: the toy data is in memory.
        return make_train_iterator(source, global_batch_size, seed=seed, process_index=process_index,
                                   process_count=process_count, preprocess_fn=preprocess, num_threads=1,
                                   prefetch_buffer_size=1)

    def tokens_per_example(self):
        return 1

    def analytic_parts(self, batch_size):
        b, m = batch_size, self.config.model
        block = flops.dense(b, m.hidden, m.mlp) + flops.dense(b, m.mlp, m.hidden)
        parts = [flops.Part("toy encoder (frozen)", flops.dense(b, m.in_features, m.hidden), "forward")]
        if m.use_batchnorm or m.num_blocks == 0:  # trained BatchNorm before the blocks: every block needs dX
            parts.append(flops.Part("toy blocks", block * m.num_blocks, "train"))
        else:  # block 0's fc1 reads the frozen encoder's output: no input gradient
            parts += [flops.Part("toy block 0 fc1", flops.dense(b, m.hidden, m.mlp), "leaf"),
                      flops.Part("toy blocks", block * m.num_blocks + flops.dense(b, m.hidden, m.mlp) * -1.0,
                                 "train")]
        return parts + [flops.Part("toy head", flops.dense(b, m.hidden, m.out_features), "train")]

