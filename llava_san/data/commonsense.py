"""LLM-Adapters' ``commonsense_170k.json`` (and any file in its format) -> causal-LM training batches.

A record is ``{"instruction": str, "input": str (may be empty), "output": str, "answer": str}`` (extra
fields, e.g. ``dataset``, are ignored). A sample is what LLM-Adapters' ``finetune.py`` makes of it
(:func:`llava_san.commonsense.encode_train`):

* the Alpaca training text ``generate_prompt(instruction, input, output)`` (:mod:`llava_san.commonsense.prompt`),
  tokenized with the tokenizer's special tokens (BOS for LLaMA), ``truncation=True, max_length=cutoff_len``
  (256), EOS appended when the row is shorter than ``cutoff_len`` and does not end in EOS;
* ``labels`` = ``input_ids``: the whole sequence is trained (``train_on_inputs=True``, LLM-Adapters' and
  the DoRA scripts' default); ``train_on_inputs=False`` masks the prompt (the template with ``output=""``).

Everything else is the LLaVA 665K pipeline through its seams (:class:`~llava_san.data.LlavaDataModule`):
the numpy-packed :class:`~llava_san.data.index.RecordIndex` (records read back with ``pread``), the
bad-record policy (``on_bad_sample`` skip with counted reasons / raise, ``max_bad_fraction``), the
stateful loader (exact mid-epoch resume), the collator (right padding, ``-100`` label padding). The
batches are shuffled without length grouping (``group_by_length=False``, LLM-Adapters' default); the
validation split holds ``val_set_size`` records out (LLM-Adapters ``train_test_split(test_size=val_set_size)``;
120 in the DoRA scripts), deterministically from ``seed``.

Bad records: not an object / a field of the wrong type / no ``instruction`` -> ``invalid_record``; an
empty ``output`` -> ``empty_answer``; a string with a lone surrogate -> ``unencodable_text`` (all found
when the index is built); with ``train_on_inputs=False`` a prompt that fills the whole cutoff leaves
nothing to train -> ``no_trained_tokens`` (found in the workers).
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from .datamodule import LlavaDataModule
from .errors import BadSample, where
from .index import RecordIndex
from .records import _encodable

log = logging.getLogger(__name__)

__all__ = ["CommonsenseDataModule", "CommonsensePreprocessor", "check_commonsense_record"]

_FIELDS = ("instruction", "input", "output", "answer")


def check_commonsense_record(rec: Any, position: int, path: str) -> int:
    """Structural check of one LLM-Adapters record; returns ``-(word count)`` (text-only, as LLaVA's
    modality length). Raises :class:`BadSample` naming the record and the file."""
    if type(rec) is not dict:
        raise BadSample("invalid_record", f"{where(None, position, path)}: record is a "
                        f"{type(rec).__name__}, expected a JSON object with {list(_FIELDS)}")
    loc = where(rec.get("id"), position, path)
    for key in _FIELDS:
        value = rec.get(key)
        if value is None and key in ("input", "answer"):
            continue
        if not isinstance(value, str):
            got = "missing" if key not in rec else f"a {type(value).__name__}"
            raise BadSample("invalid_record", f"{loc}: field {key!r} must be a string, got {got}")
        if not _encodable(value):
            raise BadSample("unencodable_text", f"{loc}: field {key!r} cannot be encoded as UTF-8 "
                            "(a lone surrogate?); fix or drop the record")
    if not rec["instruction"].strip():
        raise BadSample("invalid_record", f"{loc}: empty 'instruction'")
    if not rec["output"].strip():
        raise BadSample("empty_answer", f"{loc}: empty 'output', nothing to train")
    words = sum(len((rec.get(k) or "").split()) for k in ("instruction", "input", "output"))
    return -max(words, 1)


class CommonsensePreprocessor:
    """record -> ``{"input_ids", "labels", "truncated"}`` as LLM-Adapters' ``generate_and_tokenize_prompt``.

    Args:
        tokenizer: the causal LM's tokenizer (``add_bos_token`` as the checkpoint ships it).
        cutoff_len: ``max_length`` of the truncation (256).
        train_on_inputs: train on the prompt too (LLM-Adapters' default ``True``).
    """

    def __init__(self, tokenizer: Any, cutoff_len: int = 256, train_on_inputs: bool = True):
        if int(cutoff_len) < 2:
            raise ValueError(f"cutoff_len must be >= 2, got {cutoff_len}")
        self.tokenizer = tokenizer
        self.cutoff_len = int(cutoff_len)
        self.train_on_inputs = bool(train_on_inputs)

    def __call__(self, rec: dict, position: int = 0, path: str = "<memory>") -> dict[str, Any]:
        from ..commonsense import encode_train, generate_prompt

        check_commonsense_record(rec, position, path)
        instruction, inp, output = rec["instruction"], rec.get("input") or "", rec["output"]
        enc = encode_train(self.tokenizer, instruction, inp, output, cutoff_len=self.cutoff_len,
                           train_on_inputs=self.train_on_inputs)
        ids, labels = enc["input_ids"], enc["labels"]
        truncated = False
        if len(ids) >= self.cutoff_len:  # at the cutoff: was anything cut? (the untruncated length)
            full = self.tokenizer(generate_prompt(instruction, inp, output))["input_ids"]
            truncated = len(full) > self.cutoff_len
        if all(label == -100 for label in labels):
            raise BadSample("no_trained_tokens", f"{where(rec.get('id'), position, path)}: the prompt fills "
                            f"all {self.cutoff_len} tokens (cutoff_len), no response token is left to train")
        return {"input_ids": torch.tensor(ids, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long), "truncated": truncated}


class CommonsenseDataModule(LlavaDataModule):
    """LLM-Adapters-format instruction records (``commonsense_170k.json``) -> causal-LM batches.

    Args:
        train_file: the records (JSON array, as ``commonsense_170k.json``, or JSON lines).
        val_file: optional validation records (wins over ``val_set_size``).
        val_set_size: records held out of ``train_file`` for the validation loss (LLM-Adapters'
            ``val_set_size``; 120 in the DoRA scripts; 0: none).
        cutoff_len: truncation length (256).
        train_on_inputs: train on the whole sequence (default, LLM-Adapters) or the response only.
        processor: the causal LM's tokenizer (``conf/model/llama*.yaml: processor``).
        **kwargs: the :class:`LlavaDataModule` loader/policy options (``batch_size``, ``num_workers``,
            ``seed``, ``on_bad_sample``, ``max_bad_fraction``, ``max_train_samples``, ...).
    """

    record_check = staticmethod(check_commonsense_record)

    def __init__(self, train_file: Optional[str] = None, val_file: Optional[str] = None, val_set_size: int = 120,
                 cutoff_len: int = 256, train_on_inputs: bool = True, group_by_length: bool = False,
                 pad_to_multiple_of: Optional[int] = 8, processor: Any = None, **kwargs: Any):
        for k in ("image_folder", "template", "tokenization", "image_aspect_ratio"):
            if kwargs.pop(k, None) is not None:
                raise ValueError(f"CommonsenseDataModule: {k} does not apply to text-only instruction data")
        if int(val_set_size) < 0:
            raise ValueError(f"val_set_size must be >= 0, got {val_set_size}")
        kwargs.pop("group_by_modality_length", None)
        super().__init__(train_file=train_file, val_file=val_file, model_max_length=int(cutoff_len),
                         group_by_modality_length=bool(group_by_length), pad_to_multiple_of=pad_to_multiple_of,
                         processor=processor, **kwargs)
        self.template = "LLM-Adapters alpaca"  # named in the data log line; the prompt is llava_san.commonsense's
        self.val_set_size = int(val_set_size)
        self.cutoff_len = int(cutoff_len)
        self.train_on_inputs = bool(train_on_inputs)

    def _make_preprocessor(self) -> CommonsensePreprocessor:
        tok = getattr(self.processor, "tokenizer", self.processor)
        return CommonsensePreprocessor(tok, self.cutoff_len, self.train_on_inputs)

    def _split(self, index: RecordIndex) -> tuple[RecordIndex, Optional[RecordIndex]]:
        if self.val_set_size <= 0 or len(index) < 2:
            return index, None
        if self.val_set_size >= len(index):
            raise ValueError(f"val_set_size={self.val_set_size} leaves nothing to train on "
                             f"({len(index)} usable records in {self.train_file})")
        return self._split_n(index, self.val_set_size)
