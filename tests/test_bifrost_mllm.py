"""Bifrost-1 dual-branch MLLM: text untouched, frozen weights stay frozen, sliced routing == the official
both-branches formulation (against transformers layers), KV-cached decoding == full forward, padding invariance,
MAR mask sampling."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from conftest import max_rel_err, rel_rms
from flax import traverse_util
from test_qwen_decoder import tiny_qwen_vl

from bifrost_jax.models.bifrost import (BifrostConfig, BifrostMLLM, init_branch_from_original, is_trainable,
                                        mse_loss, random_orders, sample_mar_mask, sample_mar_mask_for,
                                        trainable_mask)
from bifrost_jax.models.qwen.decoder import QwenTextConfig
from bifrost_jax.port.qwen_text import load_language_model

N, GRID = 6, (2, 3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two random transformers models: A = the frozen original, B = the generation branch; and a BifrostMLLM whose
    params are A's text weights + B's as branch + random head / mask token / pos-emb."""
    model_a, model_b = tiny_qwen_vl(seed=0), tiny_qwen_vl(seed=1)
    path_a, path_b = str(tmp_path_factory.mktemp("a")), str(tmp_path_factory.mktemp("b"))
    model_a.save_pretrained(path_a)
    model_b.save_pretrained(path_b)
    text_module, text_vars = load_language_model(path_a)
    _, branch_vars = load_language_model(path_b)
    cfg = BifrostConfig(text=text_module.config, num_image_tokens=N, image_grid=GRID)
    params = build_params(cfg, text_vars["params"], branch_vars["params"], scan=False)
    return dict(model_a=model_a, model_b=model_b, cfg=cfg, text_module=text_module, text_vars=text_vars,
                branch_params=branch_vars["params"], params=params)


def build_params(cfg, text_params, branch_params, scan, seed=7):
    module = BifrostMLLM(cfg, dtype=jnp.float32, scan_layers=scan)
    b, t = 1, 3
    shapes = nn.meta.unbox(jax.eval_shape(lambda: module.init(
        jax.random.PRNGKey(0), jnp.zeros((b, t), jnp.int32), jnp.ones((b, t), jnp.int32),
        jnp.zeros((b, N, cfg.clip_dim)), jnp.zeros((b, N), bool)))["params"])
    flat_shapes, flat_text = traverse_util.flatten_dict(shapes), traverse_util.flatten_dict(text_params)
    # the original weights sit under exactly QwenLanguageModel's names (so text_key_map loads them)
    for k, v in flat_text.items():
        assert k in flat_shapes and flat_shapes[k].shape == v.shape, k
    rng = np.random.default_rng(seed)
    flat = {k: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32) for k, s in flat_shapes.items()}
    flat.update(flat_text)
    params = init_branch_from_original(traverse_util.unflatten_dict(flat), source=branch_params)
    flat = traverse_util.flatten_dict(params)
    assert set(flat) == set(flat_shapes)
    return params


def make_batch(seed=0, pads=(3, 0), t=9):
    rng = np.random.default_rng(seed)
    b = len(pads)
    ids = rng.integers(0, 300, size=(b, t))
    mask = np.ones((b, t), np.int64)
    for r, p in enumerate(pads):
        mask[r, :p] = 0
        ids[r, :p] = 0
    latents = rng.standard_normal((b, N, 64)).astype(np.float32)
    img_mask = rng.random((b, N)) < 0.5
    img_mask[:, 0], img_mask[:, 1] = True, False  # both kinds present in every row
    return ids, mask, latents, img_mask


_JITTED = {}


def apply(module, params, *args, method=None):
    """module.apply under jit (eager op-by-op dispatch is what makes flax tests slow on busy cores)."""
    key = (module, method)
    if key not in _JITTED:
        _JITTED[key] = jax.jit(lambda p, *a: module.apply({"params": p}, *a, method=method))
    return np.asarray(_JITTED[key](params, *[None if a is None else jnp.asarray(a) for a in args]))


