"""``bifrost eval understanding``: the paper's understanding benchmarks from VLMEvalKit TSVs, sharded and resumable.

    bifrost eval understanding --checkpoint CKPT [--base QWEN_DIR] --data MMBench_DEV_EN.tsv [--data MME.tsv ...]
        --out DIR [--model-name NAME] [--batch-size 8] [--max-new-tokens 128] [--limit N] [--image-buckets]

Per benchmark (``data/vlmeval.py`` for the file format, prompts and answer extraction):

* rows are dealt round-robin to the hosts (``eval.geneval.assigned``); each host answers its rows greedily in
  batches (``sample.text.TextGenerator``, batch sharded over its devices) and appends ``{"index", "prediction"}`` to
  ``OUT/.understanding/<benchmark>/process_<i>.jsonl`` after every batch: rerunning the same command skips every
  row already answered (by any host), so a killed run resumes;
* malformed rows (bad base64, an unreadable image, a missing option, no answer) are skipped, counted and named;
* host 0 then writes ``OUT/<model>_<benchmark>.tsv``, VLMEvalKit's prediction file (the input columns without the
  image data, plus ``prediction``: its evaluator reads it), and ``OUT/<model>_<benchmark>_score.json``; after all
  benchmarks ``OUT/summary.json`` and ``OUT/summary.txt`` (one line per metric).

Metrics (exact matching, no judge): accuracy overall, per ``category``, ``l2-category`` and ``split`` for multiple
choice; MMBench's circular evaluation when the file holds the circular copies (index >= 1e6 is a copy of
index % 1e6 with the options rotated; a question counts only if every copy is right); MME's perception and
cognition scores (per subtask: accuracy + accuracy+ (both questions of an image right), x100, summed over the
subtasks); HallusionBench's question accuracy plus figure and question-pair accuracy where the columns exist.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections import defaultdict
from typing import Callable, Optional, Sequence

import numpy as np

from bifrost_jax.data.chat import user_message
from bifrost_jax.data.qwen_image import MAX_PIXELS, MIN_PIXELS
from bifrost_jax.data.vlmeval import (
    answer_matches,
    benchmark_kind,
    options_of,
    prepare_question,
    read_tsv,
    resolve_shared_images,
    yes_no_from_answer,
    yes_no_truth,
)
from bifrost_jax.eval.geneval import assigned, barrier, write_text_atomic
from bifrost_jax.parallel.mesh import make_mesh, maybe_initialize_distributed
from bifrost_jax.sample.text import (
    DecodeOptions,
    ImageBuckets,
    ImageOptions,
    TextGenerator,
)
from bifrost_jax.sample.understanding import load_understanding

LOG_DIR = ".understanding"
MME_SUBTASKS = {
    "perception": ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                   "OCR"),
    "cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"),
}
CIRCULAR_OFFSET = 1_000_000

AnswerFn = Callable[[Sequence], list]  # (list of data.vlmeval.Question) -> answer strings


# ----------------------------------------------------------------------------------------------------------------
# running

def _log_dir(out: str, name: str) -> str:
    return os.path.join(out, LOG_DIR, name)


def finished(out: str, name: str) -> dict[str, str]:
    """{index: prediction} of every row any host has answered (its process_*.jsonl files)."""
    directory = _log_dir(out, name)
    done = {}
    if os.path.isdir(directory):
        for f in sorted(os.listdir(directory)):
            if f.startswith("process_") and f.endswith(".jsonl"):
                with open(os.path.join(directory, f)) as fh:
                    for line in fh:
                        try:
                            rec = json.loads(line)
                        except json.JSONDecodeError:
                            continue  # a line cut by a kill: that row is redone
                        done[str(rec["index"])] = rec["prediction"]
    return done


def run_benchmark(answer_fn: AnswerFn, path: str, out: str, *, batch_size: int = 8, limit: Optional[int] = None,
                  process_index: int = 0, process_count: int = 1, progress: bool = True) -> dict:
    """Answer this host's unfinished rows of one TSV. Returns {"name", "kind", "answered", "malformed"}."""
    name = os.path.splitext(os.path.basename(path))[0]
    columns, rows = read_tsv(path)
    kind = benchmark_kind(name, columns)
    resolve_shared_images(rows)
    rows = rows[:limit] if limit is not None else rows
    done = finished(out, name)
    todo = [i for i in assigned(len(rows), process_index, process_count) if str(rows[i]["index"]) not in done]
    malformed = {}
    log = os.path.join(_log_dir(out, name), f"process_{process_index}.jsonl")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    if os.path.isfile(log) and os.path.getsize(log):
        with open(log, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            cut = fh.read(1) != b"\n"
        if cut:  # a kill mid-line: start the next record on its own line
            with open(log, "a") as fh:
                fh.write("\n")
    root = os.path.dirname(os.path.abspath(path))
    answered = 0
    batches = [todo[s:s + batch_size] for s in range(0, len(todo), batch_size)]
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc=f"{name}[{process_index}]", unit="batch")
    for batch in batches:
        questions = []
        for i in batch:
            try:
                questions.append(prepare_question(rows[i], kind, name, root))
            except ValueError as e:
                malformed[str(rows[i]["index"])] = str(e)
        if not questions:
            continue
        answers = answer_fn(questions)
        with open(log, "a") as fh:
            for q, a in zip(questions, answers):
                fh.write(json.dumps({"index": q.index, "prediction": a}) + "\n")
        answered += len(questions)
    record = os.path.join(_log_dir(out, name), f"malformed_{process_index}.json")
    write_text_atomic(record, json.dumps(malformed, indent=2))
    return {"name": name, "kind": kind, "answered": answered, "malformed": malformed}


