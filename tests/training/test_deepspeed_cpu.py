"""DeepSpeed ZeRO-2/3 on CPU (DeepSpeed's CPU accelerator, gloo) through ``run(cfg)``.

The known LLaVA failure under ZeRO-3 is an adapter saved from the partitioned placeholders (empty
tensors) or before training. Here, for SAN-LoRA and SAN-DoRA under ZeRO-2 and ZeRO-3 (every parameter
partitioned: ``stage3_param_persistence_threshold: 0``):

* the saved adapter holds the trained values (equal to the in-memory parameters gathered from their
  partitions; LoRA ``B`` is no longer 0), and its γ̄;
* ``load_adapter`` of it onto a fresh base gives the trained model's eval logits;
* ZeRO-2 and ZeRO-3 train the same adapter;
* with 2 ranks (``python -m train trainer.devices=2``, each rank on other data) the saved γ̄ is the mean
  of the ranks' γ̄, and the adapter holds the tensors gathered from both partitions.
"""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported: a GPU machine would pick CUDA

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

pytest.importorskip("deepspeed")

from deepspeed_helpers import BASE, ROOT, compose_train as _cfg  # noqa: E402
STRATEGY = {2: "deepspeed_zero2", 3: "deepspeed_zero3_cpu"}  # zero3_cpu: persistence threshold 0
PEFTS = ["san_lora", "san_dora"]


def _eval_batch(cfg):
    """Two samples of the synthetic data, the second with 3 padding positions."""
    processor = instantiate(cfg.model.processor)
    dm = instantiate(cfg.data, processor=processor)
    samples = [dm.dataset[i] for i in range(2)]
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("input_ids", "attention_mask", "pixel_values")}
    batch["attention_mask"][1, -3:] = 0
    return batch


@torch.no_grad()
def _logits(model, batch):
    was = model.training
    model.eval()
    try:
        return model(**batch).logits.float()
    finally:
        model.train(was)


@pytest.fixture
def _dist_env(monkeypatch):
    """Lightning writes MASTER_PORT, RANK... into os.environ for DeepSpeed; they do not leak out of a test.

    The (1-process, gloo) process group itself stays up for the session: DeepSpeed caches its groups
    (``deepspeed.utils.groups``) and cannot be initialised a second time in one process.
    """
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "PL_GLOBAL_SEED"):
        monkeypatch.delenv(key, raising=False)
    yield


_RUNS: dict = {}


