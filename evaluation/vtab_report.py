"""``python -m evaluation.vtab_report RUN_OR_MULTIRUN_DIR... [--output report.md]``: VTAB-1k top-1 per task,
the three group means and both averages, with the SAN paper's Table 1 rows beside ours.

Each run folder is a ``python -m train experiment=vit_b16_vtab_<method> data.task=<task>`` run: its
``config.yaml`` names the task (``data.task``) and the method (``peft.ssf.method``, or the recipe's
``_target_`` for the others) and its ``metrics.json`` holds ``test/top1``. A folder is searched
recursively, so a multirun folder (``-m data.task=cifar,caltech101,...``) works as it is. Two runs of the
same method and task are refused (say which one to report by passing folders).

Averages (the VTAB-1k protocol): "mean of 19" over the tasks present, and "mean of groups", the mean
of the Natural / Specialized / Structured means (the paper's "Mean Acc."). A group with a missing task
has no mean (shown as ``-``), and neither has the mean of groups then.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from llava_san.vision.data import VTAB_GROUPS

#: top-1 % of ViT-B/16 IN-21k per VTAB-1k task (the SAN paper's per-task table)
PAPER_ROWS: dict[str, dict[str, float]] = {
    "SSF (paper)": {
        "cifar": 69.0, "caltech101": 92.6, "oxford_flowers102": 99.4, "oxford_iiit_pet": 91.8, "dtd": 75.1,
        "sun397": 52.9, "svhn": 90.2, "eurosat": 95.9, "patch_camelyon": 87.4, "diabetic_retinopathy": 75.5,
        "resisc45": 87.4, "clevr_count": 75.9, "clevr_dist": 62.3, "dsprites_loc": 77.3, "dsprites_ori": 54.9,
        "smallnorb_azi": 29.5, "smallnorb_ele": 37.9, "dmlab": 53.3, "kitti": 80.6},
    "SAN+SSF (paper)": {
        "cifar": 74.3, "caltech101": 93.8, "oxford_flowers102": 99.7, "oxford_iiit_pet": 93.0, "dtd": 76.4,
        "sun397": 53.4, "svhn": 91.8, "eurosat": 97.7, "patch_camelyon": 88.1, "diabetic_retinopathy": 78.1,
        "resisc45": 90.6, "clevr_count": 82.4, "clevr_dist": 61.4, "dsprites_loc": 81.7, "dsprites_ori": 55.2,
        "smallnorb_azi": 30.3, "smallnorb_ele": 40.4, "dmlab": 54.5, "kitti": 82.1},
}
TASKS = [t for group in VTAB_GROUPS.values() for t in group]


def _method(config: dict[str, Any]) -> str:
    peft = config.get("peft") or {}
    ssf = peft.get("ssf") or {}
    if ssf.get("method"):
        return str(ssf["method"])
    return str(peft.get("_target_", "?")).rsplit(".", 1)[-1]


def collect(folders: Sequence[str | Path]) -> dict[str, dict[str, float]]:
    """method -> task -> top-1 % from the run folders under ``folders`` (errors name the folder)."""
    import yaml

    found: dict[str, dict[str, float]] = {}
    for root in folders:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist")
        for metrics_file in sorted(root.rglob("metrics.json")):
            run = metrics_file.parent
            config_file = run / "config.yaml"
            if not config_file.is_file():
                raise FileNotFoundError(f"{run}: metrics.json without config.yaml; "
                                        "not a python -m train run folder")
            config = yaml.safe_load(config_file.read_text())
            task = (config.get("data") or {}).get("task")
            if (config.get("data") or {}).get("source") != "vtab" or task not in TASKS:
                continue  # not a VTAB-1k run
            metrics = json.loads(metrics_file.read_text())
            if "test/top1" not in metrics:
                raise ValueError(f"{metrics_file} has no test/top1 (was evaluate_classification off?)")
            method = _method(config)
            if task in found.setdefault(method, {}):
                raise ValueError(f"two {method} runs of {task} (one is {run}); pass the folders to report")
            found[method][task] = 100.0 * float(metrics["test/top1"])
    return found


def summarise(row: dict[str, float]) -> dict[str, Optional[float]]:
    """Group means (only for complete groups), the mean over the tasks present and the mean of groups."""
    out: dict[str, Optional[float]] = {}
    for group, tasks in VTAB_GROUPS.items():
        values = [row[t] for t in tasks if t in row]
        out[group] = sum(values) / len(values) if len(values) == len(tasks) else None
    present = [row[t] for t in TASKS if t in row]
    out["mean_of_tasks"] = sum(present) / len(present) if present else None
    groups = [out[g] for g in VTAB_GROUPS]
    out["mean_of_groups"] = None if any(g is None for g in groups) else sum(groups) / len(groups)
    return out


def _cell(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1f}"


def markdown(ours: dict[str, dict[str, float]]) -> str:
    """One table: the paper's rows, then ours; columns are the tasks present in ours (all 19 if none)."""
    tasks = [t for t in TASKS if any(t in row for row in ours.values())] or TASKS
    head = ["method", *tasks, *VTAB_GROUPS, "mean of tasks", "mean of groups"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = {**PAPER_ROWS, **{f"{m} (ours)": r for m, r in sorted(ours.items())}}
    for name, row in rows.items():
        s = summarise(row)
        lines.append("| " + " | ".join([name, *(_cell(row.get(t)) for t in tasks),
                                        *(_cell(s[g]) for g in VTAB_GROUPS),
                                        _cell(s["mean_of_tasks"]), _cell(s["mean_of_groups"])]) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.vtab_report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", help="run folders or multirun folders")
    parser.add_argument("--output", help="also write the table (and a JSON twin, .json) here")
    args = parser.parse_args(argv)
    try:
        ours = collect(args.folders)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    table = markdown(ours)
    print(table)
    if args.output:
        from llava_san.utils.atomic import atomic_file

        with atomic_file(args.output) as f:
            f.write(table + "\n")
        with atomic_file(Path(args.output).with_suffix(".json")) as f:
            json.dump({"ours": ours, "paper": PAPER_ROWS,
                       "summary": {m: summarise(r) for m, r in {**PAPER_ROWS, **ours}.items()}}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
