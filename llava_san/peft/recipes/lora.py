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


#: ``peft.vision``: SSF sites on LLaVA's CLIP tower beside the language adapters (None: the tower stays frozen)
VISION_METHODS = ("ssf", "san_ssf")


class LoraRecipe(AdapterRecipe):
    """peft LoRA/DoRA (``lora_config.use_dora``) on the seven LLaMA projections of the language tower,
    plus SAN when ``san`` is given, plus SSF or SAN-SSF on the CLIP tower when ``vision`` is given; the
    base stays frozen.

    Args:
        lora_config: peft ``LoraConfig`` (``target_modules``: module types, a regex or None, scoped to
            the language tower by :func:`~llava_san.peft.apply_lora`).
        san: SAN options, or None for stock peft. Its ``pairs`` are filled when SAN is attached.
        vision: ``ssf`` or ``san_ssf`` (``peft.vision=san_ssf``): :func:`llava_san.vision.ssf.apply_ssf` on
            the vision tower's layers that reach the projector (all but the last); None: the tower stays
            frozen (the LLaVA recipe). Its vectors are saved with the adapter and folded by :meth:`merge`.
    """

    kinds = ("adapter",)

    def __init__(self, lora_config: LoraConfig, san: Optional[SanConfig] = None, vision: Optional[str] = None) -> None:
        if not isinstance(lora_config, LoraConfig):
            raise TypeError(f"LoraRecipe needs a peft LoraConfig, got {type(lora_config).__name__}")
        if san is not None and not isinstance(san, SanConfig):
            raise TypeError(f"LoraRecipe.san must be a SanConfig or None, got {type(san).__name__}")
        if vision is not None and vision not in VISION_METHODS:
            raise ValueError(f"peft.vision must be one of {list(VISION_METHODS)} or null, got {vision!r}")
        self.lora_config = lora_config
        self.san = san
        self.vision = vision

    def apply(self, model: nn.Module) -> PeftModel:
        """Freeze ``model``, wrap its language tower with LoRA/DoRA (+ SAN), and add SSF to its vision
        tower when ``vision`` is set."""
        model.requires_grad_(False)
        model = get_san_model(model, self.lora_config, self.san)
        if self.vision is not None:
            from ...vision.ssf import SsfConfig, apply_ssf

            apply_ssf(model.get_base_model(), SsfConfig(method=self.vision))
        return model

    def describe(self) -> dict[str, Any]:
        """``adapter`` (rank, DoRA or not), ``san`` (the propagation, or None) and, when set, ``vision``."""
        out = {"adapter": {"r": int(self.lora_config.r), "use_dora": bool(self.lora_config.use_dora)},
               "san": None if self.san is None else self.san.propagation}
        if self.vision is not None:
            out["vision"] = self.vision
        return out

    def save(self, model: nn.Module, folder: str | os.PathLike) -> Path:
        """:func:`~llava_san.peft.save_adapter`: peft tensors, SAN config and γ̄, other trained tensors
        (the projector; the vision tower's SSF vectors, with the method in the manifest)."""
        return save_adapter(model, folder, base_model=self.base_model, vision=self.vision)

    @classmethod
    def load(cls, model: nn.Module, folder: str | os.PathLike, is_trainable: bool = False) -> PeftModel:
        """:func:`~llava_san.peft.load_adapter` (eval mode and frozen unless ``is_trainable``)."""
        return load_adapter(model, folder, is_trainable=is_trainable)

    @classmethod
    def merge(cls, model: nn.Module) -> nn.Module:
        """:func:`~llava_san.peft.merge_san`: LoRA/DoRA and γ̄ folded into the weights, then the vision
        tower's SSF vectors (:func:`~llava_san.vision.ssf.merge_ssf`) when it has any (consumes ``model``)."""
        plain = merge_san(model) if isinstance(model, PeftModel) else model
        from ...vision.ssf import ssf_sites

        if ssf_sites(plain):
            from ...vision.ssf import merge_ssf

            plain = merge_ssf(plain)
        return plain

    def __repr__(self) -> str:
        vision = "" if self.vision is None else f", vision={self.vision!r}"
        return f"LoraRecipe(r={self.lora_config.r}, use_dora={self.lora_config.use_dora}, san={self.san!r}{vision})"


__all__ = ["LoraRecipe"]
