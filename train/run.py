"""``run(cfg) -> metrics``: one training run from a composed config (tests call it directly).

Writes to ``cfg.paths.output_dir``: ``config.yaml`` (resolved; a resume writes ``config.resume-N.yaml``
instead, and only once its checkpoint was accepted), logs (``csv/version_N/`` by default;
``logger=tensorboard|wandb|many``), ``checkpoints/`` (atomic ``last.ckpt``), ``adapter/``
(``save_adapter`` format), ``metrics.json`` and, with ``export=true``, ``merged/`` (plain transformers
checkpoint). ``metrics.json`` (also logged to every logger at the last step): ``train/loss_first``,
``train/loss_last``, ``train/global_step``, ``time/train_s`` (wall), ``time/train_cpu_s`` (CPU of this
process and its dataloader workers), ``val/loss`` when the data holds out a validation split
(:func:`~llava_san.training.validation.held_out_loss`, once after training) and, with ``evaluate``, the easy-vqa metrics
(:mod:`llava_san.training.easyvqa_eval`), whose table is the last thing printed. ``evaluate.when``:
``auto`` (default) runs that check only when the training data is easy-vqa (a log line says why it is
skipped otherwise), ``always`` whatever the data; ``evaluate=null`` never. ``evaluate_commonsense``
(``experiment=csr_tiny``) is the same hook for commonsense-format data
(:mod:`llava_san.training.commonsense_eval`: ``test/commonsense_accuracy`` beside
``test/commonsense_majority_baseline``); ``evaluate_classification`` (the vision experiments) scores
top-1 on the test split (:mod:`llava_san.training.classification_eval`). A LLaMA causal LM (``model=llama*``/``tiny_llama``) exports
``merged/`` as a plain ``LlamaForCausalLM`` + tokenizer.
"""
from __future__ import annotations

import importlib
import logging
import resource
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from llava_san.checkpoint import (
    AtomicCheckpointIO,
    export_merged,
    export_merged_from_adapter,
    resolve_ckpt_path,
    save_final_adapter,
    tidy_checkpoint_dir,
)
from llava_san.distributed import any_partitioned
from llava_san.models.llama import export_causal_lm, export_causal_lm_from_adapter
from llava_san.training import BadSampleReport, ConfigAtTrainStart, MetricsRecorder, write_metrics
from llava_san.training.validation import held_out_loss

log = logging.getLogger(__name__)

#: end-of-training checks: config key -> what it scores (the evaluator's module has should_evaluate and
#: format_report)
EVALUATIONS = {"evaluate": "easy-vqa test accuracy", "evaluate_commonsense": "commonsense test accuracy",
               "evaluate_classification": "image classification top-1"}


def _instantiate_all(node) -> list:
    if not node:
        return []
    return [instantiate(v) for v in node.values() if v is not None and "_target_" in v]


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children (dataloader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _log_summary(loggers: list, metrics: dict, step: int) -> None:
    """Log the run's final metrics (loss, time, easy-vqa accuracy) to every logger, flush, and close W&B
    runs (a later job of a multirun in the same process must start its own run)."""
    from lightning.pytorch.loggers import WandbLogger

    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    for lg in loggers:
        lg.log_metrics(numbers, step=step)
        lg.finalize("success")
        if isinstance(lg, WandbLogger):
            lg.experiment.finish()


def _check_seed(cfg: DictConfig) -> None:
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r} (set it with seed=<int>)")


