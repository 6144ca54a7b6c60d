"""A synthetic LLaVA datamodule (random images and tokens, fixed shapes) and a resumable sampler.

Used by the training tests and ``benchmarks/train_step.py``: it needs no files, every sample is a
pure function of its index, and batches have the collator layout of :mod:`llava_san.data`
(``input_ids``, ``attention_mask``, ``labels``, ``pixel_values``). Select it with ``data=synthetic``.

Two knobs reproduce what real data does to a distributed step (tests of
:mod:`llava_san.training.lockstep`): ``skipped_samples`` come out as ``None`` (as a bad record does from
:class:`llava_san.data.LlavaDataset`; a batch of only those is empty) and ``text_only_samples`` have no
image. Under several processes each rank reads every ``world_size``-th index of the epoch's order,
starting at its rank (as LLaVA's sharded samplers do).
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.collator import LlavaCollator


class ResumableSampler(Sampler[int]):
    """A (shuffled) permutation of ``range(n)`` per epoch that can start mid-epoch.

    ``skip(k)`` makes the next ``__iter__`` start after the first ``k`` indices of the epoch's order
    (index-level resume: nothing seen twice, nothing skipped). The order depends on ``(seed, epoch)`` only.
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0) -> None:
        self.n, self.shuffle, self.seed = int(n), shuffle, int(seed)
        self.epoch = 0
        self._start = 0
        self.rank, self.world_size = 0, 1

    def shard(self, rank: int, world_size: int) -> None:
        """Read positions ``rank, rank + world_size, ...`` of each epoch's order (``skip`` counts those)."""
        self.rank, self.world_size = int(rank), int(world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip(self, num_samples: int) -> None:
        self._start = int(num_samples)

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        return iter(self.order()[self.rank::self.world_size][start:])

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


class SyntheticLlavaDataset(Dataset):
    """``<s> <image>×n_img tokens… answer…``; loss on the last ``answer_len`` tokens."""

    def __init__(self, processor: Any, num_samples: int, seq_len: int, answer_len: int, image_size: int,
                 num_image_tokens: int, seed: int = 0, skipped_samples: Sequence[int] = (),
                 text_only_samples: Sequence[int] = ()) -> None:
        tok = processor.tokenizer
        self.image_id = tok.convert_tokens_to_ids(processor.image_token)
        self.vocab = [i for i in range(3, min(len(tok), 1000)) if i not in (self.image_id, tok.pad_token_id)]
        self.n, self.seq_len, self.answer_len = num_samples, seq_len, answer_len
        self.image_size, self.n_img, self.seed = image_size, num_image_tokens, seed
        self.skipped, self.text_only = frozenset(map(int, skipped_samples)), frozenset(map(int, text_only_samples))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Optional[dict]:
        if i in self.skipped:
            return None
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        text = torch.tensor(self.vocab)[torch.randint(len(self.vocab), (self.seq_len,), generator=g)]
        image = i not in self.text_only
        ids = torch.cat([torch.tensor([1]), torch.full((self.n_img if image else 0,), self.image_id), text])
        labels = torch.full_like(ids, -100)
        labels[-self.answer_len:] = ids[-self.answer_len:]
        pixels = torch.randn(3, self.image_size, self.image_size, generator=g) if image else None
        return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


class SyntheticDataModule(L.LightningDataModule):
    """Fixed-shape random LLaVA batches (see :class:`SyntheticLlavaDataset`)."""

    def __init__(self, processor: Any = None, num_samples: int = 64, seq_len: int = 16, answer_len: int = 4,
                 batch_size: int = 4, seed: int = 0, shuffle: bool = True, num_workers: int = 0,
                 persistent_workers: bool = False, skipped_samples: Sequence[int] = (),
                 text_only_samples: Sequence[int] = ()) -> None:
        super().__init__()
        if processor is None:
            raise ValueError("SyntheticDataModule needs the model's processor (processor=...)")
        self.processor = processor
        self.batch_size, self.num_workers = batch_size, num_workers
        self.persistent_workers = bool(persistent_workers) and num_workers > 0
        ip = processor.image_processor
        size = ip.crop_size["height"] if getattr(ip, "crop_size", None) else ip.size["shortest_edge"]
        n_img = (size // processor.patch_size) ** 2 + processor.num_additional_image_tokens - 1
        self.dataset = SyntheticLlavaDataset(processor, num_samples, seq_len, answer_len, size, n_img, seed,
                                             skipped_samples, text_only_samples)
        self.sampler = ResumableSampler(num_samples, shuffle=shuffle, seed=seed)
        self.collate = LlavaCollator(processor.tokenizer.pad_token_id)

    def state_dict(self) -> dict:
        """The training position: batches processed in the current epoch (saved in Lightning checkpoints)."""
        if self.trainer is None:
            return {}
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": int(self.trainer.current_epoch), "batches": int(done)}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.sampler.set_epoch(state["epoch"])
            self.sampler.skip(state["batches"] * self.batch_size)

    def train_dataloader(self) -> DataLoader:
        if self.trainer is not None:
            self.sampler.shard(self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler, collate_fn=self.collate,
                          num_workers=self.num_workers, persistent_workers=self.persistent_workers,
                          drop_last=True)
