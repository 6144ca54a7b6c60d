"""``benchmarks/train_step.py --smoke``: the training-step benchmark runs end to end through
``LlavaSanModule`` on the tiny model and prints its JSON, so it cannot silently break again."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARMS = ("none", "lora", "dora", "san_lora", "san_dora")
RATIOS = ("san_lora/lora", "san_dora/dora", "dora/lora", "none/lora")


def test_train_step_smoke():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE",
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--smoke"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout)
    assert {"config", "env", "models", "seconds"} <= set(res)
    assert res["config"]["smoke"] and res["config"]["repeats"] == 2 and res["config"]["batch"] == 2
    tiny = res["models"]["tiny"]
    assert list(res["models"]) == ["tiny"] and tiny["batch"] == 2 and tiny["seq_len"] > 0
    assert set(tiny["arms"]) == set(ARMS)
    for arm, a in tiny["arms"].items():
        for key in ("step_ms", "step_cpu_ms", "samples_per_s", "samples_per_cpu_s", "train_rss_growth_mb",
                    "peak_rss_mb"):
            assert math.isfinite(a[key]) and a[key] > 0, (arm, key, a[key])
        assert a["trainable_params"] > 0
        assert math.isclose(a["samples_per_s"], 2 / (a["step_ms"] / 1e3), rel_tol=1e-9)
    # the adapters train more tensors than the projector alone; DoRA adds its magnitudes
    t = {arm: a["trainable_params"] for arm, a in tiny["arms"].items()}
    assert t["none"] < t["lora"] == t["san_lora"] < t["dora"] == t["san_dora"]
    assert set(tiny["ratios"]) == set(RATIOS)
    for name, r in tiny["ratios"].items():
        assert set(r) == {"speed", "cpu_speed", "speed_paired", "cpu_speed_paired", "memory_growth",
                          "peak_memory"}, name
        assert all(math.isfinite(v) and v > 0 for v in r.values()), (name, r)
