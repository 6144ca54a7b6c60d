"""Throughput counters (:mod:`llava_san.training.throughput`) and the FLOP model (:mod:`llava_san.training.flops`).

* the FLOP model of a built LLaVA + LoRA/DoRA(+SAN) equals ``benchmarks/gpu_check.py``'s formula;
* through ``Trainer.fit`` on the tiny model, with a fake clock, gradient accumulation and padded,
  partly text-only batches: every optimiser step logs ``train/tokens_per_s`` = non-padding tokens of its
  micro-batches / step time, ``train/samples_per_s`` likewise, and ``train/mfu`` = FLOPs (written out
  here from the model's sizes) / step time / the given peak;
* the CUDA branch (faked): the card's peak by name, peak memory per step or per run;
* through ``python -m train``'s ``run(cfg)``: the default callbacks log the counters once per step with
  plausible values (no MFU on a CPU without a peak), and ``callbacks=none`` still logs them.
"""
import csv
import math
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from peft import LoraConfig
from torch.utils.data import DataLoader, Dataset

from llava_san.data.collator import LlavaCollator
from llava_san.models import build_tiny
from llava_san.module import LlavaSanModule
from llava_san.peft import LLAMA_MODULE_TYPES, LoraRecipe, SanConfig
from llava_san.training import OptimConfig
from llava_san.training.flops import FlopModel, peak_flops
from llava_san.training.throughput import Throughput

ROOT = Path(__file__).resolve().parents[2]
SPEC = {"patch_size": 8}  # conf/model/tiny.yaml


