"""One record -> one training sample, as LLaVA-1.5 prepares it (``LazySupervisedDataset.__getitem__``).

Steps: validate and normalise the turns (:mod:`.records`), render pieces with the template
(:mod:`llava_san.conversation`), tokenize them into ids + labels (:mod:`.tokenize`), truncate to
``model_max_length`` without cutting the image span, then load, pad and CLIP-process the image
(:mod:`.images`). The text is done first so a sample that will be skipped never decodes its image.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch

from ..conversation import get_template
from .errors import BadSample, where
from .images import MAX_IMAGE_PIXELS, ImageLoadError, background_color, load_image, process_image
from .pixel_cache import PixelCache
from .records import normalize_turns
from .tokenize import IGNORE_INDEX, Encoded, PieceEncoder, image_token_count


class LlavaPreprocessor:
    """Callable ``(record, position, path) -> sample dict``; raises :class:`BadSample`.

    Args:
        tokenizer: the model's tokenizer.
        image_processor: the CLIP image processor (``None`` only for text-only data).
        image_token_id: id of ``<image>``.
        image_tokens: ``<image>`` copies per image (576 for LLaVA-1.5).
        template: conversation template name (``vicuna_v1`` or ``plain``).
        model_max_length: maximum sequence length *including* image tokens (2048 in LLaVA-1.5).
        tokenization: ``"llava"`` or ``"processor"`` (see :mod:`llava_san.data.tokenize`).
        image_folder: root that record ``image`` paths are relative to.
        image_aspect_ratio: ``"pad"`` (LLaVA-1.5) or ``"crop"``.
        max_image_pixels: an image with more pixels is skipped (``image_too_large``) before decoding.
        symlinks_outside: allow image paths that resolve, through a symlink, outside ``image_folder``
            (absolute paths and ``..`` are always refused: ``unsafe_image_path``).
        image_cache_mb: keep up to this many MB of preprocessed images per process and reuse them for
            the other records of the same image (:mod:`.pixel_cache`; bit-identical samples); 0: off.

    A sample is ``{"input_ids": LongTensor (T,), "labels": LongTensor (T,), "pixel_values":
    FloatTensor (3, H, W) or None, "truncated": bool}``.
    """

    def __init__(self, tokenizer, image_processor=None, *, image_token_id: int, image_tokens: int,
                 template: str = "vicuna_v1", model_max_length: int = 2048, tokenization: str = "llava",
                 image_folder: Optional[str] = None, image_aspect_ratio: str = "pad",
                 max_image_pixels: Optional[int] = MAX_IMAGE_PIXELS, symlinks_outside: bool = False,
                 image_cache_mb: float = 0):
        if image_aspect_ratio not in ("pad", "crop"):
            raise ValueError(f"image_aspect_ratio must be 'pad' or 'crop', got {image_aspect_ratio!r}")
        if model_max_length <= 0:
            raise ValueError(f"model_max_length must be positive, got {model_max_length}")
        self.template = get_template(template)
        self.encoder = PieceEncoder(tokenizer, image_token_id, image_tokens, tokenization)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_max_length = int(model_max_length)
        self.image_folder = None if image_folder is None else os.fspath(image_folder)
        self.image_aspect_ratio = image_aspect_ratio
        self.max_image_pixels = max_image_pixels
        self.symlinks_outside = bool(symlinks_outside)
        self._real_folder = None if self.image_folder is None else os.path.realpath(self.image_folder)
        if image_cache_mb < 0:
            raise ValueError(f"image_cache_mb must be >= 0, got {image_cache_mb}")
        self.pixel_cache = PixelCache(int(image_cache_mb * 2**20)) if image_cache_mb > 0 else None
        self.fill = background_color(image_processor.image_mean) if image_processor is not None else None

    @classmethod
    def from_processor(cls, processor, **kwargs) -> "LlavaPreprocessor":
        """Build from a transformers ``LlavaProcessor`` (image size, patch, extra tokens read from it)."""
        return cls(processor.tokenizer, processor.image_processor, image_token_id=processor.image_token_id,
                   image_tokens=image_token_count(processor), **kwargs)

    # ------------------------------------------------------------------ text
    def encode_record(self, rec: dict, position: int = 0, path: str = "<memory>") -> tuple[Encoded, bool]:
        """Ids/labels of a record before truncation, and whether it has an image."""
        turns, has_image = normalize_turns(rec, position, path)
        try:
            pieces = self.template.pieces(turns)
        except ValueError as e:
            raise BadSample("template_mismatch", f"{where(rec.get('id'), position, path)}: {e}") from None
        if self.template.style == "plain" and not has_image:
            raise BadSample("template_mismatch", f"{where(rec.get('id'), position, path)}: template "
                            f"'plain' needs an image record")
        try:
            enc = self.encoder.encode(pieces)
        except BadSample as bad:
            raise BadSample(bad.reason, f"{where(rec.get('id'), position, path)}: {bad.message}") from None
        return enc, has_image

    def truncate(self, enc: Encoded, rec: dict, position: int, path: str) -> bool:
        """Cut ``enc`` to ``model_max_length`` in place (LLaVA truncates the same way, at the end).

        Returns whether it was cut. Raises ``BadSample("too_long")`` when the cut would fall inside
        an image span and ``BadSample("no_trained_tokens")`` when no trained token is left.
        """
        n, limit = len(enc.input_ids), self.model_max_length
        truncated = n > limit
        if truncated:
            for start, end in enc.image_spans:
                if end > limit:
                    raise BadSample("too_long", f"{where(rec.get('id'), position, path)}: {n} tokens > "
                                    f"model_max_length={limit} and the image span [{start}, {end}) "
                                    "does not fit; skipped rather than cut inside the image")
            del enc.input_ids[limit:], enc.labels[limit:]
        if all(x == IGNORE_INDEX for x in enc.labels):
            why = f"after truncation to {limit} tokens (was {n})" if truncated else "in the whole sample"
            raise BadSample("no_trained_tokens",
                            f"{where(rec.get('id'), position, path)}: no trained token {why}")
        return truncated

    # ------------------------------------------------------------------ full sample
    def image_path(self, rec: dict) -> str:
        """Path of the record's image (``image_folder / image``); ``ValueError`` if it leaves the folder:
        an absolute path, ``..``, or (unless ``symlinks_outside``) a symlink pointing outside."""
        image = rec["image"]
        if self.image_folder is None:
            return image
        parts = image.replace("\\", "/").split("/")
        if os.path.isabs(image) or ".." in parts:
            raise ValueError(f"image path {image!r} leaves image_folder {self.image_folder} "
                             "(absolute or '..'); record image paths are relative to it")
        full = os.path.join(self.image_folder, image)
        if not self.symlinks_outside:
            real = os.path.realpath(full)
            if os.path.commonpath([real, self._real_folder]) != self._real_folder:
                raise ValueError(f"image {full} resolves to {real}, outside image_folder {self.image_folder} "
                                 "(a symlink); set data.image_symlinks_outside=true to allow it")
        return full

    def pixel_values(self, rec: dict, position: int = 0, path: str = "<memory>") -> torch.Tensor:
        """The record's preprocessed image, ``(3, H, W)``: from the pixel cache when an earlier record of
        this process used the same image (it passed the path checks then), else checked, loaded and
        processed (and cached). Raises :class:`BadSample`; a bad image is never cached."""
        cache = self.pixel_cache
        key = rec["image"]
        cached = None if cache is None else cache.get(key)
        if cached is not None:
            return cached
        try:
            image_file = self.image_path(rec)
        except ValueError as e:
            raise BadSample("unsafe_image_path", f"{where(rec.get('id'), position, path)}: {e}") from None
        try:
            img = load_image(image_file, self.max_image_pixels)
        except ImageLoadError as e:
            raise BadSample(e.reason, f"{where(rec.get('id'), position, path)}: {e}") from None
        pixel_values = process_image(img, self.image_processor, self.image_aspect_ratio, self.fill)
        if cache is not None:
            cache.put(key, pixel_values)
        return pixel_values

    def __call__(self, rec: dict, position: int = 0, path: str = "<memory>") -> dict[str, Any]:
        """Prepare one sample. Raises :class:`BadSample` (reason + message naming id and file)."""
        enc, has_image = self.encode_record(rec, position, path)
        truncated = self.truncate(enc, rec, position, path)
        pixel_values = None
        if has_image:
            if self.image_processor is None:
                raise ValueError("an image record needs an image_processor")
            pixel_values = self.pixel_values(rec, position, path)
        return {
            "input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
            "labels": torch.tensor(enc.labels, dtype=torch.long),
            "pixel_values": pixel_values,
            "truncated": truncated,
        }
