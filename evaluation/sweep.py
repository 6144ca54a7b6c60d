"""Collect a Hydra multirun (e.g. ``peft`` x ``seed``) into mean +- std per configuration.

``python -m evaluation.sweep MULTIRUN_DIR`` prints the table (:func:`main`).

A multirun folder holds one sub-folder per job, each with ``.hydra/overrides.yaml`` (the job's
command-line overrides, a YAML list of ``key=value``), ``.hydra/config.yaml`` and the job's
``metrics.json`` (any JSON object; nested dicts are flattened to ``a/b`` keys, non-numeric leaves
dropped). Jobs are grouped by their overrides other than the seed; each metric gets the mean, the
sample standard deviation (``ddof=1``; ``None`` with a single seed) and the count.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from evaluation.files import DataFileError, read_json

__all__ = [
    "DEFAULT_METRICS",
    "Job",
    "aggregate",
    "collect_multirun",
    "flatten_metrics",
    "load_job",
    "main",
    "parse_overrides",
    "plot_sweep",
    "sweep_markdown",
]

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One job of a multirun."""

    path: Path
    overrides: dict[str, str]
    metrics: dict[str, float]
    config: dict[str, Any] | None = field(default=None, repr=False)

    def seed(self, seed_key: str = "seed") -> Any:
        """The seed from the overrides, else from ``config.yaml`` (None when neither has it)."""
        if seed_key in self.overrides:
            return self.overrides[seed_key]
        node: Any = self.config or {}
        for part in seed_key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        return node


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
    """``["peft=lora", "+x=1", "seed=0"]`` -> ``{"peft": "lora", "x": "1", "seed": "0"}``
    (``+``/``++``/``~`` prefixes dropped; a deletion ``~key`` maps to ``""``)."""
    out = {}
    for item in items:
        item = str(item)
        key, _, value = item.partition("=")
        out[key.lstrip("+~")] = value
    return out


def flatten_metrics(obj: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict as ``{"a/b": value}`` (bools and non-finite values dropped)."""
    out: dict[str, float] = {}
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_metrics(v, name + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[name] = float(v)
    return out


def _yaml(path: Path) -> Any:
    import yaml

    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_job(job_dir: str | os.PathLike, metrics_file: str = "metrics.json") -> Job:
    """Read one job folder (``.hydra/overrides.yaml``, optional ``.hydra/config.yaml``, metrics)."""
    job_dir = Path(job_dir)
    overrides = _yaml(job_dir / ".hydra" / "overrides.yaml") or []
    if not isinstance(overrides, list):
        raise DataFileError(f"{job_dir}/.hydra/overrides.yaml: expected a list of key=value")
    cfg_path = job_dir / ".hydra" / "config.yaml"
    config = _yaml(cfg_path) if cfg_path.is_file() else None
    metrics = read_json(job_dir / metrics_file)
    if not isinstance(metrics, Mapping):
        raise DataFileError(f"{job_dir / metrics_file}: expected a JSON object")
    return Job(job_dir, parse_overrides(overrides), flatten_metrics(metrics), config)


def _failure(job_dir: Path) -> str:
    """`` (FAILED: <exception>)`` for a job whose run left a ``FAILED`` marker (``train/marker.py``)."""
    marker = job_dir / "FAILED"
    if not marker.is_file():
        return ""
    lines = marker.read_text(encoding="utf-8", errors="replace").splitlines()
    return f" (FAILED: {lines[0] if lines else 'see its FAILED file'})"


def _job_order(p: Path) -> tuple:
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in p.parts)


def collect_multirun(
    root: str | os.PathLike, metrics_file: str = "metrics.json", *, strict: bool = False
) -> list[Job]:
    """Every job under ``root`` (folders with ``.hydra/overrides.yaml``), in job-number order. A job
    without ``metrics_file`` (failed or running) is skipped with a warning (naming the exception of a
    failed one), or raises if ``strict``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"multirun folder not found: {root}")
    jobs = []
    for ov in sorted(root.rglob(".hydra/overrides.yaml"), key=lambda p: _job_order(p.parent.parent)):
        job_dir = ov.parent.parent
        if not (job_dir / metrics_file).is_file():
            if strict:
                raise FileNotFoundError(f"{job_dir}: no {metrics_file}")
            log.warning("skipping %s: no %s%s", job_dir, metrics_file, _failure(job_dir))
            continue
        jobs.append(load_job(job_dir, metrics_file))
    if not jobs:
        raise FileNotFoundError(f"no job with {metrics_file} under {root}")
    return jobs


