"""run(cfg) end to end on the tiny model with synthetic data: every peft option, outputs, errors, resume."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from llava_san.checkpoint import CheckpointMismatchError, NothingToResumeError

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
FAST = ["data=synthetic", "trainer.accelerator=cpu", "evaluate=null",
        "callbacks.progress_bar.refresh_rate=0"]


def _cfg(out, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=[f"paths.output_dir={out}", *FAST, *overrides])


def _run(out, *overrides):
    from train.run import run

    return run(_cfg(out, *overrides))


@pytest.mark.parametrize("peft", ["none", "lora", "dora", "san_lora", "san_dora"])
def test_fast_dev_run_each_peft(peft, tmp_path):
    metrics = _run(tmp_path, f"peft={peft}", "debug=fast_dev_run")
    assert metrics["train/global_step"] == 1 and torch.isfinite(torch.tensor(metrics["train/loss_first"]))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert {"train/loss_first", "train/loss_last", "time/train_s"} <= set(saved)
    assert (tmp_path / "config.yaml").exists()
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert ("adapter_model.safetensors" in files) == (peft != "none")
    # the projector: beside the adapters as a peft modules_to_save module, alone without an adapter
    assert ("extra_trainable.safetensors" in files) == (peft == "none")
    projector_file = "extra_trainable.safetensors" if peft == "none" else "adapter_model.safetensors"
    assert any("multi_modal_projector" in k for k in load_file(tmp_path / "adapter" / projector_file))
    assert ("san_state.safetensors" in files) == peft.startswith("san_")


def test_short_run_checkpoint_metrics_export(tmp_path):
    from transformers import LlavaForConditionalGeneration

    m = _run(tmp_path, "peft=san_dora", "trainer.max_steps=4", "trainer.log_every_n_steps=1",
             "callbacks.model_checkpoint.every_n_train_steps=2", "module.log_gamma_every_n_steps=1", "export=true")
    assert m["train/global_step"] == 4 and m["train/loss_last"] < m["train/loss_first"] + 1.0
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)  # plain data only
    keys = list(ckpt["state_dict"])
    assert keys and all("lora_" in k or "san_" in k or "multi_modal_projector" in k for k in keys)
    assert "optimizer_states" in ckpt
    log = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    for name in ("train/loss", "train/lr", "train/samples_per_s", "train/tokens_per_s", "san/q_proj/mean"):
        assert name in log
    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert not list(tmp_path.glob("checkpoints/.*tmp*"))


def test_ckpt_path_last_without_checkpoint_stops(tmp_path):
    with pytest.raises(NothingToResumeError, match="nothing to resume"):
        _run(tmp_path, "ckpt_path=last", "trainer.max_steps=2")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _run(tmp_path, f"ckpt_path={tmp_path}/nope.ckpt", "trainer.max_steps=2")


def test_checkpoint_from_another_model_fails(tmp_path):
    _run(tmp_path / "a", "peft=lora", "trainer.max_steps=2", "callbacks.model_checkpoint.every_n_train_steps=1")
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointMismatchError, match="another model"):
        _run(tmp_path / "b", "peft=lora", "model.build.text_hidden=32", "trainer.max_steps=4", f"ckpt_path={ckpt}")
    with pytest.raises(CheckpointMismatchError, match="another model"):
        _run(tmp_path / "c", "peft=dora", "trainer.max_steps=4", f"ckpt_path={ckpt}")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match="weights_only"):
        _run(tmp_path / "d", "peft=lora", "trainer.max_steps=4", f"ckpt_path={junk}")


RESUME = ["peft=san_dora", "trainer.max_steps=8", "data.num_samples=24", "data.batch_size=2",
          "callbacks.model_checkpoint.every_n_train_steps=1", "logger=csv"]


def _subprocess_run(out, *overrides):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "train", f"hydra.run.dir={out}", *FAST, *RESUME, *overrides]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_sigkill_resume_matches_uninterrupted(tmp_path):
    """A run SIGKILLed after step 5 and resumed with ckpt_path=last ends with the same adapter (2 epochs: 12 batches/epoch
    would be one; 24 samples / batch 2 = 12 batches, 8 steps stay mid-epoch)."""
    ref = _subprocess_run(tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = _subprocess_run(tmp_path / "run", "+callbacks.kill._target_=llava_san.testing.callbacks.KillAtStep",
                             "+callbacks.kill.step=5")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "run" / "adapter").exists()
    resumed = _subprocess_run(tmp_path / "run", "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for name in ("adapter_model.safetensors", "san_state.safetensors"):  # the projector is in the first
        a, b = load_file(tmp_path / "ref" / "adapter" / name), load_file(tmp_path / "run" / "adapter" / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{name}:{k}")


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_refused_resume_leaves_the_run_folder_unchanged(tmp_path):
    """A resume refused by the checkpoint checks writes nothing; an accepted one keeps config.yaml and
    writes config.resume-1.yaml."""
    run_dir = tmp_path / "run"
    _run(run_dir, "peft=lora", "trainer.max_steps=2", "callbacks.model_checkpoint.every_n_train_steps=1")
    before = _snapshot(run_dir)
    assert "config.yaml" in before and "metrics.json" in before
    with pytest.raises(CheckpointMismatchError, match="another model"):
        _run(run_dir, "peft=dora", "trainer.max_steps=4", "ckpt_path=last")
    assert _snapshot(run_dir) == before
    _run(run_dir, "peft=lora", "trainer.max_steps=3", "ckpt_path=last")
    after = _snapshot(run_dir)
    assert after["config.yaml"] == before["config.yaml"]
    assert "max_steps: 3" in after["config.resume-1.yaml"].decode() and "config.resume-2.yaml" not in after


def test_resume_tidies_the_checkpoint_folder_and_outputs_honour_the_umask(tmp_path):
    """A killed run's temporaries and its step checkpoints past last.ckpt are removed when the run is
    continued (save_top_k=1 then holds); files and folders the run writes get the umask's modes."""
    import shutil

    old = os.umask(0o022)
    try:
        run_dir = tmp_path / "run"
        _run(run_dir, "peft=lora", "trainer.max_steps=2", "callbacks.model_checkpoint.every_n_train_steps=1")
        ckpts = run_dir / "checkpoints"
        shutil.copy(ckpts / "step000002.ckpt", ckpts / "step000005.ckpt")  # written after last.ckpt, then killed
        (ckpts / ".last.ckpt.tmp-x1y2").write_bytes(b"half a checkpoint")
        _run(run_dir, "peft=lora", "trainer.max_steps=3", "callbacks.model_checkpoint.every_n_train_steps=1",
             "ckpt_path=last")
        assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step000003.ckpt"]
        for p in [run_dir / "adapter", *(run_dir / "adapter").iterdir(), ckpts / "last.ckpt", run_dir / "metrics.json"]:
            assert p.stat().st_mode & 0o777 == (0o755 if p.is_dir() else 0o644), p
    finally:
        os.umask(old)
