"""Start points of the training phases that load ports, exercised through the phases themselves (the loop's
``pretrained_overrides``: the phase's ``load_pretrained`` plus the accounting against its new-subtree allow-list),
on the tiny configs and a 2x2x2 mesh; nothing is trained.

* T5 / CLIP text encoders from tiny transformers ``save_pretrained`` directories and from their ``bifrost port``
  Orbax outputs (controlnet phase): the frozen encoders equal the port's values exactly.
* The latent ControlNet from the official ``flux_controlnet/`` layout (config.json without our clip fields) and
  from its Orbax port: params AND BatchNorm statistics equal the saved ones.
* The mllm phase from the OFFICIAL Bifrost-1 checkpoint layout (names written out from docs/design.md §12.2, every tensor
  random), with and without the ViT inside, and from its ``bifrost port --kind bifrost-1`` output: every weight
  comes from it (nothing left at its init), branch / head / mask token / position embedding included.
* Ports with a missing or an extra key fail through the phase, naming the key.
"""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import write_sharded_checkpoint
from flax import traverse_util

from bifrost_jax import cli, port
from bifrost_jax.configs import load_config_file
from bifrost_jax.parallel.mesh import make_mesh
from bifrost_jax.port.base import SafetensorsReader, write_safetensors
from bifrost_jax.port.orbax_io import save_ported
from bifrost_jax.train.loop import pretrained_overrides
from bifrost_jax.train.registry import get_phase
from bifrost_jax.train.state import StateBuilder, make_optimizer, merge_params

ROOT = os.path.join(os.path.dirname(__file__), "..")
VLM = "vision_language_model."


def cfg(name, *extra):
    return load_config_file(os.path.join(ROOT, "configs", f"{name}.py"), list(extra))


def load_through_phase(config):
    """(phase, {dotted path: numpy array} of the pretrained weights, expected dotted paths) as the loop gets
    them at a fresh start (accounting included)."""
    phase = get_phase(config)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    tx, _ = make_optimizer(config.optim, config.train.steps)
    builder = StateBuilder(phase, tx, mesh, seed=0, ema=False)  # abstract only
    flat = pretrained_overrides(builder, phase, config, frozen_only=False)
    got = {".".join(k): np.asarray(jax.device_get(v)) for k, v in flat.items()}
    expected = {".".join(k) for k in traverse_util.flatten_dict(
        {"params": merge_params(builder.abstract_state.params, builder.abstract_frozen),
         **builder.abstract_state.mutable})}
    return phase, got, expected


