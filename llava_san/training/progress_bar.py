"""The training progress bar: optimiser steps towards ``trainer.max_steps`` when a run is sized in steps.

Lightning's :class:`~lightning.pytorch.callbacks.TQDMProgressBar` shows batches of the current epoch and
starts again at 0 every epoch, so a run sized by ``max_steps`` (the default ``python -m train``: 3,500
steps over 3 epochs) never shows how far it is. :class:`StepProgressBar` shows ``global_step /
max_steps`` in one bar over the whole run (the epoch in its description; a resumed run starts at its
step). Without ``max_steps`` (``-1``, runs sized in epochs) it is Lightning's bar.
"""
from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import _update_n


class StepProgressBar(TQDMProgressBar):
    """:class:`~lightning.pytorch.callbacks.TQDMProgressBar` counting optimiser steps to ``max_steps``
    (see the module doc); same arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shown: Optional[int] = None

    @staticmethod
    def max_steps(trainer: Any) -> Optional[int]:
        """The run's step budget, or None when it is sized in epochs."""
        steps = getattr(trainer, "max_steps", -1)
        return int(steps) if steps is not None and steps > 0 else None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        total = self.max_steps(trainer)
        if total is not None:
            bar = self.train_progress_bar
            bar.reset(total=total)
            bar.initial = bar.n = int(trainer.global_step)  # a resumed run starts at its step
            self._shown = None

    def on_train_epoch_start(self, trainer: Any, *args: Any) -> None:
        if self.max_steps(trainer) is None:
            return super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch}")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        total = self.max_steps(trainer)
        if total is None:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = int(trainer.global_step)
        # under gradient accumulation several batches end on the same step: show each step once
        if step != self._shown and self._should_update(step, total):
            self._shown = step
            _update_n(self.train_progress_bar, step)
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.max_steps(trainer) is None:
            return super().on_train_epoch_end(trainer, pl_module)
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.max_steps(trainer) is not None:
            _update_n(self.train_progress_bar, int(trainer.global_step))
        super().on_train_end(trainer, pl_module)


__all__ = ["StepProgressBar"]
