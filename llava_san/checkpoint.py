"""Checkpoints of a training run: atomic Lightning checkpoints, resume helpers, adapter and merged export.

* :class:`AtomicCheckpointIO` writes each ``.ckpt`` to a temporary file beside it and renames it into
  place (``os.replace``), so a crash never leaves a half-written ``last.ckpt``; it also drops anything
  that is not plain data, so every checkpoint loads with ``torch.load(weights_only=True)``.
* :func:`resolve_ckpt_path` turns ``ckpt_path=last`` (or a run folder, or a file) into a file, and
  refuses loudly when there is nothing to resume instead of silently starting over.
* mid-epoch resume is exact at the index level through the datamodules' own ``state_dict`` /
  ``load_state_dict`` (saved in the checkpoint by Lightning), not here.
* :func:`save_final_adapter` gathers ZeRO-3 partitioned tensors before :func:`llava_san.peft.save_adapter`
  (the known LLaVA failure: adapters saved under ZeRO-3 holding empty or initial values).
* :func:`export_merged` folds adapters + SAN (the run's recipe merges) into a plain ``LlavaForConditionalGeneration`` folder;
  under ZeRO-3, :func:`export_merged_from_adapter` does it from the saved adapter on a rebuilt base.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from peft import PeftModel
from torch import nn

from .data.llava15_text import save_attached
from .distributed import zero3
from .export_processor import export_processor
from .peft import AdapterRecipe, LoraRecipe, apply_adapter_folder, save_adapter, sync_gamma_ema
from .peft.adapter_io import save_extra_only
from .utils.atomic import atomic_dir, atomic_file, remove_stale_temporaries

LAST = "last.ckpt"


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not belong to the model of this run (or is no llava-san checkpoint)."""


class NothingToResumeError(FileNotFoundError):
    """``ckpt_path=last`` but the run folder holds no checkpoint."""


# ----------------------------------------------------------------------------------------------
# writing and reading .ckpt files
# ----------------------------------------------------------------------------------------------
_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.Size, torch.dtype, torch.device)


def _is_plain(obj: Any) -> bool:
    if isinstance(obj, _PLAIN):
        return True
    if isinstance(obj, (list, tuple, set)):
        return all(_is_plain(v) for v in obj)
    if isinstance(obj, dict):
        return all(_is_plain(k) and _is_plain(v) for k, v in obj.items())
    return False


def plain_checkpoint(checkpoint: dict) -> dict:
    """``checkpoint`` without entries that ``torch.load(weights_only=True)`` would refuse.

    Hyper-parameters (which may hold an OmegaConf node, a processor...) are dropped; the run's resolved
    config is in ``.hydra/config.yaml`` beside the checkpoints instead.
    """
    out = {}
    for k, v in checkpoint.items():
        if k in ("hyper_parameters", "datamodule_hyper_parameters", "hparams_name", "hparams_type"):
            continue
        if not _is_plain(v):
            warnings.warn(f"checkpoint entry {k!r} is not plain data and is not saved", UserWarning, stacklevel=3)
            continue
        out[k] = v
    return out


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: plain data only, atomic rename, ``weights_only=True`` loading."""

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Optional[Any] = None) -> None:
        with atomic_file(path, "wb") as fh:
            torch.save(plain_checkpoint(checkpoint), fh)

    def load_checkpoint(self, path: Any, map_location: Any = "cpu", weights_only: Optional[bool] = True) -> dict:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # unpickling error, truncated zip...
            raise CheckpointMismatchError(
                f"{path} cannot be read as a llava-san checkpoint with torch.load(weights_only=True): "
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None


def tidy_checkpoint_dir(checkpoint_dir: str | os.PathLike, resume_from: Optional[str]) -> list[Path]:
    """Before a run starts: remove the temporaries of writes a killed run left half-done, and, when
    continuing the run from its own ``last.ckpt``, the step checkpoints written after it (a killed run's
    future, which ``save_top_k`` no longer tracks). Never the checkpoint being resumed, never ``last.ckpt``."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    removed = remove_stale_temporaries(folder)
    last = folder / LAST
    # only when continuing the run itself: resuming from an older checkpoint on purpose keeps the later ones
    if resume_from is not None and last.is_file() and Path(resume_from).resolve() == last.resolve():
        # mmap: only the small header is read here; Lightning reads the tensors once, when it resumes
        step = torch.load(resume_from, map_location="cpu", weights_only=True, mmap=True).get("global_step")
        for p in folder.glob("step*.ckpt"):
            digits = p.stem[len("step"):]
            if p.is_file() and digits.isdigit() and step is not None and int(digits) > int(step) \
                    and p.resolve() != Path(resume_from).resolve():
                p.unlink()
                removed.append(p)
    return removed


