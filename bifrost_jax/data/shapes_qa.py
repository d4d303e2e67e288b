"""Questions and answers about a shapes scene: what the understanding phase trains on and what its evaluation asks.

Each question has ONE right answer, written in the shapes vocabulary, and names one attribute. A question never
names the colour or the shape of the object it asks about (it names it by its place), so that the language model's
prior over the training pairs cannot answer it: on held-out images (unseen colour-shape pairs) only the image can.

* ``caption``:  "describe the image." -> the scene's caption ("two red circles", "a red circle to the left of a
  blue square");
* ``color``:    "what color is the object?" / "what color are the objects?"; in a relation scene "what color is
  the left object?" (left / right / top / bottom) -> "red";
* ``shape``:    the same with "what shape" -> "circle" (singular);
* ``count``:    "how many objects are there?" -> "one" | "two" | "three" | ...;
* ``position``: relation scenes only, "where is the red object relative to the blue object?" (the colours of a
  relation scene differ) -> "to the left of" | "to the right of" | "above" | "below".

Answers are scored by exact match after lower-casing and whitespace normalisation (``normalize_answer``).
``chance_levels`` are one over the number of possible answers of each attribute (a uniform guess).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from bifrost_jax.data.chat import chat_token_ids, user_message
from bifrost_jax.data.prompt import IM_END, Tokenizer
from bifrost_jax.data.shapes import COLORS, NUMBER_WORDS, RELATIONS, SHAPES, SceneSpec

ATTRIBUTES = ("color", "shape", "count", "position")
QUESTION_KINDS = ("caption",) + ATTRIBUTES
CAPTION_QUESTION = "describe the image."
INVERSE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
           "below": "above"}
# where object 0 of a relation scene sits, and object 1
SIDES = {"to the left of": ("left", "right"), "to the right of": ("right", "left"), "above": ("top", "bottom"),
         "below": ("bottom", "top")}
# the question words (answers are colours, shapes, number words, relations and captions: already shapes words)
QA_WORDS = ("describe", "image", "what", "color", "is", "are", "shape", "object", "objects", "how", "many", "there",
            "where", "relative", "the", "left", "right", "top", "bottom", "?", ".")


def chance_levels(max_count: int = 3) -> dict[str, float]:
    """Accuracy of a uniform guess among the possible answers of each attribute."""
    return {"color": 1 / len(COLORS), "shape": 1 / len(SHAPES), "count": 1 / max_count,
            "position": 1 / len(RELATIONS)}


def normalize_answer(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def question(spec: SceneSpec, kind: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """(question, answer) of ``kind`` about ``spec`` (variants drawn with ``rng``), or None where ``kind`` does not
    apply (``position`` in a count scene)."""
    if kind not in QUESTION_KINDS:
        raise ValueError(f"question kind {kind!r} is not one of {QUESTION_KINDS}")
    if kind == "caption":
        return CAPTION_QUESTION, spec.caption
    if kind == "count":
        return "how many objects are there?", NUMBER_WORDS[spec.count]
    relation = spec.relation
    if relation is None:
        if kind == "position":
            return None
        (color, shape), n = spec.objects[0], spec.count
        what = "the object?" if n == 1 else "the objects?"
        verb = "is" if n == 1 else "are"
        return (f"what color {verb} {what}", color) if kind == "color" else (f"what shape {verb} {what}", shape)
    k = int(rng.integers(2))
    (c0, s0), (c1, _) = spec.objects if k == 0 else spec.objects[::-1]
    if kind == "position":
        return f"where is the {c0} object relative to the {c1} object?", relation if k == 0 else INVERSE[relation]
    side = SIDES[relation][k]
    return (f"what color is the {side} object?", c0) if kind == "color" else \
        (f"what shape is the {side} object?", s0)


def random_question(spec: SceneSpec, rng: np.random.Generator,
                    kinds: Sequence[str] = QUESTION_KINDS) -> tuple[str, str, str]:
    """(kind, question, answer): a kind drawn uniformly among those of ``kinds`` that apply to ``spec``."""
    usable = [k for k in kinds if k != "position" or spec.relation is not None]
    kind = usable[int(rng.integers(len(usable)))]
    q, a = question(spec, kind, rng)
    return kind, q, a


def evaluation_questions(spec: SceneSpec, index: int, seed: int = 0) -> dict[str, tuple[str, str]]:
    """{kind: (question, answer)} for held-out image ``index``: every kind that applies, variants fixed by
    ``(seed, index)`` so that every evaluation asks the same questions."""
    out = {}
    for j, kind in enumerate(QUESTION_KINDS):
        qa = question(spec, kind, np.random.default_rng([seed, index, j]))
        if qa is not None:
            out[kind] = qa
    return out


def question_prompt(tokenizer: Tokenizer, question_text: str, num_image_tokens: int) -> list[int]:
    """Token ids of a one-image, one-question conversation in the chat template, ending in the assistant's turn
    (what the model answers from at evaluation)."""
    return chat_token_ids(tokenizer, [user_message(question_text, 1)], [num_image_tokens])


def encode_qa(tokenizer: Tokenizer, question_text: str, answer: str, num_image_tokens: int,
              max_length: int) -> dict[str, np.ndarray]:
    """One training sequence: ``question_prompt`` + the answer + ``<|im_end|>``, right-padded to ``max_length``.
    ``loss_mask`` marks the tokens the model must predict (the answer and its ``<|im_end|>``: it learns to stop)."""
    return encode_conversation(tokenizer, [(question_text, answer)], num_image_tokens, max_length)


def encode_conversation(tokenizer: Tokenizer, turns: Sequence[tuple[str, str]], num_image_tokens: int,
                        max_length: int) -> dict[str, np.ndarray]:
    """Several (question, answer) turns about one image (the image in the first user turn), right-padded to
    ``max_length``; ``loss_mask`` marks every answer and its ``<|im_end|>``. One turn: ``question_prompt`` + the
    answer + ``<|im_end|>``, exactly what the evaluation answers from."""
    end = tokenizer.token_id(IM_END)
    messages, ids, mask = [], [], []
    for j, (q, a) in enumerate(turns):
        messages.append(user_message(q, 1 if j == 0 else 0))
        prompt = chat_token_ids(tokenizer, messages, [num_image_tokens])
        if prompt[:len(ids)] != ids:
            raise RuntimeError(f"the chat template of turn {j} does not extend the previous turns: {turns}")
        answer = tokenizer.encode(a) + [end]
        mask += [0] * (len(prompt) - len(ids)) + [1] * len(answer)
        ids = prompt + answer
        messages.append({"role": "assistant", "content": a})
    if len(ids) > max_length:
        raise ValueError(f"the conversation {list(turns)} takes {len(ids)} tokens but config.language.max_length is "
                         f"{max_length}")
    out = {"input_ids": np.full((max_length,), tokenizer.pad_id, np.int32),
           "attention_mask": np.zeros((max_length,), np.int32), "loss_mask": np.zeros((max_length,), np.int32)}
    out["input_ids"][:len(ids)] = ids
    out["attention_mask"][:len(ids)] = 1
    out["loss_mask"][:len(ids)] = mask
    return out


def random_conversation(spec: SceneSpec, rng: np.random.Generator, turns: int) -> list[tuple[str, str]]:
    """Up to ``turns`` (question, answer) pairs about ``spec``, one per applicable kind: the attribute questions in
    a random order, the caption (which names every attribute) always last so no earlier answer can copy it."""
    kinds = [k for k in ATTRIBUTES if k != "position" or spec.relation is not None]
    kinds = [kinds[i] for i in rng.permutation(len(kinds))] + ["caption"]
    return [question(spec, k, rng) for k in kinds[:turns]]
