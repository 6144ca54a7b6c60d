"""``python -m train -m peft=lora,san_lora seed=0,1``: one folder and metrics.json per job, one table."""
import json
import os
import subprocess
import sys
from pathlib import Path

from evaluation.sweep import aggregate, collect_multirun

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["data=synthetic", "trainer.accelerator=cpu", "trainer.max_steps=2",
         "evaluate=null", "callbacks=none", "logger=csv", "trainer.enable_progress_bar=false",
         "trainer.log_every_n_steps=1"]


def test_multirun_jobs_and_sweep_table(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    sweep = tmp_path / "sweep"
    args = [sys.executable, "-m", "train", "-m", "peft=lora,san_lora", "seed=0,1", f"hydra.sweep.dir={sweep}",
            *SHORT]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["train/global_step"] == 2
        assert (job / "adapter" / "adapter_model.safetensors").is_file()
        assert (job / "csv" / "version_0" / "metrics.csv").is_file()
        assert not (job / "checkpoints").exists() and not list(job.rglob("*.ckpt"))  # callbacks=none
        cfg = (job / ".hydra" / "config.yaml").read_text()
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        seen.add(tuple(line.strip("- \n") for line in overrides.splitlines() if line.startswith("- peft=")
                       or line.startswith("- seed=")))
        assert f"output_dir: {job}" in (job / "config.yaml").read_text() and "san:" in cfg
    assert seen == {("peft=lora", "seed=0"), ("peft=lora", "seed=1"), ("peft=san_lora", "seed=0"),
                    ("peft=san_lora", "seed=1")}

    rows = aggregate(collect_multirun(sweep), by=["peft"], metrics=["train/loss_last"])
    assert [r["group"]["peft"] for r in rows] == ["lora", "san_lora"]
    for r in rows:
        losses = [json.loads((sweep / j / "metrics.json").read_text())["train/loss_last"]
                  for j in ("0", "1", "2", "3")
                  if f"peft={r['group']['peft']}\n" in (sweep / j / ".hydra" / "overrides.yaml").read_text()]
        assert r["n"] == 2 and r["metrics"]["train/loss_last"]["mean"] == sum(losses) / 2

    table = subprocess.run([sys.executable, "-m", "evaluation.sweep", str(sweep), "--metrics", "train/loss_last"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.strip().splitlines()
    assert lines[0] == f"4 jobs in {sweep}"
    assert lines[2] == "| peft | n | train/loss_last |"  # only the override that varies, seeds pooled
    assert [ln.split("|")[1].strip() for ln in lines[4:]] == ["lora", "san_lora"]
    assert all(" ± " in ln for ln in lines[4:])
