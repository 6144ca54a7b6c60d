"""Shared pieces of the DeepSpeed CPU tests: the run config they compose, and callbacks the ``python -m train``
ranks they launch import.

Not a test module: ``tests/training/test_deepspeed_cpu.py`` puts this folder on the ranks' PYTHONPATH and
adds e.g. ``+callbacks.dump._target_=deepspeed_helpers.DumpTrainedState``.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
#: A short CPU run on synthetic data: no evaluation, checkpoints or progress bar.
BASE = ["data=synthetic", "trainer=cpu", "evaluate=null", "callbacks=none", "logger=csv",
        "trainer.enable_progress_bar=false", "+trainer.enable_checkpointing=false", "data.batch_size=2"]


def compose_train(out, *overrides):
    """``conf/train.yaml`` composed with :data:`BASE`, ``paths.output_dir=out`` and ``overrides``."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=[f"paths.output_dir={out}", *BASE, *overrides])


class DumpTrainedState(L.Callback):
    """At the end of fit (before ``run`` saves the adapter), every rank writes its own γ̄ buffers
    (``gamma_rank<r>.pt``, before any cross-rank averaging), and rank 0 writes the trained parameters
    gathered from all ZeRO-3 partitions (``trained.pt``; the gather is a collective on every rank)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from llava_san.checkpoint import gathered
        from llava_san.peft import san_layers

        model = pl_module.model
        gammas = {layer._san.name: layer.san_gamma_ema.detach().clone() for layer in san_layers(model)}
        torch.save(gammas, self.path / f"gamma_rank{trainer.global_rank}.pt")
        partitioned = {n: p.numel() == 0 for n, p in model.named_parameters() if p.requires_grad}
        with gathered(model, trainable_only=True):
            trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if trainer.global_rank == 0:
            torch.save({"trained": trained, "partitioned": partitioned}, self.path / "trained.pt")


class RecordOptimizer(L.Callback):
    """Writes the class name of the optimizer that DeepSpeed's engine steps to ``<path>/optimizer.txt``."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        engine_optimizer = trainer.strategy.deepspeed_engine.optimizer  # ZeRO's wrapper
        inner = getattr(engine_optimizer, "optimizer", engine_optimizer)
        (self.path / "optimizer.txt").write_text(type(inner).__name__)
