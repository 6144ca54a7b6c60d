"""The commonsense benchmarks (LLM-Adapters): the prompt byte for byte, the official answer extraction
with its quirks, accuracy on tiny test.json files in the real layout, and ``python -m evaluation.score``.

Expected values come from reading ``commonsense_evaluate.py`` (AGI-Edgerunners/LLM-Adapters
``commomsense_evaluate.py``; NVlabs/DoRA ``commonsense_reasoning/commonsense_evaluate.py``):
``re.findall(<alternation>, sentence.strip())``, first match, ``""`` when none; correct iff it equals
``answer``. The prompt strings are those of ``generate_prompt`` in ``commonsense_evaluate.py``
(evaluation) and ``finetune.py`` (training).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.answers import AnswerSetError
from evaluation.score import main, score_benchmark
from evaluation.tasks import COMMONSENSE_BENCHMARKS, get_benchmark
from llava_san.commonsense import BENCHMARKS, extract_answer, generate_prompt, response_text

ROOT = Path(__file__).resolve().parents[2]
PAD = " " * 16

# ------------------------------------------------------------------------------------------------ prompt
EVAL_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request. \n\n" + PAD + "### Instruction:\n" + PAD + "{i}\n\n" + PAD + "### Response:\n"
                 + PAD)
EVAL_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
              "context. Write a response that appropriately completes the request.\n\n" + PAD
              + "### Instruction:\n" + PAD + "{i}\n\n" + PAD + "### Input:\n" + PAD + "{x}\n\n" + PAD
              + "### Response:\n" + PAD)
TRAIN_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                  "the request.  \n\n" + PAD + "### Instruction:\n" + PAD + "{i}\n" + PAD + "\n" + PAD
                  + "### Response:\n" + PAD + "{o}")
TRAIN_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
               "context. Write a response that appropriately completes the request. \n\n" + PAD
               + "### Instruction:\n" + PAD + "{i}\n" + PAD + "\n" + PAD + "### Input:\n" + PAD + "{x}\n"
               + PAD + "\n" + PAD + "### Response:\n" + PAD + "{o}")


def test_prompt_templates_byte_for_byte():
    i, x, o = "Is water wet?\n\nAnswer format: true/false", "ctx", "the correct answer is true"
    assert generate_prompt(i) == EVAL_NO_INPUT.format(i=i)
    assert generate_prompt(i, "") == EVAL_NO_INPUT.format(i=i)  # `if input:` -- empty means none
    assert generate_prompt(i, x) == EVAL_INPUT.format(i=i, x=x)
    assert generate_prompt(i, None, o) == TRAIN_NO_INPUT.format(i=i, o=o)
    assert generate_prompt(i, "", o) == TRAIN_NO_INPUT.format(i=i, o=o)
    assert generate_prompt(i, x, o) == TRAIN_INPUT.format(i=i, x=x, o=o)
    # train_on_inputs=False masks the training template with output="", not the evaluation prompt
    assert generate_prompt(i, None, "") != generate_prompt(i)


def test_response_text_keeps_the_text_after_the_last_response_marker():
    prompt = generate_prompt("Q?")
    assert response_text(prompt + "the correct answer is true") == "the correct answer is true"
    assert response_text("  answer1 ### Response:\n  answer2 ") == "answer2"
    assert response_text("") == ""


# ---------------------------------------------------------------------------------------------- extraction
CASES = [
    # (dataset, output, expected prediction)
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "the correct answer is false", "false"),
    ("boolq", "True", ""),  # case-sensitive
    ("boolq", "FALSE", ""),
    ("boolq", "false, not true", "false"),  # several candidates: the first in the text
    ("boolq", "true or false", "true"),
    ("boolq", "untrue", "true"),  # no word boundaries
    ("boolq", "falsehood", "false"),
    ("boolq", "", ""),  # empty output
    ("boolq", "   \n ", ""),
    ("boolq", "yes", ""),
    ("piqa", "the correct answer is solution2", "solution2"),
    ("piqa", "solution10", "solution1"),  # prefix match
    ("piqa", "Solution1", ""),
    ("piqa", "solution3 solution2", "solution2"),  # solution3 is not in the alternation
    ("piqa", "solution 1", ""),
    ("social_i_qa", "answer3", "answer3"),
    ("social_i_qa", "answer5", "answer5"),  # in the alternation although SIQA has three answers
    ("social_i_qa", "Answer2", ""),
    ("social_i_qa", "answer12", "answer1"),
    ("hellaswag", "the correct answer is ending4", "ending4"),
    ("hellaswag", "ending5 then ending3", "ending3"),  # ending5 is not in the alternation
    ("hellaswag", "answer1", ""),  # another family's word
    ("winogrande", "the correct answer is option2", "option2"),
    ("winogrande", "option3", ""),
    ("winogrande", "Option1 option2 option1", "option2"),
    ("ARC-Challenge", "answer4", "answer4"),  # LLM-Adapters' dataset name
    ("arc_challenge", "answer4", "answer4"),  # ours
    ("ARC-Easy", "the answer is answer1 not answer2", "answer1"),
    ("arc_easy", "answer6", ""),
    ("openbookqa", "answer2answer3", "answer2"),
    ("openbookqa", "true", ""),
]


@pytest.mark.parametrize("dataset,output,expected", CASES)
def test_official_extraction(dataset, output, expected):
    assert extract_answer(dataset, output) == expected


def test_benchmark_table_and_names():
    assert list(BENCHMARKS) == list(COMMONSENSE_BENCHMARKS)
    assert [b.folder for b in BENCHMARKS.values()] == [
        "boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"]
    with pytest.raises(ValueError, match="unknown commonsense dataset 'arc'"):
        extract_answer("arc", "answer1")
    for name in COMMONSENSE_BENCHMARKS:
        task = get_benchmark(name)
        assert task.max_new_tokens == 32 and task.num_beams == 4 and task.prompt_format == "text"
        assert task.suite == "commonsense" and task.layout["questions"] == "test.json"
        assert task.llava_paths("/d")["annotations"] == Path("/d") / BENCHMARKS[name].folder / "test.json"


# ------------------------------------------------------------------------------------------------ scoring
def _item(instruction, answer, family):
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}",
            "answer": answer}


def _dataset(root, name, labels, family):
    folder = root / BENCHMARKS[name].folder
    folder.mkdir(parents=True, exist_ok=True)
    items = [_item(f"Question {k}?\n\nAnswer format: {family}", a, family) for k, a in enumerate(labels)]
    (folder / "test.json").write_text(json.dumps(items, indent=4))
    return folder / "test.json"


def _answers(path, texts):
    path.write_text("".join(json.dumps({"question_id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def test_accuracy_on_a_tiny_test_json(tmp_path):
    test = _dataset(tmp_path, "boolq", ["true", "false", "true", "false", "true"], "true/false")
    answers = _answers(tmp_path / "a.jsonl", [
        "the correct answer is true",  # right
        "the correct answer is true",  # wrong
        "True",                        # unparsed -> wrong
        "false true",                  # first match false -> right
        "",                            # empty -> wrong
    ])
    res = score_benchmark("boolq", str(answers), annotations=str(test))
    assert res["benchmark"] == "boolq" and res["headline"] == "accuracy"
    assert res["accuracy"] == pytest.approx(2 / 5) and res["correct"] == 2 and res["n_questions"] == 5
    assert res["unparsed"] == 2 and res["predictions"] == {"": 2, "false": 1, "true": 2}
    assert res["coverage"]["missing"] == 0


def test_subset_missing_and_unknown_answers(tmp_path):
    test = _dataset(tmp_path, "winogrande", ["option1", "option2", "option1"], "option1/option2")
    task = get_benchmark("winogrande")
    qs = task.load_questions(test)
    assert [q.question_id for q in qs] == [0, 1, 2] and qs[1].meta["answer"] == "option2"
    assert qs[0].prompt == EVAL_NO_INPUT.format(i="Question 0?\n\nAnswer format: option1/option2")
    two = [{"question_id": 0, "text": "option1"}, {"question_id": 1, "text": "option1"}]
    assert task.score(two, test, questions=qs[:2])["accuracy"] == pytest.approx(0.5)
    with pytest.raises(AnswerSetError, match="missing"):
        task.score(two, test)
    res = task.score(two, test, allow_missing=True)
    assert res["accuracy"] == pytest.approx(1 / 3) and res["coverage"]["missing"] == 1
    with pytest.raises(AnswerSetError, match="unknown"):
        task.score([*two, {"question_id": 2, "text": "x"}, {"question_id": 7, "text": "x"}], test)


def test_bad_test_json(tmp_path):
    bad = tmp_path / "test.json"
    bad.write_text(json.dumps([{"instruction": "Q", "output": "x"}]))
    with pytest.raises(Exception, match=r"needs string 'instruction' and 'answer'"):
        get_benchmark("piqa").load_questions(bad)


def test_cli_prints_one_json_object(tmp_path, capsys):
    test = _dataset(tmp_path, "arc_challenge", ["answer2", "answer4", "answer1"], "answer1/answer2/answer3/answer4")
    answers = _answers(tmp_path / "a.jsonl", ["answer2", "the correct answer is answer4.", "Answer1"])
    rc = main(["arc_challenge", "--answers", str(answers), "--annotations", str(test)])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["accuracy"] == pytest.approx(2 / 3) and out["benchmark"] == "arc_challenge"
    assert main(["arc_challenge", "--answers", str(answers)]) == 1
    assert "needs --annotations dataset/ARC-Challenge/test.json" in capsys.readouterr().err


def test_cli_subprocess(tmp_path):
    test = _dataset(tmp_path, "openbookqa", ["answer3", "answer1"], "answer1/answer2/answer3/answer4")
    answers = _answers(tmp_path / "a.jsonl", ["answer3", "answer2"])
    proc = subprocess.run([sys.executable, "-m", "evaluation.score", "openbookqa", "--answers", str(answers),
                           "--annotations", str(test)], cwd=ROOT, capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout)
    assert out["accuracy"] == pytest.approx(0.5) and out["coverage"]["expected"] == 2


# ------------------------------------------------------------------------------------------------- report
def _res(name, acc):
    return {"benchmark": name, "headline": "accuracy", "accuracy": acc}


def test_report_suite_columns_avg_and_reload(tmp_path):
    from evaluation.report import build_report, load_reports, render_markdown, write_report

    accs = dict(zip(COMMONSENSE_BENCHMARKS, (0.70, 0.80, 0.75, 0.85, 0.80, 0.82, 0.66, 0.78)))
    rep = build_report({"SAN-DoRA (ours)": {n: _res(n, a) for n, a in accs.items()}})
    assert rep["suite"] == "commonsense" and rep["columns"] == list(COMMONSENSE_BENCHMARKS)
    ours = rep["rows"][-1]
    assert ours["avg"] == pytest.approx(100 * sum(accs.values()) / 8)
    assert ours["values"]["arc_easy"] == pytest.approx(82.0)
    ref = {r["name"]: r for r in rep["rows"] if r["source"] != "run"}
    # NVlabs/DoRA commonsense_reasoning/README.md, rank 32, as printed
    assert [ref["LLaMA3-8B DoRA r32"]["values"][n] for n in COMMONSENSE_BENCHMARKS] == [
        74.6, 89.3, 79.9, 95.5, 85.6, 90.5, 80.4, 85.8]
    for r in ref.values():  # each printed average is the mean of its eight cells (to the README's rounding)
        assert sum(r["values"].values()) / 8 == pytest.approx(r["avg"], abs=0.051)
    md = render_markdown(rep)
    assert "| method | BoolQ | PIQA | SIQA | HellaSwag | WinoGrande | ARC-e | ARC-c | OBQA | avg |" in md
    write_report(rep, tmp_path / "a")
    again = load_reports(tmp_path)
    assert again["suite"] == "commonsense" and again["rows"][-1]["name"] == "SAN-DoRA (ours)"
    mixed = build_report({"x": {"pope": {"benchmark": "pope", "headline": "f1_mean", "f1_mean": 0.8},
                                "boolq": _res("boolq", 0.5)}})
    assert mixed["suite"] == "llava" and mixed["columns"][-1] == "boolq" and mixed["rows"][-1]["avg"] is None


def test_a_questions_override_alone_is_scored_against_itself(tmp_path):
    from evaluation.resolve import resolve_benchmark
    from evaluation.scoring import score_answers

    test = _dataset(tmp_path / "elsewhere", "piqa", ["solution1", "solution2"], "solution1/solution2")
    data = resolve_benchmark("piqa", eval_root=tmp_path / "no-such-root", overrides={"questions": str(test)})
    assert data.annotations is None and len(data.questions) == 2 and data.questions[0].max_new_tokens == 32
    res = score_answers(data, _answers(tmp_path / "a.jsonl", ["solution1", "solution1"]))
    assert res["accuracy"] == pytest.approx(0.5)
