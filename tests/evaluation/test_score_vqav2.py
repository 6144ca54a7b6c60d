"""VQAv2: LLaVA pipeline (B on the prediction, then vqaEval with its unanimity rule), lmms-eval
variant, per answer type, submission file, question prompts."""

import json

import pytest

from evaluation.answers import AnswerSetError
from evaluation.tasks import vqav2

SUFFIX = "\nAnswer the question using a single word or phrase."

# question_id -> (answer_type, 10 gt answers, prediction, LLaVA score, lmms-eval score)
CASES = {
    1: ("yes/no", ["yes"] * 10, "Yes", 1.0, 1.0),  # B lower-cases; raw vqaEval alone would give 0
    2: ("other", ["t-shirt"] * 10, "t-shirt", 0.0, 1.0),  # pre-normalised "t shirt" vs unanimous raw gt
    3: ("other", ["man's"] * 4 + ["hat"] * 6, "man's", 0.0, 1.0),  # B splits 's
    4: ("number", ["2"] * 2 + ["two"] * 8, "Two", 1.0, 1.0),  # non-unanimous: A on both sides
    5: ("other", ["red"] * 2 + ["blue"] * 8, "red", 0.6, 0.6),
    6: ("number", ["3"] * 3 + ["4"] * 7, "3", 0.9, 0.9),
}


def _annotations(tmp_path):
    anns = []
    for qid, (atype, gts, _, _, _) in CASES.items():
        anns.append(
            {
                "question_id": qid,
                "image_id": 100 + qid,
                "question_type": "what is" if qid % 2 else "how many",
                "answer_type": atype,
                "multiple_choice_answer": gts[0],
                "answers": [
                    {"answer": g, "answer_confidence": "yes", "answer_id": i + 1} for i, g in enumerate(gts)
                ],
            }
        )
    p = tmp_path / "v2_mscoco_val2014_annotations.json"
    p.write_text(json.dumps({"annotations": anns}))
    return p


def _answers(tmp_path, ids=None):
    p = tmp_path / "answers.jsonl"
    with open(p, "w") as f:
        for qid in ids or CASES:
            f.write(json.dumps({"question_id": qid, "prompt": "q" + SUFFIX, "text": CASES[qid][2]}) + "\n")
    return p


def test_llava_convention_by_hand(tmp_path):
    out = vqav2.score(_answers(tmp_path), _annotations(tmp_path))
    assert out["accuracy"] == pytest.approx(sum(c[3] for c in CASES.values()) / 6) == pytest.approx(3.5 / 6)
    assert out["per_answer_type"] == pytest.approx({"yes/no": 1.0, "other": 0.2, "number": 0.95})
    assert out["headline"] == "accuracy" and out["benchmark"] == "vqav2" and out["n_questions"] == 6
    assert out["coverage"]["missing"] == 0


def test_per_question_accuracy_matches_table():
    for atype, gts, pred, llava, lmms in CASES.values():
        assert vqav2.question_accuracy(pred, gts, "llava") == pytest.approx(llava)
        assert vqav2.question_accuracy(pred, gts, "lmms-eval") == pytest.approx(lmms)


def test_lmms_eval_convention(tmp_path):
    out = vqav2.score(_answers(tmp_path), _annotations(tmp_path), convention="lmms-eval")
    assert out["accuracy"] == pytest.approx(5.5 / 6)
    with pytest.raises(ValueError, match="unknown VQAv2 convention 'raw'"):
        vqav2.score(_answers(tmp_path), _annotations(tmp_path), convention="raw")


def test_missing_answer_is_reported_or_scored_empty(tmp_path):
    ann = _annotations(tmp_path)
    with pytest.raises(AnswerSetError, match=r"1 missing \(e\.g\. '6'\)"):
        vqav2.score(_answers(tmp_path, [1, 2, 3, 4, 5]), ann)
    out = vqav2.score(_answers(tmp_path, [1, 2, 3, 4, 5]), ann, allow_missing=True)
    assert out["accuracy"] == pytest.approx(2.6 / 6) and out["coverage"]["missing"] == 1


def test_submission_file_over_question_ids(tmp_path):
    qfile = tmp_path / "llava_vqav2_mscoco_test2015.jsonl"
    qfile.write_text(
        "".join(
            json.dumps({"question_id": q, "image": f"COCO_test2015_{q:012d}.jpg", "text": "q" + SUFFIX})
            + "\n"
            for q in [1, 2, 3, 7]
        )
    )
    sub = tmp_path / "upload.json"
    answers = _answers(tmp_path, [1, 2, 3])
    with pytest.raises(AnswerSetError, match="1 missing"):
        vqav2.score_files(answers, questions=qfile, submission=sub)
    assert not sub.exists()
    out = vqav2.score_files(answers, questions=qfile, submission=sub, allow_missing=True)
    assert json.loads(sub.read_text()) == [
        {"question_id": 1, "answer": "yes"},
        {"question_id": 2, "answer": "t shirt"},
        {"question_id": 3, "answer": "man 's"},
        {"question_id": 7, "answer": ""},
    ]
    assert "accuracy" not in out and out["submission"] == str(sub) and out["coverage"]["missing"] == 1


def test_score_files_default_submission_beside_answers(tmp_path):
    out = vqav2.score_files(_answers(tmp_path), annotations=_annotations(tmp_path))
    sub = tmp_path / "answers_submission.json"
    assert out["submission"] == str(sub) and len(json.loads(sub.read_text())) == 6
    assert isinstance(json.loads(sub.read_text())[0]["question_id"], int)
    with pytest.raises(ValueError, match="vqav2 needs"):
        vqav2.score_files(_answers(tmp_path))


def test_questions_from_official_json_and_llava_jsonl(tmp_path):
    qj = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    qj.write_text(
        json.dumps(
            {
                "data_subtype": "val2014",
                "questions": [{"image_id": 42, "question": "What is this?", "question_id": 420}],
            }
        )
    )
    (q,) = vqav2.load_questions(qj, image_folder=tmp_path / "imgs")
    assert q.question_id == 420 and q.prompt == "What is this?" + SUFFIX
    assert q.image == tmp_path / "imgs" / "COCO_val2014_000000000042.jpg" and q.max_new_tokens == 128
    assert q.model_prompt() == "<image>\nWhat is this?" + SUFFIX
    assert q.answer_record("cat", model_id="m") == {
        "question_id": 420,
        "prompt": q.prompt,
        "text": "cat",
        "model_id": "m",
    }

    ql = tmp_path / "q.jsonl"
    ql.write_text(json.dumps({"question_id": 5, "image": "a.jpg", "text": "Is it?" + SUFFIX}) + "\n")
    (q,) = vqav2.load_questions(ql)
    assert q.prompt == "Is it?" + SUFFIX and str(q.image) == "a.jpg"
