"""LLaVA-1.5's text tokenization: transformers 4.31's slow ``LlamaTokenizer``, rebuilt on ``sentencepiece``.

LLaVA-1.5 loaded the Vicuna tokenizer with ``use_fast=False`` under transformers 4.31, so every id it
trained on came from that slow tokenizer. transformers 5's ``LlamaTokenizer`` (a ``tokenizers``
pipeline) differs from it in either ``legacy`` setting on text that follows a special token (``</s>``)
or starts with a space. :class:`Llava15TextTokenizer` reproduces the 4.31 code path exactly:

1. ``tokenize(text)``: with ``legacy=False`` the text becomes ``"▁" + text.replace("▁", " ")``;
2. the text is cut at the special tokens (``<unk> <s> </s>``; longest match first). LLaMA wraps them
   in ``AddedToken(lstrip=False, rstrip=False)``, so no whitespace around them is stripped;
3. each remaining segment goes to ``sp_model.encode(segment, out_type=str)``: SentencePiece adds its
   dummy ``▁`` prefix to *every* segment. With ``legacy=False`` a segment that is not the first one
   and does not start with a space loses that ``▁`` again (``"▁USER"`` -> ``"USER"``);
4. pieces become ids with ``sp_model.piece_to_id`` (an unknown piece -> ``<unk>``), and ``<s>`` is
   prepended when special tokens are added (``add_bos_token``; LLaMA adds no ``</s>``).

``legacy`` comes from the checkpoint's ``tokenizer_config.json``; 4.31 treated a missing or ``null``
value as ``True``. The object implements the small part of the tokenizer interface that
:class:`~llava_san.data.tokenize.PieceEncoder` uses, and is *attached* to the transformers tokenizer
of a checkpoint that ships a ``tokenizer.model`` (:func:`attach_from_folder`); ``tokenization="llava"``
then tokenizes text with it, ``tokenization="processor"`` keeps transformers' tokenizer.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

import sentencepiece as spm
from transformers import BatchEncoding

from ..utils.atomic import atomic_file

SPIECE_UNDERLINE = "▁"
SP_MODEL_FILE = "tokenizer.model"
_ATTRIBUTE = "llava15_text"


class Llava15TextTokenizer:
    """transformers 4.31's slow ``LlamaTokenizer`` on a SentencePiece model (see module docstring).

    Args:
        model_proto: the serialized SentencePiece model (the bytes of ``tokenizer.model``).
        legacy: the checkpoint's ``legacy`` flag as written (``None``: unset, which 4.31 read as ``True``).
        add_bos_token: prepend ``<s>`` when special tokens are added (LLaMA: ``True``).
        special_tokens: the texts split off before SentencePiece sees the text (``unk``, ``bos``, ``eos``).
        bos_token: which of ``special_tokens`` is ``<s>``.
        source: where the model came from, for error messages.
    """

    def __init__(self, model_proto: bytes, *, legacy: Optional[bool] = None, add_bos_token: bool = True,
                 special_tokens: Sequence[str] = ("<unk>", "<s>", "</s>"), bos_token: str = "<s>",
                 source: str = "<memory>"):
        self.model_proto = bytes(model_proto)
        self.legacy_flag = legacy
        self.legacy = True if legacy is None else bool(legacy)
        self.add_bos_token = bool(add_bos_token)
        self.source = source
        self.sp = _load_processor(self.model_proto, source)
        self.special_ids = {}
        for text in special_tokens:
            pid = self.sp.piece_to_id(text)
            if self.sp.id_to_piece(pid) != text:
                raise ValueError(f"{source}: special token {text!r} is not a piece of the SentencePiece model; "
                                 "the tokenizer_config.json and tokenizer.model do not belong together")
            self.special_ids[text] = pid
        if bos_token not in self.special_ids:
            raise ValueError(f"{source}: bos_token {bos_token!r} is not one of the special tokens {special_tokens}")
        self.bos_token_id = self.special_ids[bos_token]
        self._splitter = _special_splitter(self.special_ids)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Llava15TextTokenizer":
        """Read ``tokenizer.model``, ``tokenizer_config.json`` and ``special_tokens_map.json`` of ``folder``."""
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        config.update({k: v for k, v in _read_json(folder / "special_tokens_map.json").items()
                       if k in ("bos_token", "eos_token", "unk_token")})
        tokens = {key: _token_text(config.get(key), default, folder)
                  for key, default in (("unk_token", "<unk>"), ("bos_token", "<s>"), ("eos_token", "</s>"))}
        legacy = config.get("legacy")
        if legacy is not None and not isinstance(legacy, bool):
            raise ValueError(f"{folder / 'tokenizer_config.json'}: 'legacy' must be true, false or null, "
                             f"got {legacy!r}")
        return cls((folder / SP_MODEL_FILE).read_bytes(), legacy=legacy,
                   add_bos_token=bool(config.get("add_bos_token", True)),
                   special_tokens=tuple(dict.fromkeys(tokens.values())), bos_token=tokens["bos_token"],
                   source=str(folder / SP_MODEL_FILE))

    # ------------------------------------------------------------------ the 4.31 code path
    def tokenize(self, text: str) -> list[str]:
        """The pieces 4.31's ``LlamaTokenizer.tokenize(text)`` gives (no ``<s>``)."""
        if not self.legacy:
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        pieces: list[str] = []
        for segment in self._splitter.split(text):
            if not segment:
                continue
            if segment in self.special_ids:
                pieces.append(segment)
            else:
                pieces.extend(self._segment_pieces(segment))
        return pieces

    def _segment_pieces(self, segment: str) -> list[str]:
        is_first = False
        if not self.legacy:
            is_first = segment.startswith(SPIECE_UNDERLINE)
            if is_first:
                segment = segment[1:]
        pieces = self.sp.encode(segment, out_type=str)
        if (not self.legacy and not is_first and not segment.startswith(" ") and pieces
                and pieces[0].startswith(SPIECE_UNDERLINE)):
            pieces = ([pieces[0][1:]] if len(pieces[0]) > 1 else []) + pieces[1:]
        return pieces

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of ``text`` as ``tokenizer(text).input_ids`` gave them in transformers 4.31."""
        ids = [self.special_ids[p] if p in self.special_ids else self.sp.piece_to_id(p)
               for p in self.tokenize(text)]
        return ([self.bos_token_id] if add_special_tokens and self.add_bos_token else []) + ids

    # ------------------------------------------------------------------ tokenizer interface
    def __call__(self, texts: str | Iterable[str], add_special_tokens: bool = True, **_ignored) -> BatchEncoding:
        """``input_ids`` of one text or a list, like a transformers tokenizer call (other options ignored)."""
        if isinstance(texts, str):
            return BatchEncoding({"input_ids": self.encode(texts, add_special_tokens)})
        return BatchEncoding({"input_ids": [self.encode(t, add_special_tokens) for t in texts]})

    def get_added_vocab(self) -> dict[str, int]:
        """The special tokens (the texts cut out before SentencePiece), as ``{text: id}``."""
        return dict(self.special_ids)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        """Piece strings of ``ids`` (ids past the SentencePiece vocabulary, e.g. ``<image>``, as ``<id N>``)."""
        size = self.sp.get_piece_size()
        return [self.sp.id_to_piece(int(i)) if 0 <= int(i) < size else f"<id {int(i)}>" for i in ids]

    def __getstate__(self) -> dict:  # dataloader workers receive it pickled
        state = dict(self.__dict__)
        del state["sp"], state["_splitter"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.sp = _load_processor(self.model_proto, self.source)
        self._splitter = _special_splitter(self.special_ids)


def _special_splitter(specials: Iterable[str]) -> re.Pattern:
    """A pattern that cuts text at the special tokens and keeps them (``re.split`` with a group); the
    longest alternative first, as the 4.31 trie prefers the longest special token at a position."""
    return re.compile("(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")")


def _load_processor(model_proto: bytes, source: str) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model_proto)
    except Exception as err:  # sentencepiece raises RuntimeError/OSError for damaged protos
        raise ValueError(f"{source} is not a readable SentencePiece model ({type(err).__name__}: {err}); "
                         "replace it with the checkpoint's original tokenizer.model") from err
    return sp


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); restore the checkpoint's original file") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _token_text(value, default: str, folder: Path) -> str:
    """A special token's text: a plain string, an ``AddedToken`` dict (``content``) or unset."""
    if value is None:
        return default
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    if isinstance(value, str):
        return value
    raise ValueError(f"{folder}: cannot read a special token from {value!r}")


