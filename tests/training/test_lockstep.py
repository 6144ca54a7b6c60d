"""Distributed steps stay in lockstep with text-only and all-skipped batches (``llava_san.training.lockstep``).

* The zero terms are exactly zero and give every trained tensor an exactly-zero gradient (not ``None``:
  DDP needs each one), and the placeholder forward leaves SAN's γ̄ untouched.
* Two ranks, DDP (``find_unused_parameters: false``) and ZeRO-3: rank 0's first batch is all skipped
  while rank 1's is not, and the second batch is text-only on both ranks. Without the zero terms DDP
  stops on the unused projector, Lightning refuses the ``None`` step and ZeRO-3 would hang.
* One process under DeepSpeed (which always steps) with an all-skipped batch.
"""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from peft import LoraConfig  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from llava_san.peft import SanConfig, get_san_model, san_layers, set_projector_trainable  # noqa: E402
from llava_san.training.lockstep import image_branch_zero, placeholder_loss, zero_image_in_forward  # noqa: E402
from llava_san.training.loss import causal_lm_loss  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BASE = ["data=synthetic", "trainer=cpu", "evaluate=null", "callbacks=none", "logger=csv", "peft=san_dora",
        "trainer.enable_progress_bar=false", "+trainer.enable_checkpointing=false", "data.batch_size=2",
        "data.num_samples=12", "+data.shuffle=false"]
# 2 ranks x batch 2: rank r reads indices r, r+2, r+4, ... -> rank 0's batch 0 = {0, 2} (both skipped),
# rank 1's batch 0 = {1, 3}; batch 1 = {4, 6} / {5, 7}: text-only on both ranks
SKIPPED, TEXT_ONLY = "[0,2]", "[4,5,6,7]"


def _san_dora(tiny_llava):
    model, _ = tiny_llava(seed=0)
    model.requires_grad_(False)
    lora = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])
    model = get_san_model(model, lora, SanConfig())
    set_projector_trainable(model, True)
    model.train()
    return model


def _trained(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_placeholder_loss_is_zero_with_zero_gradient_everywhere_and_keeps_gamma(tiny_llava):
    model = _san_dora(tiny_llava)
    # move γ̄ away from its initial ones, so "restored" is not "reset"
    with torch.no_grad():
        for layer in san_layers(model):
            layer.san_gamma_ema.uniform_(0.5, 1.5)
    before = {layer._san.name: layer.san_gamma_ema.clone() for layer in san_layers(model)}
    loss = placeholder_loss(model)
    assert loss.dim() == 0 and loss.item() == 0.0
    loss.backward()
    trained = _trained(model)
    assert any(".lora_" in n for n in trained) and any("multi_modal_projector" in n for n in trained)
    for name, p in trained.items():
        assert p.grad is not None, f"{name} is outside the placeholder graph"
        assert torch.count_nonzero(p.grad) == 0, name
    for layer in san_layers(model):
        torch.testing.assert_close(layer.san_gamma_ema, before[layer._san.name], rtol=0, atol=0)


def test_image_branch_zero_reaches_the_projector_only(tiny_llava):
    model = _san_dora(tiny_llava)
    term = image_branch_zero(model)
    assert term.item() == 0.0 and term.dtype == torch.float32
    term.backward()
    for name, p in _trained(model).items():
        if "multi_modal_projector" in name:
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name
        else:
            assert p.grad is None, name  # the language model is not run


def test_text_only_batch_with_image_branch_has_the_same_loss_and_gradients(tiny_llava):
    """The zero-image route gives the text-only loss and adapter gradients bit-exactly, plus zero
    gradients for the projector (which the plain route leaves out of the graph)."""
    ids = torch.tensor([[1, 57, 91, 23, 14, 88], [1, 33, 44, 55, 0, 0]])
    mask = (ids != 0).long()
    labels = torch.where(torch.arange(6) >= 3, ids, torch.full_like(ids, -100)).masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    results = []
    for route in ("plain", "image_branch"):
        torch.manual_seed(0)  # the same LoRA A init for both routes
        model = _san_dora(tiny_llava)
        if route == "plain":
            loss = causal_lm_loss(model, batch)
        else:
            with zero_image_in_forward(model):
                loss = causal_lm_loss(model, batch)
            assert not model.base_model.model.model._forward_pre_hooks  # removed on exit
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in _trained(model).items()}))
    (plain_loss, plain_grads), (loss, grads) = results
    assert torch.equal(loss, plain_loss)
    for name, grad in grads.items():
        if "multi_modal_projector" in name:
            assert plain_grads[name] is None and torch.count_nonzero(grad) == 0, name
        else:
            torch.testing.assert_close(grad, plain_grads[name], rtol=0, atol=0, msg=name)


def test_one_process_deepspeed_steps_through_an_all_skipped_batch(tmp_path, monkeypatch):
    import train.run as run_module

    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "PL_GLOBAL_SEED"):
        monkeypatch.delenv(key, raising=False)  # Lightning sets them for DeepSpeed; they must not leak

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"paths.output_dir={tmp_path}", *BASE, "strategy=deepspeed_zero2", "trainer.max_steps=3",
            "data.skipped_samples=[2,3]", "data.text_only_samples=[4,5]"])
    metrics = run_module.run(cfg)
    assert metrics["train/global_step"] == 3  # DeepSpeed stepped on the empty batch too
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in adapter.values())


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero3_cpu"])
def test_two_ranks_step_together_through_skipped_and_text_only_batches(strategy, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    if strategy.startswith("deepspeed"):  # DeepSpeed then checks that the ranks ran the same ZeRO-3 module trace
        env["TORCH_DISTRIBUTED_DEBUG"] = "DETAIL"  # (under DDP, DETAIL crashes torch 2.13's gloo reducer)
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "PL_GLOBAL_SEED"):
        env.pop(key, None)
    args = [sys.executable, "-m", "train", f"hydra.run.dir={tmp_path}", *BASE, "trainer.devices=2",
            "trainer.max_steps=3", f"strategy={strategy}", f"data.skipped_samples={SKIPPED}",
            f"data.text_only_samples={TEXT_ONLY}"]
    if strategy == "ddp":
        args.append("+strategy.process_group_backend=gloo")
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run folder:" in proc.stdout
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in adapter.items())  # it trained
    assert all(torch.isfinite(v).all() for v in adapter.values())
