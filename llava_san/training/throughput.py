"""Throughput counters of a training run, logged per optimiser step (progress bar and loggers).

:class:`Throughput` logs, for every optimiser step (its gradient-accumulation micro-batches summed):

* ``train/tokens_per_s``: non-padding tokens (``attention_mask`` sum; image tokens included) per second;
* ``train/samples_per_s``: sequences per second;
* ``train/mfu``: model FLOPs utilisation, :class:`~llava_san.training.flops.FlopModel` FLOPs of the step's
  batches / step time / the device's peak FLOP/s — when a peak is known (``peak_flops``, or on CUDA the
  card's dense bf16 peak by name, :data:`~llava_san.training.flops.PEAK_BF16`);
* ``train/peak_mem_gb`` (CUDA): ``torch.cuda.max_memory_allocated`` in GiB (2³⁰ bytes): with
  ``peak_memory="step"`` (``conf/callbacks/default.yaml``) the peak reset at each step's start, so the
  step's own peak; with ``"run"`` never reset (the peak so far), which leaves the process-wide peak
  counter to whoever else reads it (the fallback :meth:`LlavaSanModule.configure_callbacks` adds).

The step time is the wall time from the end of the previous optimiser step to the end of this one (the
first step of a fit or an epoch: from the start of its first micro-batch), so data loading, logging and
checkpoint saves count, as they do in the run's duration; on CUDA the device is synchronised first. The
figures are this process's (under data parallelism every rank steps its own batches; the run's
throughput is the sum over ranks, its MFU about the same on each).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

import lightning as L
import torch

from .flops import FlopModel, peak_flops as peak_flops_of


class Throughput(L.Callback):
    """Log ``train/tokens_per_s``, ``train/samples_per_s`` and, when known, ``train/mfu`` and
    ``train/peak_mem_gb`` per optimiser step (module doc).

    Args:
        peak_flops: the device's peak FLOP/s for MFU; None: the CUDA card's dense bf16 peak by name
            (None on a CPU or an unknown card: no MFU).
        prog_bar: show the counters in the progress bar too.
        peak_memory: ``"step"`` (reset CUDA's peak counter at each step's start) or ``"run"`` (never reset).
        clock: the wall clock (seconds); tests pass a fake one.
    """

    def __init__(self, peak_flops: Optional[float] = None, prog_bar: bool = True, peak_memory: str = "step",
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if peak_flops is not None and not (isinstance(peak_flops, (int, float)) and peak_flops > 0):
            raise ValueError(f"Throughput.peak_flops must be a positive number or null, got {peak_flops!r}")
        if peak_memory not in ("step", "run"):
            raise ValueError(f"Throughput.peak_memory must be 'step' or 'run', got {peak_memory!r}")
        self.peak_memory = peak_memory
        self.peak_flops = None if peak_flops is None else float(peak_flops)
        self.prog_bar = bool(prog_bar)
        self.clock = clock
        self.last: dict[str, float] = {}  # the latest step's logged values
        self._flops: Optional[FlopModel] = None
        self._peak: Optional[float] = None
        self._t_last: Optional[float] = None  # end of the previous optimiser step (or start of this one)
        self._step_seen = 0
        self._micro: list[dict[str, Any]] = []  # this step's micro-batches so far

    # ------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: L.LightningModule) -> None:
        self._step_seen = int(trainer.global_step)
        self._peak = self.peak_flops
        if self._peak is None and pl_module.device.type == "cuda":
            self._peak = peak_flops_of(torch.cuda.get_device_name(pl_module.device))
        try:
            self._flops = FlopModel.of(pl_module.model if hasattr(pl_module, "model") else pl_module)
        except (ValueError, AttributeError):  # no LLaMA-family language tower: no FLOP count, no MFU
            self._flops = None

    def on_train_epoch_start(self, trainer: Any, pl_module: L.LightningModule) -> None:
        self._t_last = None
        self._micro = []

    def on_train_batch_start(self, trainer: Any, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._micro:
            return  # inside an accumulation window
        if self._t_last is None:
            self._t_last = self.clock()
        if pl_module.device.type == "cuda" and self.peak_memory == "step":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(self, trainer: Any, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._micro.append(self._count(batch))
        if int(trainer.global_step) == self._step_seen:
            return  # no optimiser step yet (gradient accumulation, or a skipped batch)
        self._step_seen = int(trainer.global_step)
        cuda = pl_module.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(pl_module.device)
        now = self.clock()
        dt = now - (self._t_last if self._t_last is not None else now)
        self._t_last = now
        micro, self._micro = self._micro, []
        if dt <= 0:
            return
        counted = [(float(m["tokens"]), float(m["n_answer"])) for m in micro]  # (the device is synchronised)
        samples = sum(m["batch"] for m in micro)
        tokens = sum(t for t, _ in counted)
        metrics = {"train/tokens_per_s": tokens / dt, "train/samples_per_s": samples / dt}
        if self._flops is not None and self._peak is not None:
            flops = sum(self._flops.step(batch=m["batch"], seq_len=m["seq_len"], n_answer=int(a),
                                         n_images=m["n_images"])["model"]
                        for m, (_, a) in zip(micro, counted))
            metrics["train/mfu"] = flops / dt / self._peak
        if cuda:
            metrics["train/peak_mem_gb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        self.last = metrics
        for name, value in metrics.items():
            pl_module.log(name, value, prog_bar=self.prog_bar, on_step=True, on_epoch=False,
                          batch_size=max(samples, 1))

    def _count(self, batch: Any) -> dict[str, Any]:
        """Samples, non-padding tokens (0-d tensor) and the FLOP-relevant sizes of one micro-batch."""
        if "input_ids" not in batch:  # image classification: samples only (no text tokens)
            n = int(batch["labels"].shape[0])
            return {"batch": n, "seq_len": 0, "n_answer": torch.tensor(0), "n_images": n, "tokens": torch.tensor(0)}
        ids = batch["input_ids"]  # (B, T)
        mask = batch.get("attention_mask")
        tokens = mask.sum() if mask is not None else torch.tensor(ids.numel())
        if self._flops is not None:
            counts = self._flops.batch_counts(batch)
        else:
            counts = {"batch": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "n_answer": torch.tensor(0),
                      "n_images": 0}
        return {**counts, "tokens": tokens}


__all__ = ["Throughput"]