def malformed_rows(out: str, name: str) -> dict[str, str]:
    """{index: what is wrong} of the malformed rows every host met (the latest run of each host)."""
    directory, merged = _log_dir(out, name), {}
    for f in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        if f.startswith("malformed_") and f.endswith(".json"):
            with open(os.path.join(directory, f)) as fh:
                merged.update(json.load(fh))
    return merged


# ----------------------------------------------------------------------------------------------------------------
# scoring

def _mean(xs) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


def _by(rows, key, hits) -> dict[str, float]:
    groups = defaultdict(list)
    for r, h in zip(rows, hits):
        if key in r and str(r[key]).strip():
            groups[str(r[key])].append(h)
    return {k: _mean(v) for k, v in sorted(groups.items())}


def score_mcq(rows: list[dict], predictions: dict[str, str]) -> dict:
    """Accuracy overall / per category, l2-category, split; circular accuracy when copies are present."""
    hits = [answer_matches(predictions[str(r["index"])], r, options_of(r)) for r in rows]
    out = {"accuracy": _mean(hits), "num_rows": len(rows), "per_category": _by(rows, "category", hits),
           "per_l2_category": _by(rows, "l2-category", hits), "per_split": _by(rows, "split", hits)}
    if any(int(float(r["index"])) >= CIRCULAR_OFFSET for r in rows):
        groups = defaultdict(list)
        first = {}
        for r, h in zip(rows, hits):
            g = int(float(r["index"])) % CIRCULAR_OFFSET
            groups[g].append(h)
            first.setdefault(g, r)
        circ_rows = [first[g] for g in groups]
        circ_hits = [all(groups[g]) for g in groups]
        vanilla = [h for r, h in zip(rows, hits) if int(float(r["index"])) < CIRCULAR_OFFSET]
        out.update(circular_accuracy=_mean(circ_hits), num_questions=len(groups), vanilla_accuracy=_mean(vanilla),
                   circular_per_category=_by(circ_rows, "category", circ_hits),
                   circular_per_l2_category=_by(circ_rows, "l2-category", circ_hits))
    return out