def rows_of(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_peak_flops_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_flops("NVIDIA H200") == 989.4e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("Some CPU") is None and peak_flops(None) is None
    with pytest.raises(ValueError, match="peak_flops"):
        Throughput(peak_flops=-1.0)
    with pytest.raises(ValueError, match="peak_memory"):
        Throughput(peak_memory="epoch")


@pytest.mark.parametrize("arm", ["lora", "dora", "san_lora", "san_dora"])
def test_flop_model_equals_gpu_check_formula(arm):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    s = gpu_check.SHAPES["tiny"]
    model, _ = build_tiny(seed=0, **s["spec"])
    lora = LoraConfig(r=s["rank"], lora_alpha=s["alpha"], lora_dropout=s["dropout"], use_dora=arm.endswith("dora"),
                      target_modules=list(LLAMA_MODULE_TYPES))
    module = LlavaSanModule(lambda: model, adapter=LoraRecipe(lora, SanConfig() if arm.startswith("san_") else None))
    module.configure_model()
    batch = gpu_check.make_batch(model, 2, 100, 0.25, seed=0)
    fm = FlopModel.of(module.model)
    c = fm.batch_counts(batch)
    got = fm.step(batch=c["batch"], seq_len=c["seq_len"], n_answer=int(c["n_answer"]), n_images=c["n_images"])
    want = gpu_check.step_flops(model.config, arm=arm, rank=s["rank"], dropout=s["dropout"], batch=2, seq_len=100,
                                n_answer=int(c["n_answer"]))
    assert got["model"] == want["model"] and got["forward"] == want["forward"]
    assert got["model"] + got["decoder_forward"] == want["hardware"]


# ----------------------------------------------------------------------------------------------
# Trainer.fit with a fake clock
# ----------------------------------------------------------------------------------------------
class VarLenLlava(Dataset):
    """Samples of different text lengths (padding in every batch); every third one without an image."""

    def __init__(self, processor, n=8):
        tok = processor.tokenizer
        self.image_id = tok.convert_tokens_to_ids(processor.image_token)
        ip = processor.image_processor
        self.size = ip.crop_size["height"]
        self.n_img = (self.size // processor.patch_size) ** 2
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        text = torch.randint(3, 200, (5 + 3 * i,), generator=g)
        image = i % 3 != 1
        ids = torch.cat([torch.tensor([1]), torch.full((self.n_img if image else 0,), self.image_id), text])
        labels = torch.full_like(ids, -100)
        labels[-(2 + i % 3):] = ids[-(2 + i % 3):]
        return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
                "pixel_values": torch.randn(3, self.size, self.size, generator=g) if image else None}


class Ticker(L.Callback):
    """Moves the fake clock: 1 s before each micro-batch (data), 2 s for it (compute)."""

    def __init__(self):
        self.now = 0.0

    def on_train_batch_start(self, *args):
        self.now += 1.0

    def on_train_batch_end(self, *args):
        self.now += 2.0


def expected_flops(config, batch, r):
    """gpu_check's formula written out for LoRA (no dropout) on the seven projections, per micro-batch."""
    t, v = config.text_config, config.vision_config
    d, f, L_, V = t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.vocab_size
    d_kv = d * t.num_key_value_heads // t.num_attention_heads
    shapes = [(d, d), (d, d_kv), (d, d_kv), (d, d), (d, f), (d, f), (f, d)]
    P = L_ * sum(i * o for i, o in shapes)
    P_lora = L_ * r * sum(i + o for i, o in shapes)
    B, T = batch["input_ids"].shape
    N = B * T
    n_ans = int((batch["labels"][:, 1:] != -100).sum())
    n_imgs = batch["pixel_values"].shape[0] if "pixel_values" in batch else 0
    n_img = (v.image_size // v.patch_size) ** 2
    T_v = n_img + 1
    P_vis = v.num_hidden_layers * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
    P_proj = v.hidden_size * d + d * d
    attn = 4 * L_ * B * T ** 2 * d
    head = 2 * d * V * n_ans
    forward = (2 * P * N + 2 * P_lora * N + attn + head
               + n_imgs * (2 * P_vis * T_v + 4 * v.num_hidden_layers * T_v ** 2 * v.hidden_size)
               + 2 * P_proj * n_imgs * n_img)
    backward = 2 * P * N + 4 * P_lora * N + 2 * attn + head + 2 * P_proj * n_imgs * n_img + 2 * d * d * n_imgs * n_img
    return forward + backward


def test_fit_logs_tokens_samples_mfu_per_optimizer_step(tmp_path):
    model, processor = build_tiny(seed=0, **SPEC)
    r, peak, accumulate, batch_size, steps = 4, 1e9, 2, 2, 3
    lora = LoraConfig(r=r, lora_alpha=8, lora_dropout=0.0, target_modules=list(LLAMA_MODULE_TYPES))
    module = LlavaSanModule(lambda: (model, processor), adapter=LoraRecipe(lora, SanConfig()),
                            optim=OptimConfig(lr=1e-4, projector_lr=1e-4))
    data = VarLenLlava(processor, n=batch_size * accumulate * steps)
    collate = LlavaCollator(processor.tokenizer.pad_token_id)
    ticker = Ticker()
    throughput = Throughput(peak_flops=peak, clock=lambda: ticker.now)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, accumulate_grad_batches=accumulate,
                        logger=CSVLogger(tmp_path, name="csv"), log_every_n_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ticker, throughput])
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=batch_size, collate_fn=collate))
    assert trainer.global_step == steps
    assert sum(isinstance(c, Throughput) for c in trainer.callbacks) == 1  # the module added none

    # what each optimiser step saw, computed here from the same batches
    batches = list(DataLoader(data, batch_size=batch_size, collate_fn=collate))
    assert any(int(b["attention_mask"].sum()) < b["attention_mask"].numel() for b in batches)  # padding
    assert any("pixel_values" not in b or b["pixel_values"].shape[0] < batch_size for b in batches)
    want = []
    for k in range(steps):
        micro = batches[k * accumulate:(k + 1) * accumulate]
        # fake clock: 1 s before and 2 s in each micro-batch; the first step starts at its first batch
        dt = 3.0 * accumulate - (1.0 if k == 0 else 0.0)
        tokens = sum(int(b["attention_mask"].sum()) for b in micro)
        flops = sum(expected_flops(model.config, b, r) for b in micro)
        want.append({"train/tokens_per_s": tokens / dt, "train/samples_per_s": batch_size * accumulate / dt,
                     "train/mfu": flops / dt / peak})
    rows = [row for row in rows_of(Path(trainer.logger.log_dir) / "metrics.csv") if row.get("train/tokens_per_s")]
    assert len(rows) == steps
    for row, w in zip(rows, want):
        for name, value in w.items():
            assert float(row[name]) == pytest.approx(value, rel=1e-6), name
        assert not row.get("train/peak_mem_gb")  # CUDA only
    assert throughput.last == pytest.approx(want[-1], rel=1e-12)


