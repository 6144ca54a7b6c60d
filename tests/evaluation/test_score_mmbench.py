"""MMBench: 2023 can_infer, circular evaluation by hand, LLaVA prompts, base64 images, xlsx upload."""

import base64
import csv
import io
import json

import pytest
from PIL import Image

from evaluation.answers import AnswerSetError
from evaluation.tasks import mmbench
from evaluation.xlsx import read_xlsx

MCQ = "\nAnswer with the option's letter from the given choices directly."
ANIMALS = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}


def _png(color=(255, 0, 0), size=(8, 6)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _rot(opts, r):
    return opts[r:] + opts[:r]


def _group(base, opts, answer_idx, preds, category, hint=""):
    """k rows (index base + r*1e6) with options rotated r times and the matching answer letter."""
    rows = []
    for r, pred in enumerate(preds):
        o = _rot(opts, r)
        letters = "ABCD"
        row = {
            "index": base + r * 1_000_000,
            "question": f"Question {base}?",
            "hint": hint,
            **{letters[i]: (o[i] if i < len(o) else "") for i in range(4)},
            "answer": letters[o.index(opts[answer_idx])],
            "category": category,
            "source": "s",
            "l2-category": "L2x",
            "comment": "",
            "split": "dev",
        }
        rows.append((row, pred))
    return rows


GROUPS = [
    _group(
        0, ["cat", "dog", "bird", "fish"], 0, ["A", "D.", "(C)", "Answer: B"], "cat_a", hint="Look."
    ),  # all right
    _group(1, ["yes", "no"], 1, ["B", "B"], "cat_b"),  # 2nd rotation wrong
    _group(
        2, ["red", "green", "blue"], 2, ["It is blue.", "The answer is B", "A or B"], "cat_a"
    ),  # last unparsed
    _group(
        3, ["cat", "dog", "bird", "fish"], 0, ["A cat is sitting on a mat", "The cat.", "C", "E"], "cat_b"
    ),
    _group(4, ["left", "right"], 0, ["b", "B"], "cat_a"),  # vanilla row unparsed
]
COLUMNS = [
    "index",
    "question",
    "hint",
    "A",
    "B",
    "C",
    "D",
    "answer",
    "category",
    "image",
    "source",
    "l2-category",
    "comment",
    "split",
]


def _files(tmp_path, drop_answer_of=None):
    image = _png()
    tsv = tmp_path / "mmbench_dev_20230712.tsv"
    rows = [pair for g in GROUPS for pair in g]
    with open(tsv, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(COLUMNS)
        for row, _ in rows:
            w.writerow([row.get(c, image if c == "image" else "") for c in COLUMNS])
    ans = tmp_path / "answers.jsonl"
    ans.write_text(
        "".join(
            json.dumps({"question_id": row["index"], "round_id": 0, "prompt": "p", "text": pred}) + "\n"
            for row, pred in rows
            if row["index"] != drop_answer_of
        )
    )
    return tsv, ans


def test_circular_and_vanilla_by_hand(tmp_path):
    tsv, ans = _files(tmp_path)
    out = mmbench.score(ans, tsv)
    assert out["circular_accuracy"] == pytest.approx(1 / 5)  # only question 0 is right in every rotation
    assert out["vanilla_accuracy"] == pytest.approx(4 / 5)  # base rows 0-3 right, 4 unparsed
    assert out["per_category"] == pytest.approx({"cat_a": 1 / 3, "cat_b": 0.0})
    assert out["per_l2_category"] == pytest.approx({"L2x": 0.2})
    assert out["vanilla_per_category"] == pytest.approx({"cat_a": 2 / 3, "cat_b": 1.0})
    assert (out["n_questions"], out["n_rows"], out["n_unparsed"]) == (5, 15, 2)
    assert out["headline"] == "circular_accuracy"


@pytest.mark.parametrize(
    "pred,letter",
    [
        ("A", "A"),
        ("A.", "A"),
        ("(D)", "D"),
        ("Answer: B", "B"),
        ("B) cat", "B"),
        ("The answer is C", "C"),
        ("bird", "C"),
        ("It is a bird.", "C"),
        ("A cat is sitting on a mat", "A"),
        ("A or B", False),
        ("E", "E"),
        ("The correct answer is **B**.", False),
        ("Option B is correct because the animal barks.", "B"),
        ("b", False),
        ("I cannot tell", False),
        (":C", "C"),
        ("(A).", "A"),
        ("A dog and a cat", False),
    ],
)
def test_can_infer_2023_table(pred, letter):
    assert mmbench.can_infer(pred, dict(ANIMALS)) == letter


def test_missing_row_answer(tmp_path):
    tsv, ans = _files(tmp_path, drop_answer_of=2_000_000)
    with pytest.raises(AnswerSetError, match=r"1 missing \(e\.g\. '2000000'\)"):
        mmbench.score(ans, tsv)
    out = mmbench.score(ans, tsv, allow_missing=True)
    assert out["circular_accuracy"] == 0.0 and out["vanilla_accuracy"] == pytest.approx(0.8)


def test_prompts_images_and_rounds(tmp_path):
    tsv, _ = _files(tmp_path)
    qs = mmbench.load_questions(tsv)
    assert len(qs) == 15 and qs[0].question_id == 0 and qs[0].max_new_tokens == 1024
    body = "Look.\nQuestion 0?\nA. cat\nB. dog\nC. bird\nD. fish"
    assert qs[0].prompt == body + MCQ and qs[0].answer_prompt == body
    img = qs[0].load_image()
    assert img.mode == "RGB" and img.size == (8, 6)
    two = next(q for q in qs if q.question_id == 1)
    assert two.prompt == "Question 1?\nA. yes\nB. no" + MCQ  # empty C/D and empty hint dropped
    rounds = mmbench.load_questions(tsv, all_rounds=True)
    r1 = [q for q in rounds if q.question_id == 0][1]
    assert r1.answer_prompt == "Look.\nQuestion 0?\nA. dog\nB. bird\nC. fish\nD. cat"
    assert r1.extra == {
        "round_id": 1,
        "options": ["dog", "bird", "fish", "cat"],
        "option_char": ["B", "C", "D", "A"],
    }
    assert r1.answer_record("A")["round_id"] == 1
    cn = mmbench.load_questions(tsv, lang="cn")[0]
    assert cn.prompt.endswith("\n请直接回答选项字母。")


def test_na_cells_follow_pandas_and_llava():
    row = {"question": "Q?", "hint": "nan", "A": "x", "B": "None", "C": "y", "D": None}
    assert mmbench.prompt_options(row) == ["x"]  # stops at the first empty option
    assert mmbench.build_prompt(row, ["x"]) == "Q?\nA. x"
    assert mmbench.is_na("NA") and mmbench.is_na("") and not mmbench.is_na("NONE")
    assert mmbench.is_none("NONE") and mmbench.is_none("nAn")


def test_image_references_are_resolved(tmp_path):
    tsv = tmp_path / "t.tsv"
    img = _png((0, 255, 0), (3, 2))
    tsv.write_text(
        "index\tquestion\tA\tB\tanswer\timage\n0\tQ?\tx\ty\tA\t" + img + "\n1000000\tQ?\ty\tx\tB\t0\n"
    )
    rows = mmbench.read_tsv(tsv)
    assert rows[1]["image"] == img
    with pytest.raises(Exception, match=r"t\.tsv:2: 'index' must be an integer"):
        tsv.write_text("index\tquestion\nzero\tQ?\n")
        mmbench.read_tsv(tsv)


def test_submission_spreadsheet(tmp_path):
    tsv, ans = _files(tmp_path)
    out = mmbench.score_files(ans, annotations=tsv)
    path = tmp_path / "answers_submission.xlsx"
    assert out["submission"] == str(path)
    rows = read_xlsx(path)
    assert rows[0] == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert rows[1] == [0, "Question 0?", "cat", "dog", "bird", "fish", "A", "A", "dev"]
    yes_no = next(r for r in rows[1:] if r[0] == 1)
    assert yes_no == [1, "Question 1?", "yes", "no", None, None, "B", "B", "dev"]
    assert len(rows) == 16
    openpyxl = pytest.importorskip("openpyxl")
    ws = openpyxl.load_workbook(path).active
    assert [c.value for c in ws[1]] == rows[0] and [c.value for c in ws[2]] == rows[1]


def test_test_split_without_answers_only_writes_submission(tmp_path):
    tsv = tmp_path / "mmbench_test.tsv"
    tsv.write_text("index\tquestion\thint\tA\tB\timage\tcategory\n0\tQ?\t\tx\ty\t\tc\n")
    ans = tmp_path / "a.jsonl"
    ans.write_text(json.dumps({"question_id": 0, "text": "A"}) + "\n")
    out = mmbench.score_files(ans, annotations=tsv, submission=tmp_path / "up.xlsx")
    assert "circular_accuracy" not in out and out["coverage"]["expected"] == 1
    assert read_xlsx(tmp_path / "up.xlsx") == [
        ["index", "question", "A", "B", "prediction"],
        [0, "Q?", "x", "y", "A"],
    ]


def test_an_empty_answer_cell_is_named_not_silently_unscored(tmp_path, capsys):
    """A dev TSV with one empty 'answer' cell: python -m evaluation.score exits 1 naming file and line."""
    from evaluation.score import main

    tsv, ans = _files(tmp_path)
    lines = tsv.read_text().splitlines()
    header = lines[0].split("\t")
    cells = lines[3].split("\t")
    cells[header.index("answer")] = ""
    lines[3] = "\t".join(cells)
    tsv.write_text("\n".join(lines) + "\n")
    rc = main(["mmbench", "--answers", str(ans), "--annotations", str(tsv)])
    err = capsys.readouterr().err
    assert rc == 1 and f"{tsv}:4" in err and "empty 'answer' cell" in err
