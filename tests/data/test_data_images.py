"""Image loading (real files of every mode, broken files) and LLaVA's pad-to-square preprocessing."""
import numpy as np
import pytest
import torch
from PIL import Image

from llava_san.data import ImageLoadError, background_color, expand2square, load_image, process_image
from llava_san.models import build_tiny_processor


def reference_expand2square(img, color):
    """LLaVA's formula, re-implemented with numpy: centred paste on a square canvas of ``color``."""
    w, h = img.size
    arr = np.asarray(img)
    if w == h:
        return arr
    side = max(w, h)
    canvas = np.empty((side, side, arr.shape[2]), dtype=arr.dtype)
    canvas[...] = np.asarray(color, dtype=arr.dtype)
    x0, y0 = ((side - w) // 2, 0) if h > w else (0, (side - h) // 2)
    canvas[y0:y0 + h, x0:x0 + w] = arr
    return canvas


@pytest.fixture(scope="module")
def image_processor():
    return build_tiny_processor().image_processor


@pytest.mark.parametrize("size", [(64, 32), (31, 64), (50, 50), (1, 7), (640, 480), (333, 501)])
def test_expand2square_bit_equal(size):
    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    color = background_color((0.48145466, 0.4578275, 0.40821073))
    assert color == (122, 116, 104)
    out = expand2square(img, color)
    assert out.size == (max(size), max(size)) and out.mode == "RGB"
    assert np.array_equal(np.asarray(out), reference_expand2square(img, color))
    if size[0] == size[1]:
        assert out is img


def test_process_image_pads_with_clip_mean(image_processor):
    img = Image.new("RGB", (64, 32), (255, 0, 0))
    px = process_image(img, image_processor)
    assert px.shape == (3, 64, 64) and px.dtype == torch.float32
    ref = image_processor(images=expand2square(img, (122, 116, 104)), return_tensors="pt")["pixel_values"][0]
    assert torch.equal(px, ref)
    # the padded band normalises to ~0 (the mean colour), the image band to red
    assert px[:, 0, :].abs().max() < 0.02 and px[0, 32, 32] > 1.5
    crop = process_image(img, image_processor, aspect_ratio="crop")
    assert torch.equal(crop, image_processor(images=img, return_tensors="pt")["pixel_values"][0])
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        process_image(img, image_processor, aspect_ratio="anyres")


def _write_modes(tmp_path):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8), "RGB")
    files = {}
    rgb.save(tmp_path / "rgb.png"), files.setdefault("rgb.png", "RGB")
    rgb.save(tmp_path / "rgb.jpg", quality=95), files.setdefault("rgb.jpg", "RGB")
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg"), files.setdefault("cmyk.jpg", "CMYK")
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0), files.setdefault("pal.png", "P")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.new("L", rgb.size, 100))
    rgba.save(tmp_path / "rgba.png"), files.setdefault("rgba.png", "RGBA")
    rgb.convert("LA").save(tmp_path / "la.png"), files.setdefault("la.png", "LA")
    rgb.convert("L").save(tmp_path / "gray.jpg"), files.setdefault("gray.jpg", "L")
    rgb.convert("1").save(tmp_path / "bw.png"), files.setdefault("bw.png", "1")
    return files


def test_load_image_modes_match_llava_convert(tmp_path):
    files = _write_modes(tmp_path)
    for name, mode in files.items():
        with Image.open(tmp_path / name) as raw:
            assert raw.mode == mode, name
            expected = np.asarray(raw.convert("RGB"))  # what LLaVA does
        img = load_image(str(tmp_path / name))
        assert img.mode == "RGB" and img.size == (40, 24), name
        assert np.array_equal(np.asarray(img), expected), name


def test_load_image_16bit_is_scaled_not_clipped(tmp_path):
    arr = (np.arange(64 * 8, dtype=np.uint16).reshape(8, 64) * 128).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode in ("I;16", "I")
    img = load_image(str(tmp_path / "deep.png"))
    got = np.asarray(img)[..., 0]
    assert img.mode == "RGB" and got.max() > 200 and got.min() == 0
    assert len(np.unique(got)) > 100  # not clipped to white


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(ImageLoadError, match="not found") as e:
        load_image(str(tmp_path / "nope.jpg"))
    assert e.value.reason == "missing_image" and "nope.jpg" in str(e.value)

    Image.new("RGB", (200, 200), (1, 2, 3)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as e:
        load_image(str(tmp_path / "trunc.jpg"))
    assert e.value.reason == "corrupt_image" and "trunc.jpg" in str(e.value)

    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) - 200])
    with pytest.raises(ImageLoadError) as e:
        load_image(str(tmp_path / "trunc.png"))
    assert e.value.reason == "corrupt_image" and "trunc.png" in str(e.value)

    (tmp_path / "garbage.png").write_bytes(b"this is not an image")
    with pytest.raises(ImageLoadError) as e:
        load_image(str(tmp_path / "garbage.png"))
    assert e.value.reason == "corrupt_image" and "garbage.png" in str(e.value)


@pytest.mark.parametrize("size", [(3000, 1000), (1000, 4000), (10000, 10), (2500, 2500)])
def test_large_images_are_shrunk_before_padding_within_tolerance(size):
    """Above PAD_LIMIT the image is shrunk before padding (no 10000 x 10000 canvas); the pixels stay within
    12 intensity levels of LLaVA's pad-then-resize (0.5 on average); at or below it they are LLaVA's."""
    from transformers import CLIPImageProcessor

    from llava_san.data.images import process_image

    ip = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    w, h = size
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (max(h // 50, 2), max(w // 50, 2), 3), dtype=np.uint8))
    img = small.resize((w, h), Image.Resampling.BILINEAR)
    llava = process_image(img, ip, "pad", pad_limit=10**9)
    ours = process_image(img, ip, "pad")
    levels = (llava - ours).abs() * torch.tensor(ip.image_std).view(3, 1, 1) * 255
    assert float(levels.max()) <= 12 and float(levels.mean()) <= 0.5
    small_img = img.resize((w // 5, h // 5)) if max(w, h) // 5 <= 2048 else img.resize((400, 200))
    assert torch.equal(process_image(small_img, ip, "pad"), process_image(small_img, ip, "pad", pad_limit=10**9))
