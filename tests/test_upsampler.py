"""Bifrost-1 latent upsampler: parity with a plain-torch reference (ConvTranspose2d / BatchNorm2d / Conv2d with the
official submodule names), eval and train mode (outputs and updated running statistics), non-square grid, the
key map and its errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_rel_err
from flax import traverse_util

from bifrost_jax.models.flux.upsampler import LatentUpsampler
from bifrost_jax.port.base import PortError
from bifrost_jax.port.vae import load_upsampler, upsampler_key_map

C, H, W, B = 12, 3, 5, 2  # non-square grid


class TorchUpsampleBlock(torch.nn.Module):
    """Independent reference written from the spec (7.1 item 2), NCHW with torch's own layers."""

    def __init__(self, channels):
        super().__init__()
        self.upconv = torch.nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2)
        self.bn1 = torch.nn.BatchNorm2d(channels)
        self.conv = torch.nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(channels)

    def forward(self, x, h, w):
        b, _, c = x.shape
        x = x.reshape(b, h, w, c).permute(0, 3, 1, 2)
        identity = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        y = torch.relu(self.bn1(self.upconv(x)))
        y = self.bn2(self.conv(y))
        y = torch.relu(y + identity)
        return y.permute(0, 2, 3, 1).reshape(b, 4 * h * w, c)


def _reference(seed=0):
    torch.manual_seed(seed)
    ref = TorchUpsampleBlock(C)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "weight" in name else 0.2))
            if "bn" in name and "weight" in name:
                p.add_(1.0)
        for bn in (ref.bn1, ref.bn2):  # non-trivial running statistics
            bn.running_mean.copy_(torch.randn(C, generator=g) * 0.5)
            bn.running_var.copy_(torch.rand(C, generator=g) + 0.5)
            bn.num_batches_tracked.fill_(7)
    return ref


def _numpy_state(ref):
    return {f"up_sampling_block.{k}": v.detach().numpy().copy() for k, v in ref.state_dict().items()}


def _port(ref):
    module = LatentUpsampler(C, (H, W), dtype=jnp.float32)
    return module, load_upsampler(_numpy_state(ref), module)


def _input(seed=2):
    return np.random.default_rng(seed).standard_normal((B, H * W, C)).astype(np.float32)


def test_eval_parity_with_running_stats():
    ref = _reference().eval()
    module, variables = _port(ref)
    x = _input()
    with torch.no_grad():
        expected = ref(torch.from_numpy(x), H, W).numpy()
    out = module.apply(variables, jnp.asarray(x), train=False)
    assert out.shape == (B, 4 * H * W, C)
    err = max_rel_err(out, expected)
    print(f"upsampler eval max_rel_err {err:.2e}")
    assert err <= 1e-4
    # The running statistics matter: default statistics give a different output.
    fresh = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
    fresh = {bn: {**d, "var": jnp.ones_like(d["var"])} for bn, d in fresh.items()}
    other = module.apply({"params": variables["params"], "batch_stats": fresh}, jnp.asarray(x), train=False)
    assert max_rel_err(other, expected) > 1e-2
    assert float(jnp.min(out)) >= 0.0  # the final ReLU


def test_train_parity_outputs_and_running_stats():
    ref = _reference().train()
    module, variables = _port(ref)
    x = _input(3)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x), H, W).numpy()
    out, updates = module.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    err = max_rel_err(out, expected)
    print(f"upsampler train max_rel_err {err:.2e}")
    assert err <= 1e-4
    for bn in ("bn1", "bn2"):
        tbn = getattr(ref, bn)
        got = updates["batch_stats"][bn]
        e_mean = max_rel_err(got["mean"], tbn.running_mean.numpy())
        e_var = max_rel_err(got["var"], tbn.running_var.numpy())
        print(f"{bn} running_mean err {e_mean:.2e} running_var err {e_var:.2e}")
        assert e_mean <= 1e-5 and e_var <= 1e-5
        assert int(got["num_batches_tracked"]) == int(tbn.num_batches_tracked) == 8
        # The statistics really moved (so the comparison above is not trivially old == old).
        assert max_rel_err(got["var"], variables["batch_stats"][bn]["var"]) > 1e-3
    # Train mode normalises with batch statistics: it differs from eval mode.
    assert max_rel_err(module.apply(variables, jnp.asarray(x), train=False), expected) > 1e-2