def test_fit_without_peak_on_cpu_logs_no_mfu(tmp_path):
    model, processor = build_tiny(seed=0, **SPEC)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=list(LLAMA_MODULE_TYPES))
    module = LlavaSanModule(lambda: (model, processor), adapter=LoraRecipe(lora))
    data = VarLenLlava(processor, n=4)
    throughput = Throughput()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[throughput])
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=2,
                                                     collate_fn=LlavaCollator(processor.tokenizer.pad_token_id)))
    assert set(throughput.last) == {"train/tokens_per_s", "train/samples_per_s"}
    assert all(v > 0 and math.isfinite(v) for v in throughput.last.values())


class FakeCudaModule:
    """What Throughput reads of a LightningModule, on a pretend CUDA device."""

    def __init__(self, model):
        self.model, self.device, self.logged = model, torch.device("cuda", 0), []

    def log(self, name, value, **kwargs):
        self.logged.append((name, value, kwargs))


class FakeTrainer:
    global_step = 0


@pytest.mark.parametrize("peak_memory", ["step", "run"])
def test_cuda_branch_peak_memory_and_card_peak(monkeypatch, peak_memory):
    """On CUDA: the card's bf16 peak by name for MFU, the device synchronised before the clock is read, the
    peak-memory counter reset at each step's start only with peak_memory="step", train/peak_mem_gb in GiB."""
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    model, processor = build_tiny(seed=0, **SPEC)
    module = LlavaSanModule(lambda: (model, processor),
                            adapter=LoraRecipe(LoraConfig(r=4, lora_alpha=8, target_modules=list(LLAMA_MODULE_TYPES))))
    module.configure_model()
    fake, trainer = FakeCudaModule(module.model), FakeTrainer()
    now = [0.0]
    cb = Throughput(peak_memory=peak_memory, clock=lambda: now[0])
    cb.on_train_start(trainer, fake)
    batch = next(iter(DataLoader(VarLenLlava(processor, n=2), batch_size=2,
                                 collate_fn=LlavaCollator(processor.tokenizer.pad_token_id))))
    for step in range(2):
        cb.on_train_batch_start(trainer, fake, batch, step)
        now[0] += 0.5
        trainer.global_step += 1
        cb.on_train_batch_end(trainer, fake, None, batch, step)
    assert calls.count("sync") == 2
    assert calls.count("reset") == (2 if peak_memory == "step" else 0)
    logged = {name: value for name, value, _ in fake.logged}
    flops = expected_flops(model.config, batch, 4)
    assert logged["train/peak_mem_gb"] == 3.0
    assert logged["train/mfu"] == pytest.approx(flops / 0.5 / 989.4e12, rel=1e-12)
    assert logged["train/tokens_per_s"] == int(batch["attention_mask"].sum()) / 0.5
    assert all(kw["prog_bar"] and kw["on_step"] and not kw["on_epoch"] for _, _, kw in fake.logged)


# ----------------------------------------------------------------------------------------------
# python -m train's run(cfg)
# ----------------------------------------------------------------------------------------------
def _run(out, *overrides):
    from hydra import compose, initialize_config_dir

    from train.run import run

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"paths.output_dir={out}", "data=synthetic", "trainer.accelerator=cpu", "evaluate=null",
            "trainer.log_every_n_steps=1", "trainer.max_steps=3", "peft=san_lora", *overrides])
    return run(cfg)


@pytest.mark.parametrize("callbacks", ["default", "none"])
def test_run_logs_counters_once_per_step(tmp_path, callbacks):
    extra = ["callbacks.progress_bar.refresh_rate=0"] if callbacks == "default" else [
        "callbacks=none", "trainer.enable_progress_bar=false"]
    metrics = _run(tmp_path, *extra)
    rows = [row for row in rows_of(tmp_path / "csv" / "version_0" / "metrics.csv") if row.get("train/tokens_per_s")]
    assert len(rows) == 3 and sorted(int(r["step"]) for r in rows) == [0, 1, 2]
    # synthetic data: every sample has <s> + the image's tokens + 16 text tokens, no padding
    model, processor = build_tiny(seed=0, **SPEC)
    n_img = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    per_sample = 1 + n_img + 16
    total = 0.0
    for row in rows:
        tps, sps = float(row["train/tokens_per_s"]), float(row["train/samples_per_s"])
        assert tps > 0 and sps > 0 and not row.get("train/mfu") and not row.get("train/peak_mem_gb")
        assert tps / sps == pytest.approx(per_sample, rel=1e-6)  # (the CSV keeps ~7 digits)
        total += 4 * per_sample / tps  # this step's seconds (4 samples per batch)
    # the steps' own times fit in the measured training time
    assert 0 < total <= metrics["time/train_s"]
