"""``python -m evaluation``: plan -> generate -> merge -> score -> report.

1. plan (:mod:`evaluation.plan`): resolve every benchmark's files and read the questions before any
   model is loaded, so a missing file or image folder fails in seconds with its path;
2. generate (:mod:`evaluation.generate`): load the model (:mod:`llava_san.inference.loading`) and answer
   into ``answers/<benchmark>.jsonl`` (crash-safe, resumable: :mod:`evaluation.journal`); with
   ``num_chunks=K > 1`` and no ``chunk_idx``, start the ``K`` chunk workers instead
   (:mod:`evaluation.launch`); a chunk worker (``chunk_idx=i``) stops after this step;
3. merge the chunk files of a sharded run (:mod:`evaluation.shards`);
4. score each benchmark (:mod:`evaluation.scoring`) into ``metrics.json``;
5. report: ``report.md`` / ``report.json`` (:mod:`evaluation.report`).

Also written: ``eval_config.yaml`` (the resolved config: a record, and what chunk workers start from)
and ``generation.json`` (questions/s of this session, per answer file).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from evaluation.answers import canonical_id
from evaluation.config import EvalConfig
from evaluation.files import write_json
from evaluation.generate import generate_answers
from evaluation.journal import AnswerFile
from evaluation.launch import launch_chunks
from llava_san.inference.loading import LoadedModel, default_model_id, load_model
from evaluation.plan import Plan, make_plan
from evaluation.report import build_report, run_row, write_report
from evaluation.scoring import score_answers
from evaluation.shards import merge_answer_files

__all__ = ["run"]

log = logging.getLogger(__name__)


def run(cfg: DictConfig, loaded: Optional[LoadedModel] = None) -> dict[str, Any]:
    """Generate, merge, score and report, as configured (``conf/eval.yaml``); returns
    ``{benchmark: score result}`` (empty for a chunk worker, which only generates).

    ``loaded`` skips model loading (tests reuse one model)."""
    config = EvalConfig.from_cfg(cfg)
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    plan = make_plan(config)
    if not plan.is_worker:
        (plan.output_dir / "eval_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if config.generate:
        generate(plan, config, loaded)
    if plan.is_worker:
        return {}
    merge(plan)
    results = score(plan) if config.score else {}
    if results:
        report(plan, config, results, loaded)
    return results


def _model_id(config: EvalConfig, loaded: Optional[LoadedModel]) -> str:
    """The ``model_id`` of the answers: the loaded model's, the configured one, else the default."""
    return (loaded.model_id if loaded else config.model_id) or default_model_id(
        config.path, adapter=config.adapter, use_merged=config.use_merged, model_cfg=config.model)


def _remaining(plan: Plan, model_id: str) -> int:
    """Questions still to answer; opens (and repairs) every answer file before a model is loaded."""
    remaining = 0
    for item in plan.work:
        ids = [canonical_id(q.question_id) for q in item.questions]
        with AnswerFile(item.answers_file, ids, model_id) as f:
            remaining += len(item.questions) - len(f.done)
    return remaining


def generate(plan: Plan, config: EvalConfig, loaded: Optional[LoadedModel] = None) -> None:
    """Answer the plan's questions (or start the chunk workers that do); writes ``generation.json``
    (``generation_<K>_<i>.json`` for a chunk worker) when something was generated."""
    if plan.launches_workers and loaded is None:
        launch_chunks(plan.output_dir, plan.num_chunks, config.devices)
        return
    model_id = _model_id(config, loaded)
    remaining = _remaining(plan, model_id)
    if not remaining:
        log.info("every question is already answered; nothing to generate")
        return
    lm = loaded or load_model(config.model, path=config.path, adapter=config.adapter,
                              use_merged=config.use_merged, merge=config.merge, dtype=config.dtype,
                              attn_implementation=config.attn_implementation, device=config.device,
                              model_id=model_id)
    stats: dict[str, Any] = {}
    for item in plan.work:
        task = plan.benchmarks[item.benchmark].task
        s = generate_answers(lm.model, lm.processor, item.questions, item.answers_file, model_id=model_id,
                             batch_size=config.batch_size, max_new_tokens=config.max_new_tokens,
                             template=config.template, tokenization=config.tokenization,
                             image_aspect_ratio=config.image_aspect_ratio, num_workers=config.num_workers,
                             prompt_format=task.prompt_format, num_beams=config.num_beams or task.num_beams,
                             postprocess=task.postprocess)
        stats[str(item.answers_file.relative_to(plan.output_dir))] = s
        log.info("%s: %d answers in %s (%d resumed)", item.benchmark, s["questions"], item.answers_file,
                 s["resumed"])
    suffix = f"_{plan.num_chunks}_{plan.chunk_idx}" if plan.is_worker else ""
    write_json(plan.output_dir / f"generation{suffix}.json", stats, indent=2)  # this session, per file


def merge(plan: Plan) -> None:
    """Concatenate each benchmark's complete chunk files into its answer file (sharded runs only)."""
    if plan.num_chunks == 1:
        return
    for name in plan.benchmarks:
        merged, files = plan.answer_files(name)
        merge_answer_files(files, plan.chunk_ids(name), merged)


def score(plan: Plan) -> dict[str, Any]:
    """``{benchmark: score result}`` of each benchmark's answer file."""
    results: dict[str, Any] = {}
    for name, data in plan.benchmarks.items():
        merged, _ = plan.answer_files(name)
        if not merged.exists():
            raise FileNotFoundError(f"{name}: no answer file {merged} to score (run with generate=true)")
        results[name] = score_answers(data, merged)
        log.info("%s: %s", name, {k: v for k, v in results[name].items() if not isinstance(v, dict)})
    return results


def report(plan: Plan, config: EvalConfig, results: dict[str, Any], loaded: Optional[LoadedModel] = None) -> None:
    """Write ``metrics.json`` and the report (paper rows + this run's row)."""
    write_json(plan.output_dir / "metrics.json", results, indent=2)
    notes = [f"{n}: first {len(d.questions)} of {d.total} questions" for n, d in plan.benchmarks.items()
             if d.limited]
    name = config.run_name or (loaded.model_id if loaded else None) or config.model_id or default_model_id(
        config.path, adapter=config.adapter, use_merged=config.use_merged, model_cfg=config.model)
    row = run_row(name, results, notes="; ".join(notes))
    paths = write_report(build_report([row], title=config.title), plan.output_dir)  # title None: the suite's
    log.info("report: %s", paths["markdown"])
