"""The registry and ``python -m evaluation.score``: one JSON object on stdout, errors on stderr."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.answers import write_answers
from evaluation.tasks import (BENCHMARKS, COMMONSENSE_BENCHMARKS, PAPER_BENCHMARKS, EvalQuestion, Task, get_benchmark,
                              llava_paths)
from evaluation.score import main, score_benchmark

ROOT = Path(__file__).resolve().parents[2]


def test_registry_names_and_loud_errors():
    assert list(BENCHMARKS) == [*PAPER_BENCHMARKS, "easyvqa", *COMMONSENSE_BENCHMARKS]
    for name in BENCHMARKS:
        task = get_benchmark(name)
        mod = importlib.import_module(BENCHMARKS[name])
        assert task is mod.TASK and isinstance(task, Task)
        assert task.name == mod.NAME == name and task.title == mod.TITLE and task.headline == mod.HEADLINE
        assert task.max_new_tokens == mod.MAX_NEW_TOKENS in ((32,) if name in COMMONSENSE_BENCHMARKS else (128, 1024))
        for fn in ("load_questions", "score", "score_files"):
            assert callable(getattr(mod, fn)), (name, fn)
            assert getattr(task, fn) is getattr(mod, fn), (name, fn)
    with pytest.raises(
        ValueError,
        match="unknown benchmark 'popee'; valid: vqav2, gqa, vizwiz, scienceqa, textvqa, pope, mmbench, "
        "easyvqa, boolq, piqa, social_i_qa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa",
    ):
        get_benchmark("popee")


def test_eval_question_image_loading(tmp_path):
    from PIL import Image

    Image.new("L", (5, 4), 7).save(tmp_path / "g.png")
    q = EvalQuestion(1, "Q?", tmp_path / "g.png")
    img = q.load_image()
    assert img.mode == "RGB" and img.size == (5, 4)
    assert EvalQuestion(2, "Q?").load_image() is None and EvalQuestion(2, "Q?").model_prompt() == "Q?"


def _easyvqa(tmp_path, answers):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"1": {"answer": "red"}, "2": {"answer": "circle"}}))
    a = tmp_path / "answers.jsonl"
    a.write_text("".join(line + "\n" for line in answers))
    return ann, a


def test_cli_prints_one_json_object(tmp_path, capsys):
    ann, a = _easyvqa(tmp_path, ['{"question_id": 1, "text": "Red"}', '{"question_id": 2, "text": "square"}'])
    rc = main(
        ["easyvqa", "--answers", str(a), "--annotations", str(ann), "--output", str(tmp_path / "m.json")]
    )
    out = capsys.readouterr()
    assert rc == 0
    result = json.loads(out.out)  # exactly one JSON document
    assert result["accuracy"] == 0.5 and result["benchmark"] == "easyvqa"
    assert json.loads((tmp_path / "m.json").read_text()) == result


@pytest.mark.parametrize(
    "answers,message",
    [
        (
            ['{"question_id": 1, "text": "Red"}', '{"question_id": 2, "text": '],
            r"answers\.jsonl:2: invalid JSON",
        ),
        (['{"question_id": 1, "text": "Red"}'], r"1 missing \(e\.g\. '2'\)"),
        (
            [
                '{"question_id": 1, "text": "a"}',
                '{"question_id": 1, "text": "b"}',
                '{"question_id": 2, "text": "c"}',
            ],
            r"1 duplicate \(e\.g\. '1' on lines 1, 2\)",
        ),
        (
            [
                '{"question_id": 1, "text": "a"}',
                '{"question_id": 2, "text": "b"}',
                '{"question_id": 3, "text": "c"}',
            ],
            r"1 unknown \(e\.g\. '3' \(line 3\)\)",
        ),
    ],
)
def test_cli_errors_exit_1_with_message(tmp_path, capsys, answers, message):
    ann, a = _easyvqa(tmp_path, answers)
    rc = main(["easyvqa", "--answers", str(a), "--annotations", str(ann)])
    out = capsys.readouterr()
    assert rc == 1 and out.out == ""
    assert out.err.startswith("error: ")
    import re

    assert re.search(message, out.err), out.err


def test_cli_allow_flags_report_counts(tmp_path, capsys):
    ann, a = _easyvqa(tmp_path, ['{"question_id": 1, "text": "red"}', '{"question_id": 9, "text": "x"}'])
    rc = main(
        ["easyvqa", "--answers", str(a), "--annotations", str(ann), "--allow-missing", "--allow-unknown"]
    )
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert rc == 0 and result["accuracy"] == 0.5
    assert result["coverage"]["missing"] == 1 and result["coverage"]["unknown"] == 1


def test_cli_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["popee", "--answers", "x.jsonl"])
    assert e.value.code == 2 and "valid: vqav2" in capsys.readouterr().err
    ann, a = _easyvqa(tmp_path, ['{"question_id": 1, "text": "red"}'])
    assert main(["easyvqa", "--answers", str(a)]) == 1
    assert "easyvqa needs --annotations" in capsys.readouterr().err
    assert main(["easyvqa", "--answers", str(a), "--annotations", str(ann), "--convention", "llava"]) == 1
    assert "easyvqa does not take option(s): convention" in capsys.readouterr().err
    assert main(["easyvqa", "--answers", str(tmp_path / "nope.jsonl"), "--annotations", str(ann)]) == 1
    with pytest.raises(ValueError, match="does not take"):
        score_benchmark("gqa", a, annotations=ann, pid_splits="x")


def test_module_entry_points_in_subprocess(tmp_path):
    ann, a = _easyvqa(tmp_path, ['{"question_id": 1, "text": "red"}', '{"question_id": 2, "text": "circle"}'])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for cmd in (
        [sys.executable, "-m", "evaluation.score"],
        [sys.executable, str(ROOT / "evaluation" / "score.py")],
    ):
        proc = subprocess.run(
            [*cmd, "easyvqa", "--answers", str(a), "--annotations", str(ann)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["accuracy"] == 1.0
        assert len(proc.stdout.strip().splitlines()) == 1


def test_llava_layout_paths():
    p = llava_paths("pope", "playground/data/eval")
    assert p == {
        "questions": Path("playground/data/eval/pope/llava_pope_test.jsonl"),
        "image_folder": Path("playground/data/eval/pope/val2014"),
        "annotations": Path("playground/data/eval/pope/coco"),
    }
    assert llava_paths("scienceqa", "e")["image_folder"] == Path("e/scienceqa/images/test")
    assert llava_paths("easyvqa", "e") == {}


def test_generation_round_trip(tmp_path):
    """questions -> answer_record -> write_answers -> score, as the generator will chain them."""
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(
        "".join(
            json.dumps({"question_id": i, "image": f"{i}.png", "text": f"q{i}?"}) + "\n" for i in range(3)
        )
    )
    ann, _ = _easyvqa(tmp_path, [])
    ann.write_text(json.dumps({str(i): {"answer": a} for i, a in enumerate(["red", "blue", "circle"])}))
    qs = get_benchmark("easyvqa").load_questions(qfile)
    out = write_answers(
        tmp_path / "ans.jsonl", [q.answer_record(t, model_id="m") for q, t in zip(qs, ["Red", "blue", "x"])]
    )
    assert json.loads(out.read_text().splitlines()[0]) == {
        "question_id": 0,
        "prompt": "q0?",
        "text": "Red",
        "model_id": "m",
    }
    result = score_benchmark("easyvqa", out, questions=qfile, annotations=ann)
    assert result["accuracy"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("damage, message", [
    ("latin1_answers", r"answers\.jsonl:2: not valid UTF-8"),
    ("surrogate_answers", r"answers\.jsonl:1: text that cannot be encoded as UTF-8"),
    ("latin1_annotations", r"ann\.json:1: not valid UTF-8"),
])
def test_cli_bad_encodings_name_file_and_line(tmp_path, capsys, damage, message):
    ann, a = _easyvqa(tmp_path, [])
    if damage == "latin1_answers":
        a.write_bytes(b'{"question_id": "0", "text": "red"}\n{"question_id": "1", "text": "caf\xe9"}\n')
    elif damage == "surrogate_answers":
        a.write_text('{"question_id": "0", "text": "red \\ud800"}\n')
    else:
        ann.write_bytes(ann.read_bytes().replace(b'"', b'"\xe9', 1))
    rc = main(["easyvqa", "--answers", str(a), "--annotations", str(ann)])
    out = capsys.readouterr()
    import re

    assert rc == 1 and out.out == "" and re.search(message, out.err), out.err


#: score_files keywords every benchmark takes, which are not benchmark inputs
_GENERIC = {"answers", "submission", "allow_missing", "allow_unknown"}


def test_help_lists_what_each_benchmark_needs(tmp_path):
    """`python -m evaluation.score --help` lists, per benchmark, each scorer input and how it is needed;
    the list is the scorer's own: every input it takes and nothing else, and leaving out the required
    ones fails naming them."""
    import inspect

    done = subprocess.run([sys.executable, "-m", "evaluation.score", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [line.split(None, 3) for line in done.stdout.split("what each benchmark needs")[1].splitlines()[1:]]
    listed, current = {}, None
    for row in rows:
        if row[0] in BENCHMARKS:
            current, row = row[0], row[1:]
        listed.setdefault(current, {})[row[0]] = row[1]
    assert list(listed) == list(BENCHMARKS)
    answers = tmp_path / "answers.jsonl"
    answers.write_text("")
    for name in BENCHMARKS:
        task = get_benchmark(name)
        takes = set(inspect.signature(task.score_files).parameters) - _GENERIC
        if not task.uses_split:  # every scorer takes split; only those with uses_split read it
            takes.discard("split")
        assert {n.arg for n in task.score_needs} == takes, name
        assert listed[name] == {n.flag: n.need for n in task.score_needs}, name
        # with none of its inputs, the scorer refuses, naming a required input (or one of the alternatives)
        must = [n.flag for n in task.score_needs if n.need != "optional"]
        assert must, name
        with pytest.raises(ValueError) as err:
            score_benchmark(name, str(answers))
        assert any(flag in str(err.value) for flag in must), (name, str(err.value))
        required = [n.flag for n in task.score_needs if n.need == "required"]
        assert all(flag in str(err.value) for flag in required), (name, str(err.value))
