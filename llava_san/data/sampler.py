"""LLaVA's modality-length grouped sampler, as a deterministic, DDP-sharded, resumable batch sampler.

LLaVA (``llava/train/llava_trainer.py``, ``get_modality_length_grouped_indices``) with
``group_by_modality_length=True``:

1. split indices by modality (``lengths > 0``: image, ``< 0``: text-only) and shuffle each;
2. cut each into *megabatches* of ``batch_size * world_size * grad_accum`` (LLaVA passes
   ``world_size=args.world_size * args.gradient_accumulation_steps``), sort each megabatch by length
   (longest first) and split it into ``world_size * grad_accum`` chunks of ``batch_size`` with
   LLaVA's greedy ``split_to_even_chunks`` (balanced total length);
3. shuffle the full megabatches of both modalities together; the two last, partial megabatches go
   at the end;
4. the flat list is cut into per-device batches, batch ``j`` going to rank ``j % world_size``
   (HF ``accelerate``'s batch sharding), so one megabatch is exactly one optimizer step.

Differences (each deliberate):

* LLaVA merges the two partial megabatches (image + text leftovers) into one "additional batch",
  which mixes modalities in a batch. Here each partial megabatch is split on its own into
  ``world_size * ceil(m / (world_size * batch_size))`` chunks (smaller batches, never mixed).
  Only if a partial megabatch has fewer samples than chunks are the empty chunks filled with
  repeats of its own samples (so every rank gets the same number of batches); ``num_padded``
  reports how many.
* LLaVA uses the global torch RNG; here the order is a pure function of ``(seed, epoch)``.
* The sampler yields this rank's batches directly (use ``Trainer(use_distributed_sampler=False)``).

Resuming: :meth:`set_start_batch` (or :meth:`set_start_index`) skips the batches already consumed
in the current epoch; the next iteration yields exactly the tail of the uninterrupted order.
``len()`` always counts the full epoch (Lightning compares it with its restored batch counter).
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import numpy as np
from torch.utils.data import Sampler


def split_to_even_chunks(indices: Sequence[int], lengths: np.ndarray, num_chunks: int) -> list[list[int]]:
    """LLaVA's ``split_to_even_chunks``: greedy split into ``num_chunks`` chunks of equal count.

    If ``len(indices)`` is not divisible by ``num_chunks`` it falls back to strided chunks
    ``indices[i::num_chunks]`` (as LLaVA). ``lengths`` is indexed by the values of ``indices``.
    """
    indices = list(indices)
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += float(lengths[index])
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return chunks


class ModalityLengthGroupedBatchSampler(Sampler[list[int]]):
    """Yields this rank's batches (lists of dataset indices) for the current epoch.

    Args:
        lengths: LLaVA modality lengths (``> 0`` image, ``< 0`` text-only; never 0).
        batch_size: per-device batch size (the largest batch; partial megabatches give smaller ones).
        world_size, rank: data-parallel size and this process's rank.
        grad_accum: gradient accumulation steps (megabatch = ``batch_size * world_size * grad_accum``).
        seed: base seed; the order of epoch ``e`` depends only on ``(seed, e)``.
        mode: ``"modality"`` (LLaVA ``group_by_modality_length``), ``"random"`` (shuffled, no length
            grouping, like HF's default sampler) or ``"sequential"`` (evaluation: file order,
            contiguous shards, no padding -- ranks may get one batch fewer).
    """

    MODES = ("modality", "random", "sequential")

    def __init__(self, lengths, batch_size: int, world_size: int = 1, rank: int = 0, grad_accum: int = 1,
                 seed: int = 0, mode: str = "modality"):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if batch_size < 1 or world_size < 1 or grad_accum < 1:
            raise ValueError(f"batch_size, world_size, grad_accum must be >= 1, got "
                             f"{batch_size}, {world_size}, {grad_accum}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.lengths = np.asarray(lengths)
        if mode == "modality" and np.any(self.lengths == 0):
            raise ValueError("modality lengths must be non-zero (sign = modality)")
        self.batch_size = int(batch_size)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.grad_accum = int(grad_accum)
        self.seed = int(seed)
        self.mode = mode
        self.epoch = 0
        self._start: tuple[int, int] = (0, 0)  # (epoch, batch) of a pending resume
        self.num_padded = 0
        self._cache: Optional[tuple[int, list[list[int]]]] = None
        # Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler``.
        self.sampler = self

    # ------------------------------------------------------------------ sizes
    @property
    def megabatch_size(self) -> int:
        """``batch_size * world_size * grad_accum`` (one optimizer step over all ranks)."""
        return self.batch_size * self.world_size * self.grad_accum

    def _groups(self) -> list[np.ndarray]:
        if self.mode == "modality":
            return [np.flatnonzero(self.lengths > 0), np.flatnonzero(self.lengths < 0)]
        return [np.arange(len(self.lengths))]

    def _partial_chunks(self, m: int) -> int:
        w = self.world_size
        return w * math.ceil(m / (w * self.batch_size)) if m else 0

    def __len__(self) -> int:
        """Batches this rank yields in a full epoch (independent of the start position)."""
        if self.mode == "sequential":  # empty trailing chunks are dropped, count them exactly
            return len(self.rank_batches())
        total = 0
        big = self.megabatch_size
        for g in self._groups():
            full, rest = divmod(len(g), big)
            total += full * self.world_size * self.grad_accum + self._partial_chunks(rest)
        return total // self.world_size

    # ------------------------------------------------------------------ order
    def global_batches(self, epoch: Optional[int] = None) -> list[list[int]]:
        """All ranks' batches of ``epoch`` in order; batch ``j`` belongs to rank ``j % world_size``."""
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed % 2**63, epoch % 2**63])
        big = self.megabatch_size
        n_chunks = self.world_size * self.grad_accum
        absl = np.abs(self.lengths)
        full_mbs: list[list[list[int]]] = []
        partial_mbs: list[list[list[int]]] = []
        padded = 0
        for group in self._groups():
            if len(group) == 0:
                continue
            order = group if self.mode == "sequential" else group[rng.permutation(len(group))]
            n_full = len(order) // big
            for k in range(n_full + 1):
                mb = order[k * big:(k + 1) * big]
                if len(mb) == 0:
                    continue
                if self.mode == "modality":  # longest first, stable like Python's sorted(reverse=True)
                    mb = mb[np.argsort(-absl[mb], kind="stable")]
                mb = mb.tolist()
                if len(mb) == big:
                    if self.mode == "modality":
                        chunks = split_to_even_chunks(mb, absl, n_chunks)
                    else:
                        bs = self.batch_size
                        chunks = [mb[i * bs:(i + 1) * bs] for i in range(n_chunks)]
                    full_mbs.append(chunks)
                    continue
                c = self._partial_chunks(len(mb))
                if self.mode == "sequential":  # contiguous, near-equal, no padding
                    bounds = np.linspace(0, len(mb), c + 1).round().astype(int)
                    chunks = [mb[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
                else:
                    chunks = split_to_even_chunks(mb, absl, c)
                    for j, ch in enumerate(chunks):
                        if not ch:  # fewer samples than chunks: repeat some so all ranks step together
                            ch.append(mb[j % len(mb)])
                            padded += 1
                partial_mbs.append(chunks)
        if self.mode != "sequential":
            full_mbs = [full_mbs[i] for i in rng.permutation(len(full_mbs))]
        if epoch == self.epoch:
            self.num_padded = padded
        return [ch for mb in full_mbs + partial_mbs for ch in mb]

    def rank_batches(self, epoch: Optional[int] = None) -> list[list[int]]:
        """This rank's batches of ``epoch`` (the full epoch, ignoring the start position)."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        batches = [b for b in self.global_batches(epoch)[self.rank::self.world_size] if b]
        self._cache = (epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        start = self.start_batch
        self._start = (self.epoch, 0)  # one-shot
        batches = self.rank_batches()
        for b in batches[start:]:
            yield b

    # ------------------------------------------------------------------ epoch / resume
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields (Lightning calls this)."""
        self.epoch = int(epoch)

    def set_start_batch(self, batch: int) -> None:
        """Skip the first ``batch`` batches of this rank when the current epoch is next iterated.

        Call after :meth:`set_epoch`; the position is tied to that epoch and ignored (dropped) if
        the next iteration is of another epoch (e.g. a checkpoint taken at the very end of one).
        """
        if batch < 0:
            raise ValueError(f"start batch must be >= 0, got {batch}")
        self._start = (self.epoch, int(batch))

    def set_start_index(self, samples: int) -> None:
        """Skip the first ``samples`` indices this rank would yield; must fall on a batch boundary."""
        if samples == 0:
            self.set_start_batch(0)
            return
        sizes = np.cumsum([len(b) for b in self.rank_batches()])
        hit = np.flatnonzero(sizes == samples)
        if not len(hit):
            raise ValueError(f"start index {samples} is not on a batch boundary of epoch {self.epoch} "
                             f"(rank {self.rank}); batches end at {sizes[:5].tolist()}...")
        self.set_start_batch(int(hit[0]) + 1)

    @property
    def start_batch(self) -> int:
        """The pending start position (batches) for the next iteration of the current epoch."""
        epoch, batch = self._start
        return batch if epoch == self.epoch else 0

    def signature(self) -> dict:
        """What the order depends on (a resume must use the same values)."""
        return {"num_samples": int(len(self.lengths)), "batch_size": self.batch_size,
                "world_size": self.world_size, "grad_accum": self.grad_accum, "seed": self.seed,
                "mode": self.mode}

    def state_dict(self) -> dict:
        """``{"epoch", "start_batch", **signature}``."""
        return {"epoch": self.epoch, "start_batch": self.start_batch, **self.signature()}

    def load_state_dict(self, state: dict) -> None:
        """Restore epoch and start position; raises ``ValueError`` if the signature differs."""
        check_signature(self.signature(), state)
        self.set_epoch(state["epoch"])
        self.set_start_batch(state.get("start_batch", 0))


def check_signature(current: dict, state: dict) -> None:
    """Raise ``ValueError`` if a saved sampler state was made with a different data order setup."""
    diff = {k: (state[k], v) for k, v in current.items() if k in state and state[k] != v}
    if diff:
        raise ValueError("cannot resume the data order: the saved state was made with different settings "
                         + ", ".join(f"{k}: saved {a!r} != now {b!r}" for k, (a, b) in diff.items()))