# ---------------------------------------------------------------------------------------------------------------
# 1. the text path is the frozen Qwen model

def test_text_hidden_equals_plain_qwen_and_transformers(setup):
    ids, mask, _, _ = make_batch()
    module = BifrostMLLM(setup["cfg"], dtype=jnp.float32)
    got = apply(module, setup["params"], ids, mask, method=BifrostMLLM.text_hidden)
    plain = apply(setup["text_module"], setup["text_vars"]["params"], ids, None, None, mask)
    real = mask.astype(bool)
    # the same block code on the same weights; only XLA's fusion of two different programs may differ
    assert max_rel_err(got[real], plain[real]) <= 1e-6
    pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 1)[None].repeat(3, 0)
    with torch.no_grad():
        want = setup["model_a"].model.language_model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(pos)).last_hidden_state.numpy()
    err = max_rel_err(got[real], want[real])
    print(f"bifrost text hidden vs transformers: max rel err {err:.2e}")
    assert err <= 1e-4


# ---------------------------------------------------------------------------------------------------------------
# 2. training the branch leaves the frozen model bit-identical

def test_training_branch_keeps_frozen_model_bit_identical(setup):
    """Scanned layers with full remat, as a training run would use them."""
    cfg = setup["cfg"]
    module = BifrostMLLM(cfg, dtype=jnp.float32, scan_layers=True, remat_policy="full")
    params = restack(setup["params"])
    ids, mask, latents, _ = make_batch(seed=1)
    labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable_mask(params))
    tx = optax.multi_transform({"train": optax.adam(1e-2), "freeze": optax.set_to_zero()}, labels)
    opt_state = tx.init(params)
    text_before = apply(module, params, ids, mask, method=BifrostMLLM.text_hidden)

    @jax.jit
    def step(params, opt_state, rng):
        img_mask = sample_mar_mask_for(cfg, rng, ids.shape[0])

        def loss_fn(p):
            return mse_loss(module.apply({"params": p}, ids, mask, latents, img_mask), latents)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    new = params
    losses = []
    for i in range(3):
        new, opt_state, loss = step(new, opt_state, jax.random.PRNGKey(i))
        losses.append(float(loss))
    flat_old, flat_new = traverse_util.flatten_dict(params), traverse_util.flatten_dict(new)
    n_trained = 0
    for k in flat_old:
        if is_trainable(k):
            n_trained += 1
            assert not np.array_equal(flat_old[k], flat_new[k]), f"trainable {'/'.join(k)} did not move"
        else:
            np.testing.assert_array_equal(flat_new[k], flat_old[k], err_msg="/".join(k))
    assert n_trained == 12 + 5  # stacked layers: q,k,v (w+b), o, 3 MLP, 2 norms; + norm, head (2), tok, pos
    text_after = apply(module, new, ids, mask, method=BifrostMLLM.text_hidden)
    np.testing.assert_array_equal(text_after, text_before)
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------------------------------------------------
# 3. sliced routing == docs/design.md §3.3 written with the transformers layers

def _sel(m, orig, branch):
    return m * branch + (1 - m) * orig


