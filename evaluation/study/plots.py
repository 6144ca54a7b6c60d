"""Figures of the study from its committed files (``summary.json`` and the per-run result files)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from .report import load_runs


def plot_accuracy(summary: dict[str, Any], regime: str):
    """Bar chart of an arm's mean accuracy (percent) with its seeds as dots, and the paired difference
    to the parent with its 95 % bootstrap interval beside it. Returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    arms = summary["regimes"][regime]["arms"]
    names = list(arms)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 0.45 * len(names) + 1.5), sharey=True)
    for i, n in enumerate(names):
        a = arms[n]
        ax.barh(i, 100 * a["accuracy_mean"], color="tab:blue" if a.get("family") == "lora" else "tab:orange",
                alpha=0.6)
        ax.plot([100 * v for v in a["accuracy_by_seed"]], [i] * len(a["accuracy_by_seed"]), "k.", ms=4)
        d = a.get("diff_vs_parent")
        if d:
            bx.errorbar(100 * d["mean"], i, xerr=[[100 * (d["mean"] - d["ci95_low"])], [100 * (d["ci95_high"] - d["mean"])]],
                        fmt="o", color="k", capsize=3)
    lo = min(100 * min(arms[n]["accuracy_by_seed"]) for n in names)
    ax.set_xlim(max(0.0, math.floor(lo - 5)), None)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel(f"{summary['metric']} (%)")
    bx.axvline(0, color="grey", lw=0.8)
    bx.set_xlabel("paired difference to the parent arm (points, 95 % bootstrap CI)")
    fig.suptitle(f"SAN study `{summary['study']}`, regime {regime}")
    fig.tight_layout()
    return fig


def gamma_curve_means(results_dir: str | Path, regime: str, arm: str, stat: str = "mean") -> dict[str, tuple[list, list]]:
    """``{module type: (steps, seed-mean of stat)}`` from the per-run result files of one arm."""
    runs = load_runs(results_dir).get(regime, {}).get(arm, {})
    out: dict[str, tuple[list, list]] = {}
    for mtype in sorted({t for r in runs.values() for t in (r.get("gamma_curves") or {})}):
        curves = [r["gamma_curves"][mtype] for r in runs.values() if mtype in (r.get("gamma_curves") or {})]
        steps = curves[0]["step"]
        same = [c for c in curves if c["step"] == steps]
        out[mtype] = (steps, [sum(c[stat][i] for c in same) / len(same) for i in range(len(steps))])
    return out


def plot_gamma(results_dir: str | Path, regime: str, arms: Optional[list[str]] = None):
    """γ over training per module type (seed means): batch-γ mean, std and clamp rate, one row per arm."""
    import matplotlib.pyplot as plt

    runs = load_runs(results_dir).get(regime, {})
    arms = [a for a in (arms or sorted(runs)) if any(r.get("gamma_curves") for r in runs.get(a, {}).values())]
    stats = ("mean", "std", "clamped")
    fig, axes = plt.subplots(max(len(arms), 1), 3, figsize=(13, 2.6 * max(len(arms), 1)), squeeze=False)
    for row, arm in enumerate(arms):
        for col, stat in enumerate(stats):
            ax = axes[row][col]
            for mtype, (steps, values) in gamma_curve_means(results_dir, regime, arm, stat).items():
                ax.plot(steps, values, label=mtype.replace("_proj", ""))
            ax.set_title(f"{arm}: γ {stat}", fontsize=9)
            ax.set_xlabel("step")
    if arms:
        axes[0][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def load_summary(results_dir: str | Path) -> dict[str, Any]:
    """``summary.json`` of a study's results folder."""
    return json.loads((Path(results_dir) / "summary.json").read_text())
