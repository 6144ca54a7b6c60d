"""Processors alone (tokenizer + image processor), for the datamodule before the model exists.

The model is built inside ``LlavaSanModule.configure_model`` (so ZeRO-3 can shard it at construction),
but the datamodule needs the processor first. ``conf/model/*.yaml: processor`` therefore targets the
builder's own processor functions, which share their code with the model builders:
:func:`llava_san.models.build_parts_processor` (``llava7b``, ``llava13b``) and
:func:`llava_san.models.load_llava_hf_processor` (``llava7b_hf``); the tiny model's is
:func:`tiny_processor` below. :func:`check_same_processor` then checks the data processor against the
built model's (``LlavaSanModule.configure_model``) and stops before the first step on a difference.
"""
from __future__ import annotations

from typing import Any

from ..models import IMAGE_TOKEN, TinyLlavaSpec, build_tiny_processor


def tiny_processor(**spec: Any):
    """The tiny model's processor; ``spec`` = the shape keywords of ``build_tiny`` (others ignored)."""
    fields = TinyLlavaSpec.__dataclass_fields__
    return build_tiny_processor(TinyLlavaSpec(**{k: v for k, v in spec.items() if k in fields}))


def check_same_processor(data_proc: Any, model_proc: Any) -> None:
    """Raise ``ValueError`` if the data was prepared with a processor that does not fit the model's.

    Compared: vocabulary size, pad/bos/eos ids, the ``<image>`` id and the patch size.
    """
    if model_proc is None:
        return
    a, b = data_proc.tokenizer, model_proc.tokenizer
    diffs = []
    if len(a) != len(b):
        diffs.append(f"vocabulary size {len(a)} vs {len(b)}")
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(a, attr) != getattr(b, attr):
            diffs.append(f"{attr} {getattr(a, attr)} vs {getattr(b, attr)}")
    if a.convert_tokens_to_ids(IMAGE_TOKEN) != b.convert_tokens_to_ids(IMAGE_TOKEN):
        diffs.append("<image> id differs")
    if data_proc.patch_size != model_proc.patch_size:
        diffs.append(f"patch_size {data_proc.patch_size} vs {model_proc.patch_size}")
    if diffs:
        raise ValueError("the data processor (model.processor) does not match the model's: "
                         + "; ".join(diffs))
