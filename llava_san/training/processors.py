"""Processors alone (tokenizer + image processor), for the datamodule before the model exists.

The model is built inside ``LlavaSanModule.configure_model`` (so ZeRO-3 can shard it at construction),
but the datamodule needs the processor first. These functions load only the processor, the same way
:mod:`llava_san.models.builder` does; ``train.run`` then checks it against the built model's processor
(same vocabulary, image token, pad token and image size) and stops on a difference.
"""
from __future__ import annotations

from typing import Any

from ..models import IMAGE_TOKEN, PAD_TOKEN, TinyLlavaSpec, build_tiny_processor


def tiny_processor(**spec: Any):
    """The tiny model's processor; ``spec`` = the shape keywords of ``build_tiny`` (others ignored)."""
    fields = TinyLlavaSpec.__dataclass_fields__
    return build_tiny_processor(TinyLlavaSpec(**{k: v for k, v in spec.items() if k in fields}))


def parts_processor(language_model: str, vision_tower: str, *, tokenizer: str | None = None,
                    pad_token: str = PAD_TOKEN, model_max_length: int = 2048, padding_side: str = "right",
                    vision_feature_select_strategy: str = "default", **_: Any):
    """The processor of :func:`llava_san.models.build_llava_from_parts` (Vicuna tokenizer + ``<image>``
    (+ ``<pad>``), CLIP image processor), without loading any weight."""
    from transformers import AutoConfig, AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    tok = AutoTokenizer.from_pretrained(tokenizer or language_model, model_max_length=model_max_length,
                                        padding_side=padding_side)
    if tok.convert_tokens_to_ids(IMAGE_TOKEN) in (None, tok.unk_token_id):
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    if pad_token == tok.unk_token:
        tok.pad_token = tok.unk_token
    elif tok.convert_tokens_to_ids(pad_token) not in (None, tok.unk_token_id):
        tok.pad_token = pad_token
    else:
        tok.add_special_tokens({"pad_token": pad_token})
    tok.model_max_length, tok.padding_side = model_max_length, padding_side
    config = AutoConfig.from_pretrained(vision_tower)
    vision = getattr(config, "vision_config", config)
    return LlavaProcessor(image_processor=CLIPImageProcessor.from_pretrained(vision_tower), tokenizer=tok,
                          patch_size=vision.patch_size, num_additional_image_tokens=1,
                          vision_feature_select_strategy=vision_feature_select_strategy, image_token=IMAGE_TOKEN)


def hf_processor(path: str, *, model_max_length: int | None = 2048, padding_side: str | None = "right", **_: Any):
    """The processor of a llava-hf checkpoint (as :func:`llava_san.models.load_llava_hf` loads it)."""
    from transformers import AutoConfig, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    if processor.patch_size is None:
        processor.patch_size = config.vision_config.patch_size
        processor.num_additional_image_tokens = 1
    if processor.vision_feature_select_strategy is None:
        processor.vision_feature_select_strategy = config.vision_feature_select_strategy
    if model_max_length is not None:
        processor.tokenizer.model_max_length = model_max_length
    if padding_side is not None:
        processor.tokenizer.padding_side = padding_side
    return processor


def check_same_processor(data_proc: Any, model_proc: Any) -> None:
    """Raise ``ValueError`` if the data was prepared with a processor that does not fit the model's."""
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
        raise ValueError("the data processor (model.processor) does not match the model's: " + "; ".join(diffs))
