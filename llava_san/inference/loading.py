"""Model loading for ``python -m evaluation``, chat, predict and serve: a training run folder (base
rebuilt from the run's config + ``adapter/``), its ``merged/`` folder, a llava-hf checkpoint, an
adapter folder, or any ``conf/model`` config. A text-only causal LM (a ``LlamaForCausalLM`` checkpoint
folder, or a run whose ``model.build`` builds one) loads as ``(model, tokenizer)``: the tokenizer
stands where a LLaVA processor would.

torch, transformers and the training code are imported inside the functions that load a model: a
run checks every input (and a ``generate=false`` run scores) without their seconds of import time.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..export import run_config_file

__all__ = ["LoadedModel", "default_model_id", "describe_path", "is_causal_lm_checkpoint", "load_causal_lm",
           "load_model", "prepare_generation_tokenizer"]

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready to answer: in eval mode, on its device."""

    model: Any
    processor: Any
    model_id: str
    source: str  # what was loaded, for the logs and the report


def _resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def _eval_dtype(dtype: Optional[str], device: str) -> Optional[str]:
    """``auto``: float16 on a GPU (LLaVA's ``load_pretrained_model``), the model's own dtype on CPU."""
    if dtype in (None, "auto"):
        return "float16" if device.startswith("cuda") else None
    return str(dtype)