def flat_np(tree, prefix):
    return {prefix + "." + ".".join(map(str, k)): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def assert_same(got, want):
    missing = sorted(set(want) - set(got))
    assert not missing, missing[:5]
    for k, v in want.items():
        assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k


def _randomise_torch(model, seed):
    import torch
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # norms start at 1: randomise everything so a mis-mapped weight shows
            p.copy_(torch.randn_like(p) * 0.2)


def _rewrite(src_dir, dst_dir, drop=(), add=None, name="model.safetensors"):
    """A copy of a single-file safetensors directory with keys dropped / added."""
    os.makedirs(dst_dir, exist_ok=True)
    reader = SafetensorsReader(src_dir)
    tensors = {k: reader.get(k) for k in reader.keys() if k not in drop}
    tensors.update(add or {})
    write_safetensors(os.path.join(dst_dir, name), tensors)
    with open(os.path.join(src_dir, "config.json")) as fh, open(os.path.join(dst_dir, "config.json"), "w") as out:
        out.write(fh.read())


# ----------------------------------------------------------------------------------------------------------------
# text encoders

@pytest.fixture(scope="module")
def text_ports(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from bifrost_jax.train.phase_configs import TINY_CLIP, TINY_T5

    root = tmp_path_factory.mktemp("text_ports")
    t5 = T5EncoderModel(T5Config(**TINY_T5)).eval()
    clip = CLIPTextModel(CLIPTextConfig(**TINY_CLIP)).eval()
    out = {"root": root}
    for name, model, kind, seed in (("t5", t5, "t5-encoder", 1), ("clip", clip, "clip-text", 2)):
        _randomise_torch(model, seed)
        hf = str(root / f"{name}_hf")
        model.save_pretrained(hf)
        _, variables = port.load(kind, hf)
        orbax = str(root / f"{name}_orbax")
        save_ported(orbax, kind, variables, hf)
        out[name] = dict(hf=hf, orbax=orbax, kind=kind, params=jax.device_get(variables["params"]),
                         torch=model.state_dict())
    return out


@pytest.mark.parametrize("t5_from,clip_from", [("hf", "orbax"), ("orbax", "hf")])
def test_text_encoders_from_ports(text_ports, t5_from, clip_from):
    t5, clip = text_ports["t5"], text_ports["clip"]
    _, got, _ = load_through_phase(cfg("controlnet", f"t5.port_dir={t5[t5_from]}", f"clip.port_dir={clip[clip_from]}"))
    assert {k.split(".")[1] for k in got} == {"t5", "clip"}
    assert_same(got, flat_np(t5["params"], "params.t5"))
    assert_same(got, flat_np(clip["params"], "params.clip"))
    assert len([k for k in got if k.startswith("params.t5.")]) == len(flat_np(t5["params"], "x"))
    # and against the torch tensors themselves (the port is not its own reference)
    np.testing.assert_array_equal(got["params.t5.shared.embedding"], t5["torch"]["shared.weight"].numpy())
    np.testing.assert_array_equal(got["params.clip.layers_0.self_attn.q_proj.kernel"],
                                  clip["torch"]["encoder.layers.0.self_attn.q_proj.weight"].numpy().T)


def test_text_port_missing_or_extra_key_fails_naming_it(text_ports):
    t5, clip, root = text_ports["t5"], text_ports["clip"], text_ports["root"]
    # transformers directory: a missing and an extra tensor
    key = "encoder.block.0.layer.1.DenseReluDense.wi_1.weight"
    missing, extra = str(root / "t5_missing"), str(root / "t5_extra")
    _rewrite(t5["hf"], missing, drop=(key,))
    _rewrite(t5["hf"], extra, add={"encoder.block.0.layer.1.extra_proj.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(Exception, match=key.replace(".", r"\.")):
        load_through_phase(cfg("controlnet", f"t5.port_dir={missing}"))
    with pytest.raises(Exception, match=r"encoder\.block\.0\.layer\.1\.extra_proj\.weight"):
        load_through_phase(cfg("controlnet", f"t5.port_dir={extra}"))
    # Orbax port: a missing and an extra leaf
    params = dict(clip["params"])
    no_norm = {k: v for k, v in params.items() if k != "final_layer_norm"}
    save_ported(str(root / "clip_orbax_missing"), "clip-text", {"params": no_norm}, clip["hf"])
    save_ported(str(root / "clip_orbax_extra"), "clip-text",
                {"params": {**params, "extra_head": {"kernel": np.ones((2, 2), np.float32)}}}, clip["hf"])
    with pytest.raises(ValueError, match=r"config\.clip\.port_dir[\s\S]*missing: \[.*final_layer_norm\.scale"):
        load_through_phase(cfg("controlnet", f"clip.port_dir={root / 'clip_orbax_missing'}"))
    with pytest.raises(ValueError, match=r"unexpected: \['extra_head\.kernel'\]"):
        load_through_phase(cfg("controlnet", f"clip.port_dir={root / 'clip_orbax_extra'}"))
    # a port of the wrong kind
    with pytest.raises(ValueError, match="'t5-encoder' port"):
        load_through_phase(cfg("controlnet", f"clip.port_dir={t5['orbax']}"))


# ----------------------------------------------------------------------------------------------------------------
# latent ControlNet

def test_controlnet_from_official_layout_and_orbax(tmp_path):
    config = cfg("controlnet")
    phase = get_phase(config)
    module = phase.controlnet.module
    shapes = nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(3), **module.dummy_inputs())))
    r = np.random.default_rng(4)

    def rand(x):
        if np.issubdtype(x.dtype, np.integer):
            return np.full(x.shape, 7, x.dtype)
        return r.uniform(0.5, 1.5, x.shape).astype(x.dtype)

    variables = jax.tree.map(rand, shapes)  # zero heads, BatchNorm statistics: all random here
    official = str(tmp_path / "flux_controlnet")
    port.save("latent-controlnet", module, variables, official)
    # the official config.json has no clip_latent_dim / clip_grid: the phase supplies its grid
    with open(os.path.join(official, "config.json")) as fh:
        hf = json.load(fh)
    for k in ("clip_latent_dim", "clip_grid"):
        hf.pop(k)
    with open(os.path.join(official, "config.json"), "w") as fh:
        json.dump(hf, fh)
    orbax = str(tmp_path / "cn_orbax")
    save_ported(orbax, "latent-controlnet", variables, official)
    want = {**flat_np(variables["params"], "params.controlnet"),
            **flat_np(variables["batch_stats"], "batch_stats.controlnet")}
    for source in (official, orbax):
        _, got, _ = load_through_phase(cfg("controlnet", f"controlnet.port_dir={source}"))
        assert_same(got, want)
        # from a port, the ControlNet is NOT re-copied from FLUX
        assert set(k.split(".")[1] for k in got) == {"controlnet"}


# ----------------------------------------------------------------------------------------------------------------
# mllm from the official Bifrost-1 checkpoint

def _random_vl(phase, seed):
    from bifrost_jax.models.qwen.vl import QwenVLConfig, QwenVLForConditionalGeneration
    from bifrost_jax.port.qwen import abstract_vl

    vl = QwenVLForConditionalGeneration(QwenVLConfig(vision=phase.vision.module.config, text=phase.mllm_config.text),
                                        dtype=jnp.float32)
    shapes, _ = abstract_vl(vl)
    r = np.random.default_rng(seed)
    return vl, jax.tree.map(lambda s: (r.normal(size=s.shape) * 0.2).astype(np.float32), shapes["params"])


def _branch_tensors(text, n, clip_dim, rng):
    """The Bifrost-1 additions, named as in the official checkpoint (docs/design.md §12.2), all random."""
    def r(*s):
        return (rng.standard_normal(s) * 0.2).astype(np.float32)
    h, hd = text.hidden_size, text.hidden_size // text.num_attention_heads
    q, kv, inter = text.num_attention_heads * hd, text.num_key_value_heads * hd, text.intermediate_size
    out = {}
    for i in range(text.num_hidden_layers):
        p = f"{VLM}model.layers.{i}."
        out[p + "self_attn.vision_branch_q_proj.weight"], out[p + "self_attn.vision_branch_q_proj.bias"] = r(q, h), r(q)
        for x in "kv":
            out[p + f"self_attn.vision_branch_{x}_proj.weight"] = r(kv, h)
            out[p + f"self_attn.vision_branch_{x}_proj.bias"] = r(kv)
        out[p + "self_attn.vision_branch_o_proj.weight"] = r(h, q)
        out[p + "vision_branch_mlp.gate_proj.weight"] = r(inter, h)
        out[p + "vision_branch_mlp.up_proj.weight"] = r(inter, h)
        out[p + "vision_branch_mlp.down_proj.weight"] = r(h, inter)
        out[p + "vision_branch_input_layernorm.weight"] = 1 + r(h)
        out[p + "vision_branch_post_attention_layernorm.weight"] = 1 + r(h)
    out[f"{VLM}model.vision_branch_norm.weight"] = 1 + r(h)
    out["vision_head.weight"], out["vision_head.bias"] = r(clip_dim, h), r(clip_dim)
    out["mask_token"], out["learnable_pos_emb"] = r(1, 1, clip_dim), r(1, n, h)
    return out


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    from bifrost_jax.port.qwen import save_qwen_vl

    root = tmp_path_factory.mktemp("bifrost1")
    phase = get_phase(cfg("mllm"))
    base, other = str(root / "base"), str(root / "other")
    vl, base_params = _random_vl(phase, 0)
    save_qwen_vl(vl, {"params": base_params}, base)
    _, other_params = _random_vl(phase, 1)
    save_qwen_vl(vl, {"params": other_params}, other)
    base_sd = {k: SafetensorsReader(base).get(k) for k in SafetensorsReader(base).keys()}
    other_sd = {k: SafetensorsReader(other).get(k) for k in SafetensorsReader(other).keys()}
    c = phase.mllm_config
    branch = _branch_tensors(c.text, c.num_image_tokens, c.clip_dim, np.random.default_rng(2))
    # full layout: text of `base`, ViT (+ LM head) of `other`; trained-only: the rest comes from base_dir
    full = {VLM + k: v for k, v in base_sd.items() if k.startswith("model.")}
    full.update({VLM + k: v for k, v in other_sd.items() if not k.startswith("model.")})
    full.update(branch)
    full["vision_gen_vae_model.encoder.conv_in.weight"] = np.zeros((2, 2), np.float32)  # ignored (docs/design.md §11.5)
    full_dir, trained_dir = str(root / "official_full"), str(root / "official_trained")
    write_sharded_checkpoint(full_dir, full)
    write_sharded_checkpoint(trained_dir, branch)
    return dict(root=root, base=base, base_params=base_params, other_params=other_params, branch=branch,
                full_dir=full_dir, trained_dir=trained_dir)


def _expected_mllm(official, vit_params):
    b = official["branch"]
    lm = official["base_params"]["language_model"]
    want = {"params.mllm.mask_token": b["mask_token"][0, 0], "params.mllm.learnable_pos_emb": b["learnable_pos_emb"][0],
            "params.mllm.vision_head.kernel": b["vision_head.weight"].T,
            "params.mllm.vision_head.bias": b["vision_head.bias"],
            "params.mllm.vision_branch_norm.scale": b[f"{VLM}model.vision_branch_norm.weight"],
            "params.mllm.embed_tokens.embedding": np.asarray(lm["embed_tokens"]["embedding"]),
            "params.mllm.norm.scale": np.asarray(lm["norm"]["scale"])}
    for i in range(2):
        p = f"{VLM}model.layers.{i}."
        m = f"params.mllm.layers_{i}."
        for x in "qkvo":
            want[f"{m}self_attn.vision_branch_{x}_proj.kernel"] = b[f"{p}self_attn.vision_branch_{x}_proj.weight"].T
        for x in ("gate", "up", "down"):
            want[f"{m}vision_branch_mlp.{x}_proj.kernel"] = b[f"{p}vision_branch_mlp.{x}_proj.weight"].T
        want[f"{m}vision_branch_input_layernorm.scale"] = b[f"{p}vision_branch_input_layernorm.weight"]
        orig = lm[f"layers_{i}"]
        want[f"{m}self_attn.q_proj.kernel"] = np.asarray(orig["self_attn"]["q_proj"]["kernel"])
        want[f"{m}mlp.down_proj.kernel"] = np.asarray(orig["mlp"]["down_proj"]["kernel"])
    want.update(flat_np(vit_params, "params.vision"))
    return want


@pytest.mark.parametrize("layout", ["full", "trained", "orbax"])
def test_mllm_from_official_bifrost1(official, layout):
    if layout == "orbax":  # `bifrost port --kind bifrost-1` of the full checkpoint
        path = str(official["root"] / "bifrost1_orbax")
        if not os.path.exists(path):
            assert cli.main(["port", "--kind", "bifrost-1", "--src", official["full_dir"], "--base", official["base"],
                             "--out", path]) == 0
        extra = [f"mllm.port_dir={path}"]
    else:
        extra = [f"mllm.port_dir={official[layout + '_dir']}", f"mllm.base_dir={official['base']}"]
    phase, got, expected = load_through_phase(cfg("mllm", *extra))
    assert phase.new_subtrees == ()  # nothing may stay at its init...
    assert set(got) == expected      # ...and nothing does: every weight of the phase came from the checkpoint
    vit = official["base_params"]["visual"] if layout == "trained" else official["other_params"]["visual"]
    want = _expected_mllm(official, vit)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    # the branch is the checkpoint's, not a copy of the original weights
    assert not np.array_equal(got["params.mllm.layers_0.self_attn.vision_branch_q_proj.kernel"],
                              got["params.mllm.layers_0.self_attn.q_proj.kernel"])


def test_mllm_official_errors_name_the_problem(official, tmp_path):
    # no base_dir
    with pytest.raises(ValueError, match=r"config\.mllm\.base_dir"):
        get_phase(cfg("mllm", f"mllm.port_dir={official['trained_dir']}"))
    # a checkpoint missing one branch tensor (and holding an unknown one): both named
    tensors = dict(official["branch"])
    gone = f"{VLM}model.layers.1.vision_branch_mlp.up_proj.weight"
    del tensors[gone]
    tensors[f"{VLM}model.layers.1.vision_branch_mlp.extra.weight"] = np.zeros((2, 2), np.float32)
    bad = str(tmp_path / "bad")
    write_sharded_checkpoint(bad, tensors)
    with pytest.raises(Exception) as e:
        load_through_phase(cfg("mllm", f"mllm.port_dir={bad}", f"mllm.base_dir={official['base']}"))
    assert gone in str(e.value) and "vision_branch_mlp.extra.weight" in str(e.value), str(e.value)


def test_mllm_from_qwen_orbax_port(official):
    """A `bifrost port --kind qwen2.5-vl` output: text model and ViT from it, the branch copied from the loaded
    text weights; only the head, mask token and position embedding stay new."""
    path = str(official["root"] / "qwen_orbax")
    assert cli.main(["port", "--kind", "qwen2.5-vl", "--src", official["base"], "--out", path]) == 0
    phase, got, expected = load_through_phase(cfg("mllm", f"mllm.port_dir={path}"))
    new = {f"params.mllm.{k}" for k in ("mask_token", "learnable_pos_emb", "vision_head.kernel", "vision_head.bias")}
    assert expected - set(got) == new
    lm = official["base_params"]["language_model"]
    np.testing.assert_array_equal(got["params.mllm.embed_tokens.embedding"], lm["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(got["params.mllm.layers_1.self_attn.vision_branch_k_proj.bias"],
                                  lm["layers_1"]["self_attn"]["k_proj"]["bias"])
    assert_same(got, flat_np(official["base_params"]["visual"], "params.vision"))
