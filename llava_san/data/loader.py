"""A ``DataLoader`` that knows its position in the epoch and reports bad samples at epoch end.

* Stateful (``state_dict``/``load_state_dict``): Lightning saves it in checkpoints and restores it
  before iterating again when resuming mid-epoch. The state is ``{"epoch", "batches_consumed",
  ...signature}`` where ``batches_consumed`` counts the batches *handed to the training loop*
  (Lightning does not prefetch a sized loader, so that is exactly the batches trained on), not the
  ones the workers already prepared.
* At the end of each pass it logs the per-reason bad-sample counters and raises
  :class:`TooManyBadSamplesError` when skipped samples exceed ``max_bad_fraction`` of the epoch --
  as soon as that is certain (``bad > max_bad_fraction * epoch_samples``), not only at the end.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator, Optional

from torch.utils.data import DataLoader

from .dataset import BadSampleCounter
from .errors import REASONS, TooManyBadSamplesError
from .sampler import ModalityLengthGroupedBatchSampler, check_signature

log = logging.getLogger(__name__)


class LlavaDataLoader(DataLoader):
    """``DataLoader(dataset, batch_sampler=sampler, ...)`` plus resume state and bad-sample checks.

    Args:
        dataset: a :class:`~llava_san.data.dataset.LlavaDataset`.
        batch_sampler: a :class:`ModalityLengthGroupedBatchSampler`.
        counter: the dataset's :class:`BadSampleCounter`.
        max_bad_fraction: hard limit on skipped / seen samples per epoch.
        name: ``"train"``/``"val"`` for messages.
        **kwargs: passed to ``DataLoader`` (``collate_fn``, ``num_workers``, ``pin_memory``, ...).
    """

    def __init__(self, dataset, batch_sampler: ModalityLengthGroupedBatchSampler, *,
                 counter: Optional[BadSampleCounter] = None, max_bad_fraction: float = 0.01,
                 name: str = "train", **kwargs: Any):
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self.counter = counter if counter is not None else getattr(dataset, "counter", None)
        self.max_bad_fraction = float(max_bad_fraction)
        self.name = name
        self.batches_consumed = 0
        self.reports: list[dict] = []  # one per finished pass
        self.epoch_samples: Optional[int] = None  # samples this rank's current pass prepares

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Any]:
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        sampler: ModalityLengthGroupedBatchSampler = self.batch_sampler
        start = sampler.start_batch
        plan = sampler.rank_batches()
        epoch_samples = sum(len(b) for b in plan[start:])  # what this pass will prepare
        limit = self.max_bad_fraction * epoch_samples
        if self.counter is not None:
            self.counter.reset()
        self.batches_consumed = start
        self.epoch_samples = epoch_samples
        for batch in super().__iter__():
            self.batches_consumed += 1
            if self.counter is not None and self.counter.bad() > limit:
                self._finish(sampler.epoch, epoch_samples, final=False)
            yield batch
        # Lightning stops at the sampler's length without asking for one more batch, so under a
        # Trainer this line is not reached: BadSampleReport (llava_san.training) calls finish_epoch
        self._finish(sampler.epoch, epoch_samples, final=True)

    def epoch_totals(self) -> dict[str, int]:
        """This process's counters of the current pass: ``{"seen", "truncated", <reason>, ...}``."""
        return self.counter.totals() if self.counter is not None else {}

    def finish_epoch(self, totals: Optional[dict[str, int]] = None) -> Optional[dict]:
        """The end-of-pass report and the ``max_bad_fraction`` check, with ``totals`` summed over the
        ranks by the caller (default: this process's counters). Returns the report (also kept in
        :attr:`reports`); :class:`TooManyBadSamplesError` past the limit."""
        if self.counter is None:
            return None
        samples = self.epoch_samples
        if samples is None:
            samples = sum(len(b) for b in self.batch_sampler.rank_batches())
        if totals is not None:  # summed over ranks: so is the epoch's sample count
            samples = int(totals.get("epoch_samples", samples))
        self._finish(self.batch_sampler.epoch, samples, final=True, totals=totals)
        return self.reports[-1]

    def _finish(self, epoch: int, epoch_samples: int, final: bool, totals: Optional[dict] = None) -> None:
        if self.counter is None:
            return
        totals = totals if totals is not None else self.counter.totals()
        bad = {k: v for k, v in totals.items() if k in REASONS and v}
        n_bad, seen = sum(bad.values()), totals.get("seen", 0)
        report = {"split": self.name, "epoch": epoch, "seen": seen, "bad": n_bad, "bad_by_reason": bad,
                  "truncated": totals.get("truncated", 0), "image_cached": totals.get("image_cached", 0),
                  "epoch_samples": epoch_samples}
        if final:
            self.reports.append(report)
            level = logging.WARNING if n_bad else logging.INFO
            log.log(level, "%s epoch %d: %d samples prepared, %d skipped %s, %d truncated, %d images from the "
                    "pixel cache", self.name, epoch, seen, n_bad, bad or "", report["truncated"],
                    report["image_cached"])
        if n_bad > self.max_bad_fraction * max(epoch_samples, 1):
            raise TooManyBadSamplesError(
                f"{self.name} epoch {epoch}: {n_bad} bad samples out of {epoch_samples} "
                f"({n_bad / max(epoch_samples, 1):.2%}) exceed max_bad_fraction={self.max_bad_fraction:.2%}: "
                f"{bad}. The messages are in the log (warnings 'skipping bad sample ...').")

    # ------------------------------------------------------------------ resume state
    def state_dict(self) -> dict:
        """``{"epoch", "batches_consumed", **sampler signature}`` (per-rank batches)."""
        sampler: ModalityLengthGroupedBatchSampler = self.batch_sampler
        return {"epoch": sampler.epoch, "batches_consumed": int(self.batches_consumed), **sampler.signature()}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration starts at ``batches_consumed`` of ``epoch``."""
        sampler: ModalityLengthGroupedBatchSampler = self.batch_sampler
        check_signature(sampler.signature(), state)
        sampler.set_epoch(state["epoch"])
        sampler.set_start_batch(state["batches_consumed"])
        self.batches_consumed = int(state["batches_consumed"])