def torch_official_reference(model_a, model_b, params, ids, mask, latents, img_mask, dtype=torch.float32):
    """docs/design.md §3.3 literally with transformers modules: both weight sets (A original, B branch) on EVERY token, mixed by
    the image mask; dense 4-D additive mask (causal + key padding at finfo.min, image block zeroed). ``dtype``: of
    the models (already converted) and of every tensor made here."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb, eager_attention_forward
    lm_a, lm_b = model_a.model.language_model, model_b.model.language_model
    t = lambda a: torch.tensor(np.asarray(a, np.float32)).to(dtype)  # noqa: E731
    b, tlen = ids.shape
    length = tlen + N
    with torch.no_grad():
        z = torch.where(torch.tensor(np.asarray(img_mask))[..., None], t(params["mask_token"]), t(latents)) \
            + t(params["learnable_pos_emb"])
        x = torch.cat([lm_a.embed_tokens(torch.tensor(np.asarray(ids))), z], dim=1)
        m = torch.cat([torch.zeros(b, tlen), torch.ones(b, N)], dim=1)[..., None].to(dtype)
        text_pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 1)
        pos = np.concatenate([text_pos, np.zeros((b, N), np.int64)], axis=1)[None].repeat(3, 0)
        cos, sin = lm_a.rotary_emb(x, t(pos))
        keys = torch.cat([torch.tensor(np.asarray(mask)).bool(), torch.ones(b, N, dtype=torch.bool)], dim=1)
        allowed = torch.tril(torch.ones(length, length, dtype=torch.bool))[None, None] & keys[:, None, None, :]
        allowed[:, :, tlen:, tlen:] = True
        bias = torch.zeros(b, 1, length, length, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        for la, lb in zip(lm_a.layers, lm_b.layers):
            aa, ab = la.self_attn, lb.self_attn
            h = _sel(m, la.input_layernorm(x), lb.input_layernorm(x))
            shape = (b, length, -1, aa.head_dim)
            q = _sel(m, aa.q_proj(h), ab.q_proj(h)).view(shape).transpose(1, 2)
            k = _sel(m, aa.k_proj(h), ab.k_proj(h)).view(shape).transpose(1, 2)
            v = _sel(m, aa.v_proj(h), ab.v_proj(h)).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            o, _ = eager_attention_forward(aa, q, k, v, bias, scaling=aa.scaling, dropout=0.0)
            o = o.reshape(b, length, -1)
            x = x + _sel(m, aa.o_proj(o), ab.o_proj(o))
            h = _sel(m, la.post_attention_layernorm(x), lb.post_attention_layernorm(x))
            x = x + _sel(m, la.mlp(h), lb.mlp(h))
        x = _sel(m, lm_a.norm(x), lm_b.norm(x))
        head = params["vision_head"]
        return (x[:, tlen:] @ t(head["kernel"]) + t(head["bias"])).float().numpy()


@pytest.mark.parametrize("scan", [False, True])
def test_sliced_forward_equals_official_reference(setup, scan):
    cfg = setup["cfg"]
    params = setup["params"] if not scan else build_params(cfg, restack(setup["text_vars"]["params"]),
                                                           restack(setup["branch_params"]), scan=True)
    if scan:  # same random extras as the unscanned tree
        for k in ("vision_head", "mask_token", "learnable_pos_emb"):
            params[k] = setup["params"][k]
    module = BifrostMLLM(cfg, dtype=jnp.float32, scan_layers=scan)
    ids, mask, latents, img_mask = make_batch(seed=2)
    want = torch_official_reference(setup["model_a"], setup["model_b"], setup["params"], ids, mask, latents,
                                    img_mask)
    got = apply(module, params, ids, mask, latents, img_mask)
    official = apply(module, params, ids, mask, latents, img_mask, method=BifrostMLLM.official_forward)
    e_sliced, e_official = max_rel_err(got, want), max_rel_err(official, want)
    print(f"scan={scan}: sliced vs torch reference {e_sliced:.2e}; official_forward vs torch {e_official:.2e}; "
          f"sliced vs official {max_rel_err(got, official):.2e}")
    assert e_sliced <= 1e-4 and e_official <= 1e-4 and max_rel_err(got, official) <= 1e-4
    # routing matters: swapping the branch for the original weights changes the prediction
    plain = init_branch_from_original(params)
    assert max_rel_err(apply(module, plain, ids, mask, latents, img_mask), want) > 1e-2


def restack(params):
    layers = sorted((k for k in params if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[k] for k in layers])
    return out


# ---------------------------------------------------------------------------------------------------------------
# 4./5. the text-prefix KV cache, padding invariance

@pytest.mark.parametrize("scan", [False, True])
def test_cached_decode_equals_full_forward(setup, scan):
    cfg = setup["cfg"]
    params = setup["params"] if not scan else restack(setup["params"])
    module = BifrostMLLM(cfg, dtype=jnp.float32, scan_layers=scan)
    ids, mask, latents, img_mask = make_batch(seed=3, pads=(4, 0, 2), t=10)
    full = apply(module, params, ids, mask, latents, img_mask)
    cache = jax.jit(lambda p, *a: module.apply({"params": p}, *a, method=BifrostMLLM.encode_prefix))(
        params, jnp.asarray(ids), jnp.asarray(mask))
    assert cache["k"].shape == (cfg.text.num_hidden_layers, 3, 10, 2, 16)
    decode = jax.jit(lambda p, c, *a: module.apply({"params": p}, c, *a, method=BifrostMLLM.decode_images))
    got = decode(params, cache, latents, img_mask)
    err = max_rel_err(got, full)
    print(f"scan={scan}: decode_images vs full forward max rel err {err:.2e}")
    assert err <= 1e-6
    # the cache is reusable: another set of visible latents, same prefix
    img_mask2 = ~img_mask
    full2 = apply(module, params, ids, mask, latents, img_mask2)
    assert max_rel_err(decode(params, cache, latents, img_mask2), full2) <= 1e-5


def test_left_padding_does_not_change_predictions(setup):
    module = BifrostMLLM(setup["cfg"], dtype=jnp.float32)
    ids, mask, latents, img_mask = make_batch(seed=4, pads=(0,), t=6)
    preds = []
    for pad in (0, 3, 7):
        ids_p = np.concatenate([np.full((1, pad), 5), ids], axis=1)  # pad id value must not matter either
        mask_p = np.concatenate([np.zeros((1, pad), np.int64), mask], axis=1)
        preds.append(apply(module, setup["params"], ids_p, mask_p, latents, img_mask))
        assert np.all(np.isfinite(preds[-1]))
    for p in preds[1:]:
        assert max_rel_err(p, preds[0]) <= 1e-5
    official = apply(module, setup["params"], np.concatenate([np.full((1, 3), 5), ids], 1),
                     np.concatenate([np.zeros((1, 3), np.int64), mask], 1), latents, img_mask,
                     method=BifrostMLLM.official_forward)
    assert max_rel_err(official, preds[0]) <= 1e-4


def test_bf16_no_worse_than_transformers_bf16(setup):
    """bf16 compute: the error against the fp32 reference is of the size of the same reference run in bf16 with
    transformers' modules (relative RMS, no absolute allowance; per-layer roundings: test_bf16_numerics.py)."""
    import copy

    ids, mask, latents, img_mask = make_batch(seed=5)
    params = setup["params"]
    want = torch_official_reference(setup["model_a"], setup["model_b"], params, ids, mask, latents, img_mask)
    bf16 = lambda model: copy.deepcopy(model).to(torch.bfloat16)  # noqa: E731
    want16 = torch_official_reference(bf16(setup["model_a"]), bf16(setup["model_b"]), params, ids, mask, latents,
                                      img_mask, dtype=torch.bfloat16)
    out = apply(BifrostMLLM(setup["cfg"], dtype=jnp.bfloat16), params, ids, mask, latents, img_mask)
    assert out.dtype == jnp.bfloat16
    err, torch_err = rel_rms(out.astype(np.float32), want), rel_rms(want16, want)
    print(f"bifrost mllm bf16 vs fp32 reference (relative RMS): ours {err:.2e}, transformers bf16 {torch_err:.2e}")
    assert 0 < err <= 1.5 * torch_err


