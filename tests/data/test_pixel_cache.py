"""The pixel cache: LRU by bytes, samples bit-identical with and without it (by hand and through
``python -m train``'s ``run``, where its hits are counted in ``metrics.json``), bad images never cached."""
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from llava_san.data import LlavaPreprocessor
from llava_san.data.easyvqa import prepare_easyvqa
from llava_san.data.errors import BadSample
from llava_san.data.pixel_cache import PixelCache
from llava_san.training.processors import tiny_processor

ROOT = Path(__file__).resolve().parents[2]


def _t(n_floats: int, value: float = 0.0) -> torch.Tensor:
    return torch.full((n_floats,), float(value), dtype=torch.float32)  # 4 bytes each


def test_lru_by_bytes():
    cache = PixelCache(max_bytes=40)  # room for 10 floats
    cache.put("a", _t(4, 1))
    cache.put("b", _t(4, 2))
    assert cache.bytes == 32 and len(cache) == 2
    assert cache.get("a")[0] == 1  # "a" is now the most recently used
    cache.put("c", _t(2, 3))  # 40 bytes: still fits
    assert cache.bytes == 40 and len(cache) == 3
    cache.put("d", _t(1, 4))  # over: the least recently used ("b") goes
    assert cache.get("b") is None and [k for k in ("a", "c", "d") if cache.get(k) is not None] == ["a", "c", "d"]
    assert cache.bytes == 28
    cache.put("a", _t(8, 5))  # replacing a key counts its new size only; "c" (now oldest) goes
    assert cache.get("a")[0] == 5 and cache.get("c") is None and cache.bytes == 36
    cache.put("huge", _t(11))  # larger than the whole budget: not kept, nothing dropped
    assert cache.get("huge") is None and cache.bytes == 36
    assert (cache.hits, cache.misses) == (5, 3)
    with pytest.raises(ValueError, match="positive"):
        PixelCache(0)


def test_pickled_copy_starts_empty():
    cache = PixelCache(1000)
    cache.put("a", _t(4))
    copy = pickle.loads(pickle.dumps(cache))
    assert len(copy) == 0 and copy.bytes == 0 and copy.max_bytes == 1000
    assert len(cache) == 1  # the original keeps its entries


@pytest.fixture(scope="module")
def easyvqa(tmp_path_factory):
    return prepare_easyvqa(str(tmp_path_factory.mktemp("easyvqa")))


def _preprocessor(paths, image_cache_mb):
    proc = tiny_processor(image_size=64, patch_size=8)
    return LlavaPreprocessor.from_processor(proc, image_folder=paths.image_folder, image_cache_mb=image_cache_mb)


def test_samples_equal_with_and_without_cache(easyvqa):
    records = json.load(open(easyvqa.train_records, encoding="utf-8"))[:200]  # ~20 images, asked ~10 times each
    plain, cached = _preprocessor(easyvqa, 0), _preprocessor(easyvqa, 64)
    assert plain.pixel_cache is None
    for i, rec in enumerate(records):
        a, b = plain(rec, i), cached(rec, i)
        assert a.keys() == b.keys() and a["truncated"] == b["truncated"]
        for k in ("input_ids", "labels", "pixel_values"):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (i, k)
    images = {r["image"] for r in records}
    assert cached.pixel_cache.misses == len(images) and cached.pixel_cache.hits == len(records) - len(images)


def test_bad_image_is_never_cached_and_unsafe_path_still_refused(easyvqa, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(os.path.join(easyvqa.image_folder, "train/images/0.png"), folder / "good.png")
    (folder / "bad.png").write_bytes(b"not a png")
    proc = LlavaPreprocessor.from_processor(tiny_processor(image_size=64, patch_size=8), image_folder=str(folder),
                                           image_cache_mb=16)
    turns = [{"from": "human", "value": "<image>\nwhat colour?"}, {"from": "gpt", "value": "red"}]
    for _ in range(2):  # the second time is not served from the cache either
        with pytest.raises(BadSample) as err:
            proc({"id": "r-bad", "image": "bad.png", "conversations": turns})
        assert err.value.reason == "corrupt_image" and "r-bad" in err.value.message
    assert len(proc.pixel_cache) == 0
    with pytest.raises(BadSample) as err:
        proc({"id": "r-up", "image": "../images/good.png", "conversations": turns})
    assert err.value.reason == "unsafe_image_path"
    proc({"id": "r-good", "image": "good.png", "conversations": turns})
    assert len(proc.pixel_cache) == 1
    with pytest.raises(ValueError, match="image_cache_mb"):
        LlavaPreprocessor.from_processor(tiny_processor(image_size=64, patch_size=8), image_cache_mb=-1)


def _run(tmp_path: Path, image_cache_mb: int) -> tuple[dict, dict]:
    from train.run import run

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"paths.output_dir={tmp_path}", "trainer.max_steps=12", "data.batch_size=16", "evaluate=null",
            f"data.image_cache_mb={image_cache_mb}", "callbacks.progress_bar.refresh_rate=0"])
    assert cfg.data.num_workers == 1  # the cache lives in the dataloader worker, as in the default run
    metrics = run(cfg)
    return metrics, load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))


def test_training_through_run_is_bit_identical_with_the_cache(tmp_path):
    """The default run (shortened) with the cache off and on: the same losses and the same trained adapter
    tensors, and the worker's cache hits reach ``metrics.json``."""
    off, off_tensors = _run(tmp_path / "off", 0)
    on, on_tensors = _run(tmp_path / "on", 256)
    assert "data/image_cached" not in off
    # 12 x 16 samples drawn from 37,803 questions about 4,000 images: a few images repeat
    assert on["data/image_cached"] > 0
    for key in ("train/loss_first", "train/loss_last", "val/loss"):
        assert on[key] == off[key], key
    assert on_tensors.keys() == off_tensors.keys()
    assert all(torch.equal(on_tensors[k], off_tensors[k]) for k in on_tensors)
