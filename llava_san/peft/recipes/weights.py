"""Recipes without adapters, whose folders hold the trained tensors themselves
(:func:`~llava_san.peft.adapter_io.save_extra_only`): :class:`NoAdapter` (``peft=none``) and
:class:`FullFinetune` (``peft=full``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ..adapter_io import load_extra_only, save_extra_only
from .base import AdapterRecipe


class _TrainedWeights(AdapterRecipe):
    """Saves the trained tensors as they are (kind ``projector_only`` when they are all the projector's,
    else ``trained_weights``) and copies them back into a fresh base."""

    def save(self, model: nn.Module, folder: str | os.PathLike) -> Path:
        return save_extra_only(model, folder, base_model=self.base_model)

    @classmethod
    def load(cls, model: nn.Module, folder: str | os.PathLike, is_trainable: bool = False) -> nn.Module:
        """Copy the folder's tensors into ``model`` in place; ``requires_grad`` and mode are left as they
        are (``is_trainable`` is accepted for the common signature)."""
        return load_extra_only(model, folder)


class NoAdapter(_TrainedWeights):
    """No adapter: the base stays frozen and only what the module unfreezes trains (LLaVA's projector,
    ``model.train_projector``; LLaVA's stage-1 setting)."""

    kinds = ("projector_only",)

    def apply(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(False)
        return model

    def describe(self) -> dict[str, Any]:
        return {"adapter": None, "san": None}

    def __repr__(self) -> str:
        return "NoAdapter()"


class FullFinetune(_TrainedWeights):
    """Full fine-tuning: every weight (vision tower, projector, language model, embeddings) trains at
    ``optim.lr``. The SAN study builds its pretrained base with it (``conf/experiment/study/base.yaml``)."""

    kinds = ("trained_weights",)

    def apply(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(True)
        return model

    def describe(self) -> dict[str, Any]:
        return {"adapter": None, "san": None, "full_finetune": True}

    def __repr__(self) -> str:
        return "FullFinetune()"


__all__ = ["FullFinetune", "NoAdapter"]
