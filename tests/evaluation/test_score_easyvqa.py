"""easy-vqa benchmark: normalised exact match (= VQA accuracy with one answer for ten annotators)."""

import json

import pytest

from evaluation.answers import AnswerSetError
from evaluation.tasks import easyvqa

# qid -> (answer, question_type, category, prediction, correct?)
CASES = {
    0: ("circle", "shape", "shape", "Circle.", True),
    1: ("red", "color", "color", "Red", True),
    2: ("red", "color", "color", "The red one", False),  # -> "red 1"
    3: ("no", "yes/no", "yes/no", "yes", False),
    4: ("triangle", None, "shape", "a triangle", True),  # article dropped; type from the question's category
}


def _files(tmp_path, as_list=False):
    q = tmp_path / "questions.jsonl"
    q.write_text(
        "".join(
            json.dumps({"question_id": i, "image": f"{i}.png", "text": f"q{i}?", "category": c[2]}) + "\n"
            for i, c in CASES.items()
        )
    )
    entries = {
        str(i): {"answer": c[0], **({"question_type": c[1]} if c[1] else {})} for i, c in CASES.items()
    }
    ann = tmp_path / "annotations.json"
    ann.write_text(
        json.dumps([{"question_id": int(k), **v} for k, v in entries.items()] if as_list else entries)
    )
    a = tmp_path / "answers.jsonl"
    a.write_text(
        "".join(
            json.dumps({"question_id": i, "prompt": f"q{i}?", "text": c[3]}) + "\n" for i, c in CASES.items()
        )
    )
    return q, ann, a


@pytest.mark.parametrize("as_list", [False, True])
def test_accuracy_by_hand(tmp_path, as_list):
    q, ann, a = _files(tmp_path, as_list)
    out = easyvqa.score(a, ann, questions=q)
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["per_question_type"] == pytest.approx({"color": 0.5, "shape": 1.0, "yes/no": 0.0})
    # Without the question file the missing type falls back to "all".
    assert easyvqa.score(a, ann)["per_question_type"]["all"] == 1.0


def test_missing_and_bad_annotations(tmp_path):
    q, ann, a = _files(tmp_path)
    a.write_text("".join(a.read_text().splitlines(keepends=True)[:4]))
    with pytest.raises(AnswerSetError, match=r"1 missing \(e\.g\. '4'\)"):
        easyvqa.score(a, ann)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"1": {"question_type": "x"}}))
    with pytest.raises(ValueError, match="needs a string 'answer'"):
        easyvqa.score(a, bad)


def test_questions_and_prompt():
    assert (
        easyvqa.build_prompt("what shape?")
        == "what shape?\nAnswer the question using a single word or phrase."
    )


def test_load_questions(tmp_path):
    q, _, _ = _files(tmp_path)
    qs = easyvqa.load_questions(q, image_folder=tmp_path)
    assert qs[0].prompt == "q0?" and qs[0].meta["category"] == "shape" and qs[0].image == tmp_path / "0.png"


def test_malformed_question_lines(tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text(
        '{"question_id": 0, "image": "0.png", "text": "q?"}\n{"question_id": 1.5, "image": "1.png", "text": "q?"}\n'
    )
    with pytest.raises(ValueError, match=r"q\.jsonl:2: question_id must be an int or a string"):
        easyvqa.load_questions(q)
    q.write_text('{"question_id": 0, "image": "0.png"}\n')
    with pytest.raises(ValueError, match=r"q\.jsonl:1: missing 'text'"):
        easyvqa.load_questions(q)
    q.write_text('{"question_id": 0, "image": "0.png", "text": "q?"}\nnot json\n')
    with pytest.raises(ValueError, match=r"q\.jsonl:2: invalid JSON"):
        easyvqa.load_questions(q)
