"""Text generation (``sample/text.py``) against transformers' ``Qwen2_5_VLForConditionalGeneration.generate``,
and preservation of the understanding path through ``mllm``-phase training.

* Greedy: one batch holding a prompt with a 140x196 image, one with a 112x112 image (two grids, so two vision
  programs and M-RoPE positions of two shapes) and a text-only prompt, left-padded to a longer bucket than
  transformers pads to: the tokens are identical (one row stops at the end-of-sequence token, the others run to
  max_new_tokens) and every step's logits agree to 1e-4 relative in float32.
* Sampling (temperature, top-k, top-p, one seed per prompt): the same tokens on a rerun and on two different mesh
  shapes; different seeds give different tokens.
* Preservation: ``mllm``-phase training from a Qwen2.5-VL directory and from the official Bifrost-1 layout (the
  tiny configs, 8 devices); the frozen Qwen2.5-VL of the trained state answers an image-question set with tokens
  and per-step logits bit-identical to those of the checkpoint it started from, while the branch has moved.
"""
import dataclasses

import jax
import numpy as np
import pytest
import torch
from conftest import max_rel_err
from flax import traverse_util
from test_phase_loading import _random_vl, cfg, official  # noqa: F401  (the official fixture)
from test_qwen_vl_parity import IMG, VEND, VSTART, tiny_reference

from bifrost_jax import port
from bifrost_jax.parallel.mesh import make_mesh
from bifrost_jax.port.bifrost import vl_params_from
from bifrost_jax.port.qwen import save_qwen_vl
from bifrost_jax.sample.text import DecodeOptions, ImageBuckets, ImageOptions, Prompt, TextGenerator, prepare_image
from bifrost_jax.sample.understanding import load_understanding
from bifrost_jax.train.loop import train
from bifrost_jax.train.registry import get_phase
from bifrost_jax.train.state import merge_params

GRID_A, GRID_B = (1, 10, 14), (1, 8, 8)
MAX_NEW = 8
PAD = 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model = tiny_reference()
    path = str(tmp_path_factory.mktemp("qwen_vl_gen"))
    model.save_pretrained(path)
    module, variables = port.load("qwen2.5-vl", path)
    return model, module, variables, path


def _prompts(seed=0):
    rng = np.random.default_rng(seed)
    txt = lambda n: [int(x) for x in rng.integers(0, 280, n)]  # noqa: E731
    a = (GRID_A[1] // 2) * (GRID_A[2] // 2)
    b = (GRID_B[1] // 2) * (GRID_B[2] // 2)
    rows = [txt(5) + [VSTART] + [IMG] * a + [VEND] + txt(4), [VSTART] + [IMG] * b + [VEND] + txt(9), txt(7)]
    pa = rng.standard_normal((GRID_A[1] * GRID_A[2], 1176)).astype(np.float32)
    pb = rng.standard_normal((GRID_B[1] * GRID_B[2], 1176)).astype(np.float32)
    return [Prompt(rows[0], [(pa, GRID_A)], seed=11), Prompt(rows[1], [(pb, GRID_B)], seed=12),
            Prompt(rows[2], [], seed=13)]


def _hf_generate(model, prompts, eos):
    rows = [p.ids for p in prompts]
    length = max(map(len, rows))
    ids = np.full((len(rows), length), PAD, np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for r, row in enumerate(rows):
        ids[r, length - len(row):] = row
        mask[r, length - len(row):] = 1
    pixels = np.concatenate([pv for p in prompts for pv, _ in p.images])
    grids = [list(g) for p in prompts for _, g in p.images]
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                             pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grids),
                             mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)), max_new_tokens=MAX_NEW,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, eos_token_id=eos,
                             pad_token_id=PAD)
    return out.sequences[:, length:].numpy(), torch.stack(out.logits, 1).numpy()


def test_greedy_matches_transformers_generate(reference):
    model, module, variables, _ = reference
    prompts = _prompts()
    probe = TextGenerator(module, variables, eos_ids=(299,), pad_id=PAD, length_bucket=16)
    free = probe.generate_batch(prompts, DecodeOptions(max_new_tokens=MAX_NEW))
    # an end-of-sequence id that row 1 produces mid-way (and no other row produces before): a per-row stop
    eos = int(free[1, 3])
    assert eos not in free[1, :3] and all(eos not in free[r] for r in (0, 2)), free
    gen = TextGenerator(module, variables, eos_ids=(eos,), pad_id=PAD, length_bucket=16)
    tokens, logits = gen.generate_batch(prompts, DecodeOptions(max_new_tokens=MAX_NEW), return_logits=True)
    ref_tokens, ref_logits = _hf_generate(model, prompts, eos)
    np.testing.assert_array_equal(tokens, ref_tokens)
    assert list(tokens[1, 4:]) == [PAD] * (MAX_NEW - 4) and tokens[1, 3] == eos
    errs = [max_rel_err(logits[:, s], ref_logits[:, s]) for s in range(MAX_NEW)]
    assert max(errs) <= 1e-4, errs
    assert gen.strip(tokens[1]) == list(tokens[1, :3])


