"""The comparison report: reference rows, headline percentages, avg, markdown/JSON files."""

import json
import os
import re
from pathlib import Path

import pytest

from evaluation.tasks import PAPER_BENCHMARKS
from evaluation.report import (
    REFERENCE_ROWS,
    build_report,
    headline_value,
    load_reports,
    render_markdown,
    run_row,
    write_report,
)

SAN_DOC = Path(__file__).resolve().parents[2] / "docs" / "san.md"


def _results(scale=1.0, benchmarks=PAPER_BENCHMARKS):
    """Score-like dicts whose headline metric is 0.5 * scale (0.6 for easyvqa)."""
    out = {}
    for b in benchmarks:
        from evaluation.tasks import get_benchmark

        key = get_benchmark(b).headline
        out[b] = {"benchmark": b, "headline": key, key: 0.6 if b == "easyvqa" else 0.5 * scale}
    return out


def test_reference_rows_are_docs_san_section_5():
    text = SAN_DOC.read_text().split("## 5.")[1].split("\n## ")[0]
    rows = [line.strip("|").split("|") for line in text.splitlines() if re.match(r"\| [^-m]", line)]
    parsed = [(cells[0].strip(), [float(c) for c in cells[1:]]) for cells in rows]
    ours = [(r["name"], [r["values"][b] for b in PAPER_BENCHMARKS] + [r["avg"]]) for r in REFERENCE_ROWS]
    assert parsed == ours


def test_reference_avg_is_the_mean_up_to_rounding():
    for r in REFERENCE_ROWS:
        mean = sum(r["values"].values()) / 7
        assert abs(mean - r["avg"]) <= 0.1, r["name"]  # SAN+DoRA prints 68.9 for 68.99


def test_headline_values():
    assert headline_value("pope", {"headline": "f1_mean", "f1_mean": 0.859}) == pytest.approx(85.9)
    assert headline_value("mmbench", {"circular_accuracy": 0.643}) == pytest.approx(
        64.3
    )  # key from the module
    assert (
        headline_value("vqav2", {"headline": "accuracy", "n_questions": 3}) is None
    )  # test-dev: no accuracy
    assert headline_value("gqa", None) is None


def test_run_rows_and_avg():
    full = run_row("ours", _results())
    assert full["values"] == {b: pytest.approx(50.0) for b in PAPER_BENCHMARKS} and full[
        "avg"
    ] == pytest.approx(50.0)
    partial = run_row("cpu", _results(benchmarks=("gqa", "easyvqa")))
    assert partial["avg"] is None and partial["values"]["easyvqa"] == pytest.approx(60.0)
    with pytest.raises(ValueError, match="unknown benchmark"):
        run_row("x", {"nope": {}})


def test_build_and_render_markdown():
    rep = build_report({"SAN+DoRA (ours)": _results(), "cpu smoke": _results(benchmarks=("easyvqa",))})
    assert rep["columns"] == [*PAPER_BENCHMARKS, "easyvqa"]
    assert [r["source"] != "run" for r in rep["rows"]] == [True] * 5 + [False] * 2
    md = render_markdown(rep)
    lines = md.splitlines()
    assert (
        lines[2] == "| method | VQAv2 | GQA | VizWiz | SQA-IMG | TextVQA | POPE | MMBench | avg | easy-vqa |"
    )
    assert "| full fine-tune (paper) | 78.5 | 61.9 | 50.0 | 66.8 | 58.2 | 85.9 | 64.3 | 66.5 | – |" in lines
    assert "| SAN+DoRA (ours) | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | – |" in lines
    assert "| cpu smoke | – | – | – | – | – | – | – | – | 60.0 |" in lines
    no_ref = build_report({"a": _results()}, reference=False)
    assert len(no_ref["rows"]) == 1 and no_ref["columns"] == list(PAPER_BENCHMARKS)


def test_write_and_load_reports(tmp_path):
    for run in ("run1", "run2"):
        paths = write_report(build_report({"ours": _results(0.8 if run == "run1" else 1.0)}), tmp_path / run)
        assert paths["json"].is_file() and paths["markdown"].read_text().startswith("# ")
        assert sorted(os.listdir(tmp_path / run)) == ["report.json", "report.md"]  # no temp files
    merged = load_reports(tmp_path)
    runs = [r for r in merged["rows"] if r["source"] == "run"]
    assert [r["name"] for r in runs] == ["ours", "ours (run2)"]
    assert runs[0]["values"]["gqa"] == pytest.approx(40.0) and len(merged["rows"]) == 7
    assert load_reports(str(tmp_path / "run*" / "report.json"), reference=False)["rows"][0]["name"] == "ours"
    (tmp_path / "bad.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not a llava-san/report/v1 report"):
        load_reports(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        load_reports(tmp_path / "missing" / "*.json")


def test_plot_report(monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    from evaluation.report import plot_report

    fig = plot_report(build_report({"ours": _results()}))
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["VQAv2", "GQA", "VizWiz", "SQA-IMG", "TextVQA", "POPE", "MMBench", "avg"]
    assert len(fig.axes[0].patches) == 6  # five paper rows + ours