def _train(stage, peft, tmp_path_factory, *overrides):
    """One run(cfg) per (stage, peft, overrides), cached: what it saved and the trained model at save time."""
    if (stage, peft, overrides) in _RUNS:
        return _RUNS[(stage, peft, overrides)]
    import train.run as run_module
    from llava_san.checkpoint import gathered
    from llava_san.peft import save_adapter

    out = tmp_path_factory.mktemp(f"zero{stage}_{peft}")
    cfg = _cfg(out, f"strategy={STRATEGY[stage]}", f"peft={peft}", "trainer.max_steps=3", *overrides)
    batch = _eval_batch(cfg)
    seen: dict = {}
    save_final_adapter = run_module.save_final_adapter

    def spy(model, directory, is_global_zero, *args):
        # what the partitions hold before saving, and that saving them ungathered is refused
        seen["numel"] = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
        if stage == 3:
            with pytest.raises(ValueError, match="partitioned"):
                save_adapter(model, out / "ungathered")
        path = save_final_adapter(model, directory, is_global_zero, *args)
        with gathered(model):  # the whole model, to read every trained value
            seen["trained"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        seen["gamma"] = {n: b.detach().clone() for n, b in model.named_buffers()
                         if n.endswith("san_gamma_ema")}
        seen["logits"] = _logits(model, batch)  # ZeRO-3's module hooks gather W (and SAN's external params)
        return path

    run_module.save_final_adapter = spy
    try:
        metrics = run_module.run(cfg)
    finally:
        run_module.save_final_adapter = save_final_adapter
    _RUNS[(stage, peft, overrides)] = dict(cfg=cfg, out=out, batch=batch, metrics=metrics, **seen)
    return _RUNS[(stage, peft, overrides)]


def _saved_key(name: str) -> tuple[str, str]:
    """(file, key) under which save_adapter stores the trained parameter ``name`` of the PeftModel."""
    if "lora_" in name:
        key = name.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector")
        return "adapter_model.safetensors", key.replace(".default.", ".")
    return "adapter_model.safetensors", name  # the projector, saved as a peft modules_to_save module


# ----------------------------------------------------------------------------------------------
# the strategy and the configs
# ----------------------------------------------------------------------------------------------
def test_resolve_auto_like_the_hf_trainer(tiny_llava):
    from llava_san.training.strategies import model_hidden_size, resolve_auto

    cfg = _cfg("/tmp/unused", "strategy=deepspeed_zero3_offload")
    raw = instantiate(cfg.strategy).config
    out = resolve_auto(raw, precision="bf16-mixed", hidden_size=4096)
    zero = out["zero_optimization"]
    assert zero["reduce_bucket_size"] == 4096 ** 2
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 4096 ** 2)
    assert zero["stage3_param_persistence_threshold"] == 40960
    assert out["bf16"] == {"enabled": True} and "fp16" not in out
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                "gradient_clipping", "optimizer", "scheduler"):
        assert key not in out  # Lightning fills them from the Trainer / the LightningModule
    assert raw["zero_optimization"]["reduce_bucket_size"] == "auto"  # the input is not modified
    fp32 = resolve_auto(raw, precision="32-true")
    assert "bf16" not in fp32 and "fp16" not in fp32
    assert fp32["zero_optimization"]["reduce_bucket_size"] == "auto"  # resolved once the model exists
    assert resolve_auto(raw, precision="16-mixed")["fp16"]["enabled"] is True
    with pytest.raises(ValueError, match="steps_per_print"):
        resolve_auto({**raw, "steps_per_print": "auto"})
    model, _ = tiny_llava(text_hidden=48)  # LLaVA: the language model's size, from text_config
    assert model_hidden_size(model) == 48


@pytest.mark.parametrize("option", ["deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload",
                                    "deepspeed_zero3_cpu"])
def test_strategy_yaml_has_llava_semantics(option):
    from llava_san.training.strategies import DeepSpeedStrategy

    strategy = instantiate(_cfg("/tmp/unused", f"strategy={option}").strategy)
    assert isinstance(strategy, DeepSpeedStrategy)
    assert strategy.zero_init == option.endswith("offload")  # offload: partitioned while it is built
    config = strategy.config
    zero = config["zero_optimization"]
    assert (zero["overlap_comm"], zero["contiguous_gradients"]) == (True, True)
    assert zero["sub_group_size"] == 10 ** 9
    assert config["bf16"] == {"enabled": "auto"} and config["fp16"]["enabled"] == "auto"
    assert zero["reduce_bucket_size"] == "auto"
    if zero["stage"] == 3:
        assert zero["stage3_prefetch_bucket_size"] == "auto"
        assert zero["stage3_param_persistence_threshold"] == (0 if option.endswith("cpu") else "auto")
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
        assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == 10 ** 9
    if option.endswith("offload"):
        assert zero["offload_optimizer"] == zero["offload_param"] == {"device": "cpu", "pin_memory": True}


def test_cpu_mode_needs_deepspeeds_cpu_accelerator(monkeypatch):
    import deepspeed.accelerator
    from lightning.pytorch.accelerators import CPUAccelerator

    from llava_san.training.strategies import DeepSpeedStrategy

    class FakeCuda:
        def device_name(self, *_):
            return "cuda"

    strategy = DeepSpeedStrategy(accelerator=CPUAccelerator(), config={"zero_optimization": {"stage": 2}})
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: FakeCuda())
    with pytest.raises(RuntimeError, match="DS_ACCELERATOR=cpu"):
        strategy.setup_environment()


