"""``LoraRecipe``: stock peft LoRA or DoRA on the language tower, optionally with SAN (``peft=lora|dora|
san_lora|san_dora``). Its folders are :func:`~llava_san.peft.save_adapter` folders (kind ``adapter``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from peft import LoraConfig, PeftModel
from torch import nn

from ..adapter_io import load_adapter, save_adapter
from ..san_config import SanConfig
from ..san_model import get_san_model, merge_san
from .base import AdapterRecipe


class LoraRecipe(AdapterRecipe):
    """peft LoRA/DoRA (``lora_config.use_dora``) on the seven LLaMA projections of the language tower,
    plus SAN when ``san`` is given; the base stays frozen.

    Args:
        lora_config: peft ``LoraConfig`` (``target_modules``: module types, a regex or None, scoped to
            the language tower by :func:`~llava_san.peft.apply_lora`).
        san: SAN options, or None for stock peft. Its ``pairs`` are filled when SAN is attached.
    """

    kinds = ("adapter",)

    def __init__(self, lora_config: LoraConfig, san: Optional[SanConfig] = None) -> None:
        if not isinstance(lora_config, LoraConfig):
            raise TypeError(f"LoraRecipe needs a peft LoraConfig, got {type(lora_config).__name__}")
        if san is not None and not isinstance(san, SanConfig):
            raise TypeError(f"LoraRecipe.san must be a SanConfig or None, got {type(san).__name__}")
        self.lora_config = lora_config
        self.san = san

    def apply(self, model: nn.Module) -> PeftModel:
        """Freeze ``model`` and wrap its language tower with LoRA/DoRA (+ SAN)."""
        model.requires_grad_(False)
        return get_san_model(model, self.lora_config, self.san)

    def describe(self) -> dict[str, Any]:
        """``adapter`` (rank, DoRA or not) and ``san`` (the propagation, or None)."""
        return {"adapter": {"r": int(self.lora_config.r), "use_dora": bool(self.lora_config.use_dora)},
                "san": None if self.san is None else self.san.propagation}

    def save(self, model: nn.Module, folder: str | os.PathLike) -> Path:
        """:func:`~llava_san.peft.save_adapter`: peft tensors, SAN config and γ̄, other trained tensors."""
        return save_adapter(model, folder, base_model=self.base_model)

    @classmethod
    def load(cls, model: nn.Module, folder: str | os.PathLike, is_trainable: bool = False) -> PeftModel:
        """:func:`~llava_san.peft.load_adapter` (eval mode and frozen unless ``is_trainable``)."""
        return load_adapter(model, folder, is_trainable=is_trainable)

    @classmethod
    def merge(cls, model: nn.Module) -> nn.Module:
        """:func:`~llava_san.peft.merge_san`: LoRA/DoRA and γ̄ folded into the weights (consumes ``model``)."""
        return merge_san(model) if isinstance(model, PeftModel) else model

    def __repr__(self) -> str:
        return f"LoraRecipe(r={self.lora_config.r}, use_dora={self.lora_config.use_dora}, san={self.san!r})"


__all__ = ["LoraRecipe"]