def resolve_ckpt_path(ckpt_path: Optional[str], checkpoint_dir: str | os.PathLike,
                      deepspeed: Optional[bool] = None) -> Optional[str]:
    """The checkpoint to resume from, or ``None`` to start fresh.

    ``None`` → fresh start; ``"last"`` → ``<checkpoint_dir>/last.ckpt`` (a ``NothingToResumeError`` if
    absent: resume the run by pointing ``hydra.run.dir`` at its folder); a folder → its
    ``checkpoints/last.ckpt`` or ``last.ckpt``; a file → itself. A path that does not exist raises.
    ``deepspeed`` (the run's strategy, when known): a DeepSpeed checkpoint is a folder, any other a file;
    the wrong kind is refused with a message naming it.
    """
    resolved = _resolve_ckpt_path(ckpt_path, checkpoint_dir)
    if resolved is None or deepspeed is None:
        return resolved
    p = Path(resolved)
    is_ds = p.is_dir() and ((p / "checkpoint").is_dir() or any(p.glob("*/mp_rank_*_model_states.pt")))
    if p.is_dir() and not deepspeed:
        raise NothingToResumeError(
            f"checkpoint {p} is a folder ({'a DeepSpeed checkpoint' if is_ds else 'not a checkpoint file'}), "
            "but this run's strategy is not DeepSpeed: resume with the strategy that wrote it"
            + ("" if is_ds else ", or remove the folder"))
    if deepspeed and not is_ds:
        raise NothingToResumeError(
            f"checkpoint {p} is not a DeepSpeed checkpoint folder (no 'checkpoint/' inside), but this run "
            "uses DeepSpeed: resume with the strategy that wrote it")
    return resolved


def _resolve_ckpt_path(ckpt_path: Optional[str], checkpoint_dir: str | os.PathLike) -> Optional[str]:
    if ckpt_path is None or str(ckpt_path).strip() == "":
        return None
    checkpoint_dir = Path(checkpoint_dir)
    if str(ckpt_path) == "last":
        last = checkpoint_dir / LAST
        if last.exists():
            return str(last)
        raise NothingToResumeError(
            f"ckpt_path=last but there is nothing to resume: {last} does not exist. To continue an "
            "interrupted run, run again with its folder, e.g. `python -m train hydra.run.dir=<run folder> "
            "ckpt_path=last` (plus the same overrides), or drop ckpt_path to start a new run.")
    p = Path(ckpt_path).expanduser()
    if p.is_dir():
        for cand in (p / "checkpoints" / LAST, p / LAST):
            if cand.exists():
                return str(cand)
        if (p / "checkpoint").is_dir() or any(p.glob("*/mp_rank_*_model_states.pt")):
            return str(p)  # a DeepSpeed checkpoint folder
        raise NothingToResumeError(f"ckpt_path={ckpt_path!r} is a folder without {LAST} or a checkpoint inside")
    if not p.exists():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r} does not exist (expected 'last', a run folder or a .ckpt)")
    return str(p)


# ----------------------------------------------------------------------------------------------
# final adapter and merged export
# ----------------------------------------------------------------------------------------------
def gathered(model: nn.Module, trainable_only: bool = False) -> contextlib.AbstractContextManager:
    """Gather the ZeRO-3 partitioned parameters of ``model`` for reading (no-op without ZeRO-3).

    A collective: every rank must enter it. ``trainable_only`` gathers only the parameters that require
    grad (adapters, projector), not the frozen base, which is all an adapter needs (7B: a few hundred MB
    instead of the whole 14 GB model materialised on every rank).
    """
    return zero3.gathered(p for p in model.parameters() if p.requires_grad or not trainable_only)


