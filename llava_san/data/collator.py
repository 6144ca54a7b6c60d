"""Batch collation: right padding, -100 label padding, stacked ``pixel_values``."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .tokenize import IGNORE_INDEX


class LlavaCollator:
    """Collate prepared samples (``None`` = skipped) into a model batch.

    Returns a dict with
      * ``input_ids`` ``(B, T)`` long, right-padded with ``pad_token_id``;
      * ``attention_mask`` ``(B, T)`` long, 1 on real tokens;
      * ``labels`` ``(B, T)`` long, -100 on masked and padded positions;
      * ``pixel_values`` ``(N_img, 3, H, W)`` float, images in batch order -- only when the batch
        has images (absent for a text-only batch, which LLaVA in transformers 5 requires).

    If every sample of the batch was skipped, the tensors have shape ``(0, 0)``: the training step
    should skip such a batch.

    Args:
        pad_token_id: the tokenizer's pad id.
        pad_to_multiple_of: optionally round ``T`` up (e.g. 8 for tensor cores).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: the tokenizer needs a pad token")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, samples: Sequence[Optional[dict[str, Any]]]) -> dict[str, torch.Tensor]:
        samples = [s for s in samples if s is not None]
        if not samples:
            empty = torch.zeros(0, 0, dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty.clone(), "labels": empty.clone()}
        t = max(len(s["input_ids"]) for s in samples)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            t = (t + m - 1) // m * m
        b = len(samples)
        input_ids = torch.full((b, t), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((b, t), dtype=torch.long)
        for row, s in enumerate(samples):
            n = len(s["input_ids"])
            input_ids[row, :n] = s["input_ids"]
            labels[row, :n] = s["labels"]
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        images = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
        if images:
            batch["pixel_values"] = torch.stack(images)  # (N_img, 3, H, W)
        return batch
