"""Understanding on held-out shapes images, before and after the generation branch was trained.

Every image gets one question per attribute that applies to it (``data/shapes_qa.evaluation_questions``: colour,
shape, count, position (relation scenes), and a caption), answered by greedy decoding (``sample.text``) and scored
by exact match of the normalised answer; accuracy per attribute beside its chance level (a uniform guess).

* BEFORE: the ``understanding`` phase's checkpoint (its ViT + language model as trained).
* AFTER: the ``mllm`` phase's MLLM with its trained generation branch. Its understanding path is its FROZEN
  Qwen2.5-VL: the original language-model weights of the Bifrost MLLM (``port.bifrost.vl_params_from``) and the
  mllm phase's vision tower, as that run holds them (``train.export.phase_variables``) or, trained on cached CLIP
  latents, as its config loads it (``train.export.frozen_vision``); an untied LM head, which
  the Bifrost MLLM does not hold, is the understanding checkpoint's. Text tokens never meet the branch, so the
  answers must be bit-identical: ``before_after`` compares every generated token and every frozen weight.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from flax import traverse_util

from bifrost_jax.components.understanding import vl_params
from bifrost_jax.data.chat import user_message
from bifrost_jax.data.shapes import SceneSpec
from bifrost_jax.data.shapes_qa import QUESTION_KINDS, chance_levels, evaluation_questions, normalize_answer
from bifrost_jax.port.bifrost import vl_params_from
from bifrost_jax.sample.text import DecodeOptions, TextGenerator
from bifrost_jax.train.export import frozen_vision, phase_variables

MAX_NEW_TOKENS = 16  # the longest answer (a relation caption) is 10 words + <|im_end|>


@dataclasses.dataclass
class UnderstandingScores:
    """Per-kind accuracy and question count, chance levels, every question with its answer (``rows``) and the
    generated tokens of each (for the bit-identity check)."""
    accuracy: dict[str, float]
    counts: dict[str, int]
    chance: dict[str, float]
    rows: list[dict]
    tokens: list[list[int]]

    def to_json(self) -> dict:
        return {"accuracy": self.accuracy, "counts": self.counts, "chance": self.chance}


def ask(module, variables, tokenizer, images: np.ndarray, specs: Sequence[SceneSpec], *, seed: int = 0,
        batch_size: int = 64, mesh=None) -> UnderstandingScores:
    """Ask every evaluation question about ``images`` (uint8 (P, R, R, 3) ViT views of the scenes ``specs``)."""
    if len(images) != len(specs):
        raise ValueError(f"{len(images)} images but {len(specs)} scene descriptions")
    gen = TextGenerator(module, variables, tokenizer=tokenizer, mesh=mesh, batch_size=batch_size, length_bucket=16)
    questions = [(i, kind, q, a) for i, spec in enumerate(specs)
                 for kind, (q, a) in evaluation_questions(spec, i, seed).items()]
    prompts = [gen.prompt([user_message(q, 1)], [images[i]]) for i, _, q, _ in questions]
    tokens = gen.generate(prompts, DecodeOptions(max_new_tokens=MAX_NEW_TOKENS))
    rows, right, total = [], {}, {}
    for (i, kind, q, a), toks in zip(questions, tokens):
        answer = gen.decode_text(toks)
        ok = normalize_answer(answer) == normalize_answer(a)
        rows.append({"image": i, "kind": kind, "question": q, "answer": answer, "truth": a, "correct": ok})
        right[kind] = right.get(kind, 0) + int(ok)
        total[kind] = total.get(kind, 0) + 1
    kinds = [k for k in QUESTION_KINDS if k in total]
    accuracy = {k: right[k] / total[k] for k in kinds}
    return UnderstandingScores(accuracy, {k: total[k] for k in kinds}, chance_levels(), rows, tokens)


def understanding_variables(workdir: str, *, mesh=None):
    """(model, ``{"params": ...}`` of the QwenVL module, tokenizer) of the ``understanding`` phase of ``workdir``."""
    phase, variables = phase_variables(workdir, "understanding", mesh=mesh)
    return phase.model, {"params": vl_params(variables["params"])}, phase.tokenizer


def bifrost_understanding_variables(workdir: str, model, before_params, *, mesh=None) -> dict:
    """``{"params": ...}`` of the frozen Qwen2.5-VL inside the ``mllm`` phase of ``workdir`` (see the module
    docstring); its text config must be the understanding model's."""
    phase, variables = phase_variables(workdir, "mllm", mesh=mesh)
    if phase.mllm_config.text != model.config.text:
        raise ValueError(f"the mllm phase's language model {phase.mllm_config.text} is not the understanding "
                         f"model's {model.config.text}")
    params = variables["params"]
    # trained on cached CLIP latents, the phase holds no vision tower: the one it was configured with (and cached)
    vision = params["vision"] if "vision" in params else frozen_vision(phase)["params"]
    return {"params": vl_params_from(params["mllm"], vision, before_params.get("lm_head"))}


def _identical_weights(a, b) -> tuple[int, list[str]]:
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    differ = sorted(".".join(k) for k in set(fa) | set(fb)
                    if k not in fa or k not in fb or not np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])))
    return len(fa), differ


def before_after(workdir: str, images: np.ndarray, specs: Sequence[SceneSpec], *, seed: int = 0,
                 batch_size: int = 64, mesh=None) -> dict[str, Any]:
    """BEFORE and AFTER scores on the same questions, and the comparison: ``identical`` is True when every
    generated token and every weight of the understanding path are equal (the frozen-base claim)."""
    model, before, tokenizer = understanding_variables(workdir, mesh=mesh)
    after = bifrost_understanding_variables(workdir, model, before["params"], mesh=mesh)
    n_weights, differ = _identical_weights(before["params"], after["params"])
    kw = dict(seed=seed, batch_size=batch_size, mesh=mesh)
    s_before = ask(model.module, before, tokenizer, images, specs, **kw)
    s_after = ask(model.module, after, tokenizer, images, specs, **kw)
    same = [a == b for a, b in zip(s_before.tokens, s_after.tokens)]
    return {"before": s_before, "after": s_after, "identical": all(same) and not differ,
            "answers_identical": int(sum(same)), "answers": len(same), "weights": n_weights,
            "weights_differing": differ}
