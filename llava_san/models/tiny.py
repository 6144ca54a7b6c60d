"""A tiny, randomly initialised LLaVA-1.5 for tests, the CPU demo and the embedded default run.

It is a real ``transformers.LlavaForConditionalGeneration`` (CLIP vision tower + 2-layer GELU MLP
projector + Llama decoder) with the LLaVA-1.5 wiring: penultimate vision layer, patch tokens only
(``vision_feature_select_strategy="default"``), ``num_additional_image_tokens=1`` for the CLS token,
so an image expands to ``(image_size / patch_size)**2`` ``<image>`` tokens (16 at 64 px / patch 16;
576 at 336 / 14 for the real model). The tokenizer is the offline LLaMA-style one of
:mod:`llava_san.models.tokenizer`; the processor is a stock ``LlavaProcessor`` around a
``CLIPImageProcessor`` at the tower's resolution. Saved with ``save_pretrained`` it loads back with
``from_pretrained`` exactly like a hub checkpoint.

Under DeepSpeed ZeRO-3 construction (a transformers ``HfDeepSpeedConfig`` alive, as inside
``DeepSpeedStrategy(zero_init=True)``'s sharded context) the builders here return the model with its
parameters already partitioned, equal once gathered to the model built without DeepSpeed for the same
``seed`` (the helpers live in :mod:`llava_san.distributed.zero3`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator, Optional

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from ..distributed import zero3
from .image_processor import CLIPImageProcessorPil
from .tokenizer import IMAGE_TOKEN, build_tiny_tokenizer


@dataclass
class TinyLlavaSpec:
    """Shapes of the tiny LLaVA. Defaults: ~0.3M parameters, builds in milliseconds."""

    image_size: int = 64
    patch_size: int = 16
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 4
    text_intermediate: int = 128
    vocab_size: int = 1024
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False

    @property
    def image_tokens(self) -> int:
        """``<image>`` tokens per image: patch tokens only (CLS dropped by strategy ``default``)."""
        return (self.image_size // self.patch_size) ** 2


def tiny_text_config(spec: TinyLlavaSpec, vocab_size: int, pad_token_id: int) -> LlamaConfig:
    """The Llama decoder config of the tiny model (also used alone as a LLaMA-family causal LM)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=pad_token_id,
        tie_word_embeddings=spec.tie_word_embeddings,
    )


def build_tiny_processor(spec: TinyLlavaSpec | None = None) -> LlavaProcessor:
    """The processor (CLIP image processor at ``spec.image_size`` + offline tokenizer)."""
    spec = spec or TinyLlavaSpec()
    tokenizer = build_tiny_tokenizer(spec.vocab_size)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
    )


def tiny_llava_config(spec: TinyLlavaSpec, processor: LlavaProcessor) -> LlavaConfig:
    """A ``LlavaConfig`` wired like LLaVA-1.5, sized by ``spec``, with ids from ``processor``."""
    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 4,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text = tiny_text_config(spec, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=spec.tie_word_embeddings,
    )


def _build_random(make, seed: int, dtype: torch.dtype):
    """``make()`` under ``seed`` (the global RNG untouched), cast, in eval mode; partitioned under ZeRO-3.

    Under ZeRO-3 the model is built whole and partitioned right after (:func:`llava_san.distributed.zero3.partition`):
    transformers' ZeRO-3 construction skips torch's default init and re-initialises module by module on
    rank 0 only, another sequence of RNG draws, so the values would differ from the same seed without
    DeepSpeed. The tiny model is a few MB; real models are loaded partitioned by ``from_pretrained``.
    """
    config = zero3.hf_zero3_config()
    with torch.random.fork_rng(devices=[]), zero3.without_hf_zero3():
        torch.manual_seed(seed)
        model = make()
    model.to(dtype)
    if config is not None:
        zero3.partition(model, config)
    model.eval()
    return model


def build_tiny_llava(
    spec: TinyLlavaSpec | None = None, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build a random tiny LLaVA and its processor, deterministically for a given ``seed``.

    Under ZeRO-3 construction (see the module doc) the parameters come back partitioned, same values.
    """
    spec = spec or TinyLlavaSpec()
    processor = build_tiny_processor(spec)
    config = tiny_llava_config(spec, processor)
    model = _build_random(lambda: LlavaForConditionalGeneration(config), seed, dtype)
    return model, processor


def build_tiny_llama(
    spec: TinyLlavaSpec | None = None, seed: int = 0, dtype: torch.dtype = torch.float32
) -> LlamaForCausalLM:
    """A random text-only LLaMA causal LM with the tiny spec's decoder (for SAN on plain LLMs)."""
    spec = spec or TinyLlavaSpec()
    tok = build_tiny_tokenizer(spec.vocab_size)
    config = tiny_text_config(spec, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    return _build_random(lambda: LlamaForCausalLM(config), seed, dtype)


def spec_dict(spec: TinyLlavaSpec) -> dict:
    """The spec as a plain dict (for logging and configs)."""
    return asdict(spec)
