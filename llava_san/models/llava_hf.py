"""Load a llava-hf checkpoint (``llava-hf/llava-1.5-7b-hf`` format) as ``(model, processor)``.

Both layouts load: what ``save_pretrained`` writes (this project's exports) and the hub's
transformers-4 layout (``language_model.model.*`` keys, a ``processor_config.json`` with only the
LLaVA fields). Processors saved before llava-hf added ``patch_size`` /
``vision_feature_select_strategy`` / ``num_additional_image_tokens`` get them from the model config,
with a warning; real conflicts raise (:func:`~llava_san.models.consistency.check_model_processor`).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

from .consistency import check_model_processor
from .image_processor import pin_pil_backend
from .source import LLAVA_HF, CheckpointSource, SourceKind, resolve_dtype, rng_untouched

_PROCESSOR = SourceKind("llava-hf processor", LLAVA_HF.expect, LLAVA_HF.hint)


def _llava_hf_source(path: str) -> tuple[CheckpointSource, Any]:
    src = LLAVA_HF.locate(path)
    config = src.config()
    if config.model_type != "llava":
        hint = ""
        if config.model_type == "llama":
            hint = " (a Vicuna/LLaMA folder: build the model with build_llava_from_parts)"
        raise ValueError(
            f"llava-hf checkpoint: {src.path!r} is not a LLaVA checkpoint: its config.json has model_type="
            f"{config.model_type!r}, architectures={getattr(config, 'architectures', None)}{hint}; "
            f"expected {LLAVA_HF.expect}"
        )
    return src, config


def _fill_legacy_processor_fields(processor: LlavaProcessor, config, path: str) -> None:
    legacy = []
    if processor.patch_size is None:
        processor.patch_size = config.vision_config.patch_size
        processor.num_additional_image_tokens = 1  # CLIP's CLS
        legacy += ["patch_size", "num_additional_image_tokens"]
    if processor.vision_feature_select_strategy is None:
        processor.vision_feature_select_strategy = config.vision_feature_select_strategy
        legacy.append("vision_feature_select_strategy")
    if legacy:
        msg = f"llava-hf processor of {path!r} lacks {legacy}; taken from the model config"
        warnings.warn(msg, UserWarning, stacklevel=4)


def _llava_hf_processor(
    src: CheckpointSource, config, model_max_length: int | None, padding_side: str | None
) -> LlavaProcessor:
    if padding_side not in (None, "left", "right"):
        raise ValueError(f"padding_side must be 'left', 'right' or None, got {padding_side!r}")
    src.require("processor_config.json", "preprocessor_config.json")
    src.require("tokenizer.json", "tokenizer.model")
    try:
        processor = AutoProcessor.from_pretrained(src.path)
    except Exception as err:
        raise src.as_kind(_PROCESSOR).not_loadable(err) from None
    if not isinstance(processor, LlavaProcessor):
        raise ValueError(
            f"llava-hf checkpoint: {src.path!r} has a {type(processor).__name__} processor, "
            "expected a LlavaProcessor"
        )
    pin_pil_backend(processor)
    src.attach_sentencepiece(processor.tokenizer)
    _fill_legacy_processor_fields(processor, config, src.path)
    tok = processor.tokenizer
    if tok.pad_token is None:
        msg = f"llava-hf tokenizer of {src.path!r} has no pad token; using {tok.unk_token!r} (as LLaVA)"
        warnings.warn(msg, UserWarning, stacklevel=3)
        tok.pad_token = tok.unk_token
    if model_max_length is not None:
        tok.model_max_length = model_max_length
    if padding_side is not None:
        tok.padding_side = padding_side
    return processor


def load_llava_hf_processor(
    path: str, *, model_max_length: int | None = 2048, padding_side: str | None = "right"
) -> LlavaProcessor:
    """The processor :func:`load_llava_hf` returns for the same arguments, without loading weights."""
    src, config = _llava_hf_source(path)
    return _llava_hf_processor(src, config, model_max_length, padding_side)


def load_llava_hf(
    path: str,
    *,
    dtype: str | torch.dtype = "bfloat16",
    attn_implementation: str = "sdpa",
    model_max_length: int | None = 2048,
    padding_side: str | None = "right",
    device_map: str | dict | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load a llava-hf checkpoint (``llava-hf/llava-1.5-7b-hf`` format) and check it is consistent.

    Args:
        path: folder or hub id with a ``LlavaForConditionalGeneration`` config + weights + processor
            files (``save_pretrained`` layout, or the hub's transformers-4 layout).
        dtype: ``"bfloat16"``, ``"float16"``, ``"float32"`` or ``"auto"`` (the checkpoint's).
        attn_implementation: ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``...
        model_max_length: set on the tokenizer (``None`` keeps the checkpoint's).
        padding_side: set on the tokenizer (``None`` keeps the checkpoint's; ``"left"`` for batched
            generation).
        device_map: forwarded to ``from_pretrained``.
    """
    if dtype is not None and str(dtype).lower() != "auto":
        resolve_dtype(dtype)
    src, config = _llava_hf_source(path)
    src.require_weights()
    processor = _llava_hf_processor(src, config, model_max_length, padding_side)
    ckpt_dtype = getattr(config.text_config, "dtype", None) or getattr(config, "dtype", None)
    load_kw = dict(dtype=resolve_dtype(dtype, auto=ckpt_dtype), attn_implementation=attn_implementation)
    if device_map is not None:
        load_kw["device_map"] = device_map
    try:
        with rng_untouched():
            model = LlavaForConditionalGeneration.from_pretrained(src.path, **load_kw)
    except (OSError, ValueError) as err:
        raise src.not_loadable(err) from None
    check_model_processor(model, processor, source=src.path)
    model.eval()
    return model, processor
