"""Where a checkpoint comes from, and the errors that say so.

A :class:`CheckpointSource` is one path argument of a builder (a local folder or a Hub id) together
with what it must be (``expect``) and how to fix a wrong one (``hint``); every check and every error
message of the loaders goes through it, so each message names the argument, the path, what was found
and what was expected.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer
from transformers.utils import cached_file
from transformers.utils import logging as hf_logging

from ..data.llava15_text import attach_from_folder

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def resolve_dtype(dtype: str | torch.dtype | None, auto: torch.dtype | None = None) -> torch.dtype:
    """Map ``"bfloat16"``/``"bf16"``/``"float16"``/``"fp16"``/``"float32"``/``"fp32"``/a ``torch.dtype``.

    ``"auto"`` (or ``None``) gives ``auto`` (the checkpoint's dtype; float32 when unknown).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or str(dtype).lower() == "auto":
        return auto if isinstance(auto, torch.dtype) else torch.float32
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(set(_DTYPES))} or 'auto'")
    return _DTYPES[key]


def is_hub_id(text: str) -> bool:
    """``owner/name`` that is not a relative path."""
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "~"))


def listing(path: Path, limit: int = 12) -> str:
    """The first ``limit`` names in a folder, for error messages."""
    names = sorted(p.name for p in path.iterdir())
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return "[" + ", ".join(names[:limit]) + more + "]" if names else "nothing"


@dataclass(frozen=True)
class SourceKind:
    """What a checkpoint argument must be: its name in messages, the expected layout and a fix."""

    what: str
    expect: str
    hint: str

    def locate(self, path: Any) -> "CheckpointSource":
        """Resolve ``path`` to an existing local folder or a string that looks like a Hub id."""
        if path is None or not str(path).strip():
            raise ValueError(f"{self.what}: no path given; expected {self.expect}; {self.hint}")
        text = str(path)
        local = Path(text).expanduser()
        if local.exists():
            if not local.is_dir():
                raise FileNotFoundError(
                    f"{self.what}: {text!r} is a file, not a folder; expected {self.expect}; {self.hint}")
            return CheckpointSource(str(local), True, self)
        if is_hub_id(text):
            return CheckpointSource(text, False, self)
        raise FileNotFoundError(
            f"{self.what}: folder {text!r} does not exist; expected {self.expect}; {self.hint}")


LANGUAGE_MODEL = SourceKind(
    "language model",
    "a Vicuna/LLaMA checkpoint folder (config.json + model*.safetensors or pytorch_model*.bin + tokenizer "
    "files, like lmsys/vicuna-7b-v1.5)",
    "e.g. model.build.language_model=/path/to/vicuna-7b-v1.5",
)
VISION_TOWER = SourceKind(
    "vision tower",
    "a CLIP checkpoint folder like openai/clip-vit-large-patch14-336 (config.json with a vision_config, "
    "weights with vision_model.* keys, preprocessor_config.json)",
    "e.g. model.build.vision_tower=/path/to/clip-vit-large-patch14-336",
)
TOKENIZER = SourceKind("tokenizer", "a folder with tokenizer files", "pass tokenizer=/path/to/tokenizer")
LLAVA_HF = SourceKind(
    "llava-hf checkpoint",
    "a llava-hf checkpoint folder like llava-hf/llava-1.5-7b-hf (config.json with model_type 'llava', "
    "weights, processor_config.json/preprocessor_config.json and tokenizer files)",
    "e.g. model.build.path=/path/to/llava-1.5-7b-hf",
)