def save_final_adapter(model: nn.Module, directory: str | os.PathLike, is_global_zero: bool = True,
                       adapter: Optional[AdapterRecipe] = None) -> Optional[Path]:
    """Save what ``model`` trained to the folder ``directory``, as its adapter recipe does
    (:meth:`AdapterRecipe.save`: LoRA/DoRA/SAN in :func:`llava_san.peft.save_adapter` format; without an
    adapter, the trained tensors such as the projector as ``extra_trainable.safetensors``).

    Call on every rank, after training: γ̄ is averaged across the data-parallel ranks first
    (``docs/san.md`` §4; :func:`llava_san.peft.sync_gamma_ema` is a no-op on one process), then the trained
    parameters are gathered (ZeRO-3 partitions them; a collective) and rank 0 writes. Saving the
    partitioned placeholders instead is LLaVA's known ZeRO-3 failure (empty tensors in the adapter);
    ``save_adapter`` refuses such a tensor. ``adapter=None`` (a caller without the run's recipe): a
    ``PeftModel`` saves as LoRA/DoRA, anything else its trained tensors.
    """
    save = adapter.save if adapter is not None else (save_adapter if isinstance(model, PeftModel)
                                                     else save_extra_only)
    sync_gamma_ema(model)  # every rank, before anything is written: all ranks then hold the mean γ̄
    # only trainable tensors are saved (γ̄ are buffers, never partitioned); the frozen base is not gathered
    with gathered(model, trainable_only=True):
        if not is_global_zero:
            return None
        return save(model, directory)


def export_merged(model: nn.Module, processor: Any, directory: str | os.PathLike,
                  adapter: Optional[AdapterRecipe] = None, *, template: str = "vicuna_v1",
                  image_aspect_ratio: str = "pad") -> Path:
    """Write a plain transformers checkpoint (adapters and SAN folded in by the recipe's
    :meth:`AdapterRecipe.merge`) plus the processor, atomically.

    The processor is saved as :func:`llava_san.export_processor.export_processor` makes it: the run's
    ``image_aspect_ratio`` preprocessing and the chat template of its conversation ``template``, so
    other tools prepare inputs as training did.

    ``model`` is consumed when it is a ``PeftModel`` (merged in place). Load it back with
    ``LlavaForConditionalGeneration.from_pretrained(directory)``. A ZeRO-3 partitioned model cannot be
    merged in place (each rank holds slices): use :func:`export_merged_from_adapter`. ``adapter=None``:
    a ``PeftModel`` is merged as LoRA/DoRA (+ SAN), anything else written as it is.
    """
    if zero3.any_partitioned(model):
        raise ValueError("export_merged: the model is partitioned by ZeRO-3; rebuild the base and fold the "
                         "saved adapter into it with export_merged_from_adapter")
    merge = adapter.merge if adapter is not None else LoraRecipe.merge
    return _save_plain(merge(model), processor, directory, template, image_aspect_ratio)


def export_merged_from_adapter(model_factory: Any, adapter_dir: str | os.PathLike, processor: Any,
                               directory: str | os.PathLike, *, template: str = "vicuna_v1",
                               image_aspect_ratio: str = "pad") -> Path:
    """The merged checkpoint of a run rebuilt from its saved adapter: a fresh base from ``model_factory``
    (the run's ``model.build``, same seed and paths), :func:`~llava_san.peft.apply_adapter_folder` with
    ``merge`` (the folder's own recipe loads and merges it), then written like :func:`export_merged`.

    The route for ZeRO-3 runs, on rank 0 after :func:`save_final_adapter`: the base is built whole in
    host memory once more (bf16 7B: 14 GB), never partitioned. ``processor=None``: the factory's.
    ``python -m llava_san.export`` runs this on a finished run folder.
    """
    built = model_factory()
    base, built_processor = built if isinstance(built, tuple) else (built, None)
    plain = apply_adapter_folder(base, adapter_dir, merge=True)
    return _save_plain(plain, processor if processor is not None else built_processor, directory,
                       template, image_aspect_ratio)


def _save_plain(model: nn.Module, processor: Any, directory: str | os.PathLike, template: str,
                image_aspect_ratio: str) -> Path:
    """``model`` and the export processor of ``processor`` into ``directory``, atomically."""
    # built before anything is written: a bad template or aspect ratio leaves no folder behind
    exported = export_processor(processor, template, image_aspect_ratio) if processor is not None else None
    with atomic_dir(directory) as tmp:
        model.save_pretrained(str(tmp))
        if exported is not None:
            exported.save_pretrained(str(tmp))
            save_attached(exported.tokenizer, tmp)  # tokenizer.model: LLaVA-1.5's text path
    return Path(directory)
