"""``bifrost eval understanding`` on small TSVs written here in VLMEvalKit's format.

An MMBench-style file (base64 images of two sizes, a shared-image reference, hints, circular copies, three
malformed rows: bad base64, an unreadable image, a missing option) and an MME-style file (``image_path`` files, two
questions per image, a perception and a cognition subtask). Scripted answers check the prompts, the exact-match
extraction and every metric against hand-computed values; host sharding covers every row once; a resumed run only
answers what is missing; the command line with a tiny model writes VLMEvalKit's prediction layout and the summary.
"""
import base64
import csv
import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from test_chat import PIXELS, qwen_dir  # noqa: F401  (the tiny model fixture)

from bifrost_jax.data.vlmeval import (MCQ_EN, answer_matches, build_prompt, option_from_answer, prepare_question,
                                      read_tsv, yes_no_from_answer, yes_no_truth)
from bifrost_jax.eval import run
from bifrost_jax.eval.understanding import finished, malformed_rows, run_benchmark, score_benchmark


def _png_b64(h, w, seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _write_tsv(path, columns, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(columns)
        for r in rows:
            w.writerow([r.get(c, "") for c in columns])


MMB_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "split", "image"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlmeval")
    a, b = _png_b64(56, 84, 0), _png_b64(84, 112, 1)
    rows = [
        dict(index=0, question="What colour is it?", hint="Look closely.", A="red", B="blue", C="green", D="grey",
             answer="A", category="color", **{"l2-category": "perception"}, split="dev", image=a),
        dict(index=1, question="How many?", A="one", B="two", answer="B", category="count",
             **{"l2-category": "perception"}, split="dev", image=b),
        dict(index=2, question="Which shape?", A="circle", B="square", C="star", answer="C", category="shape",
             **{"l2-category": "reasoning"}, split="dev", image="0"),  # shares row 0's image
        # circular copies of 0 and 1 (options rotated)
        dict(index=1000000, question="What colour is it?", hint="Look closely.", A="blue", B="green", C="grey",
             D="red", answer="D", category="color", **{"l2-category": "perception"}, split="dev", image=a),
        dict(index=1000001, question="How many?", A="two", B="one", answer="A", category="count",
             **{"l2-category": "perception"}, split="dev", image=b),
        dict(index=5, question="Bad base64?", A="x", B="y", answer="A", category="color", split="dev",
             image="!!not base64!!" * 10),
        dict(index=6, question="Unreadable?", A="x", B="y", answer="A", category="color", split="dev",
             image=base64.b64encode(b"not an image at all, just bytes").decode()),
        dict(index=7, question="Missing option?", A="x", C="z", answer="C", category="color", split="dev", image=a),
    ]
    mmb = str(root / "MMBench_DEV_EN.tsv")
    _write_tsv(mmb, MMB_COLUMNS, rows)
    os.makedirs(root / "mme_images")
    for i, (h, w) in enumerate(((56, 56), (84, 56))):
        Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(root / "mme_images" / f"{i}.png")
    mme_rows = [
        dict(index=0, question="Is there a cat? Please answer yes or no.", answer="Yes", category="existence",
             image_path="mme_images/0.png"),
        dict(index=1, question="Is there a dog? Please answer yes or no.", answer="No", category="existence",
             image_path="mme_images/0.png"),
        dict(index=2, question="Does the code print 3? Please answer yes or no.", answer="Yes",
             category="code_reasoning", image_path="mme_images/1.png"),
        dict(index=3, question="Does the code print 4? Please answer yes or no.", answer="No",
             category="code_reasoning", image_path="mme_images/1.png"),
    ]
    mme = str(root / "MME.tsv")
    _write_tsv(mme, ["index", "question", "answer", "category", "image_path"], mme_rows)
    return dict(root=root, mmb=mmb, mme=mme)


def scripted(wrong=()):
    """Right answers in varied forms, except rows in ``wrong`` (answered with a wrong option's text)."""
    calls = []

    def answer(questions):
        calls.append([q.index for q in questions])
        out = []
        for q in questions:
            truth = q.row["answer"]
            if q.options:
                if q.index in wrong:
                    other = next(k for k in q.options if k != truth)
                    out.append(f"I think it is {q.options[other]}")
                else:
                    out.append(f"({truth}) {q.options[truth]}." if int(q.index) % 2 else truth)
            else:
                flip = {"Yes": "No", "No": "Yes"}[truth] if q.index in wrong else truth
                out.append(f"{flip}, it is." if q.index != "2" else flip.lower())
        return out
    answer.calls = calls
    return answer


def test_prompts_and_extraction(data):
    _, rows = read_tsv(data["mmb"])
    assert build_prompt(rows[0], "mcq", "MMBench_DEV_EN") == (
        "Hint: Look closely.\nQuestion: What colour is it?\nOptions:\nA. red\nB. blue\nC. green\nD. grey\n" + MCQ_EN)
    assert build_prompt(rows[1], "mcq", "MMBench_DEV_EN").startswith("Question: How many?\nOptions:\nA. one\nB. two")
    assert build_prompt({"question": "Is it?"}, "yes/no", "HallusionBench") == "Is it? Please answer yes or no."
    assert build_prompt({"question": "Is it? Please answer yes or no."}, "yes/no", "MME").endswith("no.")
    assert build_prompt(dict(rows[0], question="这是什么?", hint=""), "mcq", "MMBench_DEV_CN").endswith("请直接回答选项字母。")
    opts = {"A": "red", "B": "blue"}
    assert option_from_answer("B", opts) == "B" and option_from_answer("The answer is (A).", opts) == "A"
    assert option_from_answer("Blue.", opts) == "B" and option_from_answer("It looks blue to me", opts) is None
    assert option_from_answer("A or B", opts) is None and option_from_answer("purple", opts) is None
    assert yes_no_from_answer("Yes, it is.") == "Yes" and yes_no_from_answer("no") == "No"
    assert yes_no_from_answer("yes and no") == "Unknown"
    assert yes_no_truth("1") == "Yes" and yes_no_truth("no") == "No"
    assert answer_matches("The value is 42 m.", {"answer": "42"}, {})  # an MMMU open question
    mmmu = prepare_question(dict(rows[0], A="", B="", C="", D="", answer="42"), "mmmu", "MMMU_DEV_VAL", ".")
    assert mmmu.options == {} and mmmu.text == "Hint: Look closely.\nQuestion: What colour is it?"
    with pytest.raises(ValueError, match="fewer than two options"):
        prepare_question(dict(rows[0], B="", C="", D=""), "mcq", "MMBench_DEV_EN", ".")


def test_metrics_sharding_and_resume(data, tmp_path):
    out = str(tmp_path / "out")
    # two hosts, each its share; a wrong answer on the circular copy of row 1
    answers = scripted(wrong={"1000001"})
    runs = [run_benchmark(answers, data["mmb"], out, batch_size=2, process_index=i, process_count=2,
                          progress=False) for i in range(2)]
    asked = [i for call in answers.calls for i in call]
    assert sorted(asked) == sorted(["0", "1", "2", "1000000", "1000001"]) and len(asked) == len(set(asked))
    assert runs[0]["malformed"].keys() | runs[1]["malformed"].keys() == {"5", "6", "7"}
    bad = malformed_rows(out, "MMBench_DEV_EN")
    assert "base64" in bad["5"] and "not a readable image" in bad["6"] and "missing option" in bad["7"]
    scores, scored = score_benchmark(data["mmb"], finished(out, "MMBench_DEV_EN"))
    assert len(scored) == 5 and scores["accuracy"] == pytest.approx(4 / 5)
    assert scores["circular_accuracy"] == pytest.approx(2 / 3) and scores["num_questions"] == 3
    assert scores["vanilla_accuracy"] == 1.0
    assert scores["circular_per_category"] == {"color": 1.0, "count": 0.0, "shape": 1.0}
    assert scores["per_l2_category"] == {"perception": pytest.approx(3 / 4), "reasoning": 1.0}

    # resume: a kill lost the last two answers of host 0; the rerun answers only those
    log = os.path.join(out, ".understanding", "MMBench_DEV_EN", "process_0.jsonl")
    lines = open(log).read().splitlines()
    lost = [json.loads(x)["index"] for x in lines[-2:]]
    open(log, "w").write("\n".join(lines[:-2]) + "\n" + lines[-2][:10])  # and a half-written line
    again = scripted(wrong={"1000001"})
    run_benchmark(again, data["mmb"], out, batch_size=2, process_index=0, process_count=2, progress=False)
    assert sorted(i for call in again.calls for i in call) == sorted(lost)
    rescored, _ = score_benchmark(data["mmb"], finished(out, "MMBench_DEV_EN"))
    assert rescored["circular_accuracy"] == scores["circular_accuracy"]

    # MME: existence all right (acc 1, acc+ 1 -> 200); code_reasoning one wrong (acc .5, acc+ 0 -> 50)
    mme_out = str(tmp_path / "mme")
    run_benchmark(scripted(wrong={"3"}), data["mme"], mme_out, progress=False)
    s, _ = score_benchmark(data["mme"], finished(mme_out, "MME"))
    assert s["mme_subtask_scores"] == {"existence": 200.0, "code_reasoning": 50.0}
    assert s["mme_perception"] == 200.0 and s["mme_cognition"] == 50.0 and s["accuracy"] == 0.75


def test_command_line_layout(qwen_dir, data, tmp_path):  # noqa: F811
    path, _ = qwen_dir
    out = str(tmp_path / "cli")
    argv = ["understanding", "--checkpoint", path, "--data", data["mmb"], "--data", data["mme"], "--out", out,
            "--max-new-tokens", "3", "--dtype", "float32", "--batch-size", "4",
            "--min-pixels", str(PIXELS["min_pixels"]), "--max-pixels", str(PIXELS["max_pixels"])]
    assert run.main(argv) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert [s["scores"]["name"] for s in summary] == ["MMBench_DEV_EN", "MME"]
    assert set(summary[0]["malformed"]) == {"5", "6", "7"} and summary[1]["malformed"] == {}
    assert "mme_perception" in summary[1]["scores"] and "circular_accuracy" in summary[0]["scores"]
    assert "MMBench_DEV_EN (mcq): 5 rows, 3 malformed" in open(os.path.join(out, "summary.txt")).read()
    with open(os.path.join(out, "bifrost_MMBench_DEV_EN.tsv"), newline="") as fh:
        pred = list(csv.DictReader(fh, delimiter="\t"))
    assert [r["index"] for r in pred] == ["0", "1", "2", "1000000", "1000001"]
    assert "image" not in pred[0] and all("prediction" in r for r in pred)
    first = {r["index"]: r["prediction"] for r in pred}
    # a rerun finds everything answered and writes the same predictions
    log = os.path.join(out, ".understanding", "MMBench_DEV_EN", "process_0.jsonl")
    n_lines = len(open(log).read().splitlines())
    assert run.main(argv) == 0
    assert len(open(log).read().splitlines()) == n_lines
    with open(os.path.join(out, "bifrost_MMBench_DEV_EN.tsv"), newline="") as fh:
        assert {r["index"]: r["prediction"] for r in csv.DictReader(fh, delimiter="\t")} == first
