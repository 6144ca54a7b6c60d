"""Loggers: CSV (default; a resumed run writes a new version), TensorBoard and W&B (offline) selectable."""
import csv
import glob
import json
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
FAST = ["data=synthetic", "trainer.accelerator=cpu", "evaluate=null",
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "peft=lora"]


def _run(out, *overrides):
    from train.run import run

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"paths.output_dir={out}", *FAST, *overrides])
    return run(cfg)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_is_the_default_and_resume_writes_a_new_version(tmp_path):
    ckpt = ["callbacks=default", "callbacks.progress_bar=null", "callbacks.model_checkpoint.every_n_train_steps=1"]
    first = _run(tmp_path, "trainer.max_steps=2", *ckpt)
    v0 = tmp_path / "csv" / "version_0" / "metrics.csv"
    before = v0.read_text()
    rows = _rows(v0)
    assert {r["step"] for r in rows if r.get("train/loss")} == {"0", "1"}
    final = [r for r in rows if r.get("time/train_s")]  # the run's summary row, at the last step
    assert len(final) == 1 and float(final[0]["train/loss_last"]) == pytest.approx(first["train/loss_last"])

    _run(tmp_path, "trainer.max_steps=4", "ckpt_path=last", *ckpt)
    assert v0.read_text() == before  # the interrupted run's log is kept as it was
    resumed = _rows(tmp_path / "csv" / "version_1" / "metrics.csv")
    assert {r["step"] for r in resumed if r.get("train/loss")} == {"2", "3"}


def test_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    m = _run(tmp_path, "logger=tensorboard", "trainer.max_steps=3", "callbacks=none")
    assert not (tmp_path / "csv").exists()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/samples_per_s", "train/loss_last"} <= set(tags)
    assert [e.step for e in events.Scalars("train/loss")][:3] == [0, 1, 2]
    assert events.Scalars("train/loss_last")[-1].value == pytest.approx(m["train/loss_last"], rel=1e-6)


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    m = _run(tmp_path, "logger=wandb", "trainer.max_steps=2", "callbacks=none")
    import wandb

    assert wandb.run is None  # finished: a next job (multirun) starts its own run
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1
    data = Path(runs[0]).read_bytes()  # protobuf records: keys and JSON values are stored as text
    for key in ("train/loss", "train/lr", "train/loss_last", "time/train_s"):
        assert key.encode() in data, key
    assert json.dumps(m["train/loss_last"]).encode() in data
    assert os.path.isfile(tmp_path / "metrics.json")
