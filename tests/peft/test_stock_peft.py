"""A training run's adapter/ folder read by stock peft: a LoRA folder is a stock peft adapter that loads
as the project's loader loads it; a SAN folder makes stock peft refuse it with what to do instead; folders
of the previous layout (manifest version 2) still load."""
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]


def _train(out, peft):
    """A real tiny `python -m train` run (train.run.run on the Hydra-composed config), 2 steps at a learning
    rate where the adapter and the projector move."""
    from hydra import compose, initialize_config_dir

    from train.run import run

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"paths.output_dir={out}", "data=synthetic", "trainer.accelerator=cpu", "evaluate=null",
            "callbacks.progress_bar.refresh_rate=0", f"peft={peft}", "trainer.max_steps=2", "optim.lr=0.01",
            "optim.projector_lr=0.01", "optim.warmup_ratio=0.0"])
    run(cfg)
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("lora") / "run", "lora")


@pytest.fixture(scope="module")
def san_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("san_lora") / "run", "san_lora")


def _fresh_base(run):
    """The run's base model, rebuilt from its config.yaml, and its processor."""
    from omegaconf import OmegaConf

    from llava_san.models import build_from_config

    return build_from_config(OmegaConf.load(run / "config.yaml").model)


def _inputs(processor):
    imgs = [Image.new("RGB", (64, 64), c) for c in ((200, 10, 10), (10, 40, 220))]
    return dict(processor(images=imgs, text=["USER: <image>\nwhat colour is the shape? ASSISTANT:",
                                             "USER: <image>\nis there a circle? ASSISTANT:"],
                          return_tensors="pt", padding=True))


def _logits(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def _answers(model, processor):
    from llava_san.generation import GenerationInput, PromptEncoder, generate

    enc = PromptEncoder(processor, "vicuna_v1", "llava", "pad")
    prompts = [GenerationInput(enc.encode_text("<image>\n" + q), enc.pixel_values(Image.new("RGB", (64, 64), c)), 6)
               for q, c in (("what colour is the shape?", (200, 10, 10)), ("is there a circle?", (10, 40, 220)))]
    return generate(model.eval(), processor, prompts, batch_size=2)


def test_lora_folder_is_a_stock_peft_adapter(lora_run):
    from peft import PeftModel

    from llava_san.peft import load_adapter

    adapter = lora_run / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["modules_to_save"] == ["model.multi_modal_projector"]
    assert not (adapter / "extra_trainable.safetensors").exists()
    # the tiny base is built from a config, not loaded from a folder or the hub: nothing to name (peft's
    # convention); the manifest says how it was built
    assert config["base_model_name_or_path"] is None
    manifest = json.loads((adapter / "llava_san_adapter.json").read_text())
    assert manifest["base_model"]["_target_"] == "llava_san.models.build_tiny" and manifest["stock_peft"]

    base, processor = _fresh_base(lora_run)
    inputs = _inputs(processor)
    untouched = _logits(copy.deepcopy(base), inputs)
    stock = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter))
    ours = load_adapter(copy.deepcopy(base), adapter)
    want = _logits(ours, inputs)
    assert not torch.allclose(want, untouched)  # the adapter changes the model: the check is not vacuous
    assert torch.equal(_logits(stock, inputs), want)
    assert _answers(stock, processor) == _answers(ours, processor)

    # what stock peft restored is exactly what the run trained: the saved projector, not the base's
    saved = load_file(adapter / "adapter_model.safetensors")
    wrapper = stock.base_model.model.model.multi_modal_projector
    for name, value in wrapper.modules_to_save["default"].state_dict().items():
        assert torch.equal(value, saved[f"base_model.model.model.multi_modal_projector.{name}"])
        assert not torch.equal(value, base.model.multi_modal_projector.state_dict()[name])


def test_lora_folder_has_a_model_card(lora_run):
    card = (lora_run / "adapter" / "README.md").read_text()
    assert "library_name: peft" in card and "PeftModel.from_pretrained" in card
    assert "build_tiny(" in card and "load_adapter" in card


def test_san_folder_makes_stock_peft_refuse_with_the_instruction(san_run):
    from peft import PeftConfig, PeftModel

    from llava_san.peft import load_adapter, san_layers

    adapter = san_run / "adapter"
    base, processor = _fresh_base(san_run)
    for load in (lambda: PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)),
                 lambda: PeftConfig.from_pretrained(str(adapter))):
        with pytest.raises(KeyError) as err:
            load()
        message = str(err.value)
        assert "llava_san.peft.load_adapter" in message and "python -m llava_san.export" in message
    # a tool that parses adapter_config.json itself (vLLM) finds no LoRA settings to misread
    stub = json.loads((adapter / "adapter_config.json").read_text())
    assert not {"r", "lora_alpha", "target_modules"} & set(stub)
    card = (adapter / "README.md").read_text()
    assert "Stock peft cannot load this folder" in card and "python -m llava_san.export" in card

    # llava-san's loader restores LoRA and γ̄ (which training moved away from 1)
    model = load_adapter(copy.deepcopy(base), adapter)
    assert any((layer.san_gamma_ema - 1).abs().max() > 0 for layer in san_layers(model))
    assert not torch.allclose(_logits(model, _inputs(processor)), _logits(copy.deepcopy(base), _inputs(processor)))


