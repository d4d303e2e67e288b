"""SDXL's second text encoder: transformers ``CLIPTextModelWithProjection`` against the Flax port (fp32): the
projected pooled output (``text_embeds``), the last and the penultimate hidden states (what SDXL reads), unscanned
and scanned, export -> ``from_pretrained`` exactly, and a missing projection named by the port.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_rel_err
from test_text_parity import CLIP_TINY, _padded_batch, _randomise, _rewrite, _run
from transformers import CLIPTextConfig as HFCLIPTextConfig
from transformers import CLIPTextModelWithProjection as HFProjection

import bifrost_jax.port as port
from bifrost_jax.port.base import PortError

TOL = 1e-4
# SDXL's text_encoder_2 (OpenCLIP bigG) uses exact gelu and eos_token_id = the end-of-text id
CONFIG = {**CLIP_TINY, "hidden_act": "gelu", "projection_dim": 20, "eos_token_id": 50}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.manual_seed(0)
    model = HFProjection(HFCLIPTextConfig(**CONFIG)).eval()
    _randomise(model, 4)
    path = str(tmp_path_factory.mktemp("clip_proj"))
    model.save_pretrained(path)
    ids, mask = _padded_batch(np.random.default_rng(1), 12, 45, pad_len=4)
    ids[0, 7], ids[1, 6] = 50, 50
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True)
    return model, path, ids, mask, out


@pytest.mark.parametrize("scan", [False, True])
def test_clip_projection_parity(reference, scan):
    _, path, ids, mask, ref = reference
    module, variables = port.load("clip-text-projection", path, scan_layers=scan)
    run = jax.jit(functools.partial(module.apply, output_hidden_states=True))
    text_embeds, last, hidden = run(variables, jnp.asarray(ids), jnp.asarray(mask))
    assert len(hidden) == len(ref.hidden_states) == CONFIG["num_hidden_layers"] + 1
    errs = {"text_embeds": max_rel_err(text_embeds, ref.text_embeds.numpy()),
            "last_hidden_state": max_rel_err(last, ref.last_hidden_state.numpy()),
            "penultimate": max_rel_err(hidden[-2], ref.hidden_states[-2].numpy()),
            "embeddings": max_rel_err(hidden[0], ref.hidden_states[0].numpy())}
    assert max(errs.values()) <= TOL, errs
    # without hidden states: the same two outputs
    text_embeds2, last2 = _run(module, variables, ids, mask)
    np.testing.assert_allclose(np.asarray(text_embeds2), np.asarray(text_embeds), rtol=0, atol=1e-6)


def test_clip_projection_export_and_errors(reference, tmp_path):
    model, path, _, _, _ = reference
    module, variables = port.load("clip-text-projection", path)
    port.save("clip-text-projection", module, variables, str(tmp_path / "out"))
    back, info = HFProjection.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    missing = _rewrite(path, tmp_path / "missing",
                       lambda t: {k: v for k, v in t.items() if k != "text_projection.weight"})
    with pytest.raises(PortError, match=r"missing keys.*text_projection\.weight"):
        port.load("clip-text-projection", missing)


def test_sdxl_text_conditioning(reference, tmp_path):
    """The two SDXL encoders' conditioning: penultimate hidden states concatenated, the bigG pooled projection, as
    diffusers' encode_prompt computes them."""
    from transformers import CLIPTextModel as HFCLIPTextModel

    from bifrost_jax.sample.unet_decoder import sdxl_text_conditioning, sdxl_time_ids

    model_g, path_g, ids, mask, out_g = reference
    torch.manual_seed(1)
    model_l = HFCLIPTextModel(HFCLIPTextConfig(**{**CLIP_TINY, "eos_token_id": 50})).eval()
    _randomise(model_l, 9)
    model_l.save_pretrained(str(tmp_path / "l"))
    with torch.no_grad():
        out_l = model_l(input_ids=torch.from_numpy(ids), output_hidden_states=True)
    expected = np.concatenate([out_l.hidden_states[-2].numpy(), out_g.hidden_states[-2].numpy()], axis=-1)
    clip_l, vars_l = port.load("clip-text", str(tmp_path / "l"))
    clip_g, vars_g = port.load("clip-text-projection", path_g)
    embeds, pooled = sdxl_text_conditioning(clip_l, vars_l, clip_g, vars_g, jnp.asarray(ids), jnp.asarray(ids),
                                            None, jnp.asarray(mask))
    assert embeds.shape == expected.shape and max_rel_err(embeds, expected) <= TOL
    assert max_rel_err(pooled, out_g.text_embeds.numpy()) <= TOL
    np.testing.assert_array_equal(np.asarray(sdxl_time_ids(2, (1024, 768), (0, 16))),
                                  [[1024, 768, 0, 16, 1024, 768]] * 2)