# ---------------------------------------------------------------------------------------------------------------
# init, config, loss, masking

def test_init_branch_from_original_and_zero_init(setup):
    cfg = setup["cfg"]
    module = BifrostMLLM(cfg, dtype=jnp.float32)
    ids, mask, latents, img_mask = make_batch(seed=6)
    params = nn.meta.unbox(jax.jit(module.init)(jax.random.PRNGKey(0), ids, mask, latents, img_mask)["params"])
    assert not np.any(params["mask_token"]) and not np.any(params["learnable_pos_emb"])
    p = init_branch_from_original(params)
    layer = p["layers_1"]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        for leaf in layer["self_attn"][name]:
            np.testing.assert_array_equal(layer["self_attn"][f"vision_branch_{name}"][leaf],
                                          layer["self_attn"][name][leaf])
    for name in ("mlp", "input_layernorm", "post_attention_layernorm"):
        for a, b in zip(jax.tree.leaves(layer[f"vision_branch_{name}"]), jax.tree.leaves(layer[name])):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(p["vision_branch_norm"]["scale"], p["norm"]["scale"])
    # branch = a copy of the original, zero mask token / pos-emb, every slot masked: the image slots all carry a
    # zero embedding at position 0, so all N predictions are equal
    pred = apply(module, p, ids, mask, latents, np.ones_like(img_mask))
    np.testing.assert_allclose(pred[:, 0], pred[:, -1], rtol=1e-5, atol=1e-6)
    assert max_rel_err(pred[0, 0], pred[1, 0]) > 1e-3  # ... but they do depend on the prompt