def test_train_gradients_match_torch():
    ref = _reference().train()
    module, variables = _port(ref)
    x = _input(4)
    tx = torch.from_numpy(x).requires_grad_(True)
    (ref(tx, H, W) ** 2).sum().backward()

    def loss(params, xx):
        out, _ = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, xx, train=True,
                              mutable=["batch_stats"])
        return jnp.sum(out ** 2)

    gp, gx = jax.grad(loss, argnums=(0, 1))(variables["params"], jnp.asarray(x))
    assert max_rel_err(gx, tx.grad.numpy()) <= 1e-4
    assert max_rel_err(gp["upconv"]["kernel"], ref.upconv.weight.grad.numpy()) <= 1e-4
    assert max_rel_err(gp["bn1"]["scale"], ref.bn1.weight.grad.numpy()) <= 1e-4


def test_key_map_errors_name_the_key():
    ref = _reference()
    module = LatentUpsampler(C, (H, W), dtype=jnp.float32)
    state = _numpy_state(ref)
    missing = dict(state)
    del missing["up_sampling_block.conv.weight"]
    with pytest.raises(PortError, match=r"missing keys.*up_sampling_block\.conv\.weight"):
        load_upsampler(missing, module)
    extra = dict(state, **{"up_sampling_block.bn3.weight": np.ones(C, np.float32)})
    with pytest.raises(PortError, match=r"unexpected keys.*up_sampling_block\.bn3\.weight"):
        load_upsampler(extra, module)
    wrong = dict(state, **{"up_sampling_block.bn2.running_var": np.ones(C + 1, np.float32)})
    with pytest.raises(PortError, match=r"up_sampling_block\.bn2\.running_var"):
        load_upsampler(wrong, module)
    # Keys of the rest of the ControlNet are not the upsampler's business.
    load_upsampler(dict(state, **{"controlnet_x_embedder.weight": np.ones((3, C), np.float32)}), module)


def test_key_map_covers_every_variable():
    module = LatentUpsampler(C, (H, W), dtype=jnp.float32)
    variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, H * W, C)))
    params_map, stats_map = upsampler_key_map("p.")
    variables = nn.meta.unbox(variables)
    flat = lambda t: {"/".join(path) for path in traverse_util.flatten_dict(t)}  # noqa: E731
    assert flat(variables["params"]) == {"/".join(p) for p in params_map}
    assert flat(variables["batch_stats"]) == {"/".join(p) for p in stats_map}
    # Init leaves the running statistics at torch's defaults.
    assert float(jnp.sum(variables["batch_stats"]["bn1"]["var"])) == C


def test_wrong_input_shape_raises():
    module = LatentUpsampler(C, (H, W), dtype=jnp.float32)
    with pytest.raises(ValueError, match="expects input"):
        module.init(jax.random.PRNGKey(0), jnp.zeros((1, H * W + 1, C)))


def test_sharded_load_and_jit():
    from bifrost_jax.parallel.mesh import make_mesh
    from bifrost_jax.parallel.rules import axis_rules

    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 4})  # C=12 splits over tensor=4
    ref = _reference().eval()
    module = LatentUpsampler(C, (H, W), dtype=jnp.float32)
    variables = load_upsampler(_numpy_state(ref), module, mesh=mesh)
    kernel = variables["params"]["conv"]["kernel"]
    assert kernel.sharding.spec[3] == "tensor"  # conv_out -> tensor
    x = _input(5)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x), H, W).numpy()
    with axis_rules(mesh):
        out = jax.jit(lambda v, xx: module.apply(v, xx, train=False))(variables, jnp.asarray(x))
    assert max_rel_err(out, expected) <= 1e-4
