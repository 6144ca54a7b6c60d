"""Tokenize template pieces into ``input_ids`` and ``labels`` that cannot drift apart.

LLaVA tokenizes the whole conversation, then re-tokenizes each round to *count* how many tokens to
mask; whenever the two disagree (tokenizer quirks around ``</s>``, the ``▁`` prefix, ...) it prints
"tokenization mismatch" and silently masks the whole sample. Here the ids are built from the pieces
themselves, so each token is labelled by the piece it came from:

1. The pieces are cut into *runs* of text between *atomic* pieces: ``<image>`` and separators the
   tokenizer knows as one added token (``</s>``). A tokenizer never merges text across an added
   token, so runs are independent -- except for what the run "sees" on its left, reproduced exactly:

   * the first run is tokenized as the start of a text (``<s>`` and the ``▁`` prefix added);
   * a run after an added token is tokenized as ``left_token + text`` and the left token dropped,
     which reproduces whatever the tokenizer does after that token (``legacy`` LLaMA tokenizers add
     ``▁``, non-legacy ones do not);
   * ``tokenization="llava"`` only: a run after ``<image>`` is tokenized as a *fresh* text (its
     ``<s>`` dropped), exactly like LLaVA's ``tokenizer_image_token`` which splits the prompt on
     ``<image>`` and tokenizes every chunk separately. With a LLaMA tokenizer this gives
     ``<image> ▁ \\n ...`` -- the ``▁`` (id 29871 in LLaMA) that LLaVA-1.5 was trained with.
     ``tokenization="processor"`` instead gives exactly ``processor(text=rendered)`` (no ``▁``).

2. Inside a run, the trained/masked boundaries are located by tokenizing each prefix in the same
   context and requiring it to be a prefix of the run's tokens. If a boundary fell inside a token,
   the sample raises ``BadSample("tokenization_drift")`` (counted and reported), never a silent
   mis-mask. For LLaMA tokenizers this cannot happen with the templates here: every boundary sits
   before a space (``▁``-prefixed token) or at an added token.

3. ``<image>`` becomes ``image_tokens`` copies of the image token id (transformers' LLaVA expects
   the placeholder pre-expanded: 576 at 336 px / patch 14).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from ..conversation import IMAGE_PLACEHOLDER, Piece
from .errors import BadSample
from .llava15_text import attached

IGNORE_INDEX = -100
TOKENIZATION_MODES = ("llava", "processor")


@dataclass
class Encoded:
    """Token ids, labels (-100 = not trained) and the ``[start, end)`` spans of each image."""

    input_ids: list[int]
    labels: list[int]
    image_spans: list[tuple[int, int]]


def image_token_count(processor) -> int:
    """``<image>`` tokens per image for a ``LlavaProcessor`` (as its ``_get_num_multimodal_tokens``).

    ``(H // patch) * (W // patch) + num_additional_image_tokens``, minus 1 with
    ``vision_feature_select_strategy="default"`` (the CLS token is dropped): 576 for LLaVA-1.5.
    """
    crop = processor.image_processor.crop_size
    h = crop["height"] if not hasattr(crop, "height") else crop.height
    w = crop["width"] if not hasattr(crop, "width") else crop.width
    patch = processor.patch_size
    if not patch:
        raise ValueError("processor.patch_size is not set; cannot count image tokens")
    n = (h // patch) * (w // patch) + int(processor.num_additional_image_tokens or 0)
    if processor.vision_feature_select_strategy == "default":
        n -= 1
    return n


class PieceEncoder:
    """Turns template :class:`Piece` lists into :class:`Encoded` ids/labels for one tokenizer.

    Args:
        tokenizer: a transformers tokenizer (LLaMA-style: adds ``<s>``, no ``</s>``). In ``"llava"`` mode
            text is tokenized by its attached :class:`~llava_san.data.llava15_text.Llava15TextTokenizer`
            when it has one (checkpoints with a ``tokenizer.model``: LLaVA-1.5's own ids).
        image_token_id: id of the ``<image>`` token.
        image_tokens: copies of ``image_token_id`` per image.
        mode: ``"llava"`` (LLaVA's ``tokenizer_image_token`` chunking, default) or ``"processor"``
            (identical to tokenizing the whole rendered string, as ``LlavaProcessor`` does).
    """

    def __init__(self, tokenizer, image_token_id: int, image_tokens: int, mode: str = "llava"):
        if mode not in TOKENIZATION_MODES:
            raise ValueError(f"tokenization must be one of {TOKENIZATION_MODES}, got {mode!r}")
        text_tokenizer = attached(tokenizer) if mode == "llava" else None
        self.tokenizer = text_tokenizer if text_tokenizer is not None else tokenizer
        self.image_token_id = int(image_token_id)
        self.image_tokens = int(image_tokens)
        self.mode = mode
        self._added = dict(self.tokenizer.get_added_vocab())
        self.bos_id = self.tokenizer.bos_token_id
        # Tokens a text starts with (``<s>``) -- masked, never part of a piece.
        self._first_base = self._tok([""], True)[0]

    # -------------------------------------------------------------- helpers
    def _tok(self, texts: Sequence[str], add_special: bool) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(list(texts), add_special_tokens=add_special, verbose=False)["input_ids"]

    def _atomic_id(self, piece: Piece) -> Optional[int]:
        if piece.kind == "image":
            return self.image_token_id
        if piece.kind == "sep":
            return self._added.get(piece.text)
        return None

    # -------------------------------------------------------------- main entry
    def encode(self, pieces: Sequence[Piece]) -> Encoded:
        """Encode ``pieces`` (see module docstring). Raises ``BadSample("tokenization_drift")``."""
        # 1. runs of text pieces separated by atomic pieces
        runs: list[list[Piece]] = [[]]
        atoms: list[Piece] = []
        for p in pieces:
            if p.kind == "image" or (p.kind == "sep" and self._atomic_id(p) is not None):
                atoms.append(p)
                runs.append([])
            else:
                runs[-1].append(Piece(p.text, p.trained))  # a non-atomic sep is plain text
        # 2. tokenization requests: for each run its full text (+ right atom) and inner prefixes
        jobs = []  # (run_no, kind, text, add_special)
        contexts = []
        for r, run in enumerate(runs):
            left = atoms[r - 1] if r > 0 else None
            right = atoms[r] if r < len(atoms) else None
            if r > 0 and not run:
                contexts.append(None)
                continue
            if left is None:
                ctx = ("first", "", True)
            elif left.kind == "image" and self.mode == "llava":
                ctx = ("fresh", "", True)
            else:
                ctx = ("anchored", left.text, False)
            include_right = right is not None and not (right.kind == "image" and self.mode == "llava")
            contexts.append((ctx, include_right, left, right))
            text = "".join(p.text for p in run)
            jobs.append((r, "full", ctx[1] + text + (right.text if include_right else ""), ctx[2]))
            acc = ""
            for p in run[:-1]:
                acc += p.text
                jobs.append((r, "prefix", ctx[1] + acc, ctx[2]))
        with_special = [j for j in jobs if j[3]]
        without = [j for j in jobs if not j[3]]
        results: dict[tuple[int, str], list[list[int]]] = {}
        for group in (with_special, without):
            for job, ids in zip(group, self._tok([j[2] for j in group], group[0][3] if group else True)):
                results.setdefault((job[0], job[1]), []).append(ids)

        # 3. assemble
        input_ids: list[int] = []
        labels: list[int] = []
        spans: list[tuple[int, int]] = []
        for r, run in enumerate(runs):
            if r > 0:
                atom = atoms[r - 1]
                if atom.kind == "image":
                    spans.append((len(input_ids), len(input_ids) + self.image_tokens))
                    input_ids.extend([self.image_token_id] * self.image_tokens)
                    labels.extend([IGNORE_INDEX] * self.image_tokens)
                else:
                    tid = self._atomic_id(atom)
                    input_ids.append(tid)
                    labels.append(tid if atom.trained else IGNORE_INDEX)
            if contexts[r] is None:
                continue
            (kind, _, _), include_right, left, right = contexts[r]
            full = results[(r, "full")][0]
            prefixes = results.get((r, "prefix"), [])
            full = self._strip(full, kind, left, include_right, right, run)
            base = self._first_base if kind == "first" else []
            bounds = [len(base)]
            for pre in prefixes:
                pre = self._strip(pre, kind, left, False, None, run)
                if full[: len(pre)] != pre or len(pre) < bounds[-1]:
                    raise BadSample("tokenization_drift", _drift_msg(run, full, pre, self.tokenizer))
                bounds.append(len(pre))
            if full[: len(base)] != base:
                raise BadSample("tokenization_drift", _drift_msg(run, full, base, self.tokenizer))
            bounds.append(len(full))
            input_ids.extend(full)
            labels.extend([IGNORE_INDEX] * len(base))
            for p, a, b in zip(run, bounds[:-1], bounds[1:]):
                labels.extend(full[a:b] if p.trained else [IGNORE_INDEX] * (b - a))
        return Encoded(input_ids, labels, spans)

    def _strip(self, ids: list[int], kind: str, left: Optional[Piece], include_right: bool,
               right: Optional[Piece], run: Sequence[Piece]) -> list[int]:
        """Remove the context tokens added around a run (left anchor, fresh ``<s>``, right atom)."""
        ids = list(ids)
        if kind == "anchored":
            if not ids or ids[0] != self._atomic_id(left):
                raise BadSample("tokenization_drift", f"{left.text!r} did not stay one token before "
                                f"{''.join(p.text for p in run)[:40]!r}")
            ids = ids[1:]
        elif kind == "fresh" and ids and ids[0] == self.bos_id:
            ids = ids[1:]
        if include_right:
            rid = self._atomic_id(right)
            if not ids or ids[-1] != rid:
                raise BadSample("tokenization_drift",
                                f"separator {right.text!r} not tokenized as one token after "
                                f"{''.join(p.text for p in run)[-40:]!r}")
            ids = ids[:-1]
        return ids


def _drift_msg(run, full, pre, tokenizer) -> str:
    text = "".join(p.text for p in run)
    got = tokenizer.convert_ids_to_tokens(pre[-3:])
    want = tokenizer.convert_ids_to_tokens(full[:len(pre)][-3:])
    return f"a trained/masked boundary falls inside a token in {text[:120]!r}: prefix tokens {got} vs {want}"


def prompt_pieces(prompt: str) -> list[Piece]:
    """Masked pieces of a generation prompt (``<image>`` cut out as image pieces)."""
    out: list[Piece] = []
    for k, part in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
        if k:
            out.append(Piece(IMAGE_PLACEHOLDER, False, "image"))
        if part or k == 0:
            out.append(Piece(part, False))
    return out


def tokenize_prompt(prompt: str, tokenizer, image_token_id: int, image_tokens: int,
                    mode: str = "llava") -> list[int]:
    """Token ids of an evaluation prompt, tokenized exactly like training data.

    ``prompt`` is typically ``get_template("vicuna_v1").render_prompt("<image>\\n" + question)``;
    with ``mode="llava"`` this equals LLaVA's ``tokenizer_image_token(prompt)`` with the image
    index expanded to ``image_tokens`` copies of ``image_token_id``.
    """
    return PieceEncoder(tokenizer, image_token_id, image_tokens, mode).encode(prompt_pieces(prompt)).input_ids
