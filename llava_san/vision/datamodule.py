"""``ClassificationDataModule``: the image classification data of ``python -m train`` (``conf/data/
digits.yaml``, ``easyvqa_shape.yaml``, ``vtab1k.yaml``); the sources and transform are :mod:`.data`."""
from __future__ import annotations

import logging
from typing import Any, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader

from .data import ClassificationDataset, ImageTransform, LabelledImages, load_split

log = logging.getLogger(__name__)


class ClassificationDataModule(L.LightningDataModule):
    """Train / val / test splits of one source as ``{"pixel_values", "labels", "index"}`` batches.

    Args:
        source: ``vtab``, ``digits``, ``easyvqa_shape`` or ``easyvqa_colour`` (:func:`.data.load_split`).
        root, task: the VTAB-1k folder and task (``source=vtab``).
        num_classes: the task's class count (checked against every label; None: from the data).
        train_split: ``trainval`` (the final VTAB-1k run: all 1,000 images, no validation) or ``train``
            (tuning: 800, with ``val`` held out for ``val/loss`` and ``val/accuracy``).
        processor: the :class:`.data.ImageTransform` of the model (``conf/model/<vit>.yaml: processor``).
        batch_size, num_workers: loader settings; the training order is a seeded permutation per epoch
            (Lightning's seeded sampler), so runs with the same seed see the same batches.
    """

    def __init__(self, source: str, processor: Optional[ImageTransform] = None, root: Optional[str] = None,
                 task: Optional[str] = None, num_classes: Optional[int] = None, train_split: str = "trainval",
                 batch_size: int = 64, eval_batch_size: int = 256, num_workers: int = 0) -> None:
        super().__init__()
        if train_split not in ("train", "trainval"):
            raise ValueError(f"data.train_split must be 'train' or 'trainval', got {train_split!r}")
        if int(batch_size) < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.source, self.root, self.task = source, root, task
        self.num_classes = None if num_classes is None else int(num_classes)
        self.train_split = train_split
        self.transform = processor or ImageTransform()
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.num_workers = int(num_workers)
        self.splits: dict[str, LabelledImages] = {}

    def split(self, name: str) -> LabelledImages:
        """The labelled images of split ``name`` (``train``, ``val``, ``trainval``, ``test``), loaded once."""
        if name not in self.splits:
            data = load_split(self.source, name, self.root, self.task, self.num_classes)
            if self.num_classes is not None and max(data.labels) >= self.num_classes:
                raise ValueError(f"{data.source}: label {max(data.labels)} >= data.num_classes={self.num_classes}")
            for note in data.notes:
                log.info("%s: %s", data.source, note)
            self.splits[name] = data
        return self.splits[name]

    def setup(self, stage: Optional[str] = None) -> None:
        """Load (and check) the training split, and the validation split when tuning, before any step."""
        self.split(self.train_split)
        if self.train_split == "train":
            self.split("val")

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        return DataLoader(ClassificationDataset(self.split(split), self.transform), batch_size=batch_size,
                          shuffle=shuffle, num_workers=self.num_workers, drop_last=False,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_split, True, self.batch_size)

    def val_dataloader(self) -> Any:
        return self._loader("val", False, self.eval_batch_size) if self.train_split == "train" else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)

    @property
    def classes(self) -> list[str]:
        return self.split(self.train_split).classes


def top1(model: torch.nn.Module, loader: DataLoader) -> tuple[float, int, torch.Tensor]:
    """``(accuracy, n, predictions)`` of ``model`` (eval mode, no grad; its mode is restored) over
    ``loader``'s ``pixel_values``/``labels`` batches."""
    was_training = model.training
    model.eval()
    correct, n, predictions = 0, 0, []
    try:
        with torch.no_grad():
            for batch in loader:
                logits = model(batch["pixel_values"])
                pred = logits.argmax(-1)
                predictions.append(pred)
                correct += int((pred == batch["labels"]).sum())
                n += int(batch["labels"].numel())
    finally:
        model.train(was_training)
    return correct / max(n, 1), n, torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)


__all__ = ["ClassificationDataModule", "top1"]
