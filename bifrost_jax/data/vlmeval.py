"""Understanding benchmarks in the VLMEvalKit TSV format, and the prompts VLMEvalKit builds for Qwen2.5-VL.

One TSV per benchmark (``MMBench_DEV_EN.tsv``, ``SEEDBench_IMG.tsv``, ``MME.tsv``, ``MMStar.tsv``, ``AI2D_TEST.tsv``,
``MMMU_DEV_VAL.tsv``, ``HallusionBench.tsv``, ``POPE.tsv``, ...): a header, then one row per question with
``index``, ``image`` (base64, a ``['...', '...']`` list of them, or the ``index`` of another row whose image it
shares) and/or ``image_path`` (file or list of files, relative to the TSV's folder), ``question``, ``hint``, option
columns ``A``, ``B``, ..., ``answer``, ``category``, ``l2-category``, ``split``. The benchmark's name is the file
name without ``.tsv``; its kind follows VLMEvalKit:

* ``yes/no``: MME, HallusionBench, POPE (and any name starting with them);
* ``mmmu``: MMMU_* (multiple choice, images first);
* ``mcq``: every other file with an ``A`` column (MMBench, SEEDBench_IMG, MMStar, AI2D, ...).

Free-form VQA sets (MM-Vet, ...) need an LLM judge and are refused.

Prompts (VLMEvalKit's ``Qwen2VLPromptMixin``): images first, then one text item. Multiple choice:
``Hint: {hint}\\n`` (when there is one) ``Question: {question}\\nOptions:\\nA. {A}\\nB. {B}\\n...`` and
"Please select the correct answer from the options above." (or "请直接回答选项字母。" when the text holds Chinese;
MMMU always the English one), stripped at the end. HallusionBench / POPE: the question + " Please answer yes or
no."; MME: the question as written (its questions carry that instruction already).

Answers are extracted by exact matching (no LLM judge), as VLMEvalKit's ``can_infer`` and
``YOrN_Extraction``: ``option_from_answer`` takes the option letter when exactly one option letter appears among the
answer's words (punctuation ``.()[],:;!*#{}`` counts as space), else the option whose text is the only one contained
in the answer (answers longer than twice the options' total length never match by text); ``yes_no_from_answer``
gives Yes / No when exactly one of the two words appears. MMMU's open questions (no options) count as right when the
answer contains the reference value.
"""
from __future__ import annotations

import ast
import base64
import csv
import dataclasses
import io
import os
import re
import string
import sys
from typing import Optional

MCQ_EN = "Please select the correct answer from the options above."
MCQ_CN = "请直接回答选项字母。"
YES_NO_SUFFIX = " Please answer yes or no."
KINDS = ("mcq", "mmmu", "yes/no")
_PUNCT = ".()[],:;!*#{}"


def benchmark_kind(name: str, columns) -> str:
    """"mcq" | "mmmu" | "yes/no" for a benchmark name and its TSV columns."""
    if name.startswith(("MME", "HallusionBench", "POPE")) and not name.startswith("MMEB"):
        return "yes/no"
    if name.startswith("MMMU"):
        return "mmmu"
    if "A" in columns:
        return "mcq"
    raise ValueError(f"benchmark {name!r}: no option columns and not a yes/no set (MME, HallusionBench, POPE); "
                     "free-form VQA needs an LLM judge and is not supported")


def _missing(value) -> bool:
    return value is None or str(value).strip() in ("", "nan", "NaN", "None")


@dataclasses.dataclass
class Question:
    """One benchmark row ready to ask: its raw fields, decoded images (PIL) and the prompt text."""
    index: str
    row: dict
    images: list
    text: str
    options: dict


def read_tsv(path: str) -> tuple[list[str], list[dict]]:
    """(columns, rows as dicts) of a VLMEvalKit TSV (pandas-style quoting; huge base64 fields allowed)."""
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        rows = [dict(r) for r in reader]
        columns = list(reader.fieldnames or [])
    for required in ("index", "question"):
        if required not in columns:
            raise ValueError(f"{path}: no {required!r} column (columns: {columns})")
    if "image" not in columns and "image_path" not in columns:
        raise ValueError(f"{path}: neither an 'image' nor an 'image_path' column")
    return columns, rows


def _as_list(value) -> list[str]:
    s = str(value).strip()
    if s.startswith("["):
        try:
            items = ast.literal_eval(s)
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"cannot parse the image list ({e})") from None
        return [str(x) for x in items]
    return [s]


def resolve_shared_images(rows: list[dict]) -> None:
    """VLMEvalKit stores a repeated image once: a row whose ``image`` is at most 64 characters names the ``index``
    of the row holding it. Replaced in place (unknown references are left for the row to fail on)."""
    by_index = {str(r["index"]): r.get("image") for r in rows}
    for r in rows:
        image = r.get("image")
        if image is not None and 0 < len(str(image)) <= 64 and str(image) in by_index:
            r["image"] = by_index[str(image)]