# ----------------------------------------------------------------------------------------------
# one process: ZeRO-2 and ZeRO-3, SAN-LoRA and SAN-DoRA
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("peft", PEFTS)
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_run_saves_the_trained_adapter(stage, peft, tmp_path_factory, _dist_env):
    r = _train(stage, peft, tmp_path_factory)
    assert r["metrics"]["train/global_step"] == 3
    if stage == 3:  # every trained tensor really was partitioned (an empty placeholder) while training
        assert all(n == 0 for n in r["numel"].values()), r["numel"]
    adapter = r["out"] / "adapter"
    files = {name: load_file(adapter / name)
             for name in ("adapter_model.safetensors",)}
    trained = r["trained"]
    assert any("lora_magnitude_vector" in n for n in trained) == (peft == "san_dora")
    for name, value in trained.items():
        file, key = _saved_key(name)
        saved = files[file][key]
        assert saved.shape == value.shape and saved.numel() > 0, name
        torch.testing.assert_close(saved, value.cpu(), rtol=0, atol=0, msg=name)
        if ".lora_B." in name:
            assert saved.abs().max() > 0, f"{name} is still its zero init"
    gammas = load_file(adapter / "san_state.safetensors")
    for name, value in r["gamma"].items():
        key = name.removeprefix("base_model.model.")
        torch.testing.assert_close(gammas[key], value.cpu(), rtol=0, atol=0)
    assert any(float((g - 1).abs().max()) > 0 for g in gammas.values())  # γ̄ moved in training
    manifest = json.loads((adapter / "llava_san_adapter.json").read_text())
    assert all(len(shape) == 2 and min(shape) > 0 for shape in manifest["adapted_shapes"].values())


