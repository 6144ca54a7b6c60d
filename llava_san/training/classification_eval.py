"""Top-1 accuracy on the test split at the end of ``python -m train`` for image classification (the
vision experiments' ``evaluate_classification``), next to the majority-class baseline.

The test split is the datamodule's own (VTAB-1k ``test.txt``; the 797 held-out digits; easy-vqa's test
images), read with the run's image transform. Metrics: ``test/top1``, ``test/majority_baseline``
(always the most frequent class of the training split), ``test/n`` and ``time/eval_s``; the
per-class accuracies are ``test/top1_class_<name>``.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Any, Optional

import torch

__all__ = ["ClassificationEvaluator", "format_report", "should_evaluate"]


class ClassificationEvaluator:
    """Score ``model`` on the test split of the data described by ``data`` (the run's data config, as
    keyword arguments of :class:`~llava_san.vision.datamodule.ClassificationDataModule`)."""

    def __init__(self, data: dict[str, Any], batch_size: int = 256, limit: Optional[int] = None) -> None:
        self.data = {k: v for k, v in dict(data).items() if k != "_target_"}
        self.batch_size = int(batch_size)
        self.limit = None if limit is None else int(limit)

    def __call__(self, model: torch.nn.Module, processor: Any) -> dict[str, float]:
        from ..vision.datamodule import ClassificationDataModule, top1

        t0 = time.perf_counter()
        dm = ClassificationDataModule(processor=processor, **{**self.data, "eval_batch_size": self.batch_size})
        test = dm.split("test")
        if self.limit is not None:
            test.images, test.labels = test.images[: self.limit], test.labels[: self.limit]
        accuracy, n, predictions = top1(model, dm.test_dataloader())
        majority = Counter(dm.split(dm.train_split).labels).most_common(1)[0][0]
        labels = torch.tensor(test.labels)
        metrics = {"test/top1": accuracy, "test/majority_baseline": float((labels == majority).float().mean()),
                   "test/n": float(n)}
        for c, name in enumerate(test.classes):
            mask = labels == c
            if bool(mask.any()):
                metrics[f"test/top1_class_{name}"] = float((predictions[mask] == c).float().mean())
        metrics["time/eval_s"] = time.perf_counter() - t0
        return metrics


def should_evaluate(when: str, data_target: Optional[str]) -> tuple[bool, str]:
    """``(score it?, why)``: ``auto`` only after training on classification data
    (:class:`~llava_san.vision.datamodule.ClassificationDataModule`); ``always``: whatever the data."""
    from ..vision.datamodule import ClassificationDataModule
    from .when import trained_on

    return trained_on(when, data_target, ClassificationDataModule, "image classification data",
                      "set evaluate_classification.when=always to score it anyway")


def format_report(metrics: dict[str, Any]) -> str:
    """Top-1 next to the majority-class baseline."""
    return (f"test top-1 ({int(metrics['test/n'])} images): {metrics['test/top1']:.4f}   "
            f"majority class: {metrics['test/majority_baseline']:.4f}")
