"""``summary.json`` and ``summary.md`` from a study's per-run result files (nothing else is read).

``summary.json``::

    {"study": ..., "metric": ..., "regimes": {"<regime>": {
        "lr_choice": {...}, "arms": {"<arm>": {
            "n_seeds", "seeds", "accuracy_mean", "accuracy_std", "accuracy_by_seed",
            "by_type": {"<type>": {"mean", "std"}},
            "diff_vs_parent": {"parent", "mean", "ci95_low", "ci95_high", "by_seed", "n_pairs"},  # SAN arms
            "gamma_final": {"<type>": {"mean", "std", "clamped", "ema_mean"}},   # seed means, last logged step
            "gamma_similarity": {"same_type_next_block", "other_type_same_block", ...}}}}}}

Accuracy is the study's metric (``metrics.json`` key, a fraction); per-type keys are
``test/easyvqa_<type>_accuracy``. Differences are paired by seed: only seeds both arms ran count.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Optional

from llava_san.utils.atomic import atomic_file

from .spec import Study
from .stats import mean_std, paired_bootstrap_ci

TYPE_KEY = re.compile(r"^test/easyvqa_(?P<t>colour|shape|yes_no)_accuracy$")


def load_runs(results_dir: str | Path) -> dict[str, dict[str, dict[int, dict]]]:
    """``{regime: {arm: {seed: result record}}}`` of the comparison runs (grid runs left out).

    Only ``runs/<regime>/`` counts: an earlier protocol's runs kept beside it under another folder name
    (``runs/scratch_3500steps/``) are history, not results of the current protocol."""
    out: dict[str, dict[str, dict[int, dict]]] = {}
    for path in sorted(Path(results_dir, "runs").glob("*/*/seed*.json")):
        record = json.loads(path.read_text())
        if record.get("grid") or path.parent.parent.name != record["regime"]:
            continue
        out.setdefault(record["regime"], {}).setdefault(record["arm"], {})[int(record["seed"])] = record
    return out


def _mean_of(dicts: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for d in dicts for k in d})
    out = {}
    for k in keys:
        vals = [d[k] for d in dicts if d.get(k) is not None and not math.isnan(d[k])]
        if vals:
            out[k] = sum(vals) / len(vals)
    return out


def _gamma_final(records: list[dict]) -> dict[str, dict[str, float]]:
    per_type: dict[str, list[dict[str, float]]] = {}
    for r in records:
        for mtype, curve in (r.get("gamma_curves") or {}).items():
            if curve["step"]:
                per_type.setdefault(mtype, []).append({s: curve[s][-1] for s in ("mean", "std", "clamped", "ema_mean")})
    return {t: _mean_of(v) for t, v in sorted(per_type.items())}


def summarize_arm(records: dict[int, dict], metric: str) -> dict[str, Any]:
    seeds = sorted(records)
    acc = [float(records[s]["metrics"][metric]) for s in seeds]
    m, sd = mean_std(acc)
    by_type: dict[str, dict[str, Optional[float]]] = {}
    for key in sorted(records[seeds[0]]["metrics"]):
        hit = TYPE_KEY.match(key)
        if hit:
            tm, tsd = mean_std([float(records[s]["metrics"][key]) for s in seeds])
            by_type[hit["t"].replace("_", "-")] = {"mean": tm, "std": tsd}
    out: dict[str, Any] = {"n_seeds": len(seeds), "seeds": seeds, "accuracy_mean": m, "accuracy_std": sd,
                           "accuracy_by_seed": acc, "by_type": by_type, "lr": records[seeds[0]].get("lr"),
                           "train_s_mean": mean_std([float(records[s]["metrics"].get("time/train_s", 0.0))
                                                    for s in seeds])[0]}
    gamma = _gamma_final([records[s] for s in seeds])
    if gamma:
        out["gamma_final"] = gamma
        out["gamma_similarity"] = _mean_of([records[s].get("gamma_similarity") or {} for s in seeds])
    return out


def paired_diff(arm: dict[int, dict], parent: dict[int, dict], metric: str, samples: int) -> dict[str, Any]:
    seeds = sorted(set(arm) & set(parent))
    if not seeds:
        raise ValueError("no seed in common with the parent arm")
    diffs = [float(arm[s]["metrics"][metric]) - float(parent[s]["metrics"][metric]) for s in seeds]
    lo, hi = paired_bootstrap_ci(diffs, samples=samples)
    return {"mean": sum(diffs) / len(diffs), "ci95_low": lo, "ci95_high": hi, "by_seed": diffs,
            "n_pairs": len(seeds)}


def summarize(study: Study, results_dir: Optional[str | Path] = None) -> dict[str, Any]:
    """The ``summary.json`` object (module docstring) from the result files under ``results_dir``."""
    results_dir = Path(results_dir or study.results_dir)
    runs = load_runs(results_dir)
    summary: dict[str, Any] = {"study": study.name, "metric": study.metric, "regimes": {}}
    for regime in study.regimes:
        arms_runs = runs.get(regime.name, {})
        if not arms_runs:
            continue
        choice_path = results_dir / "runs" / regime.name / "lr_choice.json"
        node: dict[str, Any] = {"lr_choice": json.loads(choice_path.read_text()) if choice_path.is_file()
                                else {k: {"lr": v, "rule": "fixed in the study file"} for k, v in regime.lr.items()},
                                "arms": {}}
        for arm in regime.arms:
            if arm.name not in arms_runs:
                continue
            entry = summarize_arm(arms_runs[arm.name], study.metric)
            entry["family"] = arm.family
            if arm.parent is not None and arm.parent in arms_runs:
                entry["diff_vs_parent"] = {"parent": arm.parent, **paired_diff(
                    arms_runs[arm.name], arms_runs[arm.parent], study.metric, study.bootstrap_samples)}
            node["arms"][arm.name] = entry
        summary["regimes"][regime.name] = node
    return summary


def _pct(x: Optional[float], signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def summary_markdown(summary: dict[str, Any]) -> str:
    """One table per regime: accuracy mean ± std (percent), per type, and the paired difference to the
    parent arm with its 95 % bootstrap interval."""
    lines = [f"# SAN study `{summary['study']}` (metric `{summary['metric']}`, percent)", ""]
    for rname, node in summary["regimes"].items():
        arms = node["arms"]
        types = sorted({t for a in arms.values() for t in a["by_type"]})
        lrs = ", ".join(f"{k} {v['lr']:g}" for k, v in sorted(node["lr_choice"].items()))
        lines += [f"## Regime `{rname}`", "", f"Learning rates: {lrs}.", "",
                  "| arm | seeds | accuracy | " + " | ".join(types) + " | vs parent (95 % CI) |",
                  "|---|---|---|" + "---|" * len(types) + "---|"]
        for name, a in arms.items():
            sd = a["accuracy_std"]
            acc = f"{_pct(a['accuracy_mean'])} ± {_pct(sd)}" if sd is not None else _pct(a["accuracy_mean"])
            per = " | ".join(_pct(a["by_type"].get(t, {}).get("mean")) for t in types)
            d = a.get("diff_vs_parent")
            vs = (f"{_pct(d['mean'], True)} [{_pct(d['ci95_low'], True)}, {_pct(d['ci95_high'], True)}] vs "
                  f"{d['parent']}" if d else "")
            lines.append(f"| {name} | {a['n_seeds']} | {acc} | {per} | {vs} |")
        sims = {n: a["gamma_similarity"] for n, a in arms.items() if a.get("gamma_similarity")}
        if sims:
            lines += ["", "γ̄ − 1 cosine similarity (Fig. 8 analogue): same type in consecutive blocks vs "
                      "different types in one block", "", "| arm | same type, next block | other type, same block |",
                      "|---|---|---|"]
            for n, s in sims.items():
                f = lambda v: "–" if v is None else f"{v:.2f}"
                lines.append(f"| {n} | {f(s.get('same_type_next_block'))} | {f(s.get('other_type_same_block'))} |")
        lines.append("")
    return "\n".join(lines)


def write_report(study: Study, results_dir: Optional[str | Path] = None) -> tuple[Path, Path]:
    """Write ``summary.json`` and ``summary.md`` into ``results_dir`` (atomically); return their paths."""
    results_dir = Path(results_dir or study.results_dir)
    summary = summarize(study, results_dir)
    if not summary["regimes"]:
        raise FileNotFoundError(f"{results_dir}/runs holds no result file of study {study.name!r}: "
                                f"run `python -m evaluation.study run --study {study.name}` first")
    js, md = results_dir / "summary.json", results_dir / "summary.md"
    with atomic_file(js, "w") as fh:
        json.dump(summary, fh, indent=1)
        fh.write("\n")
    with atomic_file(md, "w") as fh:
        fh.write(summary_markdown(summary))
    return js, md
