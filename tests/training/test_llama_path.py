"""The LLaMA path: conf/model/llama*.yaml on tiny on-disk checkpoints, the adapted layers of the paper's
recipe, a short csr_tiny run (commonsense accuracy + majority baseline), exact resume after SIGKILL, export."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
LLAMAS = ["llama7b", "llama13b", "llama2_7b", "llama3_8b"]
QUICK = ["trainer.accelerator=cpu", "callbacks.progress_bar.refresh_rate=0", "data.n_train=160", "data.n_test=24",
         "data.val_set_size=16", "data.batch_size=8", "data.num_workers=0", "evaluate_commonsense.batch_size=24"]


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=["paths.output_dir=/tmp/unused", *overrides])


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny random LlamaForCausalLM + tokenizer written with save_pretrained (the hub checkpoints' layout)."""
    from llava_san.models import build_tiny_causal_lm

    folder = tmp_path_factory.mktemp("tiny-llama")
    model, tok = build_tiny_causal_lm(seed=1)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", LLAMAS)
def test_build_from_config_each_llama(name, llama_folder):
    from transformers import LlamaForCausalLM

    from llava_san.models import build_from_config

    cfg = _compose(f"model={name}", "data=commonsense170k", f"model.build.path={llama_folder}")
    assert cfg.model.train_projector is False
    model, tok = build_from_config(cfg.model, dtype="float32")
    assert type(model) is LlamaForCausalLM and model.dtype == torch.float32
    assert tok.pad_token_id is not None and tok.model_max_length == 256 and tok.padding_side == "right"
    data_tok = instantiate(cfg.model.processor)  # the datamodule's tokenizer: same vocabulary and ids
    assert len(data_tok) == len(tok) and data_tok.pad_token_id == tok.pad_token_id
    with pytest.raises(ValueError, match="model_type"):  # a LLaVA folder is refused with its model_type
        from llava_san.models.llama import load_llama

        bad = llama_folder.parent / "not-llama"
        bad.mkdir(exist_ok=True)
        (bad / "config.json").write_text(json.dumps({"model_type": "llava"}))
        load_llama(str(bad))


def _adapted(model):
    from llava_san.peft.adapters import base_transformers_model

    names = set()
    for n, m in base_transformers_model(model).named_modules():
        if hasattr(m, "lora_A") and len(m.lora_A):
            names.add(n)
    return names


@pytest.mark.parametrize("experiment,types", [
    ("llama7b_san_dora", ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]),
    ("llama3_8b_lora", ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]),
    ("llama7b_san_dora_qud", ["q_proj", "up_proj", "down_proj"]),
])
def test_adapted_layers(experiment, types, llama_folder):
    """The paper's targets (q,k,v,up,down; Table 6: q,up,down) in every decoder layer, nothing else;
    SAN on the same module types; the adapter recipe of conf/peft works unchanged on a causal LM."""
    from llava_san.models import build_from_config
    from llava_san.peft import san_layers

    cfg = _compose(f"experiment={experiment}", f"model.build.path={llama_folder}")
    model, _ = build_from_config(cfg.model, dtype="float32")
    layers = model.config.num_hidden_layers
    recipe = instantiate(cfg.peft)
    wrapped = recipe.apply(model)
    where = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "up_proj": "mlp", "down_proj": "mlp"}
    assert _adapted(wrapped) == {f"model.layers.{i}.{where[t]}.{t}" for i in range(layers) for t in types}
    lora = recipe.lora_config
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (32, 64, 0.05)
    assert lora.use_dora == ("dora" in experiment)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)  # the base (embeddings, lm_head) frozen
    if recipe.san is not None:  # SAN takes part on the adapted layers of its module types: the same layers
        assert len(san_layers(wrapped)) == layers * len(types)


def test_llama_experiments_values():
    expect = {"llama7b": (2e-4, 2e-4, 64), "llama13b": (2e-4, 2e-4, 32), "llama2_7b": (2e-4, 2e-4, 64),
              "llama3_8b": (1e-4, 2e-4, 64)}
    for name, (lr_lora, lr_dora, batch) in expect.items():
        for method in ("lora", "dora", "san_lora", "san_dora"):
            cfg = _compose(f"experiment={name}_{method}")
            assert cfg.optim.lr == (lr_dora if method.endswith("dora") else lr_lora)
            assert cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.accumulate_grad_batches == batch
            assert cfg.trainer.max_epochs == 3 and cfg.data.cutoff_len == 256 and cfg.data.train_on_inputs
            assert (cfg.peft.san is not None) == method.startswith("san_")
            if cfg.peft.san is not None:
                assert cfg.peft.san.propagation == "blockwise"
    assert _compose("experiment=llama7b_san_dora_layerwise").peft.san.propagation == "layerwise"
    assert _compose("experiment=llama7b_san_dora_lr3e-4").optim.lr == 3e-4


