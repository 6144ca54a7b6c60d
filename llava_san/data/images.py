"""Image loading and LLaVA-1.5's ``pad`` preprocessing (``expand2square`` + CLIP processor)."""
from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

# Modes PIL converts to RGB directly (what LLaVA's ``Image.open(...).convert('RGB')`` does):
# alpha is dropped, palettes are looked up, CMYK / YCbCr / LAB are colour-converted.
_DIRECT_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB",
                 "HSV"}
# High bit-depth single-channel modes: PIL's convert('RGB') would clip them, so scale to 8 bits.
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


class ImageLoadError(ValueError):
    """An image could not be loaded.

    ``reason`` is ``missing_image``, ``corrupt_image`` or ``unsupported_image``.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):
        return (type(self), (self.reason, str(self)))


#: Default cap on decoded pixels per image (40 MP: 8000 x 5000); a 144 MP file would decode to 432 MB.
MAX_IMAGE_PIXELS = 40_000_000
#: Longest side an image keeps before padding to a square (see :func:`process_image`).
PAD_LIMIT = 2048


def load_image(path: str, max_pixels: Optional[int] = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open ``path`` fully and return an RGB ``PIL.Image``.

    Like LLaVA's ``Image.open(path).convert('RGB')`` (so the pixels match), but every failure is a
    clear :class:`ImageLoadError` naming the file: missing file, unreadable or truncated data (the
    image is decoded here, not lazily later), and modes that cannot become RGB. 16-bit/float
    greyscale is scaled to 8 bits instead of being clipped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageLoadError("missing_image", f"image file not found: {path}")
    try:
        with warnings.catch_warnings():
            # "Palette images with Transparency expressed in bytes should be converted to RGBA"
            warnings.simplefilter("ignore", UserWarning)
            with Image.open(path) as img:
                w, h = img.size  # from the header: nothing decoded yet
                if max_pixels is not None and w * h > max_pixels:
                    raise ImageLoadError("image_too_large", f"image {path} is {w} x {h} = {w * h / 1e6:.1f} MP, "
                                         f"over max_image_pixels={max_pixels / 1e6:.1f} MP (data.max_image_pixels)")
                img.load()  # decode now: truncated files fail here, with the path in the message
                mode = img.mode
                if mode in _DIRECT_MODES:
                    return img.convert("RGB")
                if mode in _WIDE_MODES:
                    return _wide_to_rgb(img)
    except ImageLoadError:
        raise
    except Exception as e:  # UnidentifiedImageError, OSError (truncated), DecompressionBombError, ...
        raise ImageLoadError("corrupt_image", f"cannot read image {path}: {type(e).__name__}: {e}") from None
    raise ImageLoadError("unsupported_image", f"unsupported image mode {mode!r} in {path}")


def _wide_to_rgb(img: Image.Image) -> Image.Image:
    arr = np.asarray(img)
    if img.mode == "F":
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr8 = np.zeros(arr.shape, np.uint8) if hi <= lo else ((arr - lo) / (hi - lo) * 255.0).round()
    else:
        arr8 = arr.astype(np.int64) >> 8 if arr.max(initial=0) > 255 else arr
    return Image.fromarray(np.clip(arr8, 0, 255).astype(np.uint8), "L").convert("RGB")


def expand2square(pil_img: Image.Image, background_color) -> Image.Image:
    """Pad an image to a square with ``background_color``, centred (LLaVA ``mm_utils.expand2square``).

    Bit-equal to LLaVA's: the image is pasted at ``((side - w) // 2, 0)`` or ``(0, (side - h) // 2)``
    on a new canvas of the same mode; square images are returned unchanged (same object).
    """
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def background_color(image_mean: Sequence[float]) -> tuple[int, ...]:
    """LLaVA's padding colour: ``tuple(int(x * 255) for x in image_processor.image_mean)``.

    (122, 116, 104) for CLIP's mean.
    """
    return tuple(int(x * 255) for x in image_mean)


def process_image(img: Image.Image, image_processor, aspect_ratio: str = "pad",
                  fill: Optional[tuple[int, ...]] = None, pad_limit: int = PAD_LIMIT) -> torch.Tensor:
    """LLaVA-1.5 image preprocessing: pad to square (``"pad"``) then the CLIP image processor.

    Args:
        img: an RGB image.
        image_processor: the model's CLIP image processor (resize shortest edge, centre crop,
            rescale, normalise).
        aspect_ratio: ``"pad"`` (LLaVA-1.5, ``image_aspect_ratio=pad``) or ``"crop"`` (CLIP's own
            resize + centre crop, LLaVA's default for other versions).
        fill: padding colour; defaults to :func:`background_color` of the processor's mean.
        pad_limit: longest side kept before padding (larger images are shrunk to it first).

    Returns:
        ``(3, H, W)`` float32 tensor at the processor's crop size (336 x 336 for LLaVA-1.5).
    """
    if aspect_ratio == "pad":
        if max(img.size) > pad_limit:
            # LLaVA pads first, then CLIP resizes the square to 336: a 10000 x 10 image would allocate a
            # 10000 x 10000 canvas (300 MB). Above pad_limit the image is first shrunk (bicubic, aspect kept)
            # to a long side of pad_limit; below it the pixels are LLaVA's exactly. The two-step resize
            # differs from LLaVA's by at most a few intensity levels (tests/data/test_data_images.py).
            scale = pad_limit / max(img.size)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.Resampling.BICUBIC)
        img = expand2square(img, fill if fill is not None else background_color(image_processor.image_mean))
    elif aspect_ratio != "crop":
        raise ValueError(f"image_aspect_ratio must be 'pad' or 'crop', got {aspect_ratio!r}")
    pixel_values = image_processor(images=img, return_tensors="pt")["pixel_values"]
    return pixel_values[0]
