"""Batched beam search with left padding, for the commonsense evaluation (LLM-Adapters decodes with
``num_beams=4``; the project's own generator, :mod:`llava_san.generation`, is greedy only).

``commonsense_evaluate.py`` calls ``model.generate(input_ids, generation_config=GenerationConfig(
temperature=0.1, top_p=0.75, top_k=40, num_beams=4), max_new_tokens=32)`` with ``batch_size 1`` in
every published evaluation script (DoRA's ``llama*_eval.sh``). ``do_sample`` is not set, so the
sampling settings have no effect: deterministic beam search, ``length_penalty=1.0``,
``early_stopping=False`` (transformers' defaults). Here transformers' ``generate`` runs the same
search on a batch: rows are left-padded, the attention mask marks the padding, and position ids
count from each row's first real token (transformers derives them from the mask), so each row's
beams see the same inputs as alone; the answer of a row does not depend on the batch up to float
rounding (fp32: checked equal on the tiny model by ``tests/evaluation/test_eval_commonsense_run.py``).

Differences from the official call, each without effect on the tokens: we pass the attention mask
(the official call with ``batch_size 1`` has no padding to mask), and the stop token is the
tokenizer's EOS.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..generation import GenerationInput, model_device_dtype

__all__ = ["beam_generate"]


@torch.no_grad()
def beam_generate(model: torch.nn.Module, inputs: Sequence[GenerationInput], *, num_beams: int,
                  pad_token_id: int, eos_token_id: Optional[int | Sequence[int]]) -> list[list[int]]:
    """The new token ids of each text-only prompt (the stop token and padding removed), by
    deterministic beam search of ``num_beams`` beams for at most the rows' ``max_new_tokens`` (one
    value per batch: rows with different limits raise ``ValueError``)."""
    from transformers import GenerationConfig

    if not inputs:
        return []
    if model.training:
        raise ValueError("beam_generate needs the model in eval() mode (call model.eval() first)")
    if any(x.pixel_values is not None for x in inputs):
        raise ValueError("beam_generate takes text-only prompts")
    limits = {int(x.max_new_tokens) for x in inputs}
    if len(limits) != 1:
        raise ValueError(f"one max_new_tokens per batch, got {sorted(limits)}")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: the tokenizer needs a pad token for batched generation")
    device, _ = model_device_dtype(model)
    b, t = len(inputs), max(len(x.input_ids) for x in inputs)
    input_ids = torch.full((b, t), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((b, t), dtype=torch.long)
    for row, x in enumerate(inputs):
        n = len(x.input_ids)
        input_ids[row, t - n:] = torch.as_tensor(list(x.input_ids), dtype=torch.long)
        attention_mask[row, t - n:] = 1
    config = GenerationConfig(num_beams=int(num_beams), do_sample=False, max_new_tokens=limits.pop(),
                              length_penalty=1.0, early_stopping=False, num_return_sequences=1,
                              pad_token_id=int(pad_token_id), eos_token_id=eos_token_id)
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         generation_config=config)
    stops = set() if eos_token_id is None else (
        {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id})
    result = []
    for row in out[:, t:].tolist():
        ids: list[int] = []
        for v in row:
            if v in stops:
                break
            ids.append(int(v))
        result.append(ids)
    return result
