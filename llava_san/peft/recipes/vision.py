"""Vision recipes for image classification on a ViT (``peft=linear_probe|ssf|san_ssf|moppa|vit_lora``).

Each freezes the backbone, adds its method (:mod:`llava_san.vision.ssf`, :mod:`llava_san.vision.moppa`,
peft LoRA on the attention ``qkv``) and trains the new classification head with it. Folders are
:mod:`llava_san.vision.adapter_folder` folders: the method's and the head's tensors, the recipe's
settings and the backbone's signature (a folder loads only onto the architecture it was trained on).

Beside the :class:`~.base.AdapterRecipe` interface a vision recipe offers what the classification module
(:class:`llava_san.vision.module.ImageClassifierModule`) asks of it: ``regulariser(model, progress)``
(SAN-SSF's eq. 13, MoPPA's route balance), ``statistics(model)`` (γ or router statistics for the
loggers) and ``no_decay(model)`` (names that get no weight decay: every 1-D tensor, as SSF's optimiser,
and MoPPA's ρ).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from .base import AdapterRecipe


def _settings_object(value: Any, fields: dict[str, Any], cls: type, owner: str) -> Any:
    """``value`` (a ``cls`` instance), or ``cls(**fields)`` when ``value`` is None (a folder's settings)."""
    if value is None:
        value = cls(**fields)
    elif fields:
        raise TypeError(f"give {owner} either a {cls.__name__} or its fields, not both")
    if not isinstance(value, cls):
        raise TypeError(f"{owner} needs a {cls.__name__}, got {type(value).__name__}")
    return value


def classifier_head(model: nn.Module) -> nn.Module:
    """The classification head of a timm model (``get_classifier()``)."""
    get = getattr(model, "get_classifier", None)
    if get is None:
        raise ValueError(f"{type(model).__name__} has no get_classifier(): vision recipes train timm classifiers")
    return get()


class VisionRecipe(AdapterRecipe):
    """Frozen backbone + a method + the trained head; subclasses implement :meth:`adapt` and
    :meth:`settings` (plain data that rebuilds the recipe through :meth:`from_settings`)."""

    kind: ClassVar[str] = ""
    _signature: Optional[str] = None

    def adapt(self, model: nn.Module) -> nn.Module:
        """Add the method to the frozen ``model`` (in place, or return a wrapper)."""
        return model

    def settings(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> "VisionRecipe":
        return cls(**settings)

    def apply(self, model: nn.Module) -> nn.Module:
        """Freeze ``model``, add the method, and train the head (recorded: the backbone's signature)."""
        from ...vision.adapter_folder import backbone_signature

        self._signature = backbone_signature(model)
        model.requires_grad_(False)
        model = self.adapt(model)
        classifier_head(model).requires_grad_(True)
        return model

    def describe(self) -> dict[str, Any]:
        return {"adapter": {"kind": self.kind, **self.settings()}, "san": None}

    def save(self, model: nn.Module, folder: str | os.PathLike) -> Path:
        from ...vision.adapter_folder import save_vision_adapter

        if self._signature is None:
            raise ValueError(f"{type(self).__name__}.save: apply() was not called on this recipe")
        return save_vision_adapter(model, folder, self.kind, self.settings(), self._signature, self.base_model)

    @classmethod
    def check(cls, model: nn.Module, folder: str | os.PathLike) -> None:
        from ...vision.adapter_folder import backbone_signature, read_vision_manifest

        manifest = read_vision_manifest(folder, cls.kinds)
        if "backbone_signature" not in manifest:
            raise ValueError(f"{folder}: its manifest has no backbone_signature; it is not a vision adapter folder "
                             "written by llava-san (or it is damaged)")
        if manifest["backbone_signature"] != backbone_signature(model):
            raise ValueError(f"adapter {folder} was trained on another backbone ({manifest['backbone_class']} "
                             f"with other parameter shapes) than the {type(model).__name__} given; load it onto "
                             "the backbone it was trained from")

    @classmethod
    def load(cls, model: nn.Module, folder: str | os.PathLike, is_trainable: bool = False) -> nn.Module:
        """The recipe of the folder's settings applied to the fresh ``model``, then its tensors copied in
        (eval mode and frozen unless ``is_trainable``)."""
        from ...vision.adapter_folder import load_vision_tensors, read_vision_manifest

        cls.check(model, folder)
        manifest = read_vision_manifest(folder, cls.kinds)
        recipe = cls.from_settings(manifest["settings"])
        model = recipe.apply(model)
        load_vision_tensors(model, folder, manifest)
        if not is_trainable:
            model.requires_grad_(False)
            model.eval()
        return model

    def regulariser(self, model: nn.Module, progress: float = 0.0) -> Optional[torch.Tensor]:
        """A loss term added to the task loss (None: none)."""
        return None

    def statistics(self, model: nn.Module) -> dict[str, float]:
        """Numbers for the loggers, every ``log_stats_every_n_steps``."""
        return {}

    def no_decay(self, model: nn.Module) -> set[str]:
        """Trained parameter names without weight decay: 1-D tensors (scales, shifts, biases)."""
        return {n for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1}


class LinearProbe(VisionRecipe):
    """Only the new head trains (the linear-probe row of the paper's tables)."""

    kind = "linear_probe"
    kinds = ("linear_probe",)

    def __repr__(self) -> str:
        return "LinearProbe()"


class _ConfiguredRecipe(VisionRecipe):
    """A vision recipe whose settings are one dataclass, ``self.config`` (SSF's, MoPPA's)."""

    config: Any

    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class SsfRecipe(_ConfiguredRecipe):
    """SSF or SAN-SSF (:class:`llava_san.vision.ssf.SsfConfig`): per-channel scale and shift after the
    frozen layers, with SAN's propagation of each scale into the next layer's input columns
    (``method: san_ssf``); folds into plain weights after training (:meth:`merge`)."""

    kind = "ssf"
    kinds = ("ssf",)

    def __init__(self, ssf: Any = None, **fields: Any) -> None:
        from ...vision.ssf import SsfConfig

        self.config = _settings_object(ssf, fields, SsfConfig, "SsfRecipe")

    def adapt(self, model: nn.Module) -> nn.Module:
        from ...vision.ssf import apply_ssf

        return apply_ssf(model, self.config)

    @classmethod
    def merge(cls, model: nn.Module) -> nn.Module:
        from ...vision.ssf import merge_ssf

        return merge_ssf(model)

    def regulariser(self, model: nn.Module, progress: float = 0.0) -> Optional[torch.Tensor]:
        from ...vision.ssf import ssf_regulariser

        return ssf_regulariser(model) if self.config.reg_lambda > 0 else None

    def statistics(self, model: nn.Module) -> dict[str, float]:
        from ...vision.ssf import ssf_statistics

        return ssf_statistics(model)


class MoppaRecipe(_ConfiguredRecipe):
    """MoPPA (:class:`llava_san.vision.moppa.MoppaConfig`): a DCT-domain mixture of heat, wave and
    Poisson priors before each block's attention, with its route balance loss. It does not fold into
    the weights (the filter mixes tokens): the merged model is the adapted one."""

    kind = "moppa"
    kinds = ("moppa",)

    def __init__(self, moppa: Any = None, **fields: Any) -> None:
        from ...vision.moppa import MoppaConfig

        self.config = _settings_object(moppa, fields, MoppaConfig, "MoppaRecipe")

    def adapt(self, model: nn.Module) -> nn.Module:
        from ...vision.moppa import apply_moppa

        return apply_moppa(model, self.config)

    def regulariser(self, model: nn.Module, progress: float = 0.0) -> Optional[torch.Tensor]:
        from ...vision.moppa import route_loss

        return route_loss(model, progress) if self.config.route_lambda > 0 else None

    def statistics(self, model: nn.Module) -> dict[str, float]:
        from ...vision.moppa import router_statistics

        return router_statistics(model)

    def no_decay(self, model: nn.Module) -> set[str]:
        from ...vision.moppa import no_weight_decay_names

        return super().no_decay(model) | set(no_weight_decay_names(model))


class VitLoraRecipe(VisionRecipe):
    """peft LoRA (or DoRA) injected into the attention ``qkv`` linears of a timm ViT (the LoRA-8
    baseline of the VTAB tables), merged into the weights by :meth:`merge`."""

    kind = "vit_lora"
    kinds = ("vit_lora",)

    def __init__(self, r: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 target_modules: str = r"blocks\.\d+\.attn\.qkv", use_dora: bool = False) -> None:
        if int(r) < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.r, self.alpha, self.dropout = int(r), float(alpha), float(dropout)
        self.target_modules, self.use_dora = str(target_modules), bool(use_dora)

    def settings(self) -> dict[str, Any]:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout,
                "target_modules": self.target_modules, "use_dora": self.use_dora}

    def adapt(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                            target_modules=self.target_modules, use_dora=self.use_dora)
        model = inject_adapter_in_model(config, model)
        if not any("lora_" in n for n, _ in model.named_parameters()):
            raise ValueError(f"vit_lora: target_modules {self.target_modules!r} matches no module of "
                             f"{type(model).__name__}")
        return model

    @classmethod
    def merge(cls, model: nn.Module) -> nn.Module:
        """Each LoRA layer folded into its base linear, which replaces it (a plain timm model)."""
        from peft.tuners.lora import LoraLayer

        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLayer) and isinstance(module, nn.Module):
                module.merge()
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
        return model

    def __repr__(self) -> str:
        return f"VitLoraRecipe({self.settings()})"


__all__ = ["LinearProbe", "MoppaRecipe", "SsfRecipe", "VisionRecipe", "VitLoraRecipe", "classifier_head"]