def _sample(module, variables, mesh, prompts):
    gen = TextGenerator(module, variables, eos_ids=(299,), pad_id=PAD, mesh=mesh, length_bucket=16)
    options = DecodeOptions(max_new_tokens=MAX_NEW, do_sample=True, temperature=1.3, top_p=0.9, top_k=50)
    return gen.generate_batch(prompts, options)


def test_sampling_reproducible_across_runs_and_meshes(reference):
    _, module, variables, path = reference
    prompts = [_prompts()[i] for i in (0, 2)]  # an image prompt and a text-only one (one ViT program per mesh)
    mesh_a = make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
    mesh_b = make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, devices=jax.devices()[4:6])
    _, params_a = port.load("qwen2.5-vl", path, mesh=mesh_a)  # weights sharded by the mesh rules
    kernel = params_a["params"]["language_model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert len(kernel.sharding.device_set) == 4 and not kernel.sharding.is_fully_replicated
    first = _sample(module, params_a, mesh_a, prompts)
    again = _sample(module, params_a, mesh_a, prompts)
    other = _sample(module, variables, mesh_b, prompts)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, other)
    reseeded = _sample(module, params_a, mesh_a, [Prompt(p.ids, p.images, p.seed + 100) for p in prompts])
    assert (first != reseeded).any(axis=1).all()  # every row really samples, from its own seed


# ----------------------------------------------------------------------------------------------------------------
# preservation through mllm-phase training