def decode_images(row: dict, root: str) -> list:
    """PIL images of a row (``image`` first, else ``image_path``); ValueError naming what is wrong."""
    from PIL import Image

    out = []
    if not _missing(row.get("image")):
        for j, b64 in enumerate(_as_list(row["image"])):
            try:
                data = base64.b64decode(b64, validate=True)
            except (ValueError, TypeError) as e:
                raise ValueError(f"image {j}: bad base64 ({e})") from None
            try:
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
                    out.append(im.copy())
            except Exception as e:  # PIL raises many kinds on a corrupt file
                raise ValueError(f"image {j}: not a readable image ({type(e).__name__}: {e})") from None
    elif not _missing(row.get("image_path")):
        for p in _as_list(row["image_path"]):
            path = p if os.path.isabs(p) else os.path.join(root, p)
            try:
                with Image.open(path) as im:
                    im.load()
                    out.append(im.copy())
            except Exception as e:
                raise ValueError(f"image file {path}: not readable ({type(e).__name__}: {e})") from None
    if not out:
        raise ValueError("no image")
    return out


def options_of(row: dict) -> dict[str, str]:
    return {c: str(row[c]) for c in string.ascii_uppercase if c in row and not _missing(row[c])}


def build_prompt(row: dict, kind: str, name: str) -> str:
    """The text VLMEvalKit asks Qwen2.5-VL for this row (images go before it)."""
    question = str(row["question"])
    if kind == "yes/no":
        return question if name.startswith("MME") else question + YES_NO_SUFFIX
    prompt = f"Hint: {row['hint']}\n" if not _missing(row.get("hint")) else ""
    prompt += f"Question: {question}\n"
    options = options_of(row)
    if options:
        prompt += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items())
        chinese = kind == "mcq" and re.search("[\u4e00-\u9fff]", prompt)
        prompt += MCQ_CN if chinese else MCQ_EN
    return prompt.rstrip()


def prepare_question(row: dict, kind: str, name: str, root: str) -> Question:
    """A ``Question``, or ValueError naming what is malformed (missing question/answer/options, bad image)."""
    if _missing(row.get("question")):
        raise ValueError("empty question")
    if _missing(row.get("answer")):
        raise ValueError("no answer")
    options = options_of(row) if kind != "yes/no" else {}
    if kind == "mmmu" and not options:
        pass  # MMMU's open questions: no options, the answer is a value (``answer_matches``)
    elif kind != "yes/no":
        if len(options) < 2:
            raise ValueError(f"fewer than two options ({sorted(options)})")
        letters = [c for c in string.ascii_uppercase if c in row]
        present = [c for c in letters if c in options]
        if present != letters[:len(present)]:
            raise ValueError(f"a missing option: options {present} are not consecutive from A")
        if str(row["answer"]).strip() not in options:
            raise ValueError(f"answer {row['answer']!r} is not one of the options {sorted(options)}")
    return Question(str(row["index"]), row, decode_images(row, root), build_prompt(row, kind, name), options)


# ----------------------------------------------------------------------------------------------------------------
# answer extraction (exact matching)

def option_from_answer(answer: str, options: dict[str, str]) -> Optional[str]:
    """The option letter an answer gives, or None."""
    answer = str(answer)
    words = answer
    for c in _PUNCT:
        words = words.replace(c, " ")
    words = words.split()
    found = [k for k in options if k in words]
    if len(found) == 1:
        return found[0]
    if found:
        return None
    lower = answer.lower()
    if len(lower) > 2 * sum(len(v) for v in options.values()):
        return None
    by_text = [k for k, v in options.items() if v.lower() in lower]
    return by_text[0] if len(by_text) == 1 else None


def answer_matches(prediction: str, row: dict, options: dict[str, str]) -> bool:
    """Exact-match scoring of one multiple-choice (or MMMU open) row."""
    truth = str(row["answer"]).strip()
    if options:
        return option_from_answer(prediction, options) == truth
    return truth.lower() in str(prediction).lower()


def yes_no_truth(answer) -> str:
    """"Yes" / "No" from a yes/no set's answer (HallusionBench files may write 1 / 0)."""
    a = str(answer).strip().lower()
    return {"1": "Yes", "0": "No", "yes": "Yes", "no": "No"}.get(a, str(answer).strip())


def yes_no_from_answer(answer: str) -> str:
    """"Yes" | "No" | "Unknown"."""
    words = set(re.sub(r"[^0-9a-z]+", " ", str(answer).lower()).split())
    if "yes" in words and "no" not in words:
        return "Yes"
    if "no" in words and "yes" not in words:
        return "No"
    return "Unknown"