def aggregate(
    jobs: Sequence[Job],
    *,
    by: Sequence[str] | None = None,
    seed_key: str = "seed",
    metrics: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Group ``jobs`` by the override keys ``by`` (default: every override key except ``seed_key``)
    and summarise each metric: ``{"group": {key: value}, "n": jobs, "seeds": [...],
    "metrics": {name: {"mean", "std", "n"}}}``. Groups keep first-seen order."""
    if by is None:
        keys: list[str] = []
        for j in jobs:
            keys += [k for k in j.overrides if k != seed_key and k not in keys]
        by = keys
    groups: dict[tuple, list[Job]] = {}
    for j in jobs:
        groups.setdefault(tuple(j.overrides.get(k) for k in by), []).append(j)
    names = list(metrics) if metrics is not None else sorted({m for j in jobs for m in j.metrics})
    rows = []
    for gkey, members in groups.items():
        summary = {}
        for m in names:
            vals = [j.metrics[m] for j in members if m in j.metrics]
            if not vals:
                continue
            summary[m] = {
                "mean": statistics.fmean(vals),
                "std": statistics.stdev(vals) if len(vals) > 1 else None,
                "n": len(vals),
            }
        rows.append(
            {
                "group": dict(zip(by, gkey)),
                "n": len(members),
                "seeds": [j.seed(seed_key) for j in members],
                "metrics": summary,
            }
        )
    return rows


def _cell(stat: Mapping[str, Any] | None, scale: float, digits: int) -> str:
    if not stat:
        return "–"
    mean = f"{stat['mean'] * scale:.{digits}f}"
    return mean if stat["std"] is None else f"{mean} ± {stat['std'] * scale:.{digits}f}"


def sweep_markdown(
    rows: Sequence[Mapping[str, Any]],
    *,
    metrics: Sequence[str] | None = None,
    scale: float = 1.0,
    digits: int = 3,
) -> str:
    """Markdown table: one line per group, ``mean ± std`` per metric (``scale`` e.g. 100 for %)."""
    names = list(metrics) if metrics is not None else sorted({m for r in rows for m in r["metrics"]})
    keys = list(rows[0]["group"]) if rows else []
    head = [*keys, "n", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["group"].get(k)) for k in keys] + [str(r["n"])]
        cells += [_cell(r["metrics"].get(m), scale, digits) for m in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(rows: Sequence[Mapping[str, Any]], metric: str | None = None, *, scale: float = 1.0, ax=None):
    """Bar chart of one metric per group with ``std`` error bars (``metric`` None: the first metric
    name in sorted order); returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    if metric is None:
        names = sorted({m for r in rows for m in r["metrics"]})
        if not names:
            raise ValueError("no metric to plot")
        metric = names[0]

    if ax is None:
        fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows)), 3.5))
    else:
        fig = ax.figure
    labels = [", ".join(f"{v}" for v in r["group"].values()) or "all" for r in rows]
    stats = [r["metrics"].get(metric) for r in rows]
    means = [s["mean"] * scale if s else 0.0 for s in stats]
    errs = [(s["std"] or 0.0) * scale if s else 0.0 for s in stats]
    ax.bar(range(len(rows)), means, yerr=errs, capsize=4, color="tab:blue")
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric}: mean ± std over seeds")
    fig.tight_layout()
    return fig


#: Columns of ``python -m evaluation.sweep`` when ``--metrics`` is not given (those the jobs have).
DEFAULT_METRICS = (
    "test/easyvqa_accuracy",
    "test/easyvqa_blind_baseline",
    "test/commonsense_accuracy",
    "test/top1",
    "test/majority_baseline",
    "train/loss_first",
    "train/loss_last",
    "time/train_s",
)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m evaluation.sweep MULTIRUN_DIR [--metrics M ...] [--all] [--by KEY ...] [--scale S]``:
    print the sweep's markdown table (mean ± std over seeds per configuration)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m evaluation.sweep", description=main.__doc__)
    parser.add_argument("multirun_dir", help="a Hydra multirun folder (e.g. multirun/train/<time>)")
    parser.add_argument("--metrics", nargs="+",
                        help=f"columns (default: those of {list(DEFAULT_METRICS)} present)")
    parser.add_argument("--all", action="store_true", help="every numeric metric as a column")
    parser.add_argument("--by", nargs="+",
                        help="group by these override keys (default: those varying across jobs, "
                        "never the seed)")
    parser.add_argument("--seed-key", default="seed")
    parser.add_argument("--scale", type=float, default=1.0, help="e.g. 100 for percentages")
    parser.add_argument("--digits", type=int, default=3)
    parser.add_argument("--strict", action="store_true", help="fail on a job without metrics.json")
    args = parser.parse_args(argv)
    jobs = collect_multirun(args.multirun_dir, strict=args.strict)
    present = {m for j in jobs for m in j.metrics}
    if args.metrics:
        unknown = [m for m in args.metrics if m not in present]
        if unknown:
            parser.error(f"no job has {unknown}; available: {sorted(present)}")
        names = list(args.metrics)
    elif args.all:
        names = sorted(present)
    else:
        names = [m for m in DEFAULT_METRICS if m in present] or sorted(present)
    by = args.by
    if by is None:
        keys = list(dict.fromkeys(k for j in jobs for k in j.overrides if k != args.seed_key))
        by = [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1] or keys
    rows = aggregate(jobs, by=by, seed_key=args.seed_key, metrics=names)
    print(f"{len(jobs)} jobs in {args.multirun_dir}\n")
    print(sweep_markdown(rows, metrics=names, scale=args.scale, digits=args.digits), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
