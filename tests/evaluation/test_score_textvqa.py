"""TextVQA: join on (image_id, question read back from the prompt); B on both sides; soft accuracy."""

import json

import pytest

from evaluation.answers import AnswerFileError, AnswerSetError
from evaluation.tasks import textvqa

SUFFIX = "\nAnswer the question using a single word or phrase."

# (image_id, question, gt answers, saved prompt, prediction, expected)
CASES = [
    (
        "img1",
        "What brand is this?",
        ["Sony"] * 3 + ["sony."] * 2 + ["SONY"] * 5,
        "What brand is this?\nReference OCR token: Sony, Alpha" + SUFFIX,
        "Sony",
        1.0,
    ),
    (
        "img1",
        "What number is shown?",
        ["10"] * 2 + ["ten"] + ["1O"] * 7,
        "What number is shown?\nReference OCR token: 10" + SUFFIX,
        "ten",
        0.9,
    ),
    ("img2", "Whose hat?", ["man's hat"] * 10, "Whose hat?" + SUFFIX, "man's hat", 1.0),
    ("img3", "What color?", ["blue"] * 10, "OCR tokens: a b Question: What color? Short answer:", "red", 0.0),
]


def _ann(tmp_path, cases=CASES):
    data = [
        {
            "question": q,
            "question_id": i,
            "image_id": img,
            "answers": gts,
            "image_classes": [],
            "set_name": "val",
        }
        for i, (img, q, gts, _, _, _) in enumerate(cases)
    ]
    p = tmp_path / "TextVQA_0.5.1_val.json"
    p.write_text(json.dumps({"dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data}))
    return p


def _answers(tmp_path, rows=None):
    rows = (
        rows
        if rows is not None
        else [{"question_id": img, "prompt": pr, "text": pred} for img, _, _, pr, pred, _ in CASES]
    )
    p = tmp_path / "answers.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_accuracy_by_hand(tmp_path):
    out = textvqa.score(_answers(tmp_path), _ann(tmp_path))
    assert out["accuracy"] == pytest.approx(2.9 / 4) and out["n_questions"] == 4


def test_prompt_to_question():
    assert textvqa.prompt_to_question("Q One?\nReference OCR token: a, b" + SUFFIX) == "q one?"
    assert textvqa.prompt_to_question("Reference OCR token: a\nQ Two?" + SUFFIX) == "q two?"
    assert textvqa.prompt_to_question("Q Three?" + SUFFIX) == "q three?"
    assert textvqa.prompt_to_question("OCR tokens: x Question: Q Four? Short answer:") == "q four?"
    with pytest.raises(ValueError):
        textvqa.prompt_to_question("one\ntwo\nthree\nfour")


def test_build_prompt_matches_llava_file_format():
    assert textvqa.build_prompt("What brand is this?", ["Sony", "Alpha"]) == CASES[0][3]
    assert textvqa.build_prompt("Whose hat?") == CASES[2][3]


def test_answer_errors_name_the_line(tmp_path):
    rows = [{"question_id": "img1", "prompt": CASES[0][3], "text": "x"}, {"question_id": "img1", "text": "x"}]
    with pytest.raises(AnswerFileError, match="line 2: TextVQA answers need the saved 'prompt'"):
        textvqa.score(_answers(tmp_path, rows), _ann(tmp_path))
    rows = [{"question_id": "img1", "prompt": "a\nb\nc\nd", "text": "x"}]
    with pytest.raises(AnswerFileError, match="line 1: cannot recover the question"):
        textvqa.score(_answers(tmp_path, rows), _ann(tmp_path))


def test_missing_and_unknown(tmp_path):
    rows = [{"question_id": img, "prompt": pr, "text": pred} for img, _, _, pr, pred, _ in CASES[:3]]
    rows.append({"question_id": "img9", "prompt": "Other?" + SUFFIX, "text": "x"})
    with pytest.raises(AnswerSetError, match=r"1 missing \(e\.g\. 'img3 / what color\?'\).*1 unknown"):
        textvqa.score(_answers(tmp_path, rows), _ann(tmp_path))
    out = textvqa.score(_answers(tmp_path, rows), _ann(tmp_path), allow_missing=True, allow_unknown=True)
    assert out["accuracy"] == pytest.approx(2.9 / 4)


def test_questions_file_restricts_expected(tmp_path):
    q = tmp_path / "llava_textvqa_val_v051_ocr.jsonl"
    q.write_text(json.dumps({"question_id": "img1", "image": "img1.jpg", "text": CASES[0][3]}) + "\n")
    (item,) = textvqa.load_questions(q, "train_images")
    assert item.prompt == CASES[0][3] and str(item.image) == "train_images/img1.jpg"
    rows = [{"question_id": "img1", "prompt": CASES[0][3], "text": "sony"}]
    assert textvqa.score(_answers(tmp_path, rows), _ann(tmp_path), questions=q)["accuracy"] == 1.0


def test_repeated_question_uses_last_annotation_like_llava(tmp_path):
    cases = [
        ("img1", "Q?", ["a"] * 10, "Q?" + SUFFIX, "a", None),
        ("img1", "q?", ["b"] * 10, "Q?" + SUFFIX, "b", None),
    ]
    rows = [{"question_id": "img1", "prompt": "Q?" + SUFFIX, "text": "b"}] * 2
    out = textvqa.score(_answers(tmp_path, rows), _ann(tmp_path, cases))
    assert out["accuracy"] == 1.0 and out["coverage"]["expected"] == 2
