"""A component's checkpoint sets its model sizes (``components/model_config.py``): a section with an EMPTY model
config takes them from ``port_dir``'s config.json (a differently-sized checkpoint than the configs' tiny sizes,
no size override anywhere), its weights load into that model, and a stated size that disagrees with the checkpoint
is an error naming both values."""
import os

import jax
import ml_collections
import numpy as np
import pytest
import torch
from flax import traverse_util

from bifrost_jax.configs import load_config_file
from bifrost_jax.parallel.mesh import make_mesh
from bifrost_jax.train.loop import pretrained_overrides
from bifrost_jax.train.registry import get_phase
from bifrost_jax.train.state import StateBuilder, make_optimizer

ROOT = os.path.join(os.path.dirname(__file__), "..")
# differs from the tiny flux config (1 double / 1 single block, 2 heads) in every block count and the head count
OTHER_FLUX = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=8,
                  num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                  axes_dims_rope=(2, 2, 4))
OTHER_TEXT = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, rope_theta=1e6, mrope_section=(2, 2, 2))


def cfg(name, *extra):
    return load_config_file(os.path.join(ROOT, "configs", f"{name}.py"), list(extra))


def pretrained(config):
    phase = get_phase(config)
    tx, _ = make_optimizer(config.optim, config.train.steps)
    builder = StateBuilder(phase, tx, make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), seed=0, ema=False)
    flat = pretrained_overrides(builder, phase, config, frozen_only=False)
    return phase, {".".join(k): np.asarray(jax.device_get(v)) for k, v in flat.items()}


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**OTHER_FLUX).eval()
    path = str(tmp_path_factory.mktemp("flux_other"))
    model.save_pretrained(path)
    return path, model.state_dict()


def test_empty_model_config_takes_the_checkpoints_sizes(flux_dir):
    path, state = flux_dir
    config = cfg("flux", f"flux.port_dir={path}")
    with config.unlocked():
        config.flux.config = ml_collections.ConfigDict()  # no size stated anywhere
    phase, got = pretrained(config)
    fcfg = phase.transformer.module.config
    assert (fcfg.num_layers, fcfg.num_single_layers, fcfg.num_attention_heads, fcfg.attention_head_dim) == (2, 3, 4, 8)
    # the weights of the checkpoint, in the model its config.json describes
    np.testing.assert_array_equal(got["params.transformer.single_transformer_blocks_2.proj_out.kernel"],
                                  state["single_transformer_blocks.2.proj_out.weight"].numpy().T)
    n_params = len([k for k in got if k.startswith("params.transformer.")])
    assert n_params == len(traverse_util.flatten_dict(jax.eval_shape(
        lambda: phase.transformer.module.init(jax.random.PRNGKey(0), **phase.transformer.module.dummy_inputs())
    )["params"]))


def test_a_stated_size_that_disagrees_is_an_error_naming_both(flux_dir):
    path, _ = flux_dir
    with pytest.raises(ValueError, match=r"config\.flux\.config\.num_layers=1 but .*config\.json has num_layers=2"):
        get_phase(cfg("flux", f"flux.port_dir={path}"))  # the tiny config states num_layers=1
    # a ControlNet section's block counts against a ported ControlNet's config.json
    with pytest.raises(ValueError, match=r"config\.controlnet\.num_single_layers=1 but .*num_single_layers=3"):
        get_phase(cfg("controlnet", f"controlnet.port_dir={path}", "controlnet.num_layers=2"))


def test_empty_config_without_a_checkpoint_is_an_error():
    config = cfg("flux")
    with config.unlocked():
        config.flux.config = ml_collections.ConfigDict()
    with pytest.raises(ValueError, match=r"config\.flux\.config is empty"):
        get_phase(config)


def test_mllm_language_model_sizes_from_a_qwen_checkpoint(tmp_path):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from bifrost_jax.train.phase_configs import TINY_VISION

    vision = dict(TINY_VISION, out_hidden_size=OTHER_TEXT["hidden_size"])
    hf_text = {k: v for k, v in OTHER_TEXT.items() if k not in ("rope_theta", "mrope_section")}
    hf_text["rope_parameters"] = {"rope_type": "mrope", "mrope_section": list(OTHER_TEXT["mrope_section"]),
                                  "rope_theta": OTHER_TEXT["rope_theta"]}
    torch.manual_seed(1)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(vision_config=vision, text_config=hf_text)).eval()
    model.save_pretrained(str(tmp_path))
    config = cfg("mllm", f"mllm.port_dir={tmp_path}")
    with config.unlocked():
        config.mllm.config.text = ml_collections.ConfigDict()   # the language model's sizes: the checkpoint's
        config.vision.config = ml_collections.ConfigDict()      # the ViT's too (same directory)
    phase = get_phase(config)
    text = phase.mllm_config.text
    assert (text.hidden_size, text.num_hidden_layers, text.intermediate_size) == (48, 3, 96)
    assert phase.vision.module.config.out_hidden_size == 48
    # stated and different: named
    bad = cfg("mllm", f"mllm.port_dir={tmp_path}")
    with pytest.raises(ValueError, match=r"config\.mllm\.config\.text\.hidden_size=32 but .* has hidden_size=48"):
        get_phase(bad)
