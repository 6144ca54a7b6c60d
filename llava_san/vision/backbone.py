"""timm classifiers for the vision recipes: a named architecture with a new head, its weights from a local
file in timm's own formats or the hub, or a small random ViT for offline runs.

``conf/model/vit_b16.yaml`` builds ``vit_base_patch16_224.augreg_in21k`` (what SSF and the SAN prototype
load); ``checkpoint=<file>`` reads a local ``.safetensors``/``.bin``/``.pth``/``.npz`` through timm's
``pretrained_cfg_overlay`` (the classifier of another class count is dropped, as timm does), so no hub
access is needed. ``conf/model/tiny_vit.yaml`` is a random 32 × 32 ViT for the embedded CPU run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

# (importing this module imports llava_san first, whose __init__ installs the torchvision import hook)


def build_timm_classifier(architecture: str, num_classes: int, checkpoint: Optional[str] = None,
                          pretrained: bool = False, seed: Optional[int] = None, **model_kwargs: Any) -> nn.Module:
    """``timm.create_model(architecture, num_classes=...)`` with its backbone weights from ``checkpoint`` (a
    local file in a timm format; the head is new) or, with ``pretrained=True``, timm's hub download;
    neither: random weights (seeded by ``seed`` when given). ``model_kwargs`` go to timm (e.g.
    ``img_size``, ``drop_path_rate``)."""
    import timm

    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"model.build.checkpoint={checkpoint} does not exist (a timm .safetensors, "
                                ".bin, .pth or .npz file of {architecture})")
    overlay = {"file": str(checkpoint)} if checkpoint is not None else None
    # the weights' seed must not reseed the process: the run's seed (data order) stays where it was
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(int(seed))
        try:
            model = timm.create_model(architecture, pretrained=bool(checkpoint) or pretrained,
                                      num_classes=int(num_classes), pretrained_cfg_overlay=overlay, **model_kwargs)
        except RuntimeError as e:  # a state dict of another architecture
            if checkpoint is None:
                raise
            raise ValueError(f"{checkpoint} does not fit {architecture}: {e}") from None
    return model


def export_timm(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write a plain timm model as timm's hub layout (``model.safetensors`` + ``config.json`` with
    ``architecture``, ``num_classes`` and ``pretrained_cfg``), atomically; load it back with
    :func:`load_exported`."""
    from safetensors.torch import save_file

    from ..utils.atomic import atomic_dir

    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    arch = cfg.get("architecture") or type(model).__name__
    config = {"architecture": arch, "num_classes": int(getattr(model, "num_classes", 0)),
              "num_features": int(getattr(model, "num_features", 0)),
              "pretrained_cfg": {k: v for k, v in cfg.items() if isinstance(v, (str, int, float, list, tuple, type(None)))},
              "model_args": getattr(model, "llava_san_model_args", {})}
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(folder) as tmp:
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=list))
    return Path(folder)


def load_exported(folder: str | os.PathLike) -> nn.Module:
    """The timm model of an :func:`export_timm` folder (architecture and head size from ``config.json``)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    model = build_timm_classifier(config["architecture"], config["num_classes"], **config.get("model_args", {}))
    # every tensor, the head included, strictly (timm's pretrained loading would drop the head)
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return model.eval()


def build_tiny_vit(num_classes: int, img_size: int = 32, patch_size: int = 8, embed_dim: int = 64, depth: int = 4,
                   num_heads: int = 4, mlp_ratio: float = 4.0, seed: int = 0, checkpoint: Optional[str] = None) -> nn.Module:
    """A small timm ViT (random unless ``checkpoint``), the architecture registered as
    ``vit_base_patch16_224`` with these sizes: the embedded CPU run's backbone."""
    args = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                mlp_ratio=mlp_ratio)
    model = build_timm_classifier("vit_base_patch16_224", num_classes, checkpoint=checkpoint, seed=seed, **args)
    model.llava_san_model_args = args  # recorded by export_timm, so the export rebuilds the same shape
    return model


__all__ = ["build_timm_classifier", "build_tiny_vit", "export_timm", "load_exported"]
