"""The processor an exported folder carries: what other tools need to prepare inputs as training did.

Training prepares an image with :func:`llava_san.data.images.process_image` and a prompt with the run's
conversation template. A plain ``LlavaProcessor`` saved as it is would do neither: its CLIP image
processor centre-crops (LLaVA-1.5 pads to a square with the CLIP mean colour first) and it has no chat
template. :func:`export_processor` returns the processor to save instead:

* ``image_aspect_ratio="pad"``: transformers' ``LlavaImageProcessorPil`` with ``do_pad=True`` and the
  CLIP settings (size, crop, mean/std, bicubic). It pads the uint8 image to a square with
  ``tuple(int(x * 255) for x in image_mean)`` at the offsets of LLaVA's ``expand2square``, then
  resizes and crops on the PIL path: the pixels of ``process_image`` exactly (tested), except for
  images longer than ``PAD_LIMIT`` (2048 px), which training shrinks before padding.
* ``image_aspect_ratio="crop"``: the CLIP processor itself (resize + centre crop), on the PIL path.
* the chat template of the run's conversation template (:func:`llava_san.chat_template.chat_template`).

Loading: ``AutoProcessor.from_pretrained(folder)`` picks the torchvision twin of the image processor
whenever torchvision is installed, whose bicubic resize gives slightly different pixels; pass
``backend="pil"`` to get training's pixels there.
"""
from __future__ import annotations

from typing import Any

from transformers import LlavaProcessor
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from .chat_template import chat_template
from .models.image_processor import clip_settings, pil_clip_image_processor

__all__ = ["export_image_processor", "export_processor"]


def export_image_processor(image_processor: Any, image_aspect_ratio: str = "pad") -> Any:
    """The image processor that reproduces training's ``image_aspect_ratio`` preprocessing on its own
    (see the module docstring); ``image_processor`` is the model's CLIP processor (left unchanged)."""
    clip = pil_clip_image_processor(image_processor)
    if image_aspect_ratio == "crop":
        return clip
    if image_aspect_ratio != "pad":
        raise ValueError(f"image_aspect_ratio must be 'pad' or 'crop', got {image_aspect_ratio!r}")
    return LlavaImageProcessorPil(**clip_settings(clip), do_pad=True)


def export_processor(processor: Any, template: str = "vicuna_v1", image_aspect_ratio: str = "pad") -> Any:
    """A ``LlavaProcessor`` sharing ``processor``'s tokenizer, with the image processor of
    :func:`export_image_processor` and the chat template of ``template``; ``processor`` is unchanged."""
    return LlavaProcessor(
        image_processor=export_image_processor(processor.image_processor, image_aspect_ratio),
        tokenizer=processor.tokenizer,
        patch_size=processor.patch_size,
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        chat_template=chat_template(template),
        image_token=processor.image_token,
        num_additional_image_tokens=processor.num_additional_image_tokens,
    )
