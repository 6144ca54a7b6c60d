"""A per-process cache of preprocessed images: ``image path -> (3, H, W) pixel tensor``, bounded in bytes.

LLaVA-format data often asks several questions about one image (easy-vqa: about 9.5 per image), and
the image preprocessing (decode, pad, CLIP resize and normalise) is the costliest part of preparing a
sample. With the cache a dataloader worker prepares each image once per epoch instead of once per
question. The tensor returned for a hit is the one made for the first question, so the samples are
bit-identical with or without the cache; it is shared, so callers must not modify it in place (the
collator stacks it into a new batch tensor).

The cache lives in one process: every dataloader worker fills its own, and a pickled copy (spawned
workers) starts empty. Least recently used images are dropped once the tensors exceed ``max_bytes``.
An image is keyed by its record path, so a file rewritten during a run is not re-read (LLaVA's image
folders do not change while training).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch


class PixelCache:
    """LRU map ``key -> tensor`` holding at most ``max_bytes`` of tensor data (``max_bytes > 0``)."""

    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"PixelCache needs a positive byte budget, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> Optional[torch.Tensor]:
        """The cached tensor for ``key`` (now the most recently used), or None."""
        tensor = self._items.get(key)
        if tensor is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return tensor

    def put(self, key: str, tensor: torch.Tensor) -> None:
        """Keep ``tensor`` for ``key`` and drop least recently used entries beyond the budget; a tensor
        larger than the whole budget is not kept."""
        size = tensor.numel() * tensor.element_size()
        if size > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old.numel() * old.element_size()
        self._items[key] = tensor
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self.bytes -= dropped.numel() * dropped.element_size()

    def __getstate__(self) -> dict:
        # a copy sent to another process (a spawned worker) starts empty: the tensors are not shipped
        state = self.__dict__.copy()
        state.update(_items=OrderedDict(), bytes=0, hits=0, misses=0)
        return state
