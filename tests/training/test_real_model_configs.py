"""conf/model/{llava7b,llava13b,llava7b_hf}.yaml run through run(cfg) on tiny checkpoints in the real formats
(write_tiny_checkpoints), so the loaders of the real recipe execute: Vicuna .bin shards + CLIP + LLaVA's
stage-1 mm_projector.bin, and a llava-hf folder (save_pretrained and the hub's transformers-4 layout)."""
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from llava_san.testing import write_tiny_checkpoints

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
FAST = ["data=synthetic", "trainer.accelerator=cpu", "debug=fast_dev_run",
        "callbacks=none", "trainer.enable_progress_bar=false", "peft=san_dora"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return write_tiny_checkpoints(tmp_path_factory.mktemp("tiny_ckpts"))


def _run(out, *overrides):
    from train.run import run

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"paths.output_dir={out}", *FAST, *overrides])
    return cfg, run(cfg)


def _projector(adapter_dir):
    """The trained projector tensors of a saved adapter, keyed linear_{1,2}.{weight,bias}."""
    out = {}
    for f in Path(adapter_dir).glob("*.safetensors"):
        for k, v in load_file(f).items():
            if "multi_modal_projector" in k:
                out[k.split("multi_modal_projector.")[1]] = v.float()
    return out


def _one_adam_step_from(saved, start, lr):
    """After one Adam step every trained tensor moved by at most ~lr (bf16 rounding aside)."""
    assert saved.keys() == start.keys() and len(saved) == 4
    for k in saved:
        assert (saved[k] - start[k]).abs().max() <= 2 * lr + 1e-2 * start[k].abs().max(), k
    assert any(not torch.equal(saved[k], start[k]) for k in saved)


@pytest.mark.parametrize("model", ["llava7b", "llava13b"])
def test_llava_from_parts(model, ckpts, tmp_path):
    cfg, m = _run(tmp_path, f"model={model}", f"model.build.language_model={ckpts['vicuna']}",
                  f"model.build.vision_tower={ckpts['clip']}", f"model.build.mm_projector={ckpts['mm_projector_dir']}")
    assert cfg.model.build._target_ == "llava_san.models.build_llava_from_parts"
    assert cfg.model.processor._target_ == "llava_san.models.build_parts_processor"
    assert m["train/global_step"] == 1 and torch.isfinite(torch.tensor(m["train/loss_first"]))
    manifest = json.loads((tmp_path / "adapter" / "llava_san_adapter.json").read_text())
    adapter = json.loads((tmp_path / "adapter" / manifest["files"]["lora_config"]).read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["use_dora"]) == (128, 256, True)  # the paper recipe
    # the projector started from LLaVA's stage-1 mm_projector.bin (model.mm_projector.{0,2} -> linear_{1,2})
    stage1 = torch.load(ckpts["mm_projector"], weights_only=True)
    start = {f"linear_{1 + i // 2}.{k.rsplit('.', 1)[1]}": v.float()
             for k, v in stage1.items() for i in [int(k.split(".")[2])]}
    _one_adam_step_from(_projector(tmp_path / "adapter"), start, cfg.optim.projector_lr)


@pytest.mark.parametrize("layout", ["llava_hf", "llava_hf_hub"])
def test_llava_hf(layout, ckpts, tmp_path):
    from transformers import LlavaForConditionalGeneration

    cfg, m = _run(tmp_path, "model=llava7b_hf", f"model.build.path={ckpts[layout]}")
    assert cfg.model.processor._target_ == "llava_san.models.load_llava_hf_processor"
    assert m["train/global_step"] == 1 and torch.isfinite(torch.tensor(m["train/loss_first"]))
    ref = LlavaForConditionalGeneration.from_pretrained(ckpts["llava_hf"], dtype=torch.bfloat16)
    start = {k.split("multi_modal_projector.")[1]: v.float() for k, v in ref.state_dict().items()
             if "multi_modal_projector" in k}
    _one_adam_step_from(_projector(tmp_path / "adapter"), start, cfg.optim.projector_lr)
