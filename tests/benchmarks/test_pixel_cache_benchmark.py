"""``benchmarks/pixel_cache.py``: the default run's real training loader, cache off vs on, in a few batches
and two shortened default runs at once per arm (structure and equality only: no timing bound)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_pixel_cache_benchmark_runs(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pixel_cache.py"), "--batches", "20",
                           "--repeats", "1", "--cache-dir", str(tmp_path), "--pair-steps", "3"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout)
    assert res["same_batches"] is True  # the cache changes no sample
    assert res["config"]["image_cache_mb"] == 256 and res["config"]["num_workers"] == 1
    assert res["off"]["image_cached"] == 0 and 0 < res["on"]["image_cached"] < 1
    assert res["off"]["samples"] >= 20 * 32 and res["on"]["samples"] >= 20 * 32
    assert res["worker_cpu_ratio_on_vs_off"] > 0
    # two real `python -m train` runs at once, twice per arm
    assert [len(res["pairs"][k]) for k in ("off", "on")] == [2, 2] and res["pair_wall_ratio_on_vs_off"] > 0
