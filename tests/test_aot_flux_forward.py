"""The ``flux-forward`` AOT target (``configs/flux_aot.py``) at a tiny size: it compiles for a CPU topology with
counted FLOPs equal to its analytic count, and the compiled program is the flow-matching MSE loss of the FLUX
transformer with the gradients of every parameter (run on the CPU devices, against the same loss written out).
With libtpu, the same target compiles for a TPU topology."""
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from bifrost_jax import aot
from bifrost_jax.configs import load_config_file
from bifrost_jax.models.flux.transformer import FluxConfig, FluxTransformer2DModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLUX = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6))


def _tiny_config(mesh):
    """configs/flux_aot.py with a tiny FLUX, 32 px images (4 image tokens), 8 text tokens, batch 4, no remat (the
    analytic count leaves remat recomputation out: with "full" the program recomputes each block's forward)."""
    config = load_config_file(os.path.join(ROOT, "configs", "flux_aot.py"),
                              ["train.batch_size=4", "data.image_size=32", "data.max_text_length=8",
                               "flux.remat_policy=none"])
    assert config.phase == "flux-forward"
    config.flux.config = ml_collections.ConfigDict(TINY_FLUX)
    config.mesh.update(mesh)
    return config


@pytest.fixture(scope="module")
def cpu_report():
    config = _tiny_config({"data": 1, "fsdp": 2, "tensor": 1})
    return config, aot.compile_target("flux-forward", config, "cpu:2", hbm_bytes=2 ** 30)


def test_flux_forward_compiles_for_cpu_topology(cpu_report):
    _, r = cpu_report
    print(aot.format_report(r))
    assert r.error is None and r.platform == "cpu" and r.num_devices == 2
    assert r.mesh_shape == {"data": 1, "fsdp": 2, "tensor": 1} and r.fits is True
    # every matmul of the program is in the analytic count of flux_transformer_parts (forward + backward)
    assert r.analytic_flops and r.counted_flops == pytest.approx(r.analytic_flops, rel=1e-6)
    assert "FLUX forward+backward" in r.notes[0] and "batch 4, 4 image + 8 text tokens" in r.notes[0]


def test_flux_forward_returns_the_loss_and_every_gradient(cpu_report):
    """The target's program maps (params, batch) to a scalar loss and a gradient for every parameter, laid out as
    the parameters (traced only: the compile above is the expensive part)."""
    config, _ = cpu_report
    mesh = aot.make_topology_mesh("cpu:2", dict(config.mesh))
    target = aot.resolve_target("flux-forward", config)[1](config, mesh)
    params_abstract, batch_abstract = target.args
    model = FluxTransformer2DModel(FluxConfig(**TINY_FLUX), dtype=jnp.bfloat16, param_dtype=jnp.float32,
                                   scan_layers=True)
    want = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **model.dummy_inputs())))
    shape_dtype = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)  # noqa: E731
    assert shape_dtype(params_abstract) == shape_dtype(want["params"])
    assert batch_abstract["hidden_states"].shape == (4, 4, 16) and batch_abstract["target"].shape == (4, 4, 16)
    assert batch_abstract["encoder_hidden_states"].shape == (4, 8, 32)
    from bifrost_jax.parallel.rules import axis_rules
    with axis_rules(mesh):
        loss, grads = jax.eval_shape(target.fn, *target.args)
    assert loss.shape == () and loss.dtype == jnp.float32
    assert shape_dtype(grads) == shape_dtype(params_abstract)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_flux_forward_compiles_for_tpu_topology():
    config = _tiny_config({"data": 1, "fsdp": 4, "tensor": 1})
    with jax.default_matmul_precision("default"):  # conftest's "highest" is a CPU parity setting
        r = aot.compile_target("flux-forward", config, "v5p:2x2x1")
    print(aot.format_report(r))
    assert r.error is None and r.platform == "tpu" and r.fits is True and r.xla_seconds and r.mfu is not None
    assert r.counted_flops == pytest.approx(r.analytic_flops, rel=1e-6)
