"""Saving and loading a trained adapter: one self-contained safetensors folder.

Layout of an adapter folder::

    adapter_config.json          peft LoraConfig (language-tower regex, r, alpha, use_dora, ...)
    adapter_model.safetensors    peft adapter tensors: lora_A/B and the DoRA magnitudes
    san_config.json              SanConfig with its resolved source -> target pairs (absent without SAN)
    san_state.safetensors        every SAN tensor (γ̄ buffers ``<layer>.san_gamma_ema``)
    extra_trainable.safetensors  other trained tensors, e.g. LLaVA's projector (absent if none)
    llava_san_adapter.json       manifest: base model class, text-model shapes, adapted layer shapes

The folder is written atomically (a reader never sees half of it). Loading checks the manifest
against the base model first, so an adapter from another architecture fails with a clear message
instead of a shape error deep inside peft.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from ..utils.atomic import atomic_dir
from .adapters import adapted_module_names, base_transformers_model, is_adapter_param
from .san import SanConfig, get_san_model, get_san_state, san_config_json

MANIFEST = "llava_san_adapter.json"
SAN_CONFIG = "san_config.json"
SAN_STATE = "san_state.safetensors"
EXTRA = "extra_trainable.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
_TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size")


def _fingerprint(model: nn.Module) -> dict[str, Any]:
    """What must match between the training base and a loading base."""
    base = base_transformers_model(model)
    cfg = base.config
    text = getattr(cfg, "text_config", None) or cfg
    return {
        "base_model_class": type(base).__name__,
        "text_config": {k: getattr(text, k, None) for k in _TEXT_KEYS},
    }


def _cpu(t: torch.Tensor) -> torch.Tensor:
    # A ZeRO-3 parameter that was not gathered is an empty placeholder (numel 0; state_dict() copies lose
    # its ds_numel): saving it is LLaVA's known ZeRO-3 failure (an adapter of empty tensors). Refuse it.
    if t.numel() == 0 or (hasattr(t, "ds_numel") and t.numel() != t.ds_numel):
        raise ValueError(
            "save_adapter got a ZeRO-3 partitioned tensor (not gathered); save with "
            "llava_san.checkpoint.save_final_adapter on every rank, which gathers the trained tensors")
    return t.detach().to("cpu").contiguous()


def save_adapter(model: PeftModel, directory: str | os.PathLike) -> Path:
    """Write the adapter of ``model`` (peft + SAN + other trainable modules) to ``directory``, atomically.

    Returns the folder. Under data parallelism call :func:`llava_san.peft.sync_gamma_ema` on every rank
    first, then this on rank 0.
    """
    if not isinstance(model, PeftModel):
        raise TypeError(f"save_adapter expects a peft.PeftModel, got {type(model).__name__}")
    base = base_transformers_model(model)
    state = get_san_state(model)
    extra = {n: _cpu(p) for n, p in base.named_parameters() if p.requires_grad and not is_adapter_param(n)}
    # ds_shape: under ZeRO-3 the frozen base weight is a [0] placeholder (it is not gathered for saving)
    adapted = {n: list(getattr(w, "ds_shape", w.shape)) for n, w in
               ((n, base.get_submodule(n).get_base_layer().weight) for n in adapted_module_names(model))}
    manifest = {
        "format": "llava-san-adapter",
        "version": 1,
        **_fingerprint(model),
        "adapted_shapes": adapted,
        "san": state is not None,
        "extra_trainable": sorted(extra),
    }
    with atomic_dir(directory) as tmp:
        peft_sd = {k: _cpu(v) for k, v in get_peft_model_state_dict(model).items()}
        save_file(peft_sd, str(tmp / PEFT_WEIGHTS))
        model.peft_config[model.active_adapter].save_pretrained(str(tmp))
        if state is not None:
            (tmp / SAN_CONFIG).write_text(san_config_json(state.cfg))
            save_file({f"{s.name}.san_gamma_ema": _cpu(s.module.san_gamma_ema) for s in state.slots},
                      str(tmp / SAN_STATE))
        if extra:
            save_file(extra, str(tmp / EXTRA))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return Path(directory)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} is missing: {path.parent} is not a llava-san adapter folder (written by save_adapter)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the adapter folder is damaged") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; the adapter folder {path.parent} is incomplete")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{path} cannot be read as safetensors ({e}); the adapter file is damaged") from None


def check_compatible(base_model: nn.Module, directory: str | os.PathLike) -> dict:
    """Raise ``ValueError`` if the adapter in ``directory`` was trained on another architecture/shape."""
    directory = Path(directory)
    manifest = _read_json(directory / MANIFEST)
    if manifest.get("format") != "llava-san-adapter":
        raise ValueError(f"{directory / MANIFEST} is not a llava-san adapter manifest")
    here = _fingerprint(base_model)
    theirs = {k: manifest.get(k) for k in here}
    if here != theirs:
        raise ValueError(
            f"adapter {directory} was trained on {theirs['base_model_class']} with text config "
            f"{theirs['text_config']}, but the base model given is {here['base_model_class']} with "
            f"{here['text_config']}; load it onto the base checkpoint it was trained from"
        )
    base = base_transformers_model(base_model)
    for name, shape in manifest.get("adapted_shapes", {}).items():
        try:
            weight = base.get_submodule(name).weight
        except AttributeError:
            raise ValueError(f"adapter {directory} adapts {name}, which the base model does not have") from None
        if list(weight.shape) != shape:
            raise ValueError(
                f"adapter {directory} expects {name} of shape {shape}, the base model has {list(weight.shape)}"
            )
    return manifest


def load_adapter(base_model: nn.Module, directory: str | os.PathLike, is_trainable: bool = False) -> PeftModel:
    """Rebuild the adapted model from ``base_model`` (a fresh transformers model) and a saved adapter.

    With ``is_trainable=False`` the result is in eval mode with everything frozen; with ``True`` the
    adapter (and saved extra modules, e.g. the projector) stay trainable, to continue training.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter folder {directory} does not exist")
    manifest = check_compatible(base_model, directory)
    lora_config = LoraConfig.from_pretrained(str(directory))
    san_config = SanConfig.from_dict(_read_json(directory / SAN_CONFIG)) if manifest["san"] else None
    model = get_san_model(base_model, lora_config, san_config)

    peft_sd = _load_tensors(directory / PEFT_WEIGHTS)
    expected = set(get_peft_model_state_dict(model))
    missing, unexpected = sorted(expected - set(peft_sd)), sorted(set(peft_sd) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{directory / PEFT_WEIGHTS} does not match the adapter config: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    set_peft_model_state_dict(model, peft_sd)

    base = base_transformers_model(model)
    if san_config is not None:
        state = get_san_state(model)
        tensors = _load_tensors(directory / SAN_STATE)
        for slot in state.slots:
            key = f"{slot.name}.san_gamma_ema"
            if key not in tensors:
                raise ValueError(f"{directory / SAN_STATE} lacks {key}")
            slot.module.san_gamma_ema.copy_(tensors[key])
    if manifest.get("extra_trainable"):
        tensors = _load_tensors(directory / EXTRA)
        for param in _copy_into(base, tensors, manifest["extra_trainable"], directory / EXTRA):
            param.requires_grad_(is_trainable)
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    return model


def apply_adapter_folder(model: nn.Module, directory: str | os.PathLike, merge: bool = True) -> nn.Module:
    """A training run's ``adapter/`` folder onto a fresh base ``model``, for inference or export.

    Two kinds of folder: a :func:`save_adapter` folder (LoRA/DoRA/SAN, plus the projector): loaded
    with :func:`load_adapter` and, with ``merge``, folded into the weights by
    :func:`~llava_san.peft.merge_san` (a plain transformers model comes back); or a projector-only
    folder (``peft=none`` runs: just ``extra_trainable.safetensors``), copied into ``model``.
    """
    from .san import merge_san

    directory = Path(directory)
    if (directory / MANIFEST).is_file():
        peft_model = load_adapter(model, directory)
        return merge_san(peft_model) if merge else peft_model
    extra = directory / EXTRA
    if not extra.is_file():
        raise FileNotFoundError(f"adapter folder {directory} has neither {MANIFEST} nor {EXTRA}")
    tensors = _load_tensors(extra)
    _copy_into(model, tensors, list(tensors), extra)
    return model


def _copy_into(model: nn.Module, tensors: dict[str, torch.Tensor], names: list[str],
               source: Path) -> list[torch.nn.Parameter]:
    """Copy ``tensors[name]`` into ``model``'s parameter ``name`` for each of ``names``; returns those
    parameters. Nothing is copied unless every name is in the file and the model with the same shape."""
    params = dict(model.named_parameters())
    absent = sorted(n for n in names if n not in tensors)
    if absent:
        raise ValueError(f"{source} lacks {absent[:3]} ({len(absent)} tensors)")
    unknown = sorted(n for n in names if n not in params)
    if unknown:
        raise ValueError(f"{source}: tensors the model does not have: {unknown[:3]}")
    for n in names:
        if tuple(tensors[n].shape) != tuple(params[n].shape):
            raise ValueError(f"{source}: {n} has shape {tuple(tensors[n].shape)}, the model has "
                             f"{tuple(params[n].shape)}")
    with torch.no_grad():
        for n in names:
            params[n].copy_(tensors[n])
    return [params[n] for n in names]
