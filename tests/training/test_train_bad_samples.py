"""Bad records in real training runs (run(cfg) -> Trainer.fit): any failure on one record is a counted,
named skip (or a named error under on_bad_sample=raise), and the per-reason counts reach metrics.json."""
import json

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from llava_san.data import BadSampleError
from llava_san.data.preprocess import LlavaPreprocessor

from test_train_run import CONF


def _conv(q, a):
    return [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]


@pytest.fixture()
def bad_data(tmp_path):
    """12 good image records, one missing image, one record that fails in preprocessing ("boom"),
    and one whose text holds a lone UTF-16 surrogate (legal JSON, no tokenizer takes it)."""
    img = tmp_path / "images"
    img.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(img / "a.png")
    recs = [{"id": f"ok{i}", "image": "a.png", "conversations": _conv(f"what is {i}?", "red")} for i in range(12)]
    recs.append({"id": "missing", "image": "nope.png", "conversations": _conv("q?", "blue")})
    recs.append({"id": "boom", "image": "a.png", "conversations": _conv("q?", "green")})
    text = json.dumps(recs)[:-1] + ', {"id": "surrogate", "image": "a.png", "conversations": ' \
        '[{"from": "human", "value": "<image>\\nwhat \\ud800?"}, {"from": "gpt", "value": "red"}]}]'
    (tmp_path / "train.json").write_text(text)
    return tmp_path


@pytest.fixture()
def boom(monkeypatch):
    """Record "boom" makes the preprocessing raise a bare TypeError (as a tokenizer does on bad text)."""
    original = LlavaPreprocessor.__call__

    def call(self, rec, position=0, path="<memory>"):
        if rec.get("id") == "boom":
            raise TypeError("argument 'text': expected str")
        return original(self, rec, position, path)

    monkeypatch.setattr(LlavaPreprocessor, "__call__", call)


def _cfg(d, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=[
            f"paths.output_dir={d / 'run'}", "data=mvit665k", f"data.train_file={d / 'train.json'}",
            f"data.image_folder={d / 'images'}", "data.num_workers=0", "data.batch_size=7",
            "data.max_bad_fraction=0.5", "data.pin_memory=false", "peft=lora", "evaluate=null",
            "trainer.max_steps=4", "callbacks=none", "trainer.enable_progress_bar=false", *overrides])


def test_any_failure_is_a_counted_skip_and_reaches_metrics(bad_data, boom, caplog):
    from train.run import run

    metrics = run(_cfg(bad_data))
    saved = json.loads((bad_data / "run" / "metrics.json").read_text())
    # 14 indexed records, 7 a batch: 2 steps an epoch, 4 steps = 2 whole epochs
    assert metrics["train/global_step"] == 4
    assert saved["data/index_skipped_unencodable_text"] == 1
    assert saved["data/skipped_missing_image"] == 2 and saved["data/skipped_preprocess_error"] == 2
    assert saved["data/skipped"] == 4 and saved["data/skipped_fraction"] == pytest.approx(4 / 28)
    log = caplog.text
    line = next(ln for ln in log.splitlines() if "id='boom'" in ln)
    assert "preprocess_error" in line and "TypeError" in line and "train.json" in line and "#13" in line
    assert "id='surrogate'" in log and "U+D800" in log
    assert "train epoch 1: 14 samples prepared, 2 skipped" in log


def test_raise_policy_names_the_record_and_the_error(bad_data, boom):
    from train.run import run

    with pytest.raises(BadSampleError, match=r"unencodable_text.*id='surrogate'.*U\+D800"):
        run(_cfg(bad_data, "data.on_bad_sample=raise"))
    text = (bad_data / "train.json").read_text()
    (bad_data / "train.json").write_text(text[: text.index(', {"id": "surrogate"')] + "]")
    recs = json.loads((bad_data / "train.json").read_text())
    (bad_data / "train.json").write_text(json.dumps([r for r in recs if r["id"] != "missing"]))
    with pytest.raises(Exception, match=r"preprocess_error.*id='boom'.*TypeError"):
        run(_cfg(bad_data, "data.on_bad_sample=raise"))


@pytest.mark.parametrize("case, message", [
    ("object_top_level", "the top level is a JSON object; a records file must be a JSON array"),
    ("deep_nesting", "nested deeper than the JSON parser allows"),
    ("missing_image_folder", "image_folder .*nowhere does not exist"),
    ("seed", "seed must be an integer, got 'abc'"),
    ("last_ckpt_dir", "last.ckpt is a folder"),
])
def test_messages_name_the_thing(bad_data, case, message):
    """Each refusal through run() names the file, folder or key at fault, before the first batch."""
    from train.run import run

    overrides = []
    if case == "object_top_level":
        (bad_data / "train.json").write_text(json.dumps({"data": [{"id": 1}]}, indent=2))
    elif case == "deep_nesting":
        (bad_data / "train.json").write_text("[" + "[" * 100000 + "]" * 100000 + "]")
    elif case == "missing_image_folder":
        overrides = [f"data.image_folder={bad_data / 'nowhere'}"]
    elif case == "seed":
        overrides = ["seed=abc"]
    else:
        (bad_data / "run" / "checkpoints" / "last.ckpt").mkdir(parents=True)
        overrides = ["ckpt_path=last"]
    with pytest.raises(Exception, match=message):
        run(_cfg(bad_data, *overrides))
    assert not (bad_data / "run" / "config.yaml").exists()  # refused before anything was written


def test_image_paths_stay_inside_the_folder_and_large_images_are_capped(bad_data):
    """Through run(): an absolute path, '..', a symlink leading outside and an over-large image are named
    skips; a 10000 x 10 image trains (shrunk before padding, no 10000 x 10000 canvas)."""
    from train.run import run

    outside = bad_data / "outside.png"
    Image.new("RGB", (8, 8), "red").save(outside)
    (bad_data / "images" / "link.png").symlink_to(outside)
    Image.new("RGB", (10000, 10), "blue").save(bad_data / "images" / "wide.png")
    Image.new("RGB", (400, 400), "green").save(bad_data / "images" / "big.png")
    recs = [{"id": f"ok{i}", "image": "a.png", "conversations": _conv(f"what is {i}?", "red")} for i in range(9)]
    for rid, image in [("abs", str(outside)), ("dotdot", "../outside.png"), ("link", "link.png"),
                       ("big", "big.png"), ("wide", "wide.png")]:
        recs.append({"id": rid, "image": image, "conversations": _conv("q?", "blue")})
    (bad_data / "train.json").write_text(json.dumps(recs))
    run(_cfg(bad_data, "data.max_image_pixels=120000", "trainer.max_steps=2"))
    saved = json.loads((bad_data / "run" / "metrics.json").read_text())
    assert saved["data/skipped_unsafe_image_path"] == 3 and saved["data/skipped_image_too_large"] == 1
    assert saved["data/skipped"] == 4  # "wide" trained
    run(_cfg(bad_data, "data.max_image_pixels=120000", "trainer.max_steps=2", "data.image_symlinks_outside=true",
             f"paths.output_dir={bad_data / 'run2'}"))
    saved = json.loads((bad_data / "run2" / "metrics.json").read_text())
    assert saved["data/skipped_unsafe_image_path"] == 2  # the symlink is allowed now
