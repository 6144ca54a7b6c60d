"""ScienceQA: LLaVA's eval_science_qa.py letter parsing, accuracy and IMG accuracy, CQM-A prompts."""

import json

import pytest

from evaluation.answers import AnswerSetError
from evaluation.tasks import scienceqa

MCQ = "\nAnswer with the option's letter from the given choices directly."

# pid -> (split, image?, n choices, answer index, subject, prediction, correct?)
CASES = {
    "1": ("test", True, 3, 1, "natural science", "B", True),
    "2": ("test", True, 4, 0, "natural science", "A. apple", True),
    "3": ("test", False, 2, 1, "language science", "The answer is B.", True),
    "4": ("test", True, 4, 2, "social science", "The answer is C", False),  # '.' needs one more char
    "5": ("test", True, 4, 3, "social science", "E", False),  # beyond the choices
    "6": ("test", False, 3, 0, "language science", "b", False),  # lower case
    "7": ("test", True, 2, 0, "natural science", "The answer is A. The answer is B.", False),  # two matches
    "8": ("test", True, 2, 1, "natural science", "The answer is (B).", False),
    "10": ("test", True, 2, 0, "natural science", "A", True),
    "9": ("val", True, 2, 0, "natural science", "A", True),
}


def _problems(tmp_path):
    probs = {
        pid: {
            "question": f"Question {pid}?",
            "choices": [f"c{i}" for i in range(n)],
            "answer": ans,
            "hint": "A  hint." if pid == "1" else "",
            "image": "image.png" if img else None,
            "task": "closed choice",
            "grade": "grade3",
            "subject": subj,
            "topic": "t",
            "category": "c",
            "skill": "s",
            "lecture": "",
            "solution": "",
            "split": split,
        }
        for pid, (split, img, n, ans, subj, _, _) in CASES.items()
    }
    (tmp_path / "problems.json").write_text(json.dumps(probs))
    splits = {
        "train": [],
        "val": [p for p, c in CASES.items() if c[0] == "val"],
        "test": [p for p, c in CASES.items() if c[0] == "test"],
    }
    (tmp_path / "pid_splits.json").write_text(json.dumps(splits))
    return tmp_path / "problems.json"


def _answers(tmp_path, pids=None):
    p = tmp_path / "answers.jsonl"
    pids = pids or [p for p, c in CASES.items() if c[0] == "test"]
    p.write_text(
        "".join(json.dumps({"question_id": pid, "prompt": "x", "text": CASES[pid][5]}) + "\n" for pid in pids)
    )
    return p


def test_accuracy_and_img_accuracy_by_hand(tmp_path):
    out = scienceqa.score(_answers(tmp_path), _problems(tmp_path), split="test")
    assert out["accuracy"] == pytest.approx(4 / 9)  # 1, 2, 3, 10
    assert out["img_accuracy"] == pytest.approx(3 / 7)  # image problems 1, 2, 4, 5, 7, 8, 10
    assert out["headline"] == "img_accuracy" and out["n_img"] == 7 and out["n_failed"] == 4
    assert out["per_subject"] == pytest.approx(
        {"language science": 0.5, "natural science": 0.6, "social science": 0.0}
    )


@pytest.mark.parametrize(
    "text,letter",
    [
        ("B", "B"),
        ("B. 42 grams", "B"),
        ("The answer is B", "FAILED"),
        ("The answer is B,", "B"),
        ("B.", "FAILED"),
        ("b", "FAILED"),
        ("The answer is (B).", "FAILED"),
        ("The answer is F.", "F"),
        ("The answer is A. The answer is B.", "FAILED"),
        ("", "FAILED"),
    ],
)
def test_parse_letter(text, letter):
    assert scienceqa.parse_letter(text) == letter


def test_pred_index():
    assert scienceqa.pred_index("E", 4) == -1 and scienceqa.pred_index("B", 4) == 1
    assert scienceqa.pred_index("F", 5) == -1 and scienceqa.pred_index("FAILED", 5) == -1


def test_missing_answer(tmp_path):
    pids = [p for p, c in CASES.items() if c[0] == "test" and p != "10"]
    with pytest.raises(AnswerSetError, match=r"1 missing \(e\.g\. '10'\)"):
        scienceqa.score(_answers(tmp_path, pids), _problems(tmp_path))
    out = scienceqa.score(_answers(tmp_path, pids), _problems(tmp_path), allow_missing=True)
    assert out["accuracy"] == pytest.approx(3 / 9) and out["img_accuracy"] == pytest.approx(2 / 7)


def test_splits(tmp_path):
    probs = _problems(tmp_path)
    assert scienceqa.resolve_split(probs, "val") == ["9"]
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(["1", "2"]))
    assert scienceqa.resolve_split(probs, str(ids)) == ["1", "2"]
    with pytest.raises(ValueError, match=r"split 'dev' not in pid_splits \(valid: test, train, val\)"):
        scienceqa.resolve_split(probs, "dev")
    out = scienceqa.score_files(_answers(tmp_path, ["1", "2"]), annotations=probs, split=str(ids))
    assert out["accuracy"] == 1.0


def test_prompts_from_problems_and_llava_json_agree(tmp_path):
    probs = _problems(tmp_path)
    qs = scienceqa.load_questions(probs, image_folder="images/test", split="test")
    q1 = qs[0]
    body = "Context: A hint.\nQuestion: Question 1?\nOptions: (A) c0 (B) c1 (C) c2"  # double space collapsed
    assert q1.question_id == "1" and q1.prompt == body + MCQ and q1.max_new_tokens == 1024
    assert q1.answer_prompt == "<image>\n" + body + MCQ and q1.model_prompt() == q1.answer_prompt
    assert str(q1.image) == "images/test/1/image.png"
    q3 = next(q for q in qs if q.question_id == "3")
    assert (
        q3.image is None
        and q3.prompt
        == q3.answer_prompt
        == "Context: N/A\nQuestion: Question 3?\nOptions: (A) c0 (B) c1" + MCQ
    )
    # The same prompts read from LLaVA's llava_test_CQM-A.json (convert_sqa_to_llava output).
    problems = json.loads(probs.read_text())
    llava = []
    for q in qs:
        p = problems[q.question_id]
        inp = scienceqa.build_prompt(p)
        item = {
            "id": q.question_id,
            "conversations": [
                {"from": "human", "value": inp + ("\n<image>" if p["image"] else "")},
                {"from": "gpt", "value": "The answer is A."},
            ],
        }
        if p["image"]:
            item["image"] = f"{q.question_id}/image.png"
        llava.append(item)
    (tmp_path / "llava_test_CQM-A.json").write_text(json.dumps(llava))
    again = scienceqa.load_questions(tmp_path / "llava_test_CQM-A.json", image_folder="images/test")
    assert [(q.question_id, q.prompt, q.answer_prompt, q.image) for q in again] == [
        (q.question_id, q.prompt, q.answer_prompt, q.image) for q in qs
    ]
