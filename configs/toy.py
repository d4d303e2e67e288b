"""Toy phase: a tiny MLP (frozen encoder, BatchNorm, trainable residual blocks) on synthetic in-memory data.

It trains in seconds on CPU and exercises the whole training stack (sharded step, frozen weights, BatchNorm
statistics, checkpoints, resume, logging); the training tests use it.

    bifrost train --config configs/toy.py --workdir runs/toy [--config.train.steps=200 ...]
"""
from bifrost_jax.configs import base_config


def get_config():
    c = base_config()
    c.phase = "toy"
    c.mesh.update(data=2, fsdp=-1, tensor=2)
    c.train.update(steps=100, batch_size=16, log_every=10)
    c.optim.update(lr=3e-3, warmup_steps=10)
    c.checkpoint.update(every=25, keep=2)
    c.model.update(in_features=16, hidden=32, mlp=64, out_features=8, num_blocks=2, use_batchnorm=True,
                   remat_policy="none", dtype="float32", input_noise=0.05)
    c.data.update(num_examples=256, delay_s=0.0)
    return c
