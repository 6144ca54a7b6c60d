"""The comparison table: the paper's reference rows beside our runs.

A report belongs to one *suite* (:data:`SUITES`), the paper table its runs compare with, chosen from
the runs' benchmarks (:attr:`Task.suite`):

* ``llava``: rows are methods, columns the seven LLaVA-1.5 benchmarks in the paper's order (VQAv2,
  GQA, VizWiz, SQA-IMG, TextVQA, POPE, MMBench), then ``avg``, then any other benchmark a run has
  (easy-vqa). A cell is the benchmark's headline metric as a percentage (``100 *`` the fraction
  ``score`` returns): VQA accuracy, GQA accuracy, ScienceQA IMG accuracy, POPE mean F1 over the
  three splits, MMBench circular accuracy.
* ``commonsense``: the eight LLM-Adapters benchmarks (BoolQ, PIQA, SIQA, HellaSwag, WinoGrande,
  ARC-e, ARC-c, OBQA), accuracy in %, when every benchmark of the runs is a commonsense one.

``avg`` is the mean of the suite's columns, only when all are present (a partial mean is not
comparable with the paper's).

A report is a plain JSON-able dict::

    {"schema": "llava-san/report/v1", "suite": "llava"|"commonsense", "title": str,
     "columns": [benchmark names...], "titles": {name: column title}, "rows": [{"name", "source",
     "values": {name: pct|None}, "avg": pct|None, "notes": str, "metrics": {name: score dict}}]}

(a report without ``suite`` is a ``llava`` one).

:func:`write_report` stores it as ``report.json`` + ``report.md`` (atomically).
"""

from __future__ import annotations

import copy
import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from evaluation.files import read_json, write_json, write_text
from evaluation.tasks import BENCHMARKS, COMMONSENSE_BENCHMARKS, PAPER_BENCHMARKS, get_benchmark

__all__ = [
    "COMMONSENSE_REFERENCE_ROWS",
    "COMMONSENSE_SOURCE",
    "SUITES",
    "Suite",
    "REFERENCE_ROWS",
    "REFERENCE_SOURCE",
    "SCHEMA",
    "build_report",
    "headline_value",
    "load_reports",
    "plot_report",
    "reference_rows",
    "render_markdown",
    "run_row",
    "suite_of",
    "write_report",
]

SCHEMA = "llava-san/report/v1"
REFERENCE_SOURCE = "paper: SAN, Table 3 (LLaVA-1.5-7B)"

#: ``docs/san.md`` §5, as printed (``avg`` is the paper's own column).
REFERENCE_ROWS: tuple[dict[str, Any], ...] = tuple(
    {
        "name": name,
        "values": dict(zip(PAPER_BENCHMARKS, values)),
        "avg": avg,
    }
    for name, values, avg in (
        ("full fine-tune", (78.5, 61.9, 50.0, 66.8, 58.2, 85.9, 64.3), 66.5),
        ("LoRA-128", (79.1, 62.9, 47.8, 68.4, 58.2, 86.4, 66.1), 67.0),
        ("DoRA-128", (78.6, 62.9, 52.2, 69.9, 57.0, 87.2, 66.1), 67.7),
        ("SAN+LoRA", (79.2, 63.4, 51.9, 69.8, 58.3, 86.8, 66.6), 68.0),
        ("SAN+DoRA", (79.2, 64.4, 54.5, 71.1, 58.3, 88.0, 67.4), 68.9),
    )
)


#: Commonsense reference rows, as printed in ``NVlabs/DoRA`` ``commonsense_reasoning/README.md`` (rank
#: 32; the DoRA code is the one LLM-Adapters-style evaluation the SAN paper's LLaMA table follows).
#: The SAN paper's own Table 2 rows could not be read from a stored copy of the paper, so they are not
#: transcribed here (no number is written from memory); add them beside these when checked.
COMMONSENSE_SOURCE = "NVlabs/DoRA commonsense_reasoning/README.md (r=32; SAN Table 2 rows not transcribed)"
COMMONSENSE_REFERENCE_ROWS: tuple[dict[str, Any], ...] = tuple(
    {"name": name, "values": dict(zip(COMMONSENSE_BENCHMARKS, values)), "avg": avg}
    for name, values, avg in (
        ("LLaMA-7B LoRA r32", (67.5, 80.8, 78.2, 83.4, 80.4, 78.0, 62.6, 79.1), 76.3),
        ("LLaMA-7B DoRA r32", (69.7, 83.4, 78.6, 87.2, 81.0, 81.9, 66.2, 79.2), 78.4),
        ("LLaMA2-7B LoRA r32", (69.8, 79.9, 79.5, 83.6, 82.6, 79.8, 64.7, 81.0), 77.6),
        ("LLaMA2-7B DoRA r32", (71.8, 83.7, 76.0, 89.1, 82.6, 83.7, 68.2, 82.4), 79.7),
        ("LLaMA3-8B LoRA r32", (70.8, 85.2, 79.9, 91.7, 84.3, 84.2, 71.2, 79.0), 80.8),
        ("LLaMA3-8B DoRA r32", (74.6, 89.3, 79.9, 95.5, 85.6, 90.5, 80.4, 85.8), 85.2),
    )
)


