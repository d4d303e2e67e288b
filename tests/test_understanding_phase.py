"""The ``understanding`` phase (tiny, 8 simulated devices) and what the later phases take from it.

* Training sequences: the answer (and its ``<|im_end|>``) is all the loss sees, and the prompt is exactly the
  chat-template prompt the evaluation answers from.
* A few steps train; a run whose last checkpoint is lost resumes from the one before and ends in the same weights
  and losses, bit for bit.
* The mllm phase started from it (``vision.init_from``, ``mllm.base_init_from``): its frozen language model and ViT
  are the understanding checkpoint's and the branch starts as the language model's copy; after training the
  branch has moved, and the understanding answers on held-out images are bit-identical before and after
  (``eval/shapes_understanding.before_after``).
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util

from bifrost_jax.configs import load_config_file
from bifrost_jax.data.prompt import IM_END
from bifrost_jax.data.shapes import ShapesOptions, parse_caption
from bifrost_jax.data.shapes_qa import (encode_conversation, encode_qa, evaluation_questions, question_prompt,
                                         random_conversation)
from bifrost_jax.data.preprocess import crop_box, decode_image, resize_crop
from bifrost_jax.eval import shapes_understanding as su
from bifrost_jax.eval.run import shapes_examples
from bifrost_jax.models.bifrost import is_trainable as mllm_is_trainable
from bifrost_jax.train.export import phase_variables
from bifrost_jax.train.loop import train
from bifrost_jax.train.understanding_phase import understanding_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4


def _config(name, data_dir, **over):
    c = load_config_file(os.path.join(REPO, "configs", f"{name}.py"))
    c.train.update(steps=STEPS, batch_size=8, log_every=1, tensorboard=False)
    c.checkpoint.update(every=2, keep=2)
    c.optim.update(lr=1e-3, warmup_steps=1)
    c.data.update(data_dir=data_dir, train_size=32, shapes_layout="fixed", shapes_jitter=0.02)
    for k, v in over.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """(workdir, the first run's result): understanding trained STEPS steps."""
    workdir = str(tmp_path_factory.mktemp("und"))
    return workdir, train(_config("understanding", data_dir), workdir, progress_bar=False)


def _losses(workdir, phase="understanding"):
    with open(os.path.join(workdir, phase, "metrics.jsonl")) as fh:
        return [(r["step"], r["loss"]) for r in map(json.loads, fh) if "loss" in r]


def test_training_sequence_masks_all_but_the_answer(data_dir):
    tok = understanding_tokenizer(_config("understanding", data_dir))
    q, a = "what color is the circle to the left of the square?", "green"
    seq = encode_qa(tok, q, a, 16, 64)
    prompt = question_prompt(tok, q, 16)
    ids, mask = list(seq["input_ids"]), seq["loss_mask"]
    assert ids[:len(prompt)] == prompt and mask[:len(prompt)].sum() == 0
    assert [i for i, m in zip(ids, mask) if m] == tok.encode(a) + [tok.token_id(IM_END)]
    assert seq["attention_mask"].sum() == len(prompt) + 2 and "<unk>" not in tok.decode(ids)
    with pytest.raises(ValueError, match="config.language.max_length"):
        encode_qa(tok, q, a, 16, len(prompt))
    # a conversation: every answer (and its <|im_end|>) in the loss, the caption last, questions and template not
    spec = parse_caption("a red circle to the left of a blue square")
    turns = random_conversation(spec, np.random.default_rng(0), 5)
    assert len(turns) == 5 and turns[-1][1] == spec.caption
    conv = encode_conversation(tok, turns, 16, 160)
    targets = [i for i, m in zip(conv["input_ids"], conv["loss_mask"]) if m]
    end = tok.token_id(IM_END)
    assert targets == [t for _, ans in turns for t in tok.encode(ans) + [end]]
    first = question_prompt(tok, turns[0][0], 16)  # the first turn is exactly an evaluation prompt
    assert list(conv["input_ids"][:len(first)]) == first and conv["loss_mask"][:len(first)].sum() == 0


def test_trains_and_resumes_exactly(trained, data_dir):
    workdir, first = trained
    losses = _losses(workdir)
    assert [s for s, _ in losses] == list(range(1, STEPS + 1)) and np.all(np.isfinite([v for _, v in losses]))
    assert losses[-1][1] < losses[0][1]
    # lose the final checkpoint: the rerun resumes from step STEPS - 2 and must reproduce the same run
    shutil.rmtree(os.path.join(workdir, "understanding", "checkpoints", str(STEPS)))
    second = train(_config("understanding", data_dir), workdir, progress_bar=False)
    assert second.step == STEPS
    assert _losses(workdir)[STEPS:] == losses[STEPS - 2:]
    a = traverse_util.flatten_dict(jax.device_get(first.state.params))
    b = traverse_util.flatten_dict(jax.device_get(second.state.params))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _held_out(n, vit_resolution=112):
    options = ShapesOptions(resolution=64, train_size=32, validation_size=0, test_size=n, layout="fixed",
                            jitter=0.02)
    images, specs = [], []
    for ex in shapes_examples(n, options):
        image = decode_image(ex["image"])
        images.append(resize_crop(image, crop_box(image.width, image.height), vit_resolution))
        specs.append(parse_caption(ex["caption"]))
    return np.stack(images), specs


def test_mllm_starts_from_it_and_keeps_its_answers(trained, data_dir):
    workdir, _ = trained
    ckpt = os.path.join(workdir, "understanding", "checkpoints")
    mllm = _config("mllm", data_dir, **{"vision.init_from": ckpt, "mllm.base_init_from": ckpt})
    with mllm.mllm.config.text.unlocked():
        mllm.mllm.config.text.tie_word_embeddings = True  # the understanding model's language model
    train(mllm, workdir, progress_bar=False)
    _, und = phase_variables(workdir, "understanding")
    _, mv = phase_variables(workdir, "mllm")
    lm = traverse_util.flatten_dict(jax.device_get(und["params"]["language_model"]))
    m = traverse_util.flatten_dict(jax.device_get(mv["params"]["mllm"]))
    base = {k: v for k, v in m.items() if not mllm_is_trainable(k)}
    assert base.keys() == lm.keys() and all(np.array_equal(base[k], lm[k]) for k in lm)
    vision = traverse_util.flatten_dict(jax.device_get(mv["params"]["vision"]))
    und_vision = traverse_util.flatten_dict(jax.device_get(und["params"]["vision"]))
    assert all(np.array_equal(vision[k], und_vision[k]) for k in und_vision)
    # the branch started as the base's copy (docs/design.md §3.2) and has moved
    q = ("layers_0", "self_attn", "q_proj", "kernel")
    bq = ("layers_0", "self_attn", "vision_branch_q_proj", "kernel")
    assert not np.array_equal(m[bq], m[q])
    images, specs = _held_out(6)
    r = su.before_after(workdir, images, specs)
    assert r["identical"] and r["answers_identical"] == r["answers"] == sum(
        len(evaluation_questions(s, i)) for i, s in enumerate(specs))
    assert not r["weights_differing"] and r["weights"] == len(lm) + len(und_vision)
    assert r["before"].tokens == r["after"].tokens and r["before"].rows == r["after"].rows
    assert set(r["before"].accuracy) >= {"color", "shape", "count"}
