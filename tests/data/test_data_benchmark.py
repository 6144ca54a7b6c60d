"""The data-pipeline benchmark runs at a tiny scale and prints the expected JSON."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_benchmark_prints_json(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "data_pipeline.py"), "--records", "2000",
           "--workers", "2", "--throughput-samples", "5", "--image-size", "64", "--patch", "16",
           "--data-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    assert res["dataset"]["records"] == 2000 and 0 < res["dataset"]["text_only"] < 2000
    for variant in ("ours", "llava_list_of_dicts"):
        r = res[variant]
        for key in ("index_build_s", "index_resident_mb", "pass_s", "worker_private_growth_mb",
                    "worker_private_growth_mb_max", "preprocess_samples_per_s_per_worker"):
            assert key in r, (variant, key)
        assert r["items"] == 2000 and len(r["worker_private_growth_mb"]) == 2
        assert r["preprocess_samples_per_s_per_worker"] > 0 and r["image_tokens"] == 16
    assert "index_arrays_mb" in res["ours"] and isinstance(res["meets_targets"], bool)
