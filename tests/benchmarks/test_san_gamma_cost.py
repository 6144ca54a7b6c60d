"""``benchmarks/san_gamma_cost.py``: the free-γ counterfactual runs and restores SAN's real γ afterwards
(structure only: no timing bound)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_san_gamma_cost_runs():
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "san_gamma_cost.py"), "--seq", "16",
                           "--repeats", "2", "--warmup", "0"], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout)
    assert set(res["step_s"]) == {"lora", "san_lora", "san_lora_free_gamma"}
    assert all(v > 0 for v in res["step_s"].values())
    assert set(res["ratio_vs_lora_paired_median"]) == {"san_lora", "san_lora_free_gamma"}
