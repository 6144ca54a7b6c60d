"""The training loss of LLaVA: next-token cross-entropy over the trained (answer) tokens only.

``LlavaForConditionalGeneration(labels=...)`` projects *every* position onto the vocabulary and then
ignores the positions whose label is ``-100``: a ``(B, T, V)`` logits tensor (and its gradient) of
which only the answer rows count. In LLaVA data most positions are masked (system prompt, image
tokens, question): on easy-vqa 2 of ~70 positions are trained, and for LLaVA-1.5 at ``T = 2048`` the
fp32 logits alone are ``B·T·32064·4`` bytes (4.2 GB at ``B = 16``). :func:`causal_lm_loss` runs the
same backbone, gathers the hidden states of the trained positions first and applies ``lm_head`` to
those rows only::

    hidden = backbone(input_ids, pixel_values, attention_mask)       (B, T, D)
    target = labels shifted left by one, -100 at the end            (B, T)
    rows   = hidden[target != -100]                                 (N, D)
    loss   = cross_entropy(lm_head(rows).float(), target[target != -100])   mean over the N tokens

which equals transformers' ``ForCausalLMLoss`` (shift, fp32 upcast, mean over non-ignored tokens)
exactly up to float summation order (``tests/training/test_loss.py``).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..peft.adapters import base_transformers_model

IGNORE_INDEX = -100
#: Batch keys that go into the LLaVA backbone's forward (the collator may add others).
BACKBONE_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "position_ids")


def causal_lm_loss(model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch["labels"]`` (``-100`` = not trained), logits computed
    only at the trained positions. ``model`` is a LLaVA ``PeftModel`` or a plain
    ``LlavaForConditionalGeneration`` (anything with ``.model`` backbone and ``.lm_head``); other models
    fall back to ``model(**batch).loss``.

    Shapes: ``input_ids``/``attention_mask``/``labels`` ``(B, T)``, ``pixel_values`` ``(N_img, 3, H, W)``.
    Returns a 0-d fp32 tensor (NaN if no token is trained, as transformers' loss).
    """
    inner = base_transformers_model(model)
    backbone, lm_head = getattr(inner, "model", None), getattr(inner, "lm_head", None)
    labels = batch["labels"]
    if backbone is None or lm_head is None:
        return model(**{k: v for k, v in batch.items() if k in BACKBONE_INPUTS or k == "labels"}).loss
    out = backbone(**{k: v for k, v in batch.items() if k in BACKBONE_INPUTS})
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, T, D)
    target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T): position t predicts token t+1
    keep = target != IGNORE_INDEX  # (B, T)
    logits = lm_head(hidden[keep])  # (N, V)
    return F.cross_entropy(logits.float(), target[keep].to(logits.device))
