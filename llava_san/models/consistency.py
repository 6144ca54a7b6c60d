"""Does a LLaVA model agree with its processor? One check shared by every loader."""
from __future__ import annotations

from typing import Any

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from ..distributed import zero3


def feature_layers(vision_feature_layer: Any) -> int | list[int]:
    """``vision_feature_layer`` as an int or a list of ints (Hydra lists and tuples accepted)."""
    if isinstance(vision_feature_layer, int):
        return vision_feature_layer
    try:
        layers = [int(x) for x in vision_feature_layer]  # Hydra's ListConfig, tuples
    except TypeError:
        msg = f"vision_feature_layer must be an int or a list of ints, got {vision_feature_layer!r}"
        raise ValueError(msg) from None
    if not layers:
        raise ValueError("vision_feature_layer must not be an empty list")
    return layers


def check_layers(layers: int | list[int], num_layers: int, where: str) -> None:
    """Every layer index must exist in a ``num_layers``-layer vision tower."""
    # hidden_states has num_layers + 1 entries (embeddings, then each layer)
    for layer in [layers] if isinstance(layers, int) else layers:
        if not -(num_layers + 1) <= layer <= num_layers:
            raise ValueError(
                f"vision_feature_layer {layer} is out of range for the {num_layers}-layer vision tower "
                f"of {where} (valid: {-(num_layers + 1)}..{num_layers}; LLaVA-1.5 uses -2, "
                "the penultimate layer)"
            )


def embedding_rows(weight: torch.Tensor) -> int:
    """Rows of an embedding / lm_head weight, also when ZeRO-3 partitioned it (an empty placeholder)."""
    return int(zero3.full_shape(weight)[0])


def check_model_processor(model: LlavaForConditionalGeneration, processor: Any, source: str = "") -> None:
    """Check that a LLaVA model and its processor agree; raise one ``ValueError`` listing every problem.

    Checked: ``LlavaProcessor``; same ``vision_feature_select_strategy``; ``patch_size`` = the tower's;
    ``<image>`` id of processor, tokenizer and ``config.image_token_id`` equal and inside the embedding;
    pad id defined and inside the embedding; image processor output size = the tower's ``image_size``;
    ``<image>`` tokens per image = patches (+1 for ``full``); ``vision_feature_layer`` within the tower.
    """
    where = f" of {source!r}" if source else ""
    if not isinstance(processor, LlavaProcessor):
        raise ValueError(f"processor{where} is a {type(processor).__name__}, expected a LlavaProcessor")
    cfg = model.config
    vision = cfg.vision_config
    tok = processor.tokenizer
    rows = embedding_rows(model.get_input_embeddings().weight)
    problems = []
    if processor.vision_feature_select_strategy != cfg.vision_feature_select_strategy:
        problems.append(
            "processor vision_feature_select_strategy="
            f"{processor.vision_feature_select_strategy!r} but model config has "
            f"{cfg.vision_feature_select_strategy!r}"
        )
    if processor.patch_size != vision.patch_size:
        problems.append(
            f"processor patch_size={processor.patch_size} but the vision tower's is {vision.patch_size}"
        )
    tok_image_id = tok.convert_tokens_to_ids(processor.image_token)
    if not (processor.image_token_id == tok_image_id == cfg.image_token_id):
        problems.append(
            f"image token {processor.image_token!r}: processor id {processor.image_token_id}, tokenizer id "
            f"{tok_image_id}, model config image_token_id {cfg.image_token_id} (must all be equal)"
        )
    if not 0 <= cfg.image_token_id < rows:
        problems.append(f"image_token_id {cfg.image_token_id} is outside the embedding ({rows} rows)")
    if len(tok) > rows:
        problems.append(f"tokenizer has {len(tok)} tokens but the embedding only {rows} rows")
    if tok.pad_token_id is None:
        problems.append("tokenizer has no pad token")
    elif not 0 <= tok.pad_token_id < rows:
        problems.append(f"pad_token_id {tok.pad_token_id} is outside the embedding ({rows} rows)")
    ip = processor.image_processor
    crop = getattr(ip, "crop_size", None) if getattr(ip, "do_center_crop", False) else None
    if crop:
        out_hw = (crop.get("height"), crop.get("width"))
        if out_hw != (vision.image_size, vision.image_size):
            problems.append(
                f"image processor crops to {out_hw[0]}x{out_hw[1]} but the vision tower takes "
                f"{vision.image_size}x{vision.image_size}"
            )
    if isinstance(processor.patch_size, int) and processor.patch_size > 0:
        patches = (vision.image_size // vision.patch_size) ** 2
        expected = patches + (1 if cfg.vision_feature_select_strategy == "full" else 0)
        produced = (vision.image_size // processor.patch_size) ** 2 + processor.num_additional_image_tokens
        produced -= 1 if processor.vision_feature_select_strategy == "default" else 0
        if produced != expected:
            problems.append(
                f"processor expands <image> to {produced} tokens (num_additional_image_tokens="
                f"{processor.num_additional_image_tokens}) but the model yields {expected} image features "
                "(CLIP has one CLS token: num_additional_image_tokens must be 1)"
            )
    try:
        layers = feature_layers(cfg.vision_feature_layer)
        check_layers(layers, vision.num_hidden_layers, source or "the model")
    except ValueError as err:
        problems.append(str(err))
    if problems:
        raise ValueError(f"LLaVA model and processor{where} are inconsistent: " + "; ".join(problems))
