"""Score a LLaVA answer file against a benchmark's official ground truth.

    python -m evaluation.score BENCHMARK --answers ANSWERS.jsonl [--questions Q] [--annotations A]
        [--split S] [--pid-splits P] [--convention C] [--submission PATH | --no-submission]
        [--allow-missing] [--allow-unknown] [--output METRICS.json]

Prints one JSON object on stdout: ``benchmark``, ``headline`` (the key of the headline metric), the
metrics as fractions in [0, 1], ``coverage`` (expected / answered / missing / unknown / duplicates)
and ``submission`` when an upload file was written. Logs go to stderr. Exit status: 0 on success,
1 when the inputs are wrong (the message says which file, line or ids), 2 for a usage error.

What each benchmark needs is listed by ``--help``, from each benchmark's :class:`~evaluation.tasks.task.Task`
(``score_needs``, and where LLaVA's ``eval.zip`` keeps the file: ``layout``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
from typing import Any, Sequence

from evaluation.files import DataFileError, write_json
from evaluation.tasks import BENCHMARKS, get_benchmark

__all__ = ["main", "needs_help", "score_benchmark"]

log = logging.getLogger("evaluation.score")


def score_benchmark(
    name: str,
    answers: Any,
    *,
    questions: Any = None,
    annotations: Any = None,
    split: str | None = None,
    submission: str | os.PathLike | bool | None = None,
    allow_missing: bool = False,
    allow_unknown: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Score ``answers`` (a path or a list of answer dicts) on benchmark ``name``.

    ``submission``: ``None`` writes the upload file beside the answers file where the benchmark has
    one (vqav2, vizwiz, mmbench), a path writes it there, ``False`` skips it. ``options`` are
    benchmark-specific (``convention`` for vqav2, ``pid_splits`` for scienceqa); an option the
    benchmark does not take raises ``ValueError``.
    """
    task = get_benchmark(name)
    if split is not None and not task.uses_split:
        log.warning("%s does not use a split; --split %s ignored", name, split)
    params = inspect.signature(task.score_files).parameters
    unsupported = sorted(k for k in options if k not in params)
    if unsupported:
        raise ValueError(f"{name} does not take option(s): {', '.join(unsupported)}")
    return task.score_files(
        answers,
        questions=questions,
        annotations=annotations,
        split=split,
        submission=submission,
        allow_missing=allow_missing,
        allow_unknown=allow_unknown,
        **options,
    )


def needs_help() -> str:
    """What each benchmark's scorer needs, one line per input: flag, how it is needed, what it takes and
    where LLaVA's ``eval.zip`` keeps it (from the benchmarks' :class:`~evaluation.tasks.task.Task`)."""
    lines = ["what each benchmark needs (either: at least one of its 'either' inputs):"]
    for name in BENCHMARKS:
        task = get_benchmark(name)
        layout = dict(task.layout)
        folder = layout.pop("folder", name)
        for k, need in enumerate(task.score_needs):
            # LLaVA's eval.zip layout; the commonsense tasks name LLM-Adapters' dataset/ path in `what`
            where = f" [eval.zip: {folder}/{layout[need.arg]}]" if need.arg in layout and task.suite == "llava" else ""
            lines.append(f"  {name if k == 0 else '':<10} {need.flag:<14} {need.need:<9} {need.what}{where}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evaluation.score",
        description="Score a LLaVA answer jsonl against official ground truth; prints one JSON object.",
        epilog=needs_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("benchmark", help=f"one of: {', '.join(BENCHMARKS)}")
    p.add_argument("--answers", required=True, help="LLaVA answer jsonl (question_id, prompt, text, ...)")
    p.add_argument("--questions", help="question file (LLaVA jsonl/json)")
    p.add_argument("--annotations", help="official ground truth (file or, for pope, folder)")
    p.add_argument("--split", help="scienceqa split name (default test) or json list of problem ids")
    p.add_argument("--pid-splits", help="scienceqa pid_splits.json (default: beside problems.json)")
    p.add_argument("--convention", help="vqav2 only: llava (default) or lmms-eval")
    sub = p.add_mutually_exclusive_group()
    sub.add_argument("--submission", help="where to write the upload file (default: beside the answers)")
    sub.add_argument("--no-submission", action="store_true", help="do not write the upload file")
    p.add_argument("--allow-missing", action="store_true", help="score missing answers as empty outputs")
    p.add_argument("--allow-unknown", action="store_true", help="ignore answers to unknown question ids")
    p.add_argument("--output", help="also write the JSON object to this file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
        )
    try:
        get_benchmark(args.benchmark)
    except ValueError as e:
        parser.error(str(e))
    options: dict[str, Any] = {}
    if args.pid_splits is not None:
        options["pid_splits"] = args.pid_splits
    if args.convention is not None:
        options["convention"] = args.convention
    submission: Any = False if args.no_submission else args.submission
    try:
        out = score_benchmark(
            args.benchmark,
            args.answers,
            questions=args.questions,
            annotations=args.annotations,
            split=args.split,
            submission=submission,
            allow_missing=args.allow_missing,
            allow_unknown=args.allow_unknown,
            **options,
        )
        if args.output:
            write_json(args.output, out, indent=2)
    except (ValueError, DataFileError, FileNotFoundError, IsADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