def score_yes_no(rows: list[dict], predictions: dict[str, str], name: str) -> dict:
    """Accuracy overall and per category; MME scores; HallusionBench figure / question-pair accuracy."""
    hits = [yes_no_from_answer(predictions[str(r["index"])]) == yes_no_truth(r["answer"]) for r in rows]
    out = {"accuracy": _mean(hits), "num_rows": len(rows), "per_category": _by(rows, "category", hits),
           "unknown_answers": sum(yes_no_from_answer(predictions[str(r["index"])]) == "Unknown" for r in rows)}
    if name.startswith("MME"):
        out.update(mme_scores(rows, hits))
    if all(k in (rows[0] if rows else {}) for k in ("set_id", "figure_id", "question_id")):
        def group_acc(keys):
            groups = defaultdict(list)
            for r, h in zip(rows, hits):
                groups[tuple(str(r.get(k)) for k in keys)].append(h)
            return _mean([all(v) for v in groups.values()])
        out["figure_accuracy"] = group_acc(("category", "subcategory", "set_id", "figure_id"))
        out["question_pair_accuracy"] = group_acc(("category", "subcategory", "set_id", "question_id"))
    return out


def mme_scores(rows: list[dict], hits: list[bool]) -> dict:
    """Per subtask 100 * (accuracy + accuracy+), accuracy+ over images (``image_path``, else the image data)
    whose questions are all right; perception and cognition sums over the subtasks present."""
    per_image = defaultdict(lambda: defaultdict(list))
    for r, h in zip(rows, hits):
        key = r.get("image_path") or r.get("image") or r["index"]
        per_image[str(r.get("category"))][key].append(h)
    sub = {}
    for cat, images in per_image.items():
        acc = _mean([h for hs in images.values() for h in hs])
        acc_plus = _mean([all(hs) for hs in images.values()])
        sub[cat] = 100.0 * (acc + acc_plus)
    totals = {group: sum(sub[c] for c in cats if c in sub) for group, cats in MME_SUBTASKS.items()}
    return {"mme_subtask_scores": sub, "mme_perception": totals["perception"], "mme_cognition": totals["cognition"]}


def score_benchmark(path: str, predictions: dict[str, str], limit: Optional[int] = None) -> tuple[dict, list]:
    """(scores, rows that have a prediction) of one TSV."""
    name = os.path.splitext(os.path.basename(path))[0]
    columns, rows = read_tsv(path)
    kind = benchmark_kind(name, columns)
    resolve_shared_images(rows)
    rows = rows[:limit] if limit is not None else rows
    scored = [r for r in rows if str(r["index"]) in predictions]
    scores = score_yes_no(scored, predictions, name) if kind == "yes/no" else score_mcq(scored, predictions)
    return dict(scores, name=name, kind=kind), scored


def write_predictions(path: str, columns: Sequence[str], rows: list[dict], predictions: dict[str, str]) -> None:
    """VLMEvalKit's prediction layout: the input columns without the image data, plus ``prediction``."""
    keep = [c for c in columns if c != "image"] + ["prediction"]
    sio = io.StringIO()
    writer = csv.writer(sio, delimiter="\t", lineterminator="\n")
    writer.writerow(keep)
    for r in rows:
        writer.writerow([r.get(c, "") for c in keep[:-1]] + [predictions[str(r["index"])]])
    write_text_atomic(path, sio.getvalue())


