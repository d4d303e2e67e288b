"""Parity of the Flax SD-family UNet with diffusers' ``UNet2DConditionModel`` (fp32), its port both ways (load,
save -> ``from_pretrained``, error reports), ControlNet residual inputs, and scanned == unscanned.

Two tiny random configs: SD1.5-style (cross-attention down blocks first, conv projections, one head count for all
blocks, 2 layers per block) on 8x12 latents, and SDXL-style (plain first block, linear projections, heads per block,
transformer layers per block (1, 2), ``text_time`` micro-conditioning) on odd 7x10 latents (the decoder then
upsamples to the skips' sizes). Every parameter is re-drawn at random before saving so that a mis-mapped weight
cannot hide.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_rel_err
from safetensors.numpy import load_file, save_file
from test_flux_parity import randomize_

from bifrost_jax import port
from bifrost_jax.models.unet import UNet2DConditionConfig, skip_shapes
from bifrost_jax.port.base import PortError

from diffusers import UNet2DConditionModel as TorchUNet  # noqa: E402

TOL = 1e-4
B, TXT, CROSS = 2, 5, 24
SD_CFG = dict(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=2, cross_attention_dim=CROSS,
              attention_head_dim=2, norm_num_groups=4, sample_size=8)
XL_CFG = dict(block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1, cross_attention_dim=CROSS,
              attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
              addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=60,
              norm_num_groups=4, sample_size=8)
CASES = {"sd15": (SD_CFG, (8, 12)), "sdxl": (XL_CFG, (7, 10))}


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def unet_inputs(cfg: UNet2DConditionConfig, size, seed=0):
    """NHWC numpy inputs: latents, two different timesteps, text states, (SDXL) pooled text + time ids."""
    rng = np.random.default_rng(seed)
    out = dict(sample=rng.standard_normal((B, *size, cfg.in_channels)).astype(np.float32),
               timestep=np.array([17.0, 640.0], np.float32),
               encoder_hidden_states=rng.standard_normal((B, TXT, CROSS)).astype(np.float32), added_cond_kwargs=None)
    if cfg.addition_embed_type == "text_time":
        out["added_cond_kwargs"] = {
            "text_embeds": rng.standard_normal((B, cfg.text_embeds_dim)).astype(np.float32),
            "time_ids": np.array([[1024, 768, 0, 16, 1024, 1024], [512, 512, 32, 0, 768, 1024]], np.float32)}
    return out


def residuals(cfg, size, seed=1):
    rng = np.random.default_rng(seed)
    down = [(0.5 * rng.standard_normal(s)).astype(np.float32) for s in skip_shapes(cfg, B, *size)]
    h, w = size
    for _ in range(cfg.num_upsamplers):
        h, w = -(-h // 2), -(-w // 2)
    mid = (0.5 * rng.standard_normal((B, h, w, cfg.block_out_channels[-1]))).astype(np.float32)
    return down, mid


def model_fields(config) -> dict:
    """A diffusers config's model fields, JSON-normalised (tuples as lists), without the bookkeeping entries."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def torch_added(added):
    return None if added is None else {k: torch.from_numpy(v) for k, v in added.items()}


def torch_forward(model, inputs, down=None, mid=None, mask=None):
    added = inputs["added_cond_kwargs"]
    with torch.no_grad():
        return nhwc(model(nchw(inputs["sample"]), torch.from_numpy(inputs["timestep"]),
                          torch.from_numpy(inputs["encoder_hidden_states"]),
                          added_cond_kwargs=torch_added(added),
                          down_block_additional_residuals=None if down is None else [nchw(d) for d in down],
                          mid_block_additional_residual=None if mid is None else nchw(mid),
                          encoder_attention_mask=None if mask is None else torch.from_numpy(mask)).sample)


def jax_forward(module, variables, inputs, down=None, mid=None, mask=None):
    return np.asarray(jax.jit(module.apply)(variables, **jax.tree.map(jnp.asarray, inputs),
                                            down_block_additional_residuals=down, mid_block_additional_residual=mid,
                                            encoder_attention_mask=mask))


_CASES = {}