@pytest.mark.parametrize("peft", PEFTS)
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_adapter_reloads_to_the_trained_logits(stage, peft, tmp_path_factory, _dist_env):
    from llava_san.peft import load_adapter

    r = _train(stage, peft, tmp_path_factory)
    base, _ = instantiate(r["cfg"].model.build)()  # fresh, same seed (the strategy built it the same way)
    model = load_adapter(base, r["out"] / "adapter")
    torch.testing.assert_close(_logits(model, r["batch"]), r["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("peft", PEFTS)
def test_zero2_and_zero3_train_the_same_adapter(peft, tmp_path_factory, _dist_env):
    z2, z3 = _train(2, peft, tmp_path_factory), _train(3, peft, tmp_path_factory)
    assert z2["trained"].keys() == z3["trained"].keys()
    for name in z2["trained"]:
        # not bit-equal: the two reduce gradients through other flat buffers, and Adam's normalised step
        # turns float noise in a near-zero gradient into up to ~1e-6 here (lr 2e-3, 3 steps)
        torch.testing.assert_close(z3["trained"][name], z2["trained"][name], rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(z3["logits"], z2["logits"], rtol=1e-5, atol=1e-5)


def test_zero3_with_activation_checkpointing_trains_the_same_adapter(tmp_path_factory, _dist_env):
    """Recomputed forwards run outside DeepSpeed's engine forward; the SAN-DoRA layer's reads of W, m and
    the LoRA weights (parameters of other modules) are then fetched by its own ZeRO-3 hooks."""
    plain = _train(3, "san_dora", tmp_path_factory)
    ckpt = _train(3, "san_dora", tmp_path_factory, "model.gradient_checkpointing=true")
    for name, value in plain["trained"].items():
        torch.testing.assert_close(ckpt["trained"][name], value, rtol=0, atol=0, msg=name)


# ----------------------------------------------------------------------------------------------
# two processes: ZeRO-3 data parallel, γ̄ averaged across ranks before saving
# ----------------------------------------------------------------------------------------------
def test_two_ranks_zero3_average_gamma_and_save_gathered_adapter(tmp_path):
    """``python -m train trainer.devices=2``: Lightning relaunches the command for rank 1; each rank
    draws other synthetic data (seed = its LOCAL_RANK)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(Path(__file__).parent)]),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "PL_GLOBAL_SEED"):
        env.pop(key, None)
    args = [sys.executable, "-m", "train", f"hydra.run.dir={tmp_path}", *BASE, "trainer.devices=2",
            "trainer.max_steps=2", "strategy=deepspeed_zero3_cpu", "peft=san_dora",
            "data.seed='${oc.decode:${oc.env:LOCAL_RANK,0}}'",
            "+callbacks.dump._target_=deepspeed_helpers.DumpTrainedState", f"+callbacks.dump.path={tmp_path}"]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    g0, g1 = (torch.load(tmp_path / f"gamma_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert max(float((g0[k] - g1[k]).abs().max()) for k in g0) > 1e-6  # the ranks saw other data
    saved = load_file(tmp_path / "adapter" / "san_state.safetensors")
    for name in g0:
        mean = (g0[name] + g1[name]) / 2
        torch.testing.assert_close(saved[f"{name}.san_gamma_ema"], mean, rtol=0, atol=1e-7)

    dump = torch.load(tmp_path / "trained.pt", weights_only=True)
    assert all(dump["partitioned"].values())  # each rank held only its partition
    files = {name: load_file(tmp_path / "adapter" / name)
             for name in ("adapter_model.safetensors",)}
    for name, value in dump["trained"].items():
        file, key = _saved_key(name)
        torch.testing.assert_close(files[file][key], value, rtol=0, atol=0, msg=name)
        if ".lora_B." in name:
            assert value.abs().max() > 0



def test_zero3_export_folds_the_saved_adapter_into_a_rebuilt_base(tmp_path_factory, _dist_env):
    """``export=true`` under ZeRO-3: the in-memory model is partitioned (each rank holds slices), so rank 0
    rebuilds the base and merges the saved adapter; the merged checkpoint gives the trained eval logits, and
    so does ``python -m llava_san.export`` on the finished run folder."""
    from transformers import LlavaForConditionalGeneration

    from llava_san.export import main as export_main

    r = _train(3, "san_dora", tmp_path_factory, "export=true")
    merged = LlavaForConditionalGeneration.from_pretrained(r["out"] / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, r["batch"]), r["logits"], rtol=1e-4, atol=1e-4)
    # merged after the fact from the run folder (python -m llava_san.export): the same model
    after = tmp_path_factory.mktemp("zero3_export") / "merged"
    assert export_main([str(r["out"]), str(after)]) == 0
    again = LlavaForConditionalGeneration.from_pretrained(after)
    torch.testing.assert_close(_logits(again, r["batch"]), _logits(merged, r["batch"]), rtol=0, atol=1e-5)


def test_zero3_offload_steps_with_deepspeed_cpu_adam_like_torch_adamw(tmp_path_factory, _dist_env):
    """``strategy=deepspeed_zero3_offload``: optimizer states on the host, stepped by DeepSpeedCPUAdam (LLaVA's
    zero3_offload optimizer); it trains the adapter that torch's AdamW trains under plain ZeRO-3."""
    import train.run as run_module

    out = tmp_path_factory.mktemp("zero3_offload")
    cfg = _cfg(out, "strategy=deepspeed_zero3_offload", "peft=san_dora", "trainer.max_steps=3",
               "+callbacks.record._target_=deepspeed_helpers.RecordOptimizer", f"+callbacks.record.path={out}")
    run_module.run(cfg)
    assert (out / "optimizer.txt").read_text() == "DeepSpeedCPUAdam"
    plain = _train(3, "san_dora", tmp_path_factory)
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    for name, value in plain["trained"].items():
        file, key = _saved_key(name)
        if file == "adapter_model.safetensors":
            torch.testing.assert_close(saved[key], value.cpu(), rtol=1e-4, atol=1e-5, msg=name)
