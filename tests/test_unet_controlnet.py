"""UNet ControlNets: diffusers ``ControlNetModel`` parity (residuals, fp32) and port both ways, ``from_unet``
initialisation against diffusers' own, and the latent UNet ControlNet against an independent torch reference (the
upsampler and latent conditioning embedding written with torch layers, feeding diffusers' ControlNetModel body).

Configs are the tiny SD1.5-style and SDXL-style ones of ``test_unet_parity`` on non-square latents.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_rel_err
from safetensors.numpy import save_file
from test_flux_parity import randomize_
from test_unet_parity import CASES, nchw, nhwc, torch_added, unet_inputs
from test_upsampler import TorchUpsampleBlock

from bifrost_jax import port
from bifrost_jax.models.unet import UNetControlNetConfig, UNet2DConditionConfig, controlnet_from_unet
from bifrost_jax.port.base import export_mapped, write_json
from bifrost_jax.port.unet import rule_key_map

from diffusers import ControlNetModel as TorchControlNet  # noqa: E402
from diffusers import UNet2DConditionModel as TorchUNet  # noqa: E402

TOL = 1e-4
EMBED = (4, 8)  # one stride-2 stage: the control image is at 2x the latent resolution
NOT_CONTROLNET = ("up_block_types", "sample_size")


def controlnet_cfg(unet_cfg: dict) -> dict:
    return {**{k: v for k, v in unet_cfg.items() if k not in NOT_CONTROLNET},
            "conditioning_embedding_out_channels": EMBED}


def torch_residuals(model, inputs, cond, **kw):
    added = inputs["added_cond_kwargs"]
    with torch.no_grad():
        down, mid = model(nchw(inputs["sample"]), torch.from_numpy(inputs["timestep"]),
                          torch.from_numpy(inputs["encoder_hidden_states"]), cond,
                          added_cond_kwargs=torch_added(added),
                          return_dict=False, **kw)
    return [nhwc(d) for d in down], nhwc(mid)


def jax_residuals(module, variables, inputs, **kw):
    down, mid = jax.jit(functools.partial(module.apply, **kw))(variables, **jax.tree.map(jnp.asarray, inputs))
    return [np.asarray(d) for d in down], np.asarray(mid)


def residual_err(got, ref) -> float:
    (gd, gm), (rd, rm) = got, ref
    assert len(gd) == len(rd)
    return max([max_rel_err(g, r) for g, r in zip(gd, rd)] + [max_rel_err(gm, rm)])


@pytest.fixture(scope="module", params=sorted(CASES))
def stock(request, tmp_path_factory):
    cfg, size = CASES[request.param]
    model = randomize_(TorchControlNet(**controlnet_cfg(cfg)), seed=5)
    path = str(tmp_path_factory.mktemp(f"cn_{request.param}"))
    model.save_pretrained(path)
    return request.param, model, path, size


def test_stock_controlnet_parity(stock, tmp_path):
    name, model, path, size = stock
    module, variables = port.load("unet-controlnet", path)
    inputs = unet_inputs(module.config.unet, size)
    cond = np.random.default_rng(4).standard_normal((2, 2 * size[0], 2 * size[1], 3)).astype(np.float32)
    kw = dict(conditioning_scale=0.7, guess_mode=name == "sdxl")
    ref = torch_residuals(model, inputs, nchw(cond), **kw)
    got = jax_residuals(module, variables, {**inputs, "controlnet_cond": cond}, **kw)
    err = residual_err(got, ref)
    assert err <= TOL, f"{name}: ControlNet residuals rel err {err:.2e}"
    # export: diffusers loads exactly the same weights back
    port.save("unet-controlnet", module, variables, str(tmp_path))
    back = TorchControlNet.from_pretrained(str(tmp_path)).state_dict()
    ref_state = model.state_dict()
    assert sorted(back) == sorted(ref_state)
    assert all(torch.equal(back[k], v) for k, v in ref_state.items())


def test_from_unet_matches_diffusers(tmp_path):
    cfg, size = CASES["sdxl"]
    unet = randomize_(TorchUNet(**cfg), seed=6)
    unet.save_pretrained(str(tmp_path))
    _, unet_vars = port.load("unet", str(tmp_path))
    unet_cfg = UNet2DConditionConfig.from_hf_config(dict(unet.config))
    module, variables = controlnet_from_unet(unet_vars, unet_cfg, conditioning_embedding_out_channels=EMBED)
    ref = TorchControlNet.from_unet(unet, conditioning_embedding_out_channels=EMBED)
    # the config diffusers derives
    ours = module.config.to_hf_config()
    assert {k: ours[k] for k in ref.config if not k.startswith("_")} == {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in ref.config.items() if not k.startswith("_")}
    # every copied weight equal, every zero conv zero; only the fresh hint encoder differs
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    ours = {k: v for k, v in jax.tree.map(np.asarray, _export(variables["params"])).items()}
    assert sorted(ours) == sorted(state)
    fresh = [k for k in state if k.startswith("controlnet_cond_embedding.") and "conv_out" not in k]
    for k in state:
        if k not in fresh:
            np.testing.assert_array_equal(ours[k], state[k], err_msg=k)
    zero = [k for k in state if k.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                               "controlnet_cond_embedding.conv_out"))]
    assert zero and all(not np.any(ours[k]) for k in zero)


def _export(params):
    return export_mapped(params, rule_key_map(params, "test"))


class TorchLatentEmbedding(torch.nn.Module):
    """Independent torch reference of the latent conditioning embedding (NCHW)."""

    def __init__(self, c_in, chans, out):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(c_in, chans[0], 3, padding=1)
        self.blocks = torch.nn.ModuleList()
        for i in range(len(chans) - 1):
            self.blocks.append(torch.nn.Conv2d(chans[i], chans[i], 3, padding=1))
            self.blocks.append(torch.nn.Conv2d(chans[i], chans[i + 1], 3, padding=1))
        self.conv_out = torch.nn.Conv2d(chans[-1], out, 3, padding=1)

    def forward(self, x):
        x = torch.nn.functional.silu(self.conv_in(x))
        for i in range(0, len(self.blocks), 2):
            x = torch.nn.functional.silu(self.blocks[i](x))
            x = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
            x = torch.nn.functional.silu(self.blocks[i + 1](x))
        return self.conv_out(x)


def torch_latent_controlnet(unet_cfg: dict, c_clip: int, grid, chans, seed: int):
    """(ControlNetModel body with the latent embedding, upsampler, state dict, our config): the torch reference of
    a latent UNet ControlNet; the body takes the upsampled (B, C_clip, 2h, 2w) map as ``controlnet_cond``."""
    body = randomize_(TorchControlNet(**controlnet_cfg(unet_cfg)), seed=seed)
    body.controlnet_cond_embedding = randomize_(
        TorchLatentEmbedding(c_clip, chans, unet_cfg["block_out_channels"][0]), seed + 1)
    up = TorchUpsampleBlock(c_clip)
    with torch.no_grad():
        randomize_(up, seed + 2)
        for bn in (up.bn1, up.bn2):
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
    state = {k: v.numpy() for k, v in body.state_dict().items()}
    state.update({f"up_sampling_block.{k}": v.numpy() for k, v in up.state_dict().items()})
    config = UNetControlNetConfig.from_hf_config(
        {k: v for k, v in body.config.items() if not k.startswith("_")},
        conditioning_embedding_out_channels=chans, clip_latent_dim=c_clip, clip_grid=grid)
    return body, up.eval(), state, config


def write_checkpoint(path, state, config) -> str:
    os.makedirs(path, exist_ok=True)
    save_file(state, os.path.join(path, "diffusion_pytorch_model.safetensors"))
    write_json(os.path.join(path, "config.json"), config.to_hf_config())
    return str(path)


def torch_upsampled(up, tokens, grid):
    """The torch upsampler's output as the NCHW map the body's embedding takes."""
    with torch.no_grad():
        upsampled = up(torch.from_numpy(np.asarray(tokens)), *grid)  # (B, 4hw, C) row-major
    return upsampled.reshape(upsampled.shape[0], 2 * grid[0], 2 * grid[1], -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("name", sorted(CASES))
def test_latent_controlnet_parity_and_port(name, tmp_path):
    """The latent ControlNet = torch upsampler -> torch latent embedding -> diffusers ControlNetModel body; loaded
    from that state dict by the port (strict), same residuals; saved and loaded back identically."""
    cfg, _ = CASES[name]
    c_clip, grid, size = 6, (2, 3), (8, 12)
    chans = (8, 4)  # one nearest-2x stage: grid (h, w) -> upsampled (2h, 2w) -> latents (4h, 4w)
    body, up, state, config = torch_latent_controlnet(cfg, c_clip, grid, chans, seed=7)
    module, variables = port.load("latent-unet-controlnet", write_checkpoint(tmp_path / "src", state, config))

    inputs = unet_inputs(config.unet, size)
    tokens = np.random.default_rng(11).standard_normal((2, grid[0] * grid[1], c_clip)).astype(np.float32)
    cond = torch_upsampled(up, tokens, grid)
    ref = torch_residuals(body, inputs, cond)
    got = jax_residuals(module, variables, {**inputs, "controlnet_cond": tokens})
    err = residual_err(got, ref)
    assert err <= TOL, f"{name}: latent ControlNet residuals rel err {err:.2e}"

    port.save("latent-unet-controlnet", module, variables, str(tmp_path / "out"))
    module2, variables2 = port.load("latent-unet-controlnet", str(tmp_path / "out"))
    assert module2.config == module.config
    jax.tree.map(np.testing.assert_array_equal, variables2, variables)


def test_latent_controlnet_from_unet_starts_at_zero(tmp_path):
    """from_unet for the latent kind: UNet weights copied, residuals exactly 0 at init; a training step's BatchNorm
    statistics update; a mismatched latent size is refused with the arithmetic in the message."""
    cfg, _ = CASES["sd15"]
    unet = randomize_(TorchUNet(**cfg), seed=12)
    unet.save_pretrained(str(tmp_path))
    unet_module, unet_vars = port.load("unet", str(tmp_path))
    module, variables = controlnet_from_unet(unet_vars, unet_module.config, clip_latent_dim=6, clip_grid=(2, 3),
                                             latent_size=(8, 12))
    assert module.config.conditioning_stages == 1
    for name in ("conv_in", "time_embedding", "down_blocks_0", "mid_block"):
        jax.tree.map(np.testing.assert_array_equal, variables["params"][name], unet_vars["params"][name])
    inputs = unet_inputs(unet_module.config, (8, 12))
    tokens = np.random.default_rng(1).standard_normal((2, 6, 6)).astype(np.float32)
    step = jax.jit(functools.partial(module.apply, train=True, mutable=["batch_stats"]))
    (down, mid), updates = step(variables, **jax.tree.map(jnp.asarray, inputs), controlnet_cond=tokens)
    assert all(not np.any(np.asarray(d)) for d in down) and not np.any(np.asarray(mid))
    before = variables["batch_stats"]["up_sampling_block"]["bn1"]["mean"]
    assert np.any(np.asarray(updates["batch_stats"]["up_sampling_block"]["bn1"]["mean"]) != np.asarray(before))
    with pytest.raises(ValueError, match="power-of-two multiple"):
        controlnet_from_unet(unet_vars, unet_module.config, clip_latent_dim=6, clip_grid=(2, 3), latent_size=(8, 10))
