"""``metrics.json``: one flat JSON object per run (``split/name`` keys, plain numbers)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import lightning as L

from ..utils.atomic import atomic_file


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_metrics(path: str | os.PathLike, metrics: Mapping[str, Any]) -> Path:
    """Write ``metrics`` (flat mapping) to ``path`` atomically, keys sorted."""
    flat = {str(k): _plain(v) for k, v in metrics.items()}
    with atomic_file(path, "w") as fh:
        json.dump(flat, fh, indent=2, sort_keys=True)
        fh.write("\n")
    return Path(path)


class MetricsRecorder(L.Callback):
    """Keeps the first and last logged training loss (``train/loss_first``, ``train/loss_last``).

    The loss is read from ``trainer.callback_metrics`` after each optimiser step's batch, so it is the
    value logged by the module (averaged over the accumulation window's last micro-batch).
    """

    def __init__(self) -> None:
        self.loss_first: float | None = None
        self.loss_last: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is None:
            return
        value = float(loss.detach())
        if self.loss_first is None:
            self.loss_first = value
        self.loss_last = value

    def state_dict(self) -> dict:
        return {"loss_first": self.loss_first, "loss_last": self.loss_last}

    def load_state_dict(self, state: dict) -> None:
        self.loss_first = state.get("loss_first")
        self.loss_last = state.get("loss_last")

    def metrics(self) -> dict[str, float]:
        out = {}
        if self.loss_first is not None:
            out["train/loss_first"] = self.loss_first
            out["train/loss_last"] = self.loss_last
        return out
