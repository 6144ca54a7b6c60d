"""``run(cfg) -> metrics``: one training run from a composed config (tests call it directly).

Writes to ``cfg.paths.output_dir``: ``config.yaml`` (resolved), logs (``csv/`` by default),
``checkpoints/`` (atomic ``last.ckpt``), ``adapter/`` (``save_adapter`` format), ``metrics.json`` and,
with ``export=true``, ``merged/`` (plain transformers checkpoint).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from llava_san.checkpoint import AtomicCheckpointIO, export_merged, resolve_ckpt_path, save_final_adapter
from llava_san.training import MetricsRecorder, write_metrics
from llava_san.training.processors import check_same_processor

log = logging.getLogger(__name__)


def _instantiate_all(node) -> list:
    if not node:
        return []
    return [instantiate(v) for v in node.values() if v is not None and "_target_" in v]


def run(cfg: DictConfig) -> dict:
    """Train (or resume), save the adapter, evaluate, export; return the flat metrics dict."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.checkpoint_dir)  # fail before any work
    L.seed_everything(cfg.seed, workers=True)

    processor = instantiate(cfg.model.processor)
    datamodule = instantiate(cfg.data, processor=processor)
    lora_config = instantiate(cfg.peft.lora_config) if cfg.peft.get("lora_config") else None
    san_config = instantiate(cfg.peft.san) if cfg.peft.get("san") else None
    module = instantiate(cfg.module)(
        model_factory=instantiate(cfg.model.build), lora_config=lora_config, san_config=san_config,
        optim=instantiate(cfg.optim))

    recorder = MetricsRecorder()
    callbacks = _instantiate_all(cfg.get("callbacks")) + [recorder]
    loggers = _instantiate_all(cfg.get("logger"))
    strategy = instantiate(cfg.strategy)
    trainer: L.Trainer = instantiate(cfg.trainer, strategy=strategy, callbacks=callbacks,
                                     logger=loggers or False, plugins=[AtomicCheckpointIO()])

    t0 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics: dict = {"time/train_s": time.perf_counter() - t0, "train/global_step": trainer.global_step}
    metrics.update(recorder.metrics())
    check_same_processor(processor, module.processor)

    save_final_adapter(module.model, cfg.paths.adapter_dir, trainer.is_global_zero)
    if cfg.get("evaluate") and trainer.is_global_zero:
        if trainer.world_size > 1:
            log.warning("evaluate: skipped under %d processes (evaluate the saved adapter instead)", trainer.world_size)
        else:
            evaluator = instantiate(cfg.evaluate)
            from llava_san.training.easyvqa_eval import format_report

            metrics.update(evaluator(module.model, module.processor or processor))
            print(format_report(metrics), flush=True)
    if cfg.get("export") and trainer.is_global_zero:
        export_merged(module.model, module.processor or processor, cfg.paths.merged_dir)
    if trainer.is_global_zero:
        write_metrics(out / "metrics.json", metrics)
        print(f"metrics: {out / 'metrics.json'}  adapter: {cfg.paths.adapter_dir}", flush=True)
    return metrics
