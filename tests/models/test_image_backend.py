"""CLIP preprocessing stays on transformers' PIL path (LLaVA-1.5's pixels) in every loader."""
import numpy as np
import pytest
from PIL import Image

from llava_san.models import build_tiny_processor
from llava_san.models.builder import build_parts_processor, load_llava_hf_processor
from llava_san.testing.checkpoints import write_tiny_checkpoints
from llava_san.models.image_processor import CLIPImageProcessorPil, pil_clip_image_processor

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


def reference_pixels(image: Image.Image, size: int) -> np.ndarray:
    """LLaVA-1.5's CLIP preprocessing written out with PIL + numpy: shortest edge -> ``size`` (bicubic; the
    long edge truncated, as transformers' ``get_resize_output_image_size``), centre crop ``size`` x ``size``,
    /255, normalise; channels first."""
    w, h = image.size
    new = (size, int(h * size / w)) if w <= h else (int(w * size / h), size)
    resized = np.asarray(image.convert("RGB").resize(new, Image.BICUBIC), dtype=np.float64)
    top, left = (resized.shape[0] - size) // 2, (resized.shape[1] - size) // 2
    crop = resized[top:top + size, left:left + size] / 255.0
    return ((crop - MEAN) / STD).transpose(2, 0, 1)


def photo(w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    ckpts = write_tiny_checkpoints(tmp_path_factory.mktemp("ckpt"))
    return {
        "tiny": build_tiny_processor(),
        "parts": build_parts_processor(str(ckpts["vicuna"]), str(ckpts["clip"])),
        "llava_hf": load_llava_hf_processor(str(ckpts["llava_hf"])),
        "llava_hf_hub": load_llava_hf_processor(str(ckpts["llava_hf_hub"])),
        "clip_folder": ckpts["clip"],
    }


@pytest.mark.parametrize("name", ["tiny", "parts", "llava_hf", "llava_hf_hub"])
def test_every_loader_uses_the_pil_path(processors, name):
    ip = processors[name].image_processor
    assert type(ip) is CLIPImageProcessorPil
    size = ip.crop_size["height"]
    for image in (photo(97, 61), photo(40, 130)):
        got = ip(images=[image], return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(got, reference_pixels(image, size), atol=1e-5)


def test_pin_converts_other_backends_with_the_same_settings():
    """A CLIP processor of another class (here a subclass standing for the torchvision one) becomes the
    PIL class with identical settings."""
    other_cls = type("CLIPImageProcessorOther", (CLIPImageProcessorPil,), {})
    other = other_cls(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    pinned = pil_clip_image_processor(other)
    assert type(pinned) is CLIPImageProcessorPil
    assert pinned.size == other.size and pinned.crop_size == other.crop_size
    image = photo(70, 50)
    np.testing.assert_allclose(pinned(images=[image], return_tensors="np")["pixel_values"][0],
                               reference_pixels(image, 48), atol=1e-5)


def test_pixels_unchanged_when_torchvision_is_importable(processors):
    """Where torchvision imports, transformers' default CLIP processor is the torchvision one; ours
    must still give the PIL pixels. (torchvision has no build for torch 2.13 here: skipped.)"""
    try:
        import torchvision  # noqa: F401
        from torchvision.transforms import v2  # noqa: F401
    except Exception as err:  # a torchvision built for another torch fails at import with RuntimeError
        pytest.skip(f"torchvision not importable: {type(err).__name__}")
    from transformers import AutoImageProcessor

    ip = processors["parts"].image_processor
    image = photo(97, 61)
    assert type(ip) is CLIPImageProcessorPil
    default = AutoImageProcessor.from_pretrained(str(processors["clip_folder"]))
    assert type(default) is not CLIPImageProcessorPil
    np.testing.assert_allclose(ip(images=[image], return_tensors="np")["pixel_values"][0],
                               reference_pixels(image, ip.crop_size["height"]), atol=1e-5)