def format_summary(results: list[dict]) -> str:
    lines = []
    for res in results:
        s = res["scores"]
        head = f"{s['name']} ({s['kind']}): {s['num_rows']} rows, {len(res['malformed'])} malformed"
        lines.append(head)
        for key in ("accuracy", "circular_accuracy", "vanilla_accuracy", "mme_perception", "mme_cognition",
                    "figure_accuracy", "question_pair_accuracy"):
            if key in s:
                lines.append(f"  {key:<24} {s[key]:.4f}" if "mme" not in key else f"  {key:<24} {s[key]:.2f}")
        for cat, v in s.get("per_category", {}).items():
            lines.append(f"  category {cat:<15} {v:.4f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# command line

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bifrost eval understanding", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__,
                                allow_abbrev=False)
    p.add_argument("--checkpoint", required=True, help="Qwen2.5-VL directory, Bifrost-1 checkpoint, or WORKDIR")
    p.add_argument("--base", default=None, help="the Qwen2.5-VL directory a Bifrost-1 checkpoint was built on")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--data", action="append", required=True, help="a benchmark TSV (repeat for several)")
    p.add_argument("--out", required=True)
    p.add_argument("--model-name", default="bifrost", help="prefix of the prediction files")
    p.add_argument("--batch-size", type=int, default=8, help="questions per host per generation call")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--limit", type=int, default=None, help="only the first N rows of each file")
    p.add_argument("--min-pixels", type=int, default=MIN_PIXELS)
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS)
    p.add_argument("--image-buckets", action="store_true",
                   help="resize images to a fixed set of sizes (sample.text.ImageBuckets.default): a bounded "
                        "number of vision programs, at the cost of the processor's exact size")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--mesh", default=None, help='JSON mesh sizes over this host\'s devices (default: data-parallel)')
    return p


def answer_with(generator, max_new_tokens: int) -> AnswerFn:
    options = DecodeOptions(max_new_tokens=max_new_tokens)

    def answer(questions):
        prompts = [generator.prompt([user_message(q.text, len(q.images))], q.images) for q in questions]
        return [generator.decode_text(t) for t in generator.generate(prompts, options)]
    return answer


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    for path in args.data:
        if not os.path.isfile(path):
            raise SystemExit(f"bifrost eval understanding: --data {path}: no such file")
    maybe_initialize_distributed()
    import jax
    import jax.numpy as jnp


    mesh = make_mesh(json.loads(args.mesh) if args.mesh else {"data": -1}, devices=jax.local_devices())
    u = load_understanding(args.checkpoint, base=args.base, tokenizer=args.tokenizer,
                           dtype=getattr(jnp, args.dtype), mesh=mesh)
    if u.tokenizer is None:
        raise SystemExit(f"no tokenizer.json in {args.checkpoint} or its base: pass --tokenizer")
    buckets = ImageBuckets.default(args.max_pixels, args.min_pixels) if args.image_buckets else None
    gen = TextGenerator(u.module, u.variables, tokenizer=u.tokenizer, mesh=mesh, batch_size=args.batch_size,
                        image_options=ImageOptions(args.min_pixels, args.max_pixels, buckets))
    answer = answer_with(gen, args.max_new_tokens)
    pi, pc = jax.process_index(), jax.process_count()
    runs = [run_benchmark(answer, path, args.out, batch_size=args.batch_size, limit=args.limit, process_index=pi,
                          process_count=pc) for path in args.data]
    barrier("bifrost_eval_understanding_done")
    if pi != 0:
        return 0
    results = []
    for path, run in zip(args.data, runs):
        predictions = finished(args.out, run["name"])
        scores, scored = score_benchmark(path, predictions, args.limit)
        columns, _ = read_tsv(path)
        write_predictions(os.path.join(args.out, f"{args.model_name}_{run['name']}.tsv"), columns, scored,
                          predictions)
        result = {"scores": scores, "malformed": malformed_rows(args.out, run["name"]), "checkpoint": u.source,
                  "data": os.path.abspath(path)}
        write_text_atomic(os.path.join(args.out, f"{args.model_name}_{run['name']}_score.json"),
                          json.dumps(result, indent=2))
        results.append(result)
    table = format_summary(results)
    write_text_atomic(os.path.join(args.out, "summary.json"), json.dumps(results, indent=2))
    write_text_atomic(os.path.join(args.out, "summary.txt"), table + "\n")
    print(table)
    return 0
