"""LLaVA mix665k records: validation, LLaVA's turn normalisation, and the modality length.

A record is ``{"id": ..., "image": "coco/train2017/000000033471.jpg" (optional),
"conversations": [{"from": "human"|"gpt", "value": str}, ...]}``; extra fields (e.g. easy-vqa's
``question_type``) are ignored. Records without ``image`` are text-only and are trained too.
"""
from __future__ import annotations

from typing import Any

from ..conversation import GPT, HUMAN, IMAGE_PLACEHOLDER
from .errors import BadSample, where

ROLES = (HUMAN, GPT)


def check_record(rec: Any, position: int, path: str) -> int:
    """Structural validation shared by the index builder and the dataset.

    Returns the record's :func:`modality_length` (computed in the same pass, for the index).

    Raises:
        BadSample: with one of the index reasons, naming the record id and file.
    """
    # Fast path: one loop over the turns; messages are only formatted on failure.
    if type(rec) is dict:
        conv = rec.get("conversations")
        image = rec.get("image")
        if type(conv) is list and conv and (image is None or (type(image) is str and image)):
            words = 0
            first = conv[0]
            # LLaVA drops a leading non-human turn, then requires human/gpt alternation.
            expect = 0 if type(first) is dict and first.get("from") == HUMAN else -1
            ok = True
            answered = False
            for j, turn in enumerate(conv):
                if type(turn) is not dict:
                    ok = False
                    break
                value, role = turn.get("value"), turn.get("from")
                if type(value) is not str or (role != HUMAN and role != GPT) or not _encodable(value):
                    ok = False
                    break
                if j + expect >= 0:
                    if role != ROLES[(j + expect) % 2]:
                        ok = False
                        break
                    if role == GPT and value.strip():  # an empty answer is masked, like LLaVA's
                        answered = True
                words += len(value.split())
            if ok and answered and (image is None or _encodable(image)):
                words = max(words, 1)
                return words if image is not None else -words
    _diagnose(rec, position, path)
    raise AssertionError("unreachable: _diagnose found no problem")  # pragma: no cover


def _encodable(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (JSON can carry lone surrogates, which no tokenizer takes)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unencodable(text: str) -> str:
    """Where ``text`` stops being encodable: ``"character 12 (U+D800)"``."""
    for k, ch in enumerate(text):
        if not _encodable(ch):
            return f"character {k} (U+{ord(ch):04X})"
    return "somewhere"  # pragma: no cover


def _diagnose(rec: Any, position: int, path: str) -> None:
    """Raise the precise :class:`BadSample` for a record that failed the fast check."""
    if not isinstance(rec, dict):
        raise BadSample("invalid_record", f"{where(None, position, path)}: record is a "
                        f"{type(rec).__name__}, expected a JSON object")
    rid = rec.get("id")
    loc = where(rid, position, path)
    image = rec.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise BadSample("invalid_record", f"{loc}: field 'image' must be a non-empty string (one "
                        f"image per record, LLaVA-1.5), got {image!r:.80}")
    conv = rec.get("conversations")
    if conv is None or (isinstance(conv, list) and not conv):
        raise BadSample("missing_conversations", f"{loc}: no 'conversations'")
    if not isinstance(conv, list):
        raise BadSample("invalid_record", f"{loc}: 'conversations' must be a list, got {type(conv).__name__}")
    for j, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise BadSample("invalid_record", f"{loc}: conversations[{j}] must be an object with a "
                            f"string 'value', got {turn!r:.80}")
        if turn.get("from") not in ROLES:
            raise BadSample("unknown_role", f"{loc}: conversations[{j}] has unknown 'from'="
                            f"{turn.get('from')!r}; valid: {list(ROLES)}")
        if not _encodable(turn["value"]):
            raise BadSample("unencodable_text", f"{loc}: conversations[{j}] 'value' cannot be encoded as "
                            f"UTF-8 at {_unencodable(turn['value'])} (a lone surrogate?); fix or drop the record")
    if image is not None and not _encodable(image):
        raise BadSample("unencodable_text", f"{loc}: 'image' path cannot be encoded as UTF-8 at "
                        f"{_unencodable(image)}")
    turns = _alternating(conv, loc)
    if not any(role == GPT for role, _ in turns):
        raise BadSample("no_answer", f"{loc}: no 'gpt' turn, nothing to train")
    if not any(role == GPT and value.strip() for role, value in turns):
        raise BadSample("empty_answer", f"{loc}: every answer turn is empty (or whitespace), nothing to train")


def _alternating(conv: list, loc: str) -> list[tuple[str, str]]:
    """LLaVA ``preprocess_v1``: drop a leading non-human turn, then require human/gpt alternation."""
    if conv and conv[0]["from"] != HUMAN:
        conv = conv[1:]  # "Skip the first one if it is not from human"
    turns = []
    for j, turn in enumerate(conv):
        if turn["from"] != ROLES[j % 2]:
            raise BadSample("bad_turn_order", f"{loc}: turn {j} is from {turn['from']!r}, expected "
                            f"{ROLES[j % 2]!r} (turns must alternate human, gpt, ...)")
        turns.append((turn["from"], turn["value"]))
    return turns


def normalize_turns(rec: dict, position: int, path: str) -> tuple[list[tuple[str, str]], bool]:
    """Validate ``rec`` and return ``(turns, has_image)`` the way LLaVA prepares them.

    * A leading non-human turn is dropped and turns must alternate (LLaVA ``preprocess_v1``).
    * Image records (LLaVA ``preprocess_multimodal``): every ``<image>`` is removed and one is put
      at the front of the first human turn as ``"<image>\\n" + text.strip()``. LLaVA moves each
      turn's own placeholder; mix665k only has one, in the first turn. A record with an image but no
      placeholder gets one (LLaVA would feed no image token and crash the model).
    * Text-only records: a literal ``<image>`` is removed -- it is a special token here and would
      ask the model for an image that does not exist.
    """
    check_record(rec, position, path)
    has_image = rec.get("image") is not None
    turns = _alternating(rec["conversations"], where(rec.get("id"), position, path))
    out = [(role, value.replace(IMAGE_PLACEHOLDER, "")) for role, value in turns]
    if has_image:
        first = turns[0][1]
        out[0] = (HUMAN, (IMAGE_PLACEHOLDER + "\n" + first.replace(IMAGE_PLACEHOLDER, "").strip()).strip())
    return out, has_image


def modality_length(rec: dict) -> int:
    """LLaVA's ``modality_lengths`` entry: word count of all turns, negative for text-only records.

    The sampler groups by it (LLaVA counts whitespace-separated words, not tokens). It is never 0
    (clamped to 1), as LLaVA's sampler requires.
    """
    n = sum(len(turn["value"].split()) for turn in rec["conversations"])
    n = max(n, 1)
    return n if rec.get("image") is not None else -n