def _subprocess_run(out, cache, *overrides):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "train", "experiment=csr_tiny", f"hydra.run.dir={out}", f"paths.cache_dir={cache}",
            *QUICK, *overrides]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_csr_tiny_resume_after_sigkill_matches_uninterrupted(tmp_path):
    """`python -m train experiment=csr_tiny`: metrics.json holds the commonsense accuracy and its majority
    baseline; a run SIGKILLed after step 5 and resumed with ckpt_path=last ends with the same adapter
    (20 batches an epoch, 8 steps: mid-epoch)."""
    resume = ["trainer.max_steps=8", "callbacks.model_checkpoint.every_n_train_steps=1"]
    ref = _subprocess_run(tmp_path / "ref", tmp_path / "cache", *resume)
    assert ref.returncode == 0, ref.stderr[-3000:]
    m = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    assert m["train/global_step"] == 8 and m["test/commonsense_n"] == 24
    assert 0 <= m["test/commonsense_accuracy"] <= 1 and 0 < m["test/commonsense_majority_baseline"] <= 1
    assert "val/loss" in m and "commonsense test accuracy" in ref.stdout
    killed = _subprocess_run(tmp_path / "run", tmp_path / "cache", *resume,
                             "+callbacks.kill._target_=llava_san.testing.callbacks.KillAtStep", "+callbacks.kill.step=5")
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = _subprocess_run(tmp_path / "run", tmp_path / "cache", *resume, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in ("adapter_model.safetensors", "san_state.safetensors"):
        a, b = load_file(tmp_path / "ref" / "adapter" / name), load_file(tmp_path / "run" / "adapter" / name)
        assert a.keys() == b.keys() and a
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{name}:{k}")


def test_export_loads_as_causal_lm_with_equal_logits(tmp_path):
    """export=true writes merged/: a plain LlamaForCausalLM + tokenizer that AutoModelForCausalLM loads,
    with the logits of the trained adapter on its base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llava_san.models import build_from_config
    from llava_san.peft import apply_adapter_folder
    from train.run import run

    out = tmp_path / "run"
    cfg = _compose("experiment=csr_tiny", f"paths.output_dir={out}", f"paths.cache_dir={tmp_path / 'cache'}", *QUICK,
                   "trainer.max_steps=3", "optim.lr=0.02", "optim.warmup_ratio=0", "export=true",
                   "evaluate_commonsense=null")
    run(cfg)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert type(merged).__name__ == "LlamaForCausalLM"
    tok = AutoTokenizer.from_pretrained(out / "merged")
    base, base_tok = build_from_config(cfg.model)
    assert len(tok) == len(base_tok) and tok.pad_token_id == base_tok.pad_token_id
    tuned = apply_adapter_folder(base, out / "adapter", merge=False).eval()  # unmerged LoRA/DoRA + SAN
    ids = torch.tensor([tok("Please answer the following question with true or false")["input_ids"]])
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, tuned(input_ids=ids).logits
        plain = build_from_config(cfg.model)[0](input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert (a - plain).abs().max() > 1e-3  # the adapter changed the model

    # merging the finished run after the fact (python -m llava_san.export) gives the same weights
    from llava_san.export import main as export_main

    assert export_main([str(out), str(tmp_path / "exported")]) == 0
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, a, rtol=0, atol=0)


def test_paper_recipe_runs_on_a_llama_folder(tmp_path, llama_folder):
    """experiment=llama7b_san_dora (the real recipe: commonsense_170k pipeline, r=32, q,k,v,up,down, SAN) through
    run() on a tiny checkpoint folder in the hub layout, on the CPU: trains, holds out val_set_size, saves
    the adapter with SAN state."""
    from llava_san.data.commonsense_synthetic import generate_records
    from train.run import run

    data = tmp_path / "commonsense_170k.json"
    data.write_text(json.dumps([{k: r[k] for k in ("instruction", "input", "output", "answer")}
                                for r in generate_records(64, seed=3)]))
    cfg = _compose("experiment=llama7b_san_dora", f"paths.output_dir={tmp_path / 'run'}",
                   f"model.build.path={llama_folder}", "model.build.dtype=float32", f"data.train_file={data}",
                   "data.val_set_size=8", "data.num_workers=0", "data.pin_memory=false", "data.batch_size=4",
                   "trainer=cpu", "trainer.max_epochs=null", "trainer.max_steps=3", "trainer.precision=32-true",
                   "trainer.accumulate_grad_batches=1", "callbacks.progress_bar.refresh_rate=0")
    m = run(cfg)
    assert m["train/global_step"] == 3 and "val/loss" in m and "test/commonsense_accuracy" not in m
    folder = tmp_path / "run" / "adapter"
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "san_state.safetensors").is_file()
    lora = json.loads((folder / "lora_config.json").read_text())
    assert lora["r"] == 32 and lora["lora_alpha"] == 64  # the regex of q,k,v,up,down over the decoder layers
    assert lora["target_modules"].startswith(r"model\.layers\.") and "o_proj" not in lora["target_modules"]


def test_csr_tiny_sweeps_over_peft(tmp_path):
    """python -m train -m experiment=csr_tiny peft=lora,san_dora: one run folder and metrics.json per job."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    sweep = tmp_path / "sweep"
    args = [sys.executable, "-m", "train", "-m", "experiment=csr_tiny", "peft=lora,san_dora", f"hydra.sweep.dir={sweep}",
            f"paths.cache_dir={tmp_path / 'cache'}", *QUICK[2:], "trainer.accelerator=cpu", "trainer.max_steps=2",
            "callbacks=none", "trainer.enable_progress_bar=false",
            "evaluate_commonsense.limit=8"]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, san in (("0", False), ("1", True)):
        m = json.loads((sweep / job / "metrics.json").read_text())
        assert m["train/global_step"] == 2 and m["test/commonsense_n"] == 8
        assert (sweep / job / "adapter" / "san_state.safetensors").is_file() == san
