"""VizWiz: B then A on the prediction, raw gt, joined through the question's image; upload file."""

import json

import pytest

from evaluation.answers import AnswerSetError
from evaluation.tasks import vizwiz

SUFFIX = (
    "\nWhen the provided information is insufficient, respond with 'Unanswerable'."
    "\nAnswer the question using a single word or phrase."
)

# (gt answers, answer_type, prediction, expected accuracy)
CASES = [
    (["unanswerable"] * 10, "unanswerable", "Unanswerable", 1.0),
    (["don't know"] * 10, "other", "dont know", 1.0),  # B expands the contraction
    (["Red"] * 10, "other", "red", 0.0),  # gt compared raw (synthetic upper-case gt)
    (["2"] * 3 + ["3"] * 7, "number", "two", 0.9),
    (["unsuitable image"] * 5 + ["unanswerable"] * 5, "unanswerable", "The answer is unanswerable.", 0.0),
]


def _files(tmp_path):
    val = [
        {
            "image": f"VizWiz_val_{i:08d}.jpg",
            "question": f"q{i}?",
            "answer_type": t,
            "answerable": 1,
            "answers": [{"answer": g, "answer_confidence": "yes"} for g in gts],
        }
        for i, (gts, t, _, _) in enumerate(CASES)
    ]
    ann = tmp_path / "val.json"
    ann.write_text(json.dumps(val))
    # LLaVA question file in a different order, ids not equal to positions.
    qfile = tmp_path / "llava_val.jsonl"
    qfile.write_text(
        "".join(
            json.dumps({"question_id": 100 + i, "image": val[i]["image"], "text": f"q{i}?" + SUFFIX}) + "\n"
            for i in reversed(range(len(CASES)))
        )
    )
    ans = tmp_path / "answers.jsonl"
    ans.write_text(
        "".join(
            json.dumps({"question_id": 100 + i, "prompt": "", "text": c[2]}) + "\n"
            for i, c in enumerate(CASES)
        )
    )
    return ann, qfile, ans


def test_accuracy_by_hand(tmp_path):
    ann, qfile, ans = _files(tmp_path)
    out = vizwiz.score(ans, ann, questions=qfile)
    assert out["accuracy"] == pytest.approx(sum(c[3] for c in CASES) / len(CASES)) == pytest.approx(2.9 / 5)
    assert out["per_answer_type"] == pytest.approx({"number": 0.9, "other": 0.5, "unanswerable": 0.5})


def test_per_question():
    for gts, _, pred, acc in CASES:
        assert vizwiz.question_accuracy(pred, gts) == pytest.approx(acc)


def test_submission_and_positional_ids(tmp_path):
    ann, qfile, ans = _files(tmp_path)
    out = vizwiz.score_files(ans, questions=qfile, annotations=ann)
    sub = json.loads((tmp_path / "answers_submission.json").read_text())
    assert sub[0] == {
        "image": "VizWiz_val_00000004.jpg",
        "answer": "answer is unanswerable",
    }  # question-file order
    assert {"image": "VizWiz_val_00000001.jpg", "answer": "don't know"} in sub
    assert out["submission"].endswith("answers_submission.json")
    # Without a LLaVA question file the ids are positions in val.json.
    pos = tmp_path / "pos.jsonl"
    pos.write_text("".join(json.dumps({"question_id": i, "text": c[2]}) + "\n" for i, c in enumerate(CASES)))
    assert vizwiz.score(pos, ann)["accuracy"] == pytest.approx(2.9 / 5)
    (q,) = vizwiz.load_questions(json.loads(ann.read_text())[:1], image_folder="val")
    assert q.question_id == 0 and q.prompt == "q0?" + SUFFIX and str(q.image) == "val/VizWiz_val_00000000.jpg"


def test_test_split_submission_only_and_missing(tmp_path):
    _, qfile, ans = _files(tmp_path)
    lines = ans.read_text().splitlines()[:-1]
    ans.write_text("\n".join(lines) + "\n")
    with pytest.raises(AnswerSetError, match=r"1 missing \(e\.g\. '104'\)"):
        vizwiz.score_files(ans, questions=qfile)
    out = vizwiz.score_files(ans, questions=qfile, allow_missing=True, submission=tmp_path / "up.json")
    assert "accuracy" not in out and out["coverage"]["missing"] == 1
    assert json.loads((tmp_path / "up.json").read_text())[0] == {
        "image": "VizWiz_val_00000004.jpg",
        "answer": "",
    }


def test_question_without_annotation_is_an_error(tmp_path):
    ann, qfile, ans = _files(tmp_path)
    with open(qfile, "a") as f:
        f.write(json.dumps({"question_id": 999, "image": "VizWiz_test_1.jpg", "text": "q"}) + "\n")
    with pytest.raises(ValueError, match="1 questions have no annotation"):
        vizwiz.score(ans, ann, questions=qfile)
