"""Tokenization of the commonsense prompts for a causal LM, as LLM-Adapters' tokenizer calls.

* **evaluation** (``commonsense_evaluate.py``, ``evaluate``): ``tokenizer(prompts, return_tensors="pt",
  padding=True)`` with ``padding_side="left"`` and ``pad_token_id = 0``. ``add_special_tokens`` is
  left at its default (True), so a LLaMA tokenizer puts BOS (``<s>``, or ``<|begin_of_text|>`` for
  LLaMA-3) in front and no EOS. :func:`encode_prompt` returns one unpadded row; the project's
  generator does the left padding (and, unlike the official call, passes the attention mask).
* **training** (``finetune.py``, ``tokenize`` / ``generate_and_tokenize_prompt``): the full text
  (``generate_prompt`` with ``output``) is tokenized the same way with ``truncation=True,
  max_length=cutoff_len`` (256 in the DoRA scripts); EOS is appended when the last id is not EOS
  and the row is shorter than ``cutoff_len``; ``labels`` is a copy of ``input_ids``. With
  ``train_on_inputs=False`` the first ``len(tokenize(user_prompt, add_eos_token=False))`` labels
  become ``-100``, where ``user_prompt`` is the training template with ``output=""``
  (:func:`encode_train`). LLM-Adapters' default is ``train_on_inputs=True``.
"""

from __future__ import annotations

from typing import Any

from .prompt import generate_prompt

__all__ = ["IGNORE_INDEX", "encode_prompt", "encode_train", "tokenize"]

IGNORE_INDEX = -100


def tokenize(tokenizer: Any, text: str, *, cutoff_len: int | None = None, add_eos_token: bool = False) -> dict:
    """``finetune.py``'s ``tokenize(prompt, add_eos_token)``: ``input_ids``, ``attention_mask``,
    ``labels`` (lists), special tokens as the tokenizer adds them (BOS for LLaMA)."""
    kwargs: dict[str, Any] = {"padding": False, "return_tensors": None}
    if cutoff_len is not None:
        kwargs.update(truncation=True, max_length=int(cutoff_len))
    enc = tokenizer(text, **kwargs)
    ids = list(enc["input_ids"])
    mask = list(enc.get("attention_mask", [1] * len(ids)))
    eos = tokenizer.eos_token_id
    if add_eos_token and eos is not None and (not ids or ids[-1] != eos) and (
        cutoff_len is None or len(ids) < cutoff_len
    ):
        ids.append(eos)
        mask.append(1)
    return {"input_ids": ids, "attention_mask": mask, "labels": list(ids)}


def encode_prompt(tokenizer: Any, instruction: str, input: str | None = None) -> list[int]:
    """Token ids of the evaluation prompt (``generate_prompt(instruction, input)``), BOS first as
    the official ``tokenizer(prompts, ...)`` call gives."""
    return list(tokenizer(generate_prompt(instruction, input))["input_ids"])


def encode_train(
    tokenizer: Any,
    instruction: str,
    input: str | None,
    output: str,
    *,
    cutoff_len: int = 256,
    train_on_inputs: bool = True,
) -> dict:
    """``generate_and_tokenize_prompt(data_point)``: the training row (``input_ids``,
    ``attention_mask``, ``labels``), the prompt part of ``labels`` set to ``-100`` when
    ``train_on_inputs`` is False."""
    full = tokenize(tokenizer, generate_prompt(instruction, input, output), cutoff_len=cutoff_len,
                    add_eos_token=True)
    if not train_on_inputs:
        user = tokenize(tokenizer, generate_prompt(instruction, input, ""), cutoff_len=cutoff_len)
        n = len(user["input_ids"])
        full["labels"] = [IGNORE_INDEX] * n + full["labels"][n:]
    return full