@dataclass(frozen=True)
class Suite:
    """A paper table: its benchmark columns (in order), reference rows and their source, the
    report's default title, the row label of reference rows and the note under the table."""

    columns: tuple[str, ...]
    rows: tuple[dict[str, Any], ...]
    source: str
    title: str
    label: str
    cells: str


SUITES: dict[str, Suite] = {
    "llava": Suite(PAPER_BENCHMARKS, REFERENCE_ROWS, REFERENCE_SOURCE, "LLaVA-1.5-7B: paper vs. ours", "paper",
                   "Cells are headline metrics in %: VQA accuracy (VQAv2, VizWiz, TextVQA), GQA accuracy, "
                   "ScienceQA IMG accuracy, POPE mean F1 of the three splits, MMBench circular accuracy; "
                   "avg = mean of the seven (only when all are present)."),
    "commonsense": Suite(COMMONSENSE_BENCHMARKS, COMMONSENSE_REFERENCE_ROWS, COMMONSENSE_SOURCE,
                         "LLaMA commonsense reasoning: reference vs. ours", "DoRA repo",
                         "Cells are accuracy in % (LLM-Adapters' commonsense_evaluate.py: Alpaca prompt, "
                         "4 beams, first regex match); avg = mean of the eight (only when all are present)."),
}


def suite_of(benchmarks: Iterable[str]) -> str:
    """``"commonsense"`` when every benchmark given is a commonsense one, else ``"llava"``."""
    names = list(benchmarks)
    kinds = {get_benchmark(b).suite for b in names}
    return "commonsense" if names and kinds == {"commonsense"} else "llava"


def reference_rows(suite: str = "llava") -> list[dict[str, Any]]:
    """Fresh copies of the suite's reference rows, with ``source``, ``notes`` and empty ``metrics``."""
    ref = SUITES[suite]
    return [{**copy.deepcopy(r), "source": ref.source, "notes": "", "metrics": {}} for r in ref.rows]


def headline_value(benchmark: str, metrics: Mapping[str, Any] | None) -> float | None:
    """``100 *`` the headline metric of a score result (None when absent)."""
    if not metrics:
        return None
    key = metrics.get("headline") or get_benchmark(benchmark).headline
    value = metrics.get(key)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return 100.0 * float(value)


def _avg(values: Mapping[str, float | None]) -> float | None:
    vals = [values.get(b) for b in SUITES[suite_of(values)].columns]
    if any(v is None for v in vals):
        return None
    return sum(vals) / len(vals)


def run_row(
    name: str, results: Mapping[str, Mapping[str, Any]], *, notes: str = "", source: str = "run"
) -> dict[str, Any]:
    """A row for one run: ``results`` maps benchmark name -> the dict ``score`` returned."""
    for b in results:
        get_benchmark(b)  # unknown names raise
    values = {b: headline_value(b, m) for b, m in results.items()}
    return {
        "name": name,
        "source": source,
        "values": values,
        "avg": _avg(values),
        "notes": notes,
        "metrics": {b: dict(m) for b, m in results.items()},
    }


def _columns(rows: Iterable[Mapping[str, Any]], suite: str) -> list[str]:
    present = {b for r in rows for b in r.get("values", {})}
    columns = SUITES[suite].columns
    extras = [b for b in BENCHMARKS if b in present and b not in columns]
    return list(columns) + extras


def build_report(
    runs: Mapping[str, Mapping[str, Mapping[str, Any]]] | Sequence[Mapping[str, Any]],
    *,
    reference: bool = True,
    title: str | None = None,
) -> dict[str, Any]:
    """The report dict: the suite's reference rows (unless ``reference=False``) then ours.

    ``runs`` is ``{run name: {benchmark: score result}}`` or a list of rows from :func:`run_row`. The
    suite (:func:`suite_of`) is the runs' benchmarks'; ``title`` defaults to the suite's.
    """
    if isinstance(runs, Mapping):
        ours = [run_row(name, results) for name, results in runs.items()]
    else:
        ours = [dict(r) for r in runs]
    suite = suite_of(b for r in ours for b in r.get("values", {}))
    rows = (reference_rows(suite) if reference else []) + ours
    columns = _columns(rows, suite)
    titles = {b: get_benchmark(b).title for b in columns}
    return {"schema": SCHEMA, "suite": suite, "title": title or SUITES[suite].title, "columns": columns,
            "titles": titles, "rows": rows}