@dataclass(frozen=True)
class CheckpointSource:
    """One located checkpoint: ``path`` (a folder when ``local``, else a Hub id) and its :class:`SourceKind`."""

    path: str
    local: bool
    kind: SourceKind

    @property
    def what(self) -> str:
        return self.kind.what

    def as_kind(self, kind: SourceKind) -> "CheckpointSource":
        """The same path, named and checked as ``kind`` in messages."""
        return dataclasses.replace(self, kind=kind)

    def error(self, problem: str, cls: type[Exception] = ValueError) -> Exception:
        """``cls("<what>: <problem>; expected <expect>; <hint>")``."""
        return cls(f"{self.kind.what}: {problem}; expected {self.kind.expect}; {self.kind.hint}")

    def not_loadable(self, err: Exception) -> Exception:
        """The error to raise when transformers could not load this source."""
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        reason = f"{type(err).__name__}: {first}"
        if self.local:
            return self.error(f"{self.path!r} could not be loaded ({reason})")
        return self.error(f"{self.path!r} is not a local folder and could not be loaded as a Hugging Face "
                          f"Hub id (offline? {reason})", FileNotFoundError)

    def require(self, *names: str) -> None:
        """A local folder must hold at least one of ``names``."""
        if self.local and not any((Path(self.path) / n).is_file() for n in names):
            raise self.error(f"{self.path!r} has no {' or '.join(names)} (found {listing(Path(self.path))})",
                             FileNotFoundError)

    def require_weights(self) -> None:
        """A local folder must hold ``*.safetensors`` or ``pytorch_model*.bin`` weights."""
        p = Path(self.path)
        if self.local and not (any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin"))):
            raise self.error(f"{self.path!r} has no weights (model*.safetensors or pytorch_model*.bin; "
                             f"found {listing(p)})", FileNotFoundError)

    def config(self):
        """``AutoConfig`` of the source; a missing, non-JSON or type-less ``config.json`` is named."""
        if self.local:
            cfg_file = Path(self.path) / "config.json"
            if not cfg_file.is_file():
                raise self.error(f"{self.path!r} has no config.json (found {listing(Path(self.path))})",
                                 FileNotFoundError)
            try:
                raw = json.loads(cfg_file.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{self.what}: {str(cfg_file)!r} is not valid JSON ({err}); "
                                 f"expected {self.kind.expect}") from None
            if not isinstance(raw, dict) or "model_type" not in raw:
                found = sorted(raw)[:12] if isinstance(raw, dict) else type(raw).__name__
                raise self.error(f"{str(cfg_file)!r} has no 'model_type' (found keys {found})")
        try:
            return AutoConfig.from_pretrained(self.path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise self.not_loadable(err) from None

    def tokenizer(self, **kwargs):
        """``AutoTokenizer`` of the source, with LLaVA-1.5's text path attached (:meth:`attach_sentencepiece`)."""
        try:
            tok = AutoTokenizer.from_pretrained(self.path, **kwargs)
        except Exception as err:  # tokenizer conversion raises many types (ValueError, ImportError, OSError...)
            extra = ""
            folder = Path(self.path)
            if self.local and (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").is_file():
                extra = (" The folder has only a SentencePiece tokenizer.model (as lmsys/vicuna-*-v1.5): "
                         "transformers needs the `sentencepiece` and `protobuf` packages to read it (pip install "
                         "sentencepiece protobuf), or pass tokenizer=<folder with a tokenizer.json of the same "
                         "LLaMA vocabulary, e.g. llava-hf/llava-1.5-7b-hf>.")
            raise ValueError(f"{self.what} tokenizer: could not load a tokenizer from {self.path!r} "
                             f"({type(err).__name__}: {err}).{extra} Expected {self.kind.expect}; "
                             f"{self.kind.hint}") from None
        self.attach_sentencepiece(tok)
        return tok

    def attach_sentencepiece(self, tok) -> None:
        """Give ``tok`` LLaVA-1.5's text path (:mod:`llava_san.data.llava15_text`) from the source's
        ``tokenizer.model``; without one, ``tokenization="llava"`` falls back to transformers' tokenizer."""
        folder = Path(self.path) if self.local else _hub_snapshot_with_sentencepiece(self.path)
        if folder is not None and attach_from_folder(tok, folder):
            return
        warnings.warn(
            f"{self.path!r} has no SentencePiece tokenizer.model: tokenization='llava' uses transformers' "
            "tokenizer, whose ids after '</s>' or a leading space can differ from LLaVA-1.5's (transformers "
            "4.31 slow tokenizer)", UserWarning, stacklevel=3,
        )


def _hub_snapshot_with_sentencepiece(repo: str) -> Path | None:
    """The local snapshot folder of a Hub checkpoint's ``tokenizer.model``, with the two JSON files that
    configure it fetched beside it; ``None`` when the repository has no ``tokenizer.model``."""
    def fetch(name: str) -> str | None:
        try:
            return cached_file(repo, name, _raise_exceptions_for_missing_entries=False)
        except OSError:
            return None

    model = fetch("tokenizer.model")
    if model is None:
        return None
    fetch("tokenizer_config.json")
    fetch("special_tokens_map.json")
    return Path(model).parent


def rng_untouched() -> contextlib.AbstractContextManager:
    """Loading a checkpoint leaves the global RNG as it was (CPU, and the current GPU if CUDA is up).

    transformers' ZeRO-3 loading builds the modules on a real device, where tensors made with
    ``torch.randn`` in ``__init__`` (CLIP's ``class_embedding``) draw from the RNG before the checkpoint
    overwrites them; without ZeRO-3 they are made on ``meta`` and draw nothing. Without this, everything
    random after the builder (the projector without ``mm_projector``, LoRA's init) would differ between
    ``zero_init`` and not.
    """
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else [])


@contextlib.contextmanager
def quiet_transformers():
    """transformers logs errors only (e.g. no table of a CLIPModel's unused text-tower keys)."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
