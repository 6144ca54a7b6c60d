"""POPE: eval_pope.py's yes/no rule, per-split confusion matrix by hand, f1_mean, label pairing."""

import itertools
import json

import pytest

from evaluation.answers import AnswerSetError
from evaluation.tasks import pope

SUFFIX = "\nAnswer the question using a single word or phrase."

# split -> [(label, prediction)]
SPLITS = {
    "adversarial": [
        ("yes", "Yes, there is a dog."),  # TP
        ("no", "No, there is not."),  # TN
        ("yes", "No\nThere is a cat"),  # no space split at the newline: parsed yes -> TP
        ("no", "NO"),  # upper case is not a no-token: yes -> FP
        ("no", "Yes. There is no dog."),  # only the first sentence counts: yes -> FP
    ],
    "popular": [("yes", "Yes, but it is not clear."), ("yes", "yes"), ("no", "no")],  # FN, TP, TN
    "random": [("no", "no"), ("no", "No."), ("yes", "No, not at all")],  # TN, TN, FN
}


def _files(tmp_path, splits=SPLITS):
    ann = tmp_path / "coco"
    ann.mkdir()
    questions, answers, qid = [], [], 1000
    for cat, items in splits.items():
        with open(ann / f"coco_pope_{cat}.json", "w") as f:
            for i, (label, pred) in enumerate(items):
                img, obj = f"COCO_val2014_{cat[:3]}{i:04d}.jpg", f"obj{i}"
                f.write(
                    json.dumps(
                        {
                            "question_id": i + 1,
                            "image": img,
                            "text": f"Is there a {obj} in the image?",
                            "label": label,
                        }
                    )
                    + "\n"
                )
                questions.append(
                    {
                        "question_id": qid,
                        "image": img,
                        "text": f"Is there a {obj} in the image?" + SUFFIX,
                        "category": cat,
                    }
                )
                answers.append({"question_id": qid, "prompt": questions[-1]["text"], "text": pred})
                qid += 1
    # Interleave categories in the question file (order within a category kept); answers reversed.
    by_cat = [[q for q in questions if q["category"] == c] for c in splits]
    questions = [q for group in itertools.zip_longest(*by_cat) for q in group if q is not None]
    qfile = tmp_path / "llava_pope_test.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    afile = tmp_path / "answers.jsonl"
    afile.write_text("".join(json.dumps(a) + "\n" for a in reversed(answers)))
    return qfile, ann, afile


def test_metrics_by_hand(tmp_path):
    qfile, ann, afile = _files(tmp_path)
    out = pope.score(afile, ann, questions=qfile)
    adv, pop, rnd = out["adversarial"], out["popular"], out["random"]
    assert (adv["tp"], adv["fp"], adv["tn"], adv["fn"]) == (2, 2, 1, 0)
    assert adv == pytest.approx(
        {
            "accuracy": 3 / 5,
            "precision": 0.5,
            "recall": 1.0,
            "f1": 2 / 3,
            "yes_ratio": 4 / 5,
            "n": 5,
            "tp": 2,
            "fp": 2,
            "tn": 1,
            "fn": 0,
        }
    )
    assert pop == pytest.approx(
        {
            "accuracy": 2 / 3,
            "precision": 1.0,
            "recall": 0.5,
            "f1": 2 / 3,
            "yes_ratio": 1 / 3,
            "n": 3,
            "tp": 1,
            "fp": 0,
            "tn": 1,
            "fn": 1,
        }
    )
    # No positive prediction: precision and F1 are defined as 0 (LLaVA would divide by zero).
    assert rnd == pytest.approx(
        {
            "accuracy": 2 / 3,
            "precision": 0.0,
            "recall": 0.0,
            "f1": 0.0,
            "yes_ratio": 0.0,
            "n": 3,
            "tp": 0,
            "fp": 0,
            "tn": 2,
            "fn": 1,
        }
    )
    assert out["f1_mean"] == pytest.approx((2 / 3 + 2 / 3 + 0.0) / 3)
    assert out["headline"] == "f1_mean" and out["n_questions"] == 11


@pytest.mark.parametrize(
    "text,parsed",
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("no", "no"),
        ("not sure", "no"),
        ("NO", "yes"),
        ("Nope", "yes"),
        ("I don't see one", "yes"),
        ("Yes, but it is not clear.", "no"),
        ("Yes. There is no dog.", "yes"),
        ("No\nThere is a cat", "yes"),
        ("", "yes"),
        ("There is no, dog", "no"),
    ],
)
def test_parse_yes_no(text, parsed):
    assert pope.parse_yes_no(text) == parsed


def test_missing_answer_scored_as_empty_output(tmp_path):
    qfile, ann, afile = _files(tmp_path)
    lines = afile.read_text().splitlines()
    afile.write_text("\n".join(lines[1:]) + "\n")  # drop the last random question's answer ("No, not at all")
    with pytest.raises(AnswerSetError, match=r"1 missing \(e\.g\. '1010'\)"):
        pope.score(afile, ann, questions=qfile)
    out = pope.score(afile, ann, questions=qfile, allow_missing=True)
    assert out["random"]["tp"] == 1 and out["coverage"]["missing"] == 1  # "" parses as yes, as in LLaVA


def test_label_pairing_is_checked(tmp_path):
    qfile, ann, afile = _files(tmp_path)
    lines = (ann / "coco_pope_random.json").read_text().splitlines()
    (ann / "coco_pope_random.json").write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(ValueError, match="POPE split 'random': 3 questions but 2 label lines"):
        pope.score(afile, ann, questions=qfile)
    (ann / "coco_pope_random.json").write_text("\n".join([lines[1], lines[0], lines[2]]) + "\n")
    with pytest.raises(
        ValueError, match=r"question 1008 \(line \d+\) does not match .*coco_pope_random.json:1"
    ):
        pope.score(afile, ann, questions=qfile)
    (ann / "coco_pope_random.json").unlink()
    with pytest.raises(FileNotFoundError, match="coco_pope_random.json"):
        pope.score(afile, ann, questions=qfile)


def test_questions_and_cli_requirements(tmp_path):
    qfile, ann, afile = _files(tmp_path)
    qs = pope.load_questions(qfile, image_folder="val2014")
    assert qs[0].meta["category"] == "adversarial" and qs[0].max_new_tokens == 128
    assert str(qs[0].image).startswith("val2014/COCO_val2014_")
    with pytest.raises(ValueError, match="pope needs --questions"):
        pope.score_files(afile, annotations=ann)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "image": "a.jpg", "text": "t"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: missing 'category'"):
        pope.load_questions(bad)