def _fmt(v: float | None, digits: int) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def render_markdown(report: Mapping[str, Any], *, digits: int = 1) -> str:
    """The report as a markdown table (percentages with ``digits`` decimals, ``–`` when absent)."""
    cols = list(report["columns"])
    suite = SUITES[report.get("suite", "llava")]
    paper = [c for c in cols if c in suite.columns]
    extra = [c for c in cols if c not in suite.columns]
    head = ["method", *(report["titles"][c] for c in paper), "avg", *(report["titles"][c] for c in extra)]
    lines = [
        f"# {report.get('title', 'Results')}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in report["rows"]:
        name = r["name"] if r.get("source", "run") == "run" else f"{r['name']} ({suite.label})"
        cells = [
            name,
            *(_fmt(r["values"].get(c), digits) for c in paper),
            _fmt(r.get("avg"), digits),
            *(_fmt(r["values"].get(c), digits) for c in extra),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Reference rows: {suite.source}. {suite.cells}",
    ]
    notes = [f"- {r['name']}: {r['notes']}" for r in report["rows"] if r.get("notes")]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def write_report(
    report: Mapping[str, Any], out_dir: str | os.PathLike, *, stem: str = "report"
) -> dict[str, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` in ``out_dir`` (atomically); returns both paths."""
    out = Path(out_dir)
    md = render_markdown(report)  # render first: a bad report fails before anything is written
    paths = {
        "json": write_json(out / f"{stem}.json", report, indent=2),
        "markdown": write_text(out / f"{stem}.md", md),
    }
    return paths


def _expand(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    found: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found += sorted(p.rglob("report.json"))
        elif p.is_file():
            found.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(item), recursive=True))
            if not matches:
                raise FileNotFoundError(f"no report found at {item}")
            found += matches
    return found


def load_reports(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    reference: bool = True,
    title: str | None = None,
) -> dict[str, Any]:
    """Merge the run rows of saved reports (files, folders searched for ``report.json``, or globs)
    into one report with the paper's rows first. Run names are kept; a name seen in several reports
    is suffixed with its folder."""
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    files = _expand(paths)
    if not files:
        raise FileNotFoundError(f"no report.json under {paths}")
    for f in files:
        rep = read_json(f)
        if not isinstance(rep, dict) or rep.get("schema") != SCHEMA:
            raise ValueError(f"{f}: not a {SCHEMA} report")
        for r in rep["rows"]:
            if r.get("source", "run") != "run":
                continue
            r = dict(r)
            if r["name"] in seen:
                r["name"] = f"{r['name']} ({f.parent.name})"
            seen.add(r["name"])
            rows.append(r)
    return build_report(rows, reference=reference, **({"title": title} if title else {}))


def plot_report(report: Mapping[str, Any], *, columns: Sequence[str] | None = None, ncols: int = 4):
    """One horizontal bar chart per benchmark (and ``avg``): a bar per row, paper rows in grey.
    Returns the matplotlib ``Figure`` (matplotlib is imported here, not at module import)."""
    import matplotlib.pyplot as plt

    suite = SUITES[report.get("suite", "llava")]
    paper = [c for c in report["columns"] if c in suite.columns]
    cols = list(columns or [*paper, "avg", *(c for c in report["columns"] if c not in suite.columns)])
    rows = report["rows"]
    nrows = -(-len(cols) // ncols)
    fig, axes = plt.subplots(
        nrows,
        min(ncols, len(cols)),
        figsize=(4 * min(ncols, len(cols)), 0.35 * len(rows) * nrows + 1.5),
        squeeze=False,
    )
    names = [r["name"] if r.get("source", "run") == "run" else f"{r['name']} ({suite.label})" for r in rows]
    colors = ["tab:blue" if r.get("source", "run") == "run" else "lightgray" for r in rows]
    for ax, col in zip(axes.flat, cols):
        vals = [(r.get("avg") if col == "avg" else r["values"].get(col)) for r in rows]
        ax.barh(range(len(rows)), [v if v is not None else 0.0 for v in vals], color=colors)
        ax.set_yticks(range(len(rows)), names if ax.get_subplotspec().is_first_col() else [""] * len(rows))
        ax.invert_yaxis()
        ax.set_title("avg" if col == "avg" else report["titles"].get(col, col))
        ax.set_xlabel("%")
        for i, v in enumerate(vals):
            ax.text(
                v if v is not None else 0.0, i, " –" if v is None else f" {v:.1f}", va="center", fontsize=7
            )
    for ax in list(axes.flat)[len(cols) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig
