"""Answer files: line-numbered errors, and missing / duplicate / unknown id reports."""

import json
import os

import pytest

from evaluation.answers import (
    Answer,
    AnswerFileError,
    AnswerSetError,
    as_answers,
    canonical_id,
    match_answers,
    read_answers,
)
from evaluation.files import atomic_write, iter_jsonl, write_json


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_read_answers_keeps_fields_and_lines(tmp_path):
    p = _write(
        tmp_path / "a.jsonl",
        [
            json.dumps({"question_id": 1, "prompt": "Q?", "text": "yes", "model_id": "m"}),
            "",
            json.dumps({"question_id": "x2", "text": "no"}),
        ],
    )
    a = read_answers(p)
    assert [(x.question_id, x.text, x.line) for x in a] == [(1, "yes", 1), ("x2", "no", 3)]
    assert a[0].prompt == "Q?" and a[0].record["model_id"] == "m" and a[1].prompt is None


@pytest.mark.parametrize(
    "bad,message",
    [
        ('{"question_id": 1, "text": "a"', r"a\.jsonl:2: invalid JSON"),
        ("[1, 2]", r"a\.jsonl:2: expected a JSON object"),
        ('{"text": "a"}', r"a\.jsonl:2: missing 'question_id'"),
        ('{"question_id": 3}', r"a\.jsonl:2: missing 'text'"),
        ('{"question_id": 3, "text": 5}', r"a\.jsonl:2: 'text' must be a string"),
        ('{"question_id": 1.5, "text": "a"}', r"a\.jsonl:2: question_id must be an int or a string"),
    ],
)
def test_malformed_line_gives_line_number(tmp_path, bad, message):
    p = _write(tmp_path / "a.jsonl", [json.dumps({"question_id": 0, "text": "ok"}), bad])
    with pytest.raises(AnswerFileError, match=message):
        read_answers(p)


def test_in_memory_answers_are_numbered():
    a = as_answers([{"question_id": 1, "text": "a"}, {"question_id": 2, "text": "b"}])
    assert [x.line for x in a] == [1, 2]
    with pytest.raises(AnswerFileError, match="answers:2: missing 'text'"):
        as_answers([{"question_id": 1, "text": "a"}, {"question_id": 2}])


def _answers(*ids):
    return [Answer(q, f"t{q}", i + 1) for i, q in enumerate(ids)]


def test_match_reports_missing_with_examples():
    with pytest.raises(AnswerSetError) as e:
        match_answers(_answers(1, 2), ["1", "2", "3", "4"])
    msg = str(e.value)
    assert "2 missing (e.g. '3', '4')" in msg and "--allow-missing" in msg
    assert e.value.coverage.missing == 2


def test_match_reports_unknown_with_lines():
    with pytest.raises(AnswerSetError, match=r"1 unknown \(e\.g\. '9' \(line 3\)\).*--allow-unknown"):
        match_answers(_answers(1, 2, 9), ["1", "2"])


def test_duplicates_always_raise_with_lines():
    with pytest.raises(AnswerSetError, match=r"1 duplicate \(e\.g\. '2' on lines 2, 3\)"):
        match_answers(_answers(1, 2, 2), ["1", "2"], allow_missing=True, allow_unknown=True)


def test_allowed_problems_are_reported_not_silent(caplog):
    m = match_answers(_answers(1, 9), ["1", "2"], allow_missing=True, allow_unknown=True)
    cov = m.coverage.as_dict()
    assert cov == {
        "expected": 2,
        "answered": 2,
        "missing": 1,
        "unknown": 1,
        "duplicates": 0,
        "missing_examples": ["'2'"],
        "unknown_examples": ["'9' (line 2)"],
    }
    assert m.one("2").text == "" and m.one("2").line is None  # missing -> empty output
    assert m.one("1").text == "t1"
    assert "1 missing" in caplog.text


def test_int_and_str_ids_are_the_same_question():
    assert canonical_id(5) == canonical_id("5") == "5"
    m = match_answers(_answers("5"), [canonical_id(5)])
    assert m.one("5").text == "t5"
    with pytest.raises(TypeError):
        canonical_id(True)


def test_multiplicity_for_repeated_keys():
    m = match_answers(_answers(1, 1), {"1": 2})
    assert len(m.by_key["1"]) == 2
    with pytest.raises(AnswerSetError, match="1 missing"):
        match_answers(_answers(1), {"1": 2})


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write("partial")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.json"]  # no temp file left
    with pytest.raises(ValueError):  # NaN refused before any file exists
        write_json(tmp_path / "new.json", {"x": float("nan")})
    assert not (tmp_path / "new.json").exists() and os.listdir(tmp_path) == ["out.json"]
    write_json(target, {"x": 1})
    assert json.loads(target.read_text()) == {"x": 1}


def test_iter_jsonl_skips_blank_lines(tmp_path):
    p = _write(tmp_path / "q.jsonl", ['{"a": 1}', "   ", '{"a": 2}'])
    assert [(n, o["a"]) for n, o in iter_jsonl(p)] == [(1, 1), (3, 2)]