def _as_version_2(folder, out):
    """``folder`` rewritten in the layout manifest version 2 had: the LoRA config in adapter_config.json
    without modules_to_save, the trained projector in extra_trainable.safetensors (keys relative to the
    transformers model), no README.md, no ``files``/``modules_to_save``/``stock_peft`` in the manifest."""
    shutil.copytree(folder, out)
    manifest = json.loads((out / "llava_san_adapter.json").read_text())
    config_file = out / manifest["files"]["lora_config"]
    config = json.loads(config_file.read_text())
    config["modules_to_save"] = None
    (out / "lora_config.json").unlink(missing_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(out / "adapter_model.safetensors")
    prefixes = tuple(f"base_model.model.{m}." for m in manifest["modules_to_save"])
    save_file({k: v for k, v in tensors.items() if not k.startswith(prefixes)}, out / "adapter_model.safetensors")
    save_file({k.removeprefix("base_model.model."): v for k, v in tensors.items() if k.startswith(prefixes)},
              out / "extra_trainable.safetensors")
    (out / "README.md").unlink()
    for key in ("files", "modules_to_save", "stock_peft", "base_model", "base_model_name_or_path"):
        manifest.pop(key)
    manifest["lora"].pop("modules_to_save")
    manifest["version"] = 2
    (out / "llava_san_adapter.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("which", ["lora", "san"])
def test_previous_layout_still_loads(which, lora_run, san_run, tmp_path):
    from llava_san.peft import apply_adapter_folder, load_adapter

    run = lora_run if which == "lora" else san_run
    old = _as_version_2(run / "adapter", tmp_path / "adapter")
    assert sorted(load_file(old / "extra_trainable.safetensors")) == \
        json.loads((old / "llava_san_adapter.json").read_text())["extra_trainable"]
    base, processor = _fresh_base(run)
    inputs = _inputs(processor)
    want = _logits(load_adapter(copy.deepcopy(base), run / "adapter"), inputs)
    assert torch.equal(_logits(load_adapter(copy.deepcopy(base), old), inputs), want)
    # to continue training: the projector is trainable again
    trainable = load_adapter(copy.deepcopy(base), old, is_trainable=True)
    assert any(p.requires_grad for n, p in trainable.named_parameters() if "multi_modal_projector" in n)
    merged = apply_adapter_folder(copy.deepcopy(base), old)
    torch.testing.assert_close(_logits(merged, inputs), want, rtol=1e-4, atol=1e-4)


def test_a_stock_peft_adapter_folder_continues_training(lora_run):
    """``is_trainable=True`` on the new layout: the adapters and the projector train, nothing else."""
    from llava_san.peft import load_adapter

    base, _ = _fresh_base(lora_run)
    model = load_adapter(copy.deepcopy(base), lora_run / "adapter", is_trainable=True)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "multi_modal_projector" in n for n in trained)
    assert any("multi_modal_projector" in n for n in trained) and any("lora_B" in n for n in trained)
    # every adapter tensor trains again, as in the run that saved it
    assert {n for n, _ in model.named_parameters() if "lora_" in n} <= trained


def _adapted(base):
    from peft import LoraConfig

    from llava_san.peft import get_san_model

    model = get_san_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4))
    with torch.no_grad():  # a trained-looking adapter: lora_B away from its zero start
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def test_base_loaded_from_a_folder_is_named(tiny_llava, tmp_path):
    """A base loaded with from_pretrained (a llava-hf checkpoint) is recorded as peft records it, and the
    model card loads it from there."""
    from transformers import LlavaForConditionalGeneration

    from llava_san.peft import save_adapter, set_projector_trainable

    base, _ = tiny_llava()
    base.save_pretrained(tmp_path / "base")
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "base")
    model = _adapted(loaded)
    set_projector_trainable(model)
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    assert f'from_pretrained("{tmp_path / "base"}")' in (tmp_path / "a" / "README.md").read_text()


def test_trained_tensors_that_are_not_whole_modules_refuse_stock_peft(tiny_llava, tmp_path):
    """Only a bias of the projector trained: stock peft could restore it only with the whole module, so
    the folder keeps it in extra_trainable.safetensors and refuses stock peft; llava-san loads it."""
    from peft import PeftModel

    from llava_san.peft import load_adapter, save_adapter

    base, processor = tiny_llava()
    model = _adapted(base)
    bias = model.base_model.model.model.multi_modal_projector.linear_2.bias
    bias.requires_grad_(True)
    with torch.no_grad():
        bias.add_(0.5)
    save_adapter(model, tmp_path / "a")
    assert load_file(tmp_path / "a" / "extra_trainable.safetensors").keys() == {
        "model.multi_modal_projector.linear_2.bias"}
    with pytest.raises(KeyError, match="not whole modules"):
        PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    inputs = _inputs(processor)
    assert torch.equal(_logits(load_adapter(copy.deepcopy(base), tmp_path / "a"), inputs), _logits(model, inputs))