def _question_set(generator):
    """Three questions: images of two sizes (through the processor path), one without an image."""
    rng = np.random.default_rng(5)
    v = generator.module.config.vision
    ids = lambda n: [int(x) for x in rng.integers(0, 100, n)]  # noqa: E731
    out = []
    for size, n_text in (((56, 84), 6), ((84, 56), 3), (None, 9)):
        images = []
        if size is not None:
            image = rng.integers(0, 256, size + (3,), dtype=np.uint8)
            pv, grid = generator.prompt_image(image)
            images = [(pv, grid)]
        tokens = []
        for _, grid in images:
            tokens += [generator.module.config.vision_start_token_id]
            tokens += [generator.module.config.image_token_id] * (grid[1] * grid[2] // v.spatial_merge_size ** 2)
            tokens += [generator.module.config.vision_end_token_id]
        out.append(Prompt(ids(4) + tokens + ids(n_text), images))
    return out


def _answers(vl, params):
    params = jax.device_get(params)  # the same (unsharded) inputs before and after: bit-identical programs
    # the tiny configs keep Qwen's special-token ids, beyond their 128-token vocabulary: use in-vocabulary ones
    vl = vl.clone(config=dataclasses.replace(vl.config, vision_start_token_id=9, vision_end_token_id=10,
                                             image_token_id=12))
    text = vl.config.text
    gen = TextGenerator(vl, params, eos_ids=(text.vocab_size - 1,), pad_id=0, length_bucket=16,
                        image_options=ImageOptions(min_pixels=28 * 28, max_pixels=112 * 112))
    return gen.generate_batch(_question_set(gen), DecodeOptions(max_new_tokens=6), return_logits=True)


def _train_mllm(workdir, *extra):
    config = cfg("mllm", "train.steps=2", "train.log_every=1", "checkpoint.async_save=False", "optim.lr=1e-2",
                 "optim.warmup_steps=0", "checkpoint.every=2", f"data.data_dir={workdir}/data",
                 "data.train_size=16", *extra)
    result = train(config, str(workdir / "work"), progress_bar=False)
    assert result.step == 2
    return merge_params(jax.device_get(result.state.params), jax.device_get(result.frozen))


def _check_preserved(before, after, params):
    assert np.isfinite(before[1]).all()
    np.testing.assert_array_equal(before[0], after[0])
    assert np.array_equal(before[1], after[1]), "per-step logits changed"
    layer = params["mllm"]["layers_0"]["self_attn"]
    assert not np.array_equal(layer["vision_branch_q_proj"]["kernel"], layer["q_proj"]["kernel"])


def test_answers_preserved_after_mllm_training_from_qwen(tmp_path):
    phase = get_phase(cfg("mllm"))
    vl, params = _random_vl(phase, 3)
    qwen_dir = str(tmp_path / "qwen")
    save_qwen_vl(vl, {"params": params}, qwen_dir)
    vl, variables = port.load("qwen2.5-vl", qwen_dir)
    before = _answers(vl, variables)
    trained = _train_mllm(tmp_path, f"mllm.port_dir={qwen_dir}")
    after_params = vl_params_from(trained["mllm"], trained["vision"], variables["params"].get("lm_head"))
    _check_flat_equal(after_params, variables["params"])
    _check_preserved(before, _answers(vl, {"params": after_params}), trained)
    # `bifrost chat --checkpoint WORKDIR`: the run's start, found through its saved config
    loaded = load_understanding(str(tmp_path / "work"))
    assert qwen_dir in loaded.source
    _check_flat_equal(loaded.variables["params"], variables["params"])


def test_answers_preserved_after_mllm_training_from_official_bifrost1(official, tmp_path):  # noqa: F811
    pair, variables = port.load("bifrost-1", official["full_dir"], base=official["base"])
    before = _answers(pair.vl, variables["vl"])
    trained = _train_mllm(tmp_path, f"mllm.port_dir={official['full_dir']}", f"mllm.base_dir={official['base']}")
    after_params = vl_params_from(trained["mllm"], trained["vision"], variables["vl"]["params"].get("lm_head"))
    _check_preserved(before, _answers(pair.vl, {"params": after_params}), trained)
    # `bifrost chat` on the checkpoint (needs --base) and on the run (its saved config names both)
    with pytest.raises(ValueError, match="base="):
        load_understanding(official["full_dir"])
    for path, base in ((official["full_dir"], official["base"]), (str(tmp_path / "work"), None)):
        loaded = load_understanding(path, base=base)
        _check_flat_equal(loaded.variables["params"], variables["vl"]["params"])


def _check_flat_equal(a, b):
    fa, fb = traverse_util.flatten_dict(jax.device_get(a)), traverse_util.flatten_dict(jax.device_get(b))
    assert fa.keys() == fb.keys()
    assert all(np.array_equal(fa[k], fb[k]) for k in fa)


def test_scanned_layers_decode_the_same(reference):
    """The kv_cache path of the scanned layer stack (``nn.scan`` over the stacked cache) equals the unscanned one."""
    _, module, variables, path = reference
    scanned_module, scanned_vars = port.load("qwen2.5-vl", path, scan_layers=True)
    prompts = _prompts()[2:]  # text only: the layer stacks differ, the vision tower does not
    options = DecodeOptions(max_new_tokens=3)
    a = TextGenerator(module, variables, eos_ids=(299,), pad_id=PAD).generate_batch(prompts, options, True)
    b = TextGenerator(scanned_module, scanned_vars, eos_ids=(299,), pad_id=PAD).generate_batch(prompts, options, True)
    np.testing.assert_array_equal(a[0], b[0])
    assert max_rel_err(b[1], a[1]) <= 1e-5


def test_image_buckets_bound_the_grids():
    buckets = ImageBuckets.default(max_pixels=448 * 448, min_pixels=56 * 56)
    assert len(buckets.sizes) <= 27 and all(h % 28 == 0 and w % 28 == 0 for h, w in buckets.sizes)
    rng = np.random.default_rng(0)
    sizes = {buckets.assign(int(h), int(w), int(h) * int(w)) for h, w in rng.integers(60, 900, (200, 2))}
    assert sizes <= set(buckets.sizes)
    wide, tall = buckets.assign(100, 300, 100 * 300), buckets.assign(300, 100, 300 * 100)
    assert wide[1] > wide[0] and tall[0] > tall[1]  # the aspect ratio is kept
    image = rng.integers(0, 256, (90, 170, 3), dtype=np.uint8)
    pv, grid = prepare_image(image, ImageOptions(56 * 56, 448 * 448, buckets))
    assert (grid[1] * 14, grid[2] * 14) in buckets.sizes and pv.shape == (grid[1] * grid[2], 1176)
    with pytest.raises(ValueError, match="multiples of 28"):
        ImageBuckets(((30, 28),))
