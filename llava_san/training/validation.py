"""``val/loss``: the LM loss on the held-out split, once, at the end of training.

The data configs hold out a validation split (``data.val_fraction``; easy-vqa: 772 of its 38,575
training questions, which keeps the default run's training samples and score as they were). Lightning's
own validation loop would run every epoch and needs a ``validation_step``; :func:`held_out_loss` instead
computes one number after training -- the token-weighted mean next-token loss over the split's
answer tokens, in eval mode (SAN with γ̄, no dropout: the model as it is evaluated and exported) -- and
``python -m train`` writes it to ``metrics.json`` and every logger (its time is ``time/val_s``, not part
of ``time/train_s``). On the tiny default run it costs seconds.

Under more than one process it is skipped with a log line (as the end-of-training easy-vqa check is):
ranks would have to step through the same number of batches together.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

from .loss import IGNORE_INDEX, causal_lm_loss

log = logging.getLogger(__name__)

__all__ = ["held_out_loss"]


def held_out_loss(trainer: Any, model: torch.nn.Module) -> dict[str, float]:
    """``val/loss`` (mean loss per trained token), ``val/tokens`` and ``time/val_s`` of ``model`` on the
    validation loader of ``trainer``'s datamodule, after ``trainer.fit``; empty without validation data
    or under more than one process (see the module doc)."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    dm = trainer.datamodule
    loader = dm.val_dataloader() if dm is not None and is_overridden("val_dataloader", dm) else []
    if not loader:
        return {}
    if trainer.world_size > 1:
        log.info("val/loss: skipped under %d processes", trainer.world_size)
        return {}
    t0 = time.perf_counter()
    loss, tokens = _mean_loss(model, loader, trainer)
    log.info("val/loss %.4f over %d answer tokens of the held-out split", loss, tokens)
    return {"val/loss": loss, "val/tokens": float(tokens), "time/val_s": time.perf_counter() - t0}


@torch.no_grad()
def _mean_loss(model: torch.nn.Module, loader: Any, trainer: Any) -> tuple[float, int]:
    """``(mean loss per trained token, number of trained tokens)`` of ``model`` in eval mode over
    ``loader``'s batches (the model's mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    try:
        with trainer.precision_plugin.forward_context():
            for batch in loader:
                if batch is None or batch["input_ids"].numel() == 0:  # every sample of it was bad
                    continue
                n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                if n == 0:
                    continue
                batch = trainer.strategy.batch_to_device(batch)
                total += causal_lm_loss(model, batch).double().cpu() * n
                count += n
    finally:
        model.train(was_training)
    return (float(total / count) if count else float("nan")), count
