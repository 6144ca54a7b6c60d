"""``benchmarks/san_overhead.py --smoke``: the SAN overhead benchmark runs end to end on a small model at
two sequence lengths and prints the JSON its README table is made from (structure only: no timing bound)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARMS = ("lora", "san_lora", "dora", "san_dora")
PAIRS = ("san_lora_vs_lora", "san_dora_vs_dora")
ARM_KEYS = {"step_s", "step_cpu_s", "peak_mb", "peak_alloc_mb", "saved_activation_mb", "hwm_reset"}
RATIO_KEYS = {"step_ratio", "step_ratio_paired_median", "cpu_ratio_paired_median", "peak_mb_ratio",
              "peak_alloc_mb_ratio", "saved_activation_ratio"}
MERGED_KEYS = {"forward_cpu_s", "base_forward_cpu_s", "forward_ratio_paired_median", "same_architecture",
               "peak_alloc_mb", "base_peak_alloc_mb", "peak_alloc_mb_ratio"}


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_san_overhead_smoke(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE",
               CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "results" / "overhead.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "san_overhead.py"), "--smoke", "--profile",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout)
    # --out holds the same finished result (it was rewritten after each length, then completed)
    assert res["complete"] is True and json.loads(out.read_text()) == res
    assert [p.name for p in out.parent.iterdir()] == ["overhead.json"]  # no temporary left behind
    lens = res["config"]["seq_lens"]
    assert lens == [16, 32] and res["default_seq_len"] == 32 and res["params"] > 0
    assert set(res["by_seq_len"]) == {"16", "32"}
    for n in lens:
        entry = res["by_seq_len"][str(n)]
        assert entry["seq_len"] == n and entry["tokens_per_step"] == res["config"]["batch"] * n
        for arm in ARMS:
            assert set(entry[arm]) == ARM_KEYS, arm
            assert all(positive(entry[arm][k]) for k in ARM_KEYS - {"hwm_reset"}), (arm, entry[arm])
        for pair in PAIRS:
            assert set(entry[pair]) == RATIO_KEYS, pair
            assert all(positive(v) for v in entry[pair].values()), (pair, entry[pair])
            merged = entry["merged"][pair]
            assert set(merged) == MERGED_KEYS and merged["same_architecture"] is True
            # same architecture, same input: the merged forward allocates exactly the same
            assert merged["peak_alloc_mb_ratio"] == 1.0 and positive(merged["forward_ratio_paired_median"])
            prof = entry["profile"][pair]
            # (a difference of two profiled steps: finite, a small share of the step, not a timing bound)
            assert math.isfinite(prof["san_op_ms"]) and abs(prof["san_op_share"]) < 1 and prof["top"]
        # SAN keeps no more activations than its base (blockwise, γ under no_grad)
        assert entry["san_lora"]["saved_activation_mb"] <= entry["lora"]["saved_activation_mb"]
    # today's top-level keys are those of the default length
    for key in (*ARMS, *PAIRS):
        assert res[key] == res["by_seq_len"]["32"][key], key
    assert positive(res["merged_vs_base"])