def describe_path(path: str | os.PathLike) -> str:
    """What ``path`` is: ``"run"`` (a ``python -m train`` folder: config + ``adapter/`` or ``merged/``),
    ``"checkpoint"`` (a transformers LLaVA folder: ``config.json``), ``"adapter"`` (a
    :func:`llava_san.peft.save_adapter` folder). Anything else raises ``FileNotFoundError``."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"path={path}: no such folder (a training run, its merged/ folder, a "
                                "llava-hf checkpoint or an adapter folder)")
    if (p / "config.json").is_file():
        return "checkpoint"
    if (p / "llava_san_adapter.json").is_file() or (p / "extra_trainable.safetensors").is_file():
        return "adapter"
    if run_config_file(p) is not None and ((p / "adapter").is_dir() or (p / "merged").is_dir()):
        return "run"
    found = sorted(x.name for x in p.iterdir())[:12]
    raise FileNotFoundError(
        f"path={path}: not a training run (config.yaml + adapter/ or merged/), a transformers checkpoint "
        f"(config.json) or an adapter folder (llava_san_adapter.json); found {found}")


def load_model(
    model_cfg: Any = None,
    *,
    path: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    use_merged: bool = False,
    merge: bool = True,
    dtype: Optional[str] = "auto",
    attn_implementation: Optional[str] = None,
    device: Optional[str] = "auto",
    model_id: Optional[str] = None,
) -> LoadedModel:
    """Load what ``python -m evaluation`` evaluates.

    * ``path`` = a training run folder: the base model is rebuilt from the run's ``config.yaml``
      (``model.build``: tiny / Vicuna+CLIP parts / llava-hf, same seed and paths) and the run's
      ``adapter/`` loaded onto it (:func:`llava_san.peft.load_adapter`); ``use_merged`` loads the
      run's ``merged/`` folder instead.
    * ``path`` = a transformers LLaVA checkpoint (a ``merged/`` folder, ``llava-hf/llava-1.5-7b-hf``):
      :func:`llava_san.models.load_llava_hf`; a causal-LM checkpoint (``config.json`` whose
      ``architectures`` are ``*ForCausalLM``, tokenizer files beside it): :func:`load_causal_lm`.
    * ``path`` = an adapter folder, or ``adapter`` given: loaded onto ``model_cfg`` 's model.
    * otherwise ``model_cfg`` (a ``conf/model/*.yaml`` node: ``build`` + ``processor``) alone.

    ``merge`` folds LoRA/DoRA/SAN into the weights before generating (LLaVA's ``load_pretrained_model``
    merges LoRA the same way; it is also faster). ``dtype="auto"``: float16 on a GPU as LLaVA
    evaluates, the configured dtype on CPU. ``attn_implementation`` (``eager``/``sdpa``/...) overrides
    the model's.
    """
    import torch

    dev = _resolve_device(device)
    dt = _eval_dtype(dtype, dev)
    source = _Source.find(model_cfg, path, adapter, use_merged)
    model, processor = source.build(dt, attn_implementation, merge)
    if dt is not None:
        from llava_san.models import resolve_dtype

        model.to(resolve_dtype(dt))
    model.to(torch.device(dev))
    for prm in model.parameters():
        prm.requires_grad_(False)
    model.eval()
    model_id = model_id or default_model_id(path, adapter=adapter, use_merged=use_merged)
    log.info("evaluating %s as model_id=%r on %s", source.description, model_id, dev)
    return LoadedModel(model, processor, str(model_id), source.description)


@dataclass
class _Source:
    """What :func:`load_model` builds: a transformers checkpoint, or a model config (+ an adapter)."""

    checkpoint: Optional[Path]
    node: Any
    adapter_dir: Optional[Path]
    description: str
    kind: Optional[str]

    @classmethod
    def find(cls, model_cfg: Any, path: Any, adapter: Any, use_merged: bool) -> "_Source":
        """Where the model comes from, by what ``path`` is (:func:`describe_path`)."""
        kind = describe_path(path) if path is not None else None
        p = Path(path).expanduser().resolve() if path is not None else None
        adapter_dir = Path(adapter).expanduser() if adapter is not None else None
        if kind == "run":
            return cls._from_run(p, adapter_dir, use_merged)
        if kind == "checkpoint":
            return cls(p, None, None, f"checkpoint {p}", kind)
        if kind == "adapter":
            return cls(None, model_cfg, p, f"adapter {p}", kind)
        return cls(None, model_cfg, adapter_dir, "model config", kind)

    @classmethod
    def _from_run(cls, p: Path, adapter_dir: Optional[Path], use_merged: bool) -> "_Source":
        """A training run: its ``merged/`` folder, or the base model of its config + its adapter."""
        if use_merged or not (p / "adapter").is_dir():
            checkpoint = p / "merged"
            if not checkpoint.is_dir():
                raise FileNotFoundError(
                    f"{p} has no merged/ folder (train with export=true, or use its adapter)")
            return cls(checkpoint, None, None, f"run {p} (merged/)", "run")
        from omegaconf import OmegaConf

        cfg_file = run_config_file(p)
        run_cfg = OmegaConf.load(cfg_file)
        if "model" not in run_cfg or "build" not in run_cfg.model:
            raise ValueError(f"{cfg_file}: no model.build node; is {p} a `python -m train` run folder?")
        adapter_dir = adapter_dir or p / "adapter"
        return cls(None, run_cfg.model, adapter_dir, f"run {p} (adapter {adapter_dir})", "run")

    def build(self, dt: Optional[str], attn_implementation: Optional[str], merge: bool) -> tuple[Any, Any]:
        """``(model, processor)``, the adapter loaded (and merged when ``merge``)."""
        if self.checkpoint is not None:
            if is_causal_lm_checkpoint(self.checkpoint):
                return load_causal_lm(self.checkpoint, dt, attn_implementation)
            from llava_san.models import load_llava_hf  # torch + transformers: only when a model is built

            return load_llava_hf(str(self.checkpoint), dtype=dt or "auto",
                                 attn_implementation=attn_implementation or "sdpa")
        if self.node is None:
            raise ValueError("nothing to evaluate: give path=<run | checkpoint | adapter> or a model config")
        from llava_san.models import build_from_config

        model, processor = build_from_config(self.node, dt)
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        if self.adapter_dir is not None:
            from llava_san.peft import apply_adapter_folder

            model = apply_adapter_folder(model, self.adapter_dir, merge)
            self.description += "" if self.kind else f" + adapter {self.adapter_dir}"
        if not hasattr(processor, "tokenizer"):  # a causal LM's tokenizer (e.g. model.build: tiny_llama)
            prepare_generation_tokenizer(processor)
        return model, processor


def is_causal_lm_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path/config.json`` describes a text-only causal LM (``architectures`` such as
    ``LlamaForCausalLM``) rather than a LLaVA checkpoint."""
    import json

    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    archs = config.get("architectures") or []
    return (config.get("model_type") != "llava" and bool(archs)
            and all(str(a).endswith("ForCausalLM") for a in archs))


def prepare_generation_tokenizer(tokenizer: Any) -> Any:
    """A causal LM's tokenizer set up as LLM-Adapters' ``commonsense_evaluate.py`` does for batched
    generation: ``padding_side = "left"`` and, when it has none, ``pad_token_id = 0`` (LLaMA's
    ``<unk>``; padded positions are masked out, so the id does not change any answer)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = 0
    return tokenizer


def load_causal_lm(path: str | os.PathLike, dtype: Optional[str] = None,
                   attn_implementation: Optional[str] = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a transformers causal-LM folder (``LlamaForCausalLM`` + tokenizer
    files): ``AutoModelForCausalLM`` in ``dtype`` (None/auto: the checkpoint's) and ``AutoTokenizer``,
    prepared by :func:`prepare_generation_tokenizer`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llava_san.models import resolve_dtype

    kw: dict[str, Any] = {"dtype": "auto" if dtype in (None, "auto") else resolve_dtype(dtype)}
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(str(path), **kw)
    tokenizer = prepare_generation_tokenizer(AutoTokenizer.from_pretrained(str(path)))
    model.eval()
    return model, tokenizer


def default_model_id(path: str | os.PathLike | None = None, *, adapter: str | os.PathLike | None = None,
                     use_merged: bool = False, model_cfg: Any = None) -> str:
    """The ``model_id`` written in the answers (and checked on resume) when none is configured: the
    folder name of ``path`` (``-merged`` added for a run's ``merged/``), else of ``adapter``, else the
    model config's builder name (``build_tiny``...)."""
    if path is not None:
        p = Path(path).expanduser().resolve()
        merged = ((p / "merged").is_dir() and not (p / "config.json").is_file()
                  and (use_merged or not (p / "adapter").is_dir()))  # what load_model loads
        return p.name + ("-merged" if merged else "")
    if adapter is not None:
        return Path(adapter).expanduser().resolve().name
    try:
        return str(model_cfg.build["_target_"]).rsplit(".", 1)[-1]
    except (AttributeError, KeyError, TypeError):
        return "model"
