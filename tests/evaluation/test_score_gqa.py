"""GQA: rstrip('.').lower() then exact match over balanced questions; open / binary split."""

import json

import pytest

from evaluation.answers import AnswerSetError
from evaluation.tasks import gqa

SUFFIX = "\nAnswer the question using a single word or phrase."

# qid -> (answer, structural type, semantic type, prediction, correct?)
CASES = {
    "201": ("cat", "query", "obj", "Cat.", True),
    "202": ("t-shirt", "query", "attr", "tshirt", False),  # no punctuation handling
    "203": ("yes", "verify", "rel", "Yes..", True),  # every trailing period goes
    "204": ("no", "logical", "rel", "no!", False),
    "205": ("left", "choose", "rel", "The left", False),  # no article removal
    "206": ("2", "compare", "attr", "two", False),  # no number words
}


def _gt(tmp_path, unbalanced=False):
    qs = {
        qid: {
            "question": f"q{qid}?",
            "answer": a,
            "imageId": f"n{qid}",
            "isBalanced": True,
            "types": {"structural": s, "semantic": sem, "detailed": "x"},
        }
        for qid, (a, s, sem, _, _) in CASES.items()
    }
    if unbalanced:
        qs["299"] = {
            "question": "q?",
            "answer": "x",
            "imageId": "n",
            "isBalanced": False,
            "types": {"structural": "query"},
        }
    p = tmp_path / "testdev_balanced_questions.json"
    p.write_text(json.dumps(qs))
    return p


def _answers(tmp_path, extra=()):
    p = tmp_path / "answers.jsonl"
    rows = [{"question_id": q, "prompt": "q", "text": c[3]} for q, c in CASES.items()] + list(extra)
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_accuracy_open_binary_by_hand(tmp_path):
    out = gqa.score(_answers(tmp_path), _gt(tmp_path))
    assert out["accuracy"] == pytest.approx(2 / 6)
    assert out["open"] == pytest.approx(1 / 2)  # 201 right, 202 wrong
    assert out["binary"] == pytest.approx(1 / 4)  # 203 right of verify/logical/choose/compare
    assert (out["n_open"], out["n_binary"]) == (2, 4)
    assert out["per_structural"]["verify"] == 1.0 and out["per_semantic"]["attr"] == 0.0


def test_parse_prediction():
    assert gqa.parse_prediction("Yes...") == "yes"
    assert gqa.parse_prediction("The Cat") == "the cat"


def test_unbalanced_answers_are_ignored_and_counted(tmp_path):
    out = gqa.score(_answers(tmp_path, [{"question_id": "299", "text": "x"}]), _gt(tmp_path, unbalanced=True))
    assert out["n_questions"] == 6 and out["n_ignored_unbalanced"] == 1 and out["coverage"]["unknown"] == 0


def test_unknown_id_is_an_error_unless_allowed(tmp_path):
    ans = _answers(tmp_path, [{"question_id": "999", "text": "x"}])
    with pytest.raises(AnswerSetError, match=r"1 unknown \(e\.g\. '999' \(line 7\)\)"):
        gqa.score(ans, _gt(tmp_path))
    assert gqa.score(ans, _gt(tmp_path), allow_unknown=True)["coverage"]["unknown"] == 1


def test_int_ids_in_answers_match_string_ids(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text("".join(json.dumps({"question_id": int(q), "text": c[3]}) + "\n" for q, c in CASES.items()))
    assert gqa.score(p, _gt(tmp_path))["accuracy"] == pytest.approx(2 / 6)


def test_questions_from_balanced_json_and_predictions_file(tmp_path):
    qs = gqa.load_questions(_gt(tmp_path), image_folder="imgs")
    assert (
        qs[0].question_id == "201"
        and qs[0].prompt == "q201?" + SUFFIX
        and str(qs[0].image) == "imgs/n201.jpg"
    )
    out = gqa.score_files(_answers(tmp_path), annotations=_gt(tmp_path), submission=tmp_path / "pred.json")
    assert json.loads((tmp_path / "pred.json").read_text())[0] == {"questionId": "201", "prediction": "cat"}
    assert out["submission"].endswith("pred.json")
    with pytest.raises(ValueError, match="gqa needs --annotations"):
        gqa.score_files(_answers(tmp_path))
