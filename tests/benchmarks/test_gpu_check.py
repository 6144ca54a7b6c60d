"""``benchmarks/gpu_check.py --tiny``: the GPU check's own code on small shapes on the CPU, end to end.

One subprocess run (the check prints one JSON object on stdout, everything else goes to stderr); every
section must be present without error, and its invariants hold: positive speeds and ratios, a FLOP formula,
SAN equal to LoRA/DoRA at initialisation, bf16 autocast within the stated bounds of fp32 with γ̄ kept in fp32,
batch-16 generation answering exactly as batch 1 (fp32), and a ZeRO-3 and a ZeRO-2 run through Lightning's
Trainer with the project's strategy configs training the same losses.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("env", "train", "generation", "bf16", "zero3", "zero2")
ARMS = ("lora", "dora", "san_lora", "san_dora")


def run_check(tmp_path, *args: str, returncode: int = 0) -> dict:
    """``python benchmarks/gpu_check.py --tiny --out <file> *args`` on the CPU; its JSON."""
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE",
               DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):  # a fresh process group
        env.pop(key, None)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == returncode, proc.stderr[-4000:]
    res = json.loads(proc.stdout)  # stdout holds the JSON only
    assert json.loads(out.read_text()) == res  # --out has the same object
    return res


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    pytest.importorskip("deepspeed")
    return run_check(tmp_path_factory.mktemp("gpu_check"))


def test_every_section_ran_without_error(result):
    assert result["benchmark"] == "gpu_check" and result["shape"] == "tiny" and result["device"] == "cpu"
    assert list(result["sections"]) == list(SECTIONS)
    for name, section in result["sections"].items():
        assert "error" not in section, (name, section.get("error"), section.get("traceback"))
        assert section["section_s"] > 0
    assert result["errors"] == [] and not result.get("timed_out")
    assert result["seconds"] < result["time_budget_s"]
    env = result["sections"]["env"]
    assert env["torch"] and env["attn_implementation"] == {"text": "sdpa", "vision": "sdpa"}
    assert env["peak_bf16_flops"] is None  # no GPU: no peak, no MFU


def test_train_section(result):
    train = result["sections"]["train"]
    assert set(train["arms"]) == set(ARMS) and train["repeats"] >= 1 and train["finite_losses"]
    assert train["tokens_per_step"] == train["batch"] * train["seq_len"]
    flops = train["flops"]
    assert "2*k*P*N" in flops["formula"] and "MFU" in flops["formula"]
    for arm, row in train["arms"].items():
        assert row["tokens_per_s"] > 0 and row["samples_per_s"] > 0 and row["trainable_params"] > 0
        assert 0 < row["model_tflops_per_step"] < row["hardware_tflops_per_step"]  # recompute counted apart
        assert row["mfu"] is None and row["peak_allocated_gb"] is None  # CPU
        assert len(row["step_s_all"]) == train["repeats"]
    arms = train["arms"]
    # DoRA multiplies W by x and drop(x) and computes ‖W + sBA‖: more FLOPs than LoRA; SAN adds no matmul
    assert arms["dora"]["model_tflops_per_step"] > arms["lora"]["model_tflops_per_step"]
    assert arms["san_dora"]["model_tflops_per_step"] == arms["dora"]["model_tflops_per_step"]
    for key in ("san_lora/lora", "san_dora/dora", "dora/lora"):
        ratio = train["ratios"][key]
        assert ratio["speed"] > 0 and ratio["speed_paired"] > 0
    # the first step starts from LoRA B = 0, where SAN computes exactly what LoRA/DoRA computes
    assert train["ratios"]["san_lora/lora"]["init_loss_rel_diff"] < 1e-6
    assert train["ratios"]["san_dora/dora"]["init_loss_rel_diff"] < 1e-5


def test_bf16_section(result):
    bf16 = result["sections"]["bf16"]
    assert bf16["autocast"] == "cpu/bfloat16" and bf16["weights"] == "float32"
    assert bf16["bounds"]["loss_rel"] <= 1e-2
    for arm in ("san_lora", "san_dora"):
        row = bf16["arms"][arm]
        assert row["finite"] and row["within_bounds"], row
        assert row["loss_rel_err"] < bf16["bounds"]["loss_rel"]
        assert row["grad_rel_err_max"] < bf16["bounds"]["grad_rel"] and len(row["grad_rel_err"]) >= 4
        assert row["ema_dtypes_after_bf16"] == ["torch.float32"]  # γ̄ stays an fp32 buffer
        assert row["gamma_dtype_bf16"] == ["torch.float32"]  # γ pooled in fp32
        assert row["gamma_max_abs_dev_from_1_fp32"] > 0.05  # random LoRA B: γ far from 1
        assert row["gamma_layers_compared"] == 14  # 2 blocks x 7 projections
    assert any("lora_magnitude" in n for n in bf16["arms"]["san_dora"]["grad_rel_err"])
    assert bf16["within_bounds"]


def test_generation_section(result):
    gen = result["sections"]["generation"]
    assert gen["identical_answers"] and gen["identical_fraction"] == 1.0  # fp32: batch 16 == batch 1
    assert gen["answer_lengths"] == [gen["max_new_tokens"]]  # no stop token: every answer is forced full
    assert gen["prompt_tokens"][0] < gen["prompt_tokens"][1]  # prompts of different lengths (left padding)
    assert gen["distinct_answers"] > 1
    assert gen[f"batch_{gen['batch_size']}"]["questions_per_s"] > 0 and gen["batch_1"]["questions_per_s"] > 0
    assert gen["speedup"] > 0 and gen["speedup_paired"] > 0


@pytest.mark.parametrize("stage", [3, 2])
def test_deepspeed_sections(result, stage):
    ds = result["sections"][f"zero{stage}"]
    assert ds["success"] and ds["zero_stage"] == stage and ds["engine"] == "DeepSpeedEngine"
    assert ds["strategy_config"] == ("conf/strategy/deepspeed_zero3_cpu.yaml" if stage == 3
                                     else "conf/strategy/deepspeed_zero2.yaml")
    assert ds["global_step"] == 2 and len(ds["steps_s"]) == 2 and all(t > 0 for t in ds["steps_s"])
    assert all(math.isfinite(v) for v in ds["losses"])
    assert (ds["partitioned_params"] > 0) == (stage == 3)


def test_zero3_and_zero2_train_the_same(result):
    """Same model seed, batches and fp32 arithmetic: the two stages give the same losses."""
    z3, z2 = result["sections"]["zero3"]["losses"], result["sections"]["zero2"]["losses"]
    assert z3 == pytest.approx(z2, rel=1e-4)


def test_summary(result):
    s = result["summary"]
    assert s["zero3_success"] and s["zero2_success"] and s["bf16_within_bounds"]
    assert s["generation_identical_answers"] and set(s["tokens_per_s"]) == set(ARMS)


def test_train_section_with_bf16_parameters(tmp_path):
    """The GPU's default train precision: bf16 weights, adapters cast to bf16 (DeepSpeed's bf16 mode)."""
    res = run_check(tmp_path, "--dtype", "bfloat16", "--sections", "train", "--repeats", "1")
    train = res["sections"]["train"]
    assert "error" not in train, train.get("traceback")
    assert train["precision"] == "params" and train["dtype"] == "torch.bfloat16" and train["finite_losses"]
    assert all(row["tokens_per_s"] > 0 for row in train["arms"].values())
    assert train["ratios"]["san_lora/lora"]["init_loss_rel_diff"] < 1e-6  # bf16 too: SAN = LoRA at B = 0


def test_a_failing_section_is_recorded_and_the_others_run(tmp_path):
    """flash-attn is not installed here: the sections that build the model fail, each on its own."""
    res = run_check(tmp_path, "--sections", "env,generation,train", "--attn", "flash_attention_2", returncode=1)
    assert res["errors"] == ["train", "generation"]
    for name in res["errors"]:
        assert "flash" in res["sections"][name]["error"].lower() and "traceback" in res["sections"][name]
    assert "error" not in res["sections"]["env"] and res["sections"]["env"]["attn_requested"] == "flash_attention_2"
    assert res["summary"]["tokens_per_s"] == {} and res["summary"]["generation_speedup"] is None


def test_a_hung_run_still_prints_what_it_measured(tmp_path):
    """Past the budget + the grace the watchdog prints the JSON so far and exits 124 (here after 3 s: the
    imports alone take longer, so it fires inside a section)."""
    res = run_check(tmp_path, "--time-budget-s", "0.1", "--watchdog-grace-s", "3", returncode=124)
    assert res["timed_out"] is True
    timed_out = [n for n, r in res["sections"].items() if "time budget" in r.get("error", "")]
    assert len(timed_out) == 1 and res["running"] == timed_out[0]