def run(cfg: DictConfig) -> dict:
    """Train (or resume), save the adapter, evaluate, export; return the flat metrics dict."""
    out = Path(cfg.paths.output_dir)
    _check_seed(cfg)
    deepspeed = "deepspeed" in str(cfg.strategy.get("_target_", "")).lower()
    # fail before any work or write
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.checkpoint_dir, deepspeed=deepspeed)
    out.mkdir(parents=True, exist_ok=True)
    for stale in tidy_checkpoint_dir(cfg.paths.checkpoint_dir, ckpt_path):
        log.info("removed %s (left by an interrupted run)", stale)
    threads = cfg.model.get("torch_threads")
    if threads:  # intra-op threads of this process (dataloader workers set their own)
        torch.set_num_threads(int(threads))
    L.seed_everything(cfg.seed, workers=True)

    processor = instantiate(cfg.model.processor)
    datamodule = instantiate(cfg.data, processor=processor)
    adapter = instantiate(cfg.peft)  # an AdapterRecipe (llava_san.peft.recipes)
    # the saved folder records how its base was built (manifest and model card)
    adapter.base_model = OmegaConf.to_container(cfg.model.build, resolve=True)
    module = instantiate(cfg.module)(
        model_factory=instantiate(cfg.model.build), adapter=adapter,
        optim=instantiate(cfg.optim), data_processor=processor)

    recorder, bad_samples = MetricsRecorder(), BadSampleReport()
    # the resolved config is written once the checkpoint (if any) has been accepted: a refused resume
    # leaves the run folder as it was
    config_file = ConfigAtTrainStart(out, OmegaConf.to_yaml(cfg, resolve=True), resume=ckpt_path is not None)
    callbacks = _instantiate_all(cfg.get("callbacks")) + [recorder, bad_samples, config_file]
    loggers = _instantiate_all(cfg.get("logger"))
    strategy = instantiate(cfg.strategy)
    extra = {}
    if "enable_checkpointing" not in cfg.trainer:  # callbacks=none: no checkpoints (not Lightning's default)
        extra["enable_checkpointing"] = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    trainer: L.Trainer = instantiate(cfg.trainer, strategy=strategy, callbacks=callbacks,
                                     logger=loggers or False, plugins=[AtomicCheckpointIO()], **extra)

    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    with warnings.catch_warnings():
        # the held-out split is evaluated once after training (held_out_loss), not by Lightning's val loop
        warnings.filterwarnings("ignore", message=r"You passed in a `val_dataloader` but have no `validation_step`")
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics: dict = {"time/train_s": time.perf_counter() - t0, "time/train_cpu_s": _cpu_seconds() - cpu0,
                     "train/global_step": trainer.global_step}
    metrics.update(recorder.metrics())
    # a module with its own held-out metrics (image classification: val/accuracy), else the LM val/loss
    metrics.update(module.held_out(trainer) if hasattr(module, "held_out") else held_out_loss(trainer, module.model))
    metrics.update(bad_samples.metrics(trainer))

    save_final_adapter(module.model, cfg.paths.adapter_dir, trainer.is_global_zero, adapter)
    reports = []
    for key in EVALUATIONS:  # evaluate: easy-vqa; evaluate_commonsense: the commonsense check (csr_tiny)
        if not (cfg.get(key) and trainer.is_global_zero):
            continue
        rules = importlib.import_module(get_class(cfg[key]._target_).__module__)  # should_evaluate, format_report
        node = OmegaConf.to_container(cfg[key], resolve=True)
        node.pop("when", None)  # the rule below, not an evaluator argument
        wanted, why = rules.should_evaluate(cfg[key].get("when", "auto"), cfg.data.get("_target_"))
        if not wanted:
            log.info("%s: %s skipped: %s", key, EVALUATIONS[key], why)
        elif trainer.world_size > 1:
            log.warning("%s: skipped under %d processes (evaluate the saved adapter instead)", key,
                        trainer.world_size)
        else:
            metrics.update(instantiate(node)(module.model, module.processor or processor))
            reports.append(rules.format_report(metrics))
    report = "\n".join(reports)
    if trainer.is_global_zero:
        _log_summary(trainer.loggers, metrics, trainer.global_step)
    if cfg.get("export") and trainer.is_global_zero and getattr(module, "task", None) == "classification":
        # a plain timm model (SSF/SAN-SSF/LoRA folded; MoPPA cannot fold and is refused there)
        from llava_san.vision.backbone import export_timm

        export_timm(adapter.merge(module.model), cfg.paths.merged_dir)
    elif cfg.get("export") and trainer.is_global_zero and module.text_only:
        # a causal LM: the merged LlamaForCausalLM + its tokenizer (AutoModelForCausalLM.from_pretrained)
        if any_partitioned(module.model):
            export_causal_lm_from_adapter(module.model_factory, cfg.paths.adapter_dir, module.processor or processor,
                                          cfg.paths.merged_dir)
        else:
            export_causal_lm(module.model, module.processor or processor, cfg.paths.merged_dir, adapter)
    elif cfg.get("export") and trainer.is_global_zero:
        # the exported processor prepares inputs as this run's data did (template, image padding)
        how = dict(template=cfg.data.get("template", "vicuna_v1"),
                   image_aspect_ratio=cfg.data.get("image_aspect_ratio", "pad"))
        if any_partitioned(module.model):  # ZeRO-3: each rank holds slices; fold the saved adapter instead
            export_merged_from_adapter(module.model_factory, cfg.paths.adapter_dir, module.processor or processor,
                                       cfg.paths.merged_dir, **how)
        else:
            export_merged(module.model, module.processor or processor, cfg.paths.merged_dir, adapter, **how)
    if trainer.is_global_zero:
        write_metrics(out / "metrics.json", metrics)
        print(f"\nrun folder: {out} (metrics.json, adapter/); {trainer.global_step} steps in "
              f"{metrics['time/train_s']:.0f} s", flush=True)
        if report:
            print(report, flush=True)
    return metrics
