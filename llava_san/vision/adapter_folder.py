"""The saved folder of a vision recipe (SSF, SAN-SSF, MoPPA, LoRA on a ViT, head only).

A folder holds ``llava_san_adapter.json`` (the manifest: ``kind``, the recipe's settings, the backbone's
signature and the tensor list), ``vision_adapter.safetensors`` (every trained tensor: the method's and
the new head's, under the adapted model's parameter names) and a short ``README.md``. It is written
atomically; a damaged, partial or foreign folder is refused with the reason before anything is copied.

The backbone signature is a hash of the frozen base's parameter names and shapes, taken before the
recipe changes it: a folder loads only onto the same architecture (same depth, width, patch, head size).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file
from torch import nn

from ..utils.atomic import atomic_dir

MANIFEST = "llava_san_adapter.json"
WEIGHTS = "vision_adapter.safetensors"
FORMAT = "llava-san-adapter"  # one format with the LLaVA folders; the kind tells the recipe
VERSION = 1


def backbone_signature(model: nn.Module) -> str:
    """sha256 over ``name:shape`` of every parameter and buffer of ``model`` (a fresh, unadapted base)."""
    lines = [f"{n}:{tuple(t.shape)}" for n, t in model.state_dict().items()]
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


def trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter with ``requires_grad``, detached, contiguous, on the CPU."""
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_vision_adapter(model: nn.Module, folder: str | os.PathLike, kind: str, settings: dict[str, Any],
                        signature: str, base_model: Optional[dict] = None) -> Path:
    """Write ``model``'s trained tensors and the manifest to ``folder`` (atomically)."""
    tensors = trained_tensors(model)
    if not tensors:
        raise ValueError(f"{kind}: the model has no trained tensors to save")
    manifest = {"format": FORMAT, "version": VERSION, "kind": kind, "settings": settings,
                "backbone_class": type(model).__name__, "backbone_signature": signature,
                "tensors": {n: list(t.shape) for n, t in sorted(tensors.items())},
                "num_trained": int(sum(t.numel() for t in tensors.values())), "base_model": base_model}
    with atomic_dir(folder) as tmp:
        save_file(tensors, str(tmp / WEIGHTS))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        (tmp / "README.md").write_text(
            f"# llava-san vision adapter ({kind})\n\nTrained tensors of a `{type(model).__name__}` "
            f"({manifest['num_trained']:,} values: the method's and the classification head's). Settings:\n\n"
            f"```json\n{json.dumps(settings, indent=2, sort_keys=True)}\n```\n\nLoad it onto the same backbone "
            "with `llava_san.peft.recipes.apply_adapter_folder(model, folder)` (merged where the method folds).\n")
    return Path(folder)


def read_vision_manifest(folder: str | os.PathLike, kinds: tuple[str, ...]) -> dict[str, Any]:
    """The manifest of a vision adapter folder of one of ``kinds`` (errors name the file and the problem)."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: {folder} is not a llava-san adapter folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the adapter folder is damaged") from None
    if manifest.get("format") != FORMAT or manifest.get("kind") not in kinds:
        raise ValueError(f"{path}: a {manifest.get('format')!r} folder of kind {manifest.get('kind')!r}, "
                         f"expected kind {' or '.join(kinds)}")
    return manifest


def load_vision_tensors(model: nn.Module, folder: str | os.PathLike, manifest: dict[str, Any]) -> nn.Module:
    """Copy the folder's tensors into ``model`` (already adapted by the same recipe), in place. Every
    tensor is checked (readable and finite, listed in the manifest, present in the model with the same
    shape) before any is copied: the checks of the LLaVA adapter folders
    (:func:`~llava_san.peft.adapter_io._load_tensors`, :func:`~llava_san.peft.adapter_io._copy_into`)."""
    from ..peft.adapter_io import _copy_into, _load_tensors

    path = Path(folder) / WEIGHTS
    tensors = _load_tensors(path)
    listed = manifest["tensors"]
    if set(tensors) != set(listed):
        raise ValueError(f"{path} holds other tensors than its manifest lists "
                         f"(missing {sorted(set(listed) - set(tensors))[:3]}, extra {sorted(set(tensors) - set(listed))[:3]})")
    _copy_into(model, tensors, sorted(tensors), path)
    return model


__all__ = ["MANIFEST", "WEIGHTS", "backbone_signature", "load_vision_tensors", "read_vision_manifest",
           "save_vision_adapter", "trained_tensors"]
