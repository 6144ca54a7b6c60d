"""CLIP image preprocessing pinned to transformers' PIL backend: LLaVA-1.5's pixels.

LLaVA-1.5 resized with PIL (bicubic) through transformers 4's ``CLIPImageProcessor``. transformers 5
resolves ``CLIPImageProcessor`` to a torchvision implementation whenever torchvision is importable,
and torchvision's bicubic resize gives different pixels (antialiasing and rounding differ). Training
and evaluation therefore build the PIL implementation explicitly, whatever is installed.
"""
from __future__ import annotations

from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

# keys of a saved preprocessor_config.json that name a class rather than configure one; and the padding
# of an exported LlavaImageProcessorPil, which process_image does itself (pad to square before CLIP)
_CLASS_KEYS = ("image_processor_type", "processor_class", "backend", "do_pad", "pad_size")


def load_clip_image_processor(path: str, **kwargs) -> CLIPImageProcessorPil:
    """``CLIPImageProcessorPil.from_pretrained(path)``: a vision tower's preprocessing on the PIL path."""
    return CLIPImageProcessorPil.from_pretrained(path, **kwargs)


def clip_settings(image_processor) -> dict:
    """An image processor's CLIP preprocessing settings (size, crop, mean/std, resample...), without
    the keys that name its class or configure padding."""
    return {k: v for k, v in image_processor.to_dict().items() if k not in _CLASS_KEYS}


def pil_clip_image_processor(image_processor) -> CLIPImageProcessorPil:
    """The same preprocessing settings on the PIL path (returned unchanged if already there)."""
    if type(image_processor) is CLIPImageProcessorPil:
        return image_processor
    return CLIPImageProcessorPil.from_dict(clip_settings(image_processor))


def pin_pil_backend(processor):
    """Replace ``processor.image_processor`` by its PIL twin (in place); returns ``processor``."""
    processor.image_processor = pil_clip_image_processor(processor.image_processor)
    return processor
