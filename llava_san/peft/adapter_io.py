"""Saving and loading a trained adapter: one self-contained safetensors folder.

Layout of an adapter folder (manifest version 3)::

    adapter_config.json          peft LoraConfig (language-tower regex, r, alpha, use_dora, the projector
                                 as ``modules_to_save``, ``base_model_name_or_path``); in a SAN folder a
                                 stub whose ``peft_type`` makes stock peft refuse it (:mod:`.stock_layout`)
    lora_config.json             the LoraConfig of a SAN folder (absent otherwise)
    adapter_model.safetensors    peft tensors: lora_A/B, the DoRA magnitudes and the ``modules_to_save``
                                 modules (LLaVA's projector) as stock peft saves them
    san_config.json              SanConfig with its resolved source -> target pairs (absent without SAN)
    san_state.safetensors        every SAN tensor (γ̄ buffers ``<layer>.san_gamma_ema``)
    extra_trainable.safetensors  trained tensors that are not whole modules (absent if none)
    README.md                    model card: what the folder is and how to load it (:mod:`.model_card`)
    llava_san_adapter.json       manifest: base model class, text-model shapes, adapted layer shapes,
                                 which file holds what (``files``), and its ``kind``, which names the
                                 recipe that loads it (:mod:`llava_san.peft.recipes`: ``adapter``,
                                 ``projector_only``, ``trained_weights``)

A LoRA/DoRA folder without SAN is a stock peft adapter: ``PeftModel.from_pretrained(base, folder)``
gives the model :func:`load_adapter` gives. Folders of manifest version 2 (the projector in
``extra_trainable.safetensors``, the LoRA config in ``adapter_config.json``) load as before.

A folder of kind ``projector_only``/``trained_weights`` (no adapter) holds only
``extra_trainable.safetensors`` and the manifest (:func:`save_extra_only`, :func:`load_extra_only`).

The folder is written atomically (a reader never sees half of it). Loading checks the manifest
against the base model first, so an adapter from another architecture fails with a clear message
instead of a shape error deep inside peft.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from ..distributed.zero3 import full_shape, is_placeholder
from ..utils.atomic import atomic_dir
from . import stock_layout
from .adapters import adapted_module_names, base_transformers_model, is_adapter_param, is_projector_param
from .san_config import SanConfig, san_config_json
from .model_card import model_card
from .san_model import get_san_model, get_san_state

MANIFEST = "llava_san_adapter.json"
CONFIG = "adapter_config.json"
SAN_LORA_CONFIG = "lora_config.json"
MODEL_CARD = "README.md"
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
    # saving an ungathered ZeRO-3 placeholder is LLaVA's known ZeRO-3 failure (an adapter of empty
    # tensors): refuse it
    if is_placeholder(t):
        raise ValueError(
            "save_adapter got a ZeRO-3 partitioned tensor (not gathered); save with "
            "llava_san.checkpoint.save_final_adapter on every rank, which gathers the trained tensors")
    return t.detach().to("cpu").contiguous()


def base_model_name(model: nn.Module) -> Optional[str]:
    """The hub id or local folder the base model was loaded from (its config's ``_name_or_path``), or
    ``None`` for a model built from a config (the tiny model, a base assembled from parts): peft's own
    convention for ``base_model_name_or_path``."""
    base = base_transformers_model(model)
    return (getattr(base.config, "_name_or_path", "") or getattr(base, "name_or_path", "") or None)


def save_adapter(model: PeftModel, directory: str | os.PathLike, base_model: Optional[dict] = None,
                 vision: Optional[str] = None) -> Path:
    """Write the adapter of ``model`` (peft + SAN + other trainable modules) to ``directory``, atomically.

    ``base_model``: how the base was built (a run's ``model.build`` config), recorded in the manifest
    and the model card. ``vision``: the SSF method on the vision tower (``ssf``/``san_ssf``), recorded
    so :func:`load_adapter` adds the same sites before copying their vectors. Returns the folder. Under data parallelism call
    :func:`llava_san.peft.sync_gamma_ema` on every rank first, then this on rank 0.
    """
    if not isinstance(model, PeftModel):
        raise TypeError(f"save_adapter expects a peft.PeftModel, got {type(model).__name__}")
    base = base_transformers_model(model)
    state = get_san_state(model)
    extra = {n: p for n, p in base.named_parameters() if p.requires_grad and not is_adapter_param(n)}
    whole = stock_layout.modules_to_save(base, extra)
    stock = state is None and whole is not None
    # full_shape: under ZeRO-3 the frozen base weight is a placeholder (it is not gathered for saving)
    adapted = {n: list(full_shape(w)) for n, w in
               ((n, base.get_submodule(n).get_base_layer().weight) for n in adapted_module_names(model))}
    lora_cfg = copy.deepcopy(model.peft_config[model.active_adapter])
    lora_cfg.modules_to_save = whole or None
    lora_cfg.base_model_name_or_path = base_model_name(model)
    lora_cfg.inference_mode = True  # as peft saves it; load_adapter(is_trainable=True) turns it off
    files = {"lora_config": CONFIG if stock else SAN_LORA_CONFIG,
             "extra": None if not extra else (PEFT_WEIGHTS if whole is not None else EXTRA)}
    manifest = {
        "format": "llava-san-adapter",
        "version": 3,
        "kind": "adapter",
        **_fingerprint(model),
        "adapted_shapes": adapted,
        "lora": _lora_settings(lora_cfg),
        "san": state is not None,
        "extra_trainable": sorted(extra),
        "modules_to_save": whole or [],
        "files": files,
        "stock_peft": stock,
        "base_model_name_or_path": lora_cfg.base_model_name_or_path,
        "base_model": _plain(base_model),
    }
    if vision is not None:
        manifest["vision"] = vision
    with atomic_dir(directory) as tmp:
        peft_sd = dict(get_peft_model_state_dict(model))
        if whole:
            peft_sd.update(stock_layout.module_tensors(base, whole))
        save_file({k: _cpu(v) for k, v in peft_sd.items()}, str(tmp / PEFT_WEIGHTS))
        lora_cfg.save_pretrained(str(tmp))  # writes adapter_config.json
        if not stock:  # stock peft must refuse the folder: the real config moves aside
            os.replace(tmp / CONFIG, tmp / SAN_LORA_CONFIG)
            refusal = stock_layout.REFUSAL if state is not None else stock_layout.REFUSAL_PARTIAL
            (tmp / CONFIG).write_text(json.dumps(
                {"peft_type": refusal, "base_model_name_or_path": lora_cfg.base_model_name_or_path,
                 "llava_san_lora_config": SAN_LORA_CONFIG}, indent=2))
        if state is not None:
            (tmp / SAN_CONFIG).write_text(san_config_json(state.cfg))
            save_file({f"{s.name}.san_gamma_ema": _cpu(s.module.san_gamma_ema) for s in state.slots},
                      str(tmp / SAN_STATE))
        if extra and whole is None:
            save_file({n: _cpu(p) for n, p in extra.items()}, str(tmp / EXTRA))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        (tmp / MODEL_CARD).write_text(model_card(manifest, None if state is None else state.cfg.to_dict()))
    return Path(directory)


def _plain(node: Any) -> Any:
    """``node`` (a mapping, e.g. an OmegaConf node) as plain JSON data, or None."""
    if node is None:
        return None
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(node):
            node = OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra, a dependency
        pass
    return json.loads(json.dumps(node, default=str))


def _lora_settings(cfg: LoraConfig) -> dict[str, Any]:
    """What decides the adapter's arithmetic: an edited ``adapter_config.json`` is caught against it."""
    targets = cfg.target_modules
    targets = targets if isinstance(targets, str) else sorted(targets or [])
    return {"r": int(cfg.r), "lora_alpha": float(cfg.lora_alpha), "use_dora": bool(cfg.use_dora),
            "use_rslora": bool(cfg.use_rslora), "target_modules": targets,
            "modules_to_save": sorted(cfg.modules_to_save or [])}


def save_extra_only(model: nn.Module, directory: str | os.PathLike, base_model: Optional[dict] = None) -> Path:
    """Write a model's trained tensors without any adapter, atomically, with a manifest of kind
    ``projector_only`` (``peft=none``: LLaVA's projector) or ``trained_weights`` (``peft=full``: every
    trained weight); ``base_model`` as for :func:`save_adapter`. :func:`load_extra_only` loads either."""
    base = base_transformers_model(model)
    extra = {n: _cpu(p) for n, p in base.named_parameters() if p.requires_grad}
    kind = "projector_only" if all(is_projector_param(n) for n in extra) else "trained_weights"
    manifest = {"format": "llava-san-adapter", "version": 2, "kind": kind, **_fingerprint(model),
                "adapted_shapes": {}, "lora": None, "san": False, "extra_trainable": sorted(extra),
                "base_model_name_or_path": base_model_name(model), "base_model": _plain(base_model)}
    with atomic_dir(directory) as tmp:
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
    """The tensors of a safetensors file, each checked finite (NaN/inf refused with its name)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; the adapter folder {path.parent} is incomplete")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{path} cannot be read as safetensors ({e}); the adapter file is damaged") from None
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path}: tensor {name} holds NaN or inf; the adapter is damaged (or its "
                             "training diverged) and is not loaded")
    return tensors


def _check_shapes(source: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Size]) -> None:
    """Exactly the expected names, each with exactly the expected shape (no broadcasting)."""
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source} does not match the model: missing {missing[:3]} ({len(missing)}), "
                         f"unexpected {unexpected[:3]} ({len(unexpected)})")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise ValueError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, the model expects "
                             f"{tuple(shape)}")


def _lora_config(directory: Path, manifest: dict) -> LoraConfig:
    """The folder's LoRA config (``adapter_config.json``, or ``lora_config.json`` in a folder stock peft
    must refuse; the manifest's ``files`` says which) as a ``LoraConfig``, checked against the manifest's
    record of it."""
    path = directory / manifest.get("files", {}).get("lora_config", CONFIG)
    raw = _read_json(path)
    if raw.get("peft_type") not in (None, "LORA"):
        raise ValueError(f"{path}: peft_type {str(raw.get('peft_type'))[:80]!r}, expected 'LORA'")
    try:
        cfg = LoraConfig.from_peft_type(**LoraConfig.check_kwargs(**raw))
        here = _lora_settings(cfg)  # also catches fields peft accepts unchecked (e.g. r="sixteen")
    except Exception as e:  # peft raises KeyError/TypeError/ValueError on edited fields
        raise ValueError(f"{path} is not a valid peft LoRA config ({type(e).__name__}: {e}); the adapter "
                         "folder is damaged") from None
    recorded = manifest.get("lora")
    if recorded is not None:
        # a setting the manifest did not record yet (older folders) is not compared
        changed = {k: (recorded.get(k), here[k]) for k in here if k in recorded and recorded[k] != here[k]}
        if changed:
            raise ValueError(f"{path} disagrees with {directory / MANIFEST} on "
                             + ", ".join(f"{k} ({a!r} when saved, {b!r} now)" for k, (a, b) in changed.items())
                             + ": the config was edited after training; restore it or retrain")
    return cfg


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of an adapter folder (``llava_san_adapter.json``), checked to be one."""
    directory = Path(directory)
    manifest = _read_json(directory / MANIFEST)
    if manifest.get("format") != "llava-san-adapter":
        raise ValueError(f"{directory / MANIFEST} is not a llava-san adapter manifest")
    return manifest


def check_compatible(base_model: nn.Module, directory: str | os.PathLike) -> dict:
    """Raise ``ValueError`` if the adapter in ``directory`` was trained on another architecture/shape;
    returns its manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
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
    if manifest.get("kind", "adapter") != "adapter":
        raise ValueError(f"{directory / MANIFEST} is a {manifest['kind']!r} folder, not a LoRA/DoRA adapter: "
                         "load it with llava_san.peft.apply_adapter_folder")
    lora_config = _lora_config(directory, manifest)
    # the modules_to_save modules are copied into the base as they are (no peft wrapper): the model is the
    # one training had
    whole = list(lora_config.modules_to_save or [])
    lora_config.modules_to_save = None
    lora_config.inference_mode = not is_trainable  # saved as True (peft's convention): peft would freeze LoRA
    if manifest["san"]:
        try:
            san_config = SanConfig.from_dict(_read_json(directory / SAN_CONFIG))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{directory / SAN_CONFIG} is not a valid SAN config ({type(e).__name__}: {e})") from None
    else:
        san_config = None
    # every tensor is read and checked before the base model is touched
    peft_sd, module_sd = stock_layout.split_module_tensors(_load_tensors(directory / PEFT_WEIGHTS), whole)
    san_sd = _load_tensors(directory / SAN_STATE) if san_config is not None else {}
    extra_file = manifest.get("files", {}).get("extra", EXTRA)
    extra_sd = _load_tensors(directory / EXTRA) if manifest.get("extra_trainable") and extra_file == EXTRA else {}
    model = get_san_model(base_model, lora_config, san_config)
    if manifest.get("vision"):  # SSF on the vision tower: the same sites, before their vectors are copied
        from ..vision.ssf import SsfConfig, apply_ssf

        apply_ssf(model.get_base_model(), SsfConfig(method=manifest["vision"]))
    _check_shapes(directory / PEFT_WEIGHTS, peft_sd,
                  {k: v.shape for k, v in get_peft_model_state_dict(model).items()})
    set_peft_model_state_dict(model, peft_sd)

    base = base_transformers_model(model)
    if san_config is not None:
        state = get_san_state(model)
        _check_shapes(directory / SAN_STATE, san_sd,
                      {f"{s.name}.san_gamma_ema": s.module.san_gamma_ema.shape for s in state.slots})
        for slot in state.slots:
            slot.module.san_gamma_ema.copy_(san_sd[f"{slot.name}.san_gamma_ema"])
    if whole:
        expected = {f"{m}.{k}" for m in whole for k in base.get_submodule(m).state_dict()}
        if set(module_sd) != expected:
            raise ValueError(f"{directory / PEFT_WEIGHTS} does not hold the whole modules {whole} its config "
                             f"lists (missing {sorted(expected - set(module_sd))[:3]})")
        _copy_into(base, module_sd, sorted(module_sd), directory / PEFT_WEIGHTS)
    if extra_sd:
        _copy_into(base, extra_sd, manifest["extra_trainable"], directory / EXTRA)
    trained = set(manifest.get("extra_trainable") or [])
    absent = trained - set(module_sd) - set(extra_sd)
    if absent:
        raise ValueError(f"{directory}: the trained tensors {sorted(absent)[:3]} listed in {MANIFEST} are in "
                         "no file of the folder; the adapter folder is incomplete")
    for name, param in base.named_parameters():
        if name in trained:
            param.requires_grad_(is_trainable)
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    return model


def load_extra_only(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Copy the tensors of a :func:`save_extra_only` folder (kind ``projector_only`` or
    ``trained_weights``) into ``model``, in place; its ``requires_grad`` flags and mode are left as they are."""
    directory = Path(directory)
    manifest = check_compatible(model, directory)
    if manifest.get("kind", "adapter") not in ("projector_only", "trained_weights"):
        raise ValueError(f"{directory / MANIFEST} is a {manifest.get('kind', 'adapter')!r} folder, not a "
                         "projector-only or trained-weights folder: load it with load_adapter")
    extra = directory / EXTRA
    tensors = _load_tensors(extra)
    _copy_into(model, tensors, list(manifest["extra_trainable"]), extra)
    if set(tensors) != set(manifest["extra_trainable"]):
        raise ValueError(f"{extra} holds other tensors than its manifest lists")
    return model


def _copy_into(model: nn.Module, tensors: dict[str, torch.Tensor], names: list[str],
               source: Path) -> list[torch.Tensor]:
    """Copy ``tensors[name]`` into ``model``'s parameter or buffer ``name`` for each of ``names``; returns
    them. Nothing is copied unless every name is in the file and the model with the same shape."""
    params = dict(model.state_dict(keep_vars=True))
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