def test_config_validation():
    text = QwenTextConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, vocab_size=50, mrope_section=(2, 3, 3))
    with pytest.raises(ValueError, match="clip_dim"):
        BifrostConfig(text=text, clip_dim=16, num_image_tokens=4, image_grid=(2, 2))
    with pytest.raises(ValueError, match="image_grid"):
        BifrostConfig(text=text, num_image_tokens=6, image_grid=(2, 2))
    cfg = BifrostConfig(text=text, num_image_tokens=4, image_grid=(2, 2))
    assert cfg.clip_dim == 32 and BifrostConfig.from_dict(cfg.to_dict()) == cfg


def test_mse_loss_over_all_slots():
    pred = jnp.asarray(np.arange(24, dtype=np.float32).reshape(1, 4, 6)).astype(jnp.bfloat16)
    target = jnp.zeros((1, 4, 6), jnp.bfloat16)
    loss = mse_loss(pred, target)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), np.mean(np.arange(24.0) ** 2), rtol=1e-6)


def test_mar_mask_sampling():
    b, n = 32, 16
    sample = jax.jit(lambda k: sample_mar_mask(k, b, n, return_orders=True))
    orders = np.asarray(random_orders(jax.random.PRNGKey(0), b, n))
    assert all(sorted(o) == list(range(n)) for o in orders)
    assert len({tuple(o) for o in orders}) > b // 2  # independent per row
    counts = []
    for i in range(8):
        mask, orders = sample(jax.random.PRNGKey(i))
        mask, orders = np.asarray(mask), np.asarray(orders)
        c = mask.sum(-1)
        assert np.all(c == c[0])  # MAR: one ratio per batch
        assert np.ceil(0.7 * n) <= c[0] <= n
        for row in range(b):  # the masked positions are the first c of the row's order
            assert set(orders[row, :c[0]]) == set(np.nonzero(mask[row])[0])
        counts.append(c[0])
    assert len(set(counts)) > 1
    per = np.asarray(sample_mar_mask(jax.random.PRNGKey(1), b, 256, per_example=True)).sum(-1)
    assert per.min() >= np.ceil(0.7 * 256) and per.max() <= 256 and len(set(per.tolist())) > 5
    # the ratio: counts are exactly ceil(N r) for r from the truncated normal
    from bifrost_jax.models.bifrost import sample_mask_ratio
    r = np.asarray(sample_mask_ratio(jax.random.PRNGKey(2), (4000,)))
    assert r.min() >= 0.7 and r.max() <= 1.0
    assert abs(r.mean() - 0.8625) < 0.01  # mean of N(1, 0.25) truncated to [0.7, 1]
    k_order, k_ratio = jax.random.split(jax.random.PRNGKey(3))
    r1 = float(sample_mask_ratio(k_ratio))
    assert int(np.asarray(sample_mar_mask(jax.random.PRNGKey(3), 2, 256)).sum(-1)[0]) == int(np.ceil(256 * r1))
