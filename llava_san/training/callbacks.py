"""Callbacks of real training runs: the resolved config at train start and the bad-sample report."""
from __future__ import annotations

import os
from typing import Any, Optional

import lightning as L
import torch

from ..data.errors import REASONS
from ..utils.atomic import atomic_file


class ConfigAtTrainStart(L.Callback):
    """Write the run's resolved config when training starts -- after any checkpoint was restored and
    checked, so a refused command changes nothing in the run folder.

    A fresh run writes ``config.yaml``; a resume writes ``config.resume-N.yaml`` (N = 1, 2, ...) and
    keeps the first launch's ``config.yaml``, which evaluation rebuilds the base model from.
    """

    def __init__(self, folder: str | os.PathLike, text: str, resume: bool) -> None:
        self.folder, self.text, self.resume = os.fspath(folder), text, bool(resume)
        self.written: Optional[str] = None

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or self.written is not None:
            return
        name = "config.yaml"
        if self.resume and os.path.exists(os.path.join(self.folder, name)):
            n = 1
            while os.path.exists(os.path.join(self.folder, f"config.resume-{n}.yaml")):
                n += 1
            name = f"config.resume-{n}.yaml"
        self.written = os.path.join(self.folder, name)
        with atomic_file(self.written, "w") as fh:
            fh.write(self.text)


class BadSampleReport(L.Callback):
    """The bad-sample accounting of :class:`~llava_san.data.LlavaDataLoader` under a ``Trainer``.

    Lightning never asks a sized loader for the batch after its last one, so the loader's own end-of-pass
    report never runs there. This callback does it at each training epoch's end and when training stops
    mid-epoch (``max_steps``): it sums the per-reason counters over every rank, lets the loader log the
    report and apply ``max_bad_fraction`` to the summed counts (every rank raises together), and keeps
    the totals over the whole run for ``metrics.json``: ``data/skipped_<reason>`` (samples skipped for
    each reason that occurred), ``data/skipped`` and ``data/skipped_fraction`` (skipped / prepared), and
    ``data/image_cached`` (samples whose image came from the pixel cache, when it is on).
    Records left out when the index was built are counted in ``data/index_skipped_<reason>``.
    """

    COLUMNS = ("seen", "truncated", "image_cached", "epoch_samples") + REASONS

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}
        self._closed_epoch: Optional[int] = None

    def _loader(self, trainer) -> Any:
        dm = trainer.datamodule
        loader = getattr(dm, "_train_loader", None) if dm is not None else None
        return loader if loader is not None and hasattr(loader, "finish_epoch") else None

    def _close(self, trainer) -> None:
        loader = self._loader(trainer)
        # the loader's own epoch: Lightning has already advanced current_epoch when on_train_end follows
        # the last epoch's end
        if loader is None or self._closed_epoch == loader.batch_sampler.epoch:
            return
        self._closed_epoch = loader.batch_sampler.epoch
        mine = loader.epoch_totals()
        mine["epoch_samples"] = loader.epoch_samples or 0
        vec = torch.tensor([float(mine.get(c, 0)) for c in self.COLUMNS], dtype=torch.float64)
        if trainer.world_size > 1:
            vec = trainer.strategy.reduce(vec.to(trainer.strategy.root_device), reduce_op="sum").cpu()
        summed = {c: int(round(v)) for c, v in zip(self.COLUMNS, vec.tolist())}
        for c, v in summed.items():
            if c != "epoch_samples":
                self.totals[c] = self.totals.get(c, 0) + v
        loader.finish_epoch(summed)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._close(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._close(trainer)  # stopped mid-epoch by max_steps: the partial pass counts too

    def state_dict(self) -> dict:
        return {"totals": dict(self.totals)}

    def load_state_dict(self, state: dict) -> None:
        self.totals = dict(state.get("totals", {}))

    def metrics(self, trainer=None) -> dict[str, float]:
        """``data/skipped_<reason>``, ``data/skipped``, ``data/skipped_fraction`` (and the index's)."""
        out: dict[str, float] = {}
        skipped = sum(v for k, v in self.totals.items() if k in REASONS)
        for k in REASONS:
            if self.totals.get(k):
                out[f"data/skipped_{k}"] = float(self.totals[k])
        if self.totals:
            out["data/skipped"] = float(skipped)
            out["data/skipped_fraction"] = skipped / max(self.totals.get("seen", 0), 1)
        if self.totals.get("image_cached"):
            out["data/image_cached"] = float(self.totals["image_cached"])
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        for stats in (getattr(dm, "index_stats", None) or {}).values():
            for reason, n in stats.get("bad_by_reason", {}).items():
                out[f"data/index_skipped_{reason}"] = out.get(f"data/index_skipped_{reason}", 0.0) + float(n)
        return out