def load_case(name, tmp_path_factory):
    """(name, torch UNet, its directory, Flax module, variables, latent size), built once per session."""
    if name not in _CASES:
        cfg, size = CASES[name]
        model = randomize_(TorchUNet(**cfg), seed=3)
        path = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(path)
        module, variables = port.load("unet", path)
        _CASES[name] = (name, model, path, module, variables, size)
    return _CASES[name]


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    return load_case(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def sdxl_case(tmp_path_factory):
    return load_case("sdxl", tmp_path_factory)


def test_unet_parity(case):
    name, model, _, module, variables, size = case
    inputs = unet_inputs(module.config, size)
    ref = torch_forward(model, inputs)
    err = max_rel_err(jax_forward(module, variables, inputs), ref)
    assert err <= TOL, f"{name}: UNet output rel err {err:.2e}"


def test_unet_parity_with_controlnet_residuals(case):
    name, model, _, module, variables, size = case
    inputs = unet_inputs(module.config, size)
    down, mid = residuals(module.config, size)
    ref = torch_forward(model, inputs, down, mid)
    assert max_rel_err(ref, torch_forward(model, inputs)) > 1e-2  # the residuals matter
    err = max_rel_err(jax_forward(module, variables, inputs, [jnp.asarray(d) for d in down], jnp.asarray(mid)), ref)
    assert err <= TOL, f"{name}: UNet + ControlNet residuals rel err {err:.2e}"


def test_unet_text_mask_and_scan(sdxl_case, tmp_path):
    """A text-padding mask (diffusers' -10000 bias vs a boolean mask) on the scanned layout (two-layer transformers
    in the SDXL-style config)."""
    name, model, path, _, _, size = sdxl_case
    module, variables = port.load("unet", path, scan_layers=True)
    inputs = unet_inputs(module.config, size, seed=2)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    ref = torch_forward(model, inputs, mask=mask)
    err = max_rel_err(jax_forward(module, variables, inputs, mask=jnp.asarray(mask)), ref)
    assert err <= TOL, f"{name}: scanned UNet with a text mask rel err {err:.2e}"
    # the scanned layout exports the per-layer keys
    port.save("unet", module, variables, str(tmp_path))
    back = TorchUNet.from_pretrained(str(tmp_path)).state_dict()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_unet_save_from_pretrained_round_trip(case, tmp_path):
    name, model, _, module, variables, _ = case
    port.save("unet", module, variables, str(tmp_path))
    back = TorchUNet.from_pretrained(str(tmp_path))
    ref_state, got_state = model.state_dict(), back.state_dict()
    assert sorted(got_state) == sorted(ref_state)
    for k, v in ref_state.items():
        assert torch.equal(got_state[k], v), f"{name}: {k} changed in the round trip"
    assert model_fields(back.config) == model_fields(model.config)


def test_unet_port_errors(sdxl_case, tmp_path):
    """Every missing, unexpected and wrong-shape key is named in one PortError."""
    _, _, path, _, _, _ = sdxl_case
    state = load_file(os.path.join(path, "diffusion_pytorch_model.safetensors"))
    del state["conv_in.bias"]
    state["extra.weight"] = np.zeros(3, np.float32)
    state["conv_out.weight"] = np.zeros((4, 16, 1, 1), np.float32)
    os.makedirs(tmp_path / "bad")
    save_file(state, str(tmp_path / "bad" / "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(path, "config.json")) as fh:
        (tmp_path / "bad" / "config.json").write_text(fh.read())
    with pytest.raises(PortError) as e:
        port.load("unet", str(tmp_path / "bad"))
    msg = str(e.value)
    assert "conv_in.bias" in msg and "extra.weight" in msg and "conv_out.weight" in msg


def test_unet_config_errors():
    with pytest.raises(ValueError, match="class_embed_type"):
        UNet2DConditionConfig.from_hf_config({**SD_CFG, "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="not_a_field"):
        UNet2DConditionConfig.from_hf_config({**SD_CFG, "not_a_field": 1})
    with pytest.raises(ValueError, match="attention_head_dim"):
        UNet2DConditionConfig(**{**SD_CFG, "attention_head_dim": (2, 4, 8)})
    cfg = UNet2DConditionConfig(**XL_CFG)
    assert json.loads(json.dumps(cfg.to_hf_config()))["addition_embed_type"] == "text_time"


def test_unet_bfloat16_compute(sdxl_case):
    """bf16 compute with fp32 parameters (norms and softmax in fp32) stays close to the fp32 reference."""
    name, model, path, _, _, size = sdxl_case
    module, variables = port.load("unet", path, compute_dtype=jnp.bfloat16, remat_policy="full")
    assert jax.tree.leaves(variables)[0].dtype == jnp.float32
    inputs = unet_inputs(module.config, size)
    out = jax_forward(module, variables, inputs)
    assert out.dtype == jnp.bfloat16
    err = max_rel_err(out.astype(np.float32), torch_forward(model, inputs))
    assert err <= 3e-2, f"{name}: bf16 UNet rel err {err:.2e}"


def test_unet_input_errors(sdxl_case):
    """Wrong inputs are named at the call, not deep inside a block."""
    _, _, _, module, variables, size = sdxl_case
    inputs = jax.tree.map(jnp.asarray, unet_inputs(module.config, size))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        module.apply(variables, **{**inputs, "encoder_hidden_states": inputs["encoder_hidden_states"][..., :7]})
    with pytest.raises(ValueError, match="NHWC"):
        module.apply(variables, **{**inputs, "sample": jnp.moveaxis(inputs["sample"], -1, 1)})
    with pytest.raises(ValueError, match="time_ids"):
        module.apply(variables, **{**inputs, "added_cond_kwargs": None})
    down = [jnp.zeros(s) for s in skip_shapes(module.config, B, *size)]
    with pytest.raises(ValueError, match="mid_block_additional_residual"):
        module.apply(variables, **inputs, down_block_additional_residuals=down)


def test_unet_remat_policy_applies(sdxl_case):
    """remat_policy wraps the resnet and transformer blocks in checkpoints (traced only: the gradients of a remat
    program are JAX's to keep equal)."""
    _, _, path, _, _, size = sdxl_case
    inputs = jax.tree.map(jnp.asarray, unet_inputs(UNet2DConditionConfig(**XL_CFG), size))
    programs = {}
    for policy in ("none", "full"):
        module, variables = port.load("unet", path, scan_layers=True, remat_policy=policy)

        def loss(params):
            return jnp.mean(jnp.square(module.apply({"params": params}, **inputs)))

        programs[policy] = str(jax.make_jaxpr(jax.grad(loss))(variables["params"]))
    # 2 resnets + 1 transformer scan per down / up block and the mid block's 2 resnets + 1 scan, at least
    assert "remat" not in programs["none"] and programs["full"].count("remat") >= 8