# ---------------------------------------------------------------------- attaching to a tokenizer
def attach(tokenizer, text_tokenizer: Llava15TextTokenizer):
    """Make ``text_tokenizer`` the ``tokenization="llava"`` text path of ``tokenizer``; returns ``tokenizer``."""
    setattr(tokenizer, _ATTRIBUTE, text_tokenizer)
    return tokenizer


def attached(tokenizer) -> Optional[Llava15TextTokenizer]:
    """The attached :class:`Llava15TextTokenizer` of ``tokenizer``, or ``None``."""
    return getattr(tokenizer, _ATTRIBUTE, None)


def attach_from_folder(tokenizer, folder: str | Path) -> bool:
    """Attach the folder's ``tokenizer.model`` (with its config) when it has one; ``True`` if attached."""
    folder = Path(folder)
    if not (folder / SP_MODEL_FILE).is_file():
        return False
    attach(tokenizer, Llava15TextTokenizer.from_folder(folder))
    return True


def save_attached(tokenizer, folder: str | Path) -> bool:
    """Write the attached SentencePiece model and its ``legacy`` flag next to a saved tokenizer.

    Call after ``tokenizer.save_pretrained(folder)``: ``tokenizer.model`` is written and
    ``tokenizer_config.json`` gets the flag the model was loaded with (removed when it was unset), so
    the folder loads back with the same ids. ``True`` if something was attached.
    """
    text_tok = attached(tokenizer)
    if text_tok is None:
        return False
    folder = Path(folder)
    with atomic_file(folder / SP_MODEL_FILE, "wb") as out:
        out.write(text_tok.model_proto)
    config_path = folder / "tokenizer_config.json"
    config = _read_json(config_path)
    if text_tok.legacy_flag is None:
        config.pop("legacy", None)
    else:
        config["legacy"] = text_tok.legacy_flag
    with atomic_file(config_path, encoding="utf-8") as out:
        out.write(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return True
