"""FLUX.1-dev transformer forward + backward (an MSE loss, gradients of all 12B parameters), for ahead-of-time
compilation only: it proves the `bifrost aot` path on the largest model without any training code and gives the
per-chip memory and FLOPs of FLUX at a given resolution and batch.

    bifrost aot --config configs/flux_aot.py --topology v5p:2x2x1
    bifrost aot --config configs/flux_aot.py --topology v5p:4x4x4 --config.train.batch_size=64 \\
        --config.data.image_size=1024
"""
from bifrost_jax.configs import base_config
from bifrost_jax.train.phase_configs import FLUX_DEV, section


def get_config():
    c = base_config()
    c.phase = "flux-forward"          # a bifrost_jax.aot target, not a training phase
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.train.batch_size = 8
    # the FLUX component section of the training configs (bf16 compute)
    c.flux = section(dict(FLUX_DEV), dtype="bfloat16", param_dtype="float32", scan_layers=True, remat_policy="full")
    c.data.image_size = 512           # (512 / 16)^2 = 1024 image tokens
    c.data.max_text_length = 512      # T5 tokens
    return c
