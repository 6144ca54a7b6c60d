"""``python -m evaluation.study run|report|plan`` -- see :mod:`evaluation.study`.

    python -m evaluation.study run --study full            # every missing job, 2 at a time, then the report
    python -m evaluation.study run --study full --regime pretrained
    python -m evaluation.study report --study full         # summary.json + summary.md from result files
    python -m evaluation.study plan --study full           # the jobs and their overrides, nothing run
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from .report import write_report
from .runner import StudyJobError, StudyRunner
from .spec import load_study


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evaluation.study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("run", "report", "plan"))
    ap.add_argument("--study", default="full", help="conf/study/<name>.yaml or a path (default: full)")
    ap.add_argument("--regime", action="append", help="only this regime (repeatable)")
    ap.add_argument("--workers", type=int, default=2, help="jobs at a time (default 2: one per core)")
    ap.add_argument("--results-dir", help="override the study file's results_dir")
    ap.add_argument("--runs-dir", help="override the study file's runs_dir (run folders)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    study = load_study(args.study)
    if args.results_dir or args.runs_dir:
        from dataclasses import replace

        study = replace(study, results_dir=args.results_dir or study.results_dir,
                        runs_dir=args.runs_dir or study.runs_dir)
    runner = StudyRunner(study, workers=args.workers, regimes=args.regime)
    if args.command == "plan":
        for regime in runner.regimes:
            for job in runner.grid_jobs(regime):
                print(job.key, " ".join(job.overrides))
            for arm in regime.arms:
                for seed in arm.seeds or regime.seeds:
                    print(f"{regime.name}/{arm.name}/seed{seed}", " ".join(arm.overrides), f"lr=<{arm.family}>")
        return 0
    if args.command == "run":
        t0 = time.perf_counter()
        try:
            ran = runner.run()
        except StudyJobError as err:
            print(f"study {study.name}: {err}", file=sys.stderr)
            return 1
        print(f"study {study.name}: {len(ran)} jobs run in {time.perf_counter() - t0:.0f} s")
    js, md = write_report(study)
    print(md.read_text())
    print(f"written: {js} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
