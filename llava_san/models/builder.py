"""The three model entry points, with plain keyword arguments so ``conf/model/*.yaml`` can ``_target_`` them.

* :func:`build_tiny` (here) - the random offline tiny LLaVA of :mod:`llava_san.models.tiny`.
* :func:`~llava_san.models.parts.build_llava_from_parts` - Vicuna + CLIP + the stage-1 projector, what
  the LLaVA-1.5 LoRA recipe starts from.
* :func:`~llava_san.models.llava_hf.load_llava_hf` - a llava-hf checkpoint, checked for consistency
  between model config and processor.

Each returns ``(model, processor)``; every path argument is a local folder or a Hugging Face Hub id
(offline, only local folders work), and a missing or wrong input raises ``FileNotFoundError`` /
``ValueError`` naming the path and what was expected (:mod:`llava_san.models.source`). Under DeepSpeed
ZeRO-3 construction all three return the model partitioned, equal once gathered to the one built without.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from .consistency import check_model_processor
from .llava_hf import load_llava_hf, load_llava_hf_processor
from .parts import build_llava_from_parts, build_parts_processor
from .source import resolve_dtype
from .tiny import TinyLlavaSpec, build_tiny_llava

__all__ = [
    "build_from_config",
    "build_llava_from_parts",
    "build_parts_processor",
    "build_tiny",
    "check_model_processor",
    "load_llava_hf",
    "load_llava_hf_processor",
    "resolve_dtype",
]

_TS = TinyLlavaSpec()


def build_tiny(
    *,
    image_size: int = _TS.image_size,
    patch_size: int = _TS.patch_size,
    vision_hidden: int = _TS.vision_hidden,
    vision_layers: int = _TS.vision_layers,
    vision_heads: int = _TS.vision_heads,
    text_hidden: int = _TS.text_hidden,
    text_layers: int = _TS.text_layers,
    text_heads: int = _TS.text_heads,
    text_kv_heads: int = _TS.text_kv_heads,
    text_intermediate: int = _TS.text_intermediate,
    vocab_size: int = _TS.vocab_size,
    max_position_embeddings: int = _TS.max_position_embeddings,
    tie_word_embeddings: bool = _TS.tie_word_embeddings,
    seed: int = 0,
    dtype: str | torch.dtype = "float32",
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The random offline tiny LLaVA from plain keyword args (``conf/model/tiny.yaml``).

    Same ``(model, processor)`` as ``build_tiny_llava(TinyLlavaSpec(**shape_kwargs), seed, dtype)``.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    spec = TinyLlavaSpec(
        image_size=image_size,
        patch_size=patch_size,
        vision_hidden=vision_hidden,
        vision_layers=vision_layers,
        vision_heads=vision_heads,
        text_hidden=text_hidden,
        text_layers=text_layers,
        text_heads=text_heads,
        text_kv_heads=text_kv_heads,
        text_intermediate=text_intermediate,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
    )
    return build_tiny_llava(spec, seed=seed, dtype=resolve_dtype(dtype))


def build_from_config(model_node: Any, dtype: Optional[str] = None) -> tuple[Any, Any]:
    """``(model, processor)`` from a run's ``model`` config node (``conf/model/*.yaml``), as training
    built them; ``dtype`` overrides ``model.build.dtype`` where the builder has one."""
    node = OmegaConf.create(OmegaConf.to_container(model_node, resolve=True))
    if dtype is not None and "dtype" in node.build:
        node.build.dtype = dtype
    built = instantiate(node.build)
    if isinstance(built, functools.partial):  # conf/model/*.yaml: `_partial_: true`
        built = built()
    if isinstance(built, tuple):
        return built
    return built, instantiate(node.processor)  # a builder that returns the model only
