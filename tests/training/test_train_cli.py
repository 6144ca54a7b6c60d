"""`python -m train` as a user runs it (a subprocess): each log message once on the console and in the run's
log file; the progress bar counts optimiser steps to max_steps; a new run that fails leaves FAILED."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["data=synthetic", "trainer.accelerator=cpu", "evaluate=null", "peft=lora", "data.num_samples=16",
        "data.batch_size=4"]


def _train(folder, *overrides, base=TINY):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "train", f"hydra.run.dir={folder}", *base, *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """6 steps over two epochs of 4 batches, the progress bar refreshed every step."""
    folder = tmp_path_factory.mktemp("cli") / "run"
    done = _train(folder, "trainer.max_steps=6", "callbacks.progress_bar.refresh_rate=1")
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, done


def _records(text):
    """Log records in Hydra's format, without their timestamps (on the console a record may follow the
    progress bar on its line)."""
    return re.findall(r"\[\d{4}-\d\d-\d\d [\d:,]+\]\[([^\]]+\]\[[A-Z]+\] - [^\r\n]*)", text)


def test_each_lightning_message_once_and_in_the_log_file(six_steps):
    folder, done = six_steps
    console = done.stdout + "\n" + done.stderr
    for message in ("Seed set to 0", "GPU available: False", "`Trainer.fit` stopped: `max_steps=6` reached."):
        assert console.count(message) == 1, (message, console[-3000:])
    (log_file,) = folder.glob("*.log")
    logged = _records(log_file.read_text())
    assert any("`Trainer.fit` stopped" in r for r in logged)
    # every record the console printed is in the log file, once each
    printed = _records(done.stdout)
    assert printed and sorted(printed) == sorted(logged)


def test_progress_bar_counts_steps_to_max_steps(six_steps):
    _, done = six_steps
    states = re.findall(r"Epoch (\d+):\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)", done.stdout)
    assert states, done.stdout[-2000:]
    assert {total for _, _, total in states} == {"6"}  # never the 4 batches of an epoch
    steps = [int(n) for _, n, _ in states]
    assert steps == sorted(steps) and steps[-1] == 6  # one bar over the run, not restarted each epoch
    assert {epoch for epoch, _, _ in states} == {"0", "1"}


def test_a_new_run_that_fails_is_marked_failed(tmp_path):
    folder = tmp_path / "run"
    done = _train(folder, "trainer.max_steps=2", "data=mvit665k", f"data.train_file={tmp_path / 'none.json'}",
                  base=[t for t in TINY if not t.startswith("data")])
    assert done.returncode != 0
    text = (folder / "FAILED").read_text()
    assert text.splitlines()[0].startswith("FileNotFoundError") and "none.json" in text.splitlines()[0]
    assert "Traceback" in text
    # the same folder, now fixed: the run finishes and the marker goes
    done = _train(folder, "trainer.max_steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (folder / "FAILED").exists() and (folder / "metrics.json").is_file()


def test_a_refused_command_on_a_finished_run_leaves_no_marker(six_steps, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(six_steps[0], folder)
    done = _train(folder, "trainer.max_steps=6", "ckpt_path=last", "peft=dora")  # another recipe: refused
    assert done.returncode != 0
    assert not (folder / "FAILED").exists()
