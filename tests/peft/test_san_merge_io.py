"""Merging, saving and loading SAN adapters on the tiny LLaVA; the trainable set."""
import copy
import json
import os

import pytest
import torch
from peft import LoraConfig
from PIL import Image
from safetensors.torch import load_file

from llava_san.models import TinyLlavaSpec, build_tiny_llama, build_tiny_llava
from llava_san.peft import (
    SanConfig,
    adapted_module_names,
    get_san_model,
    load_adapter,
    merge_san,
    san_layers,
    save_adapter,
    set_projector_trainable,
    trainable_parameters,
)

SPEC = TinyLlavaSpec(text_layers=3)


@pytest.fixture(scope="module")
def base_and_inputs():
    base, proc = build_tiny_llava(SPEC, seed=0)
    imgs = [Image.new("RGB", (64, 64), c) for c in ((200, 10, 10), (10, 200, 30))]
    enc = proc(images=imgs, text=["USER: <image>\nwhat color is the shape? ASSISTANT: red</s>",
                                  "USER: <image>\nis there a circle? ASSISTANT: no</s>"],
               return_tensors="pt", padding=True)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return base, dict(enc), labels


def trained(base, inputs, labels, dora, san_cfg, steps=6):
    torch.manual_seed(0)
    model = get_san_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, use_dora=dora), san_cfg)
    set_projector_trainable(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for _ in range(steps):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model


CASES = [(False, SanConfig()), (True, SanConfig()), (True, SanConfig(propagation="layerwise")),
         (False, SanConfig(propagation="random", pool="mean")), (True, SanConfig(dora_norm="scaled", ema=0.5)),
         (True, None)]


@pytest.mark.parametrize("dora,san_cfg", CASES)
def test_merge_and_save_load(base_and_inputs, tmp_path, dora, san_cfg):
    base, inputs, labels = base_and_inputs
    model = trained(base, inputs, labels, dora, copy.deepcopy(san_cfg))
    if san_cfg is not None:  # training moved γ̄ away from 1, so the check below is not vacuous
        assert any((l.san_gamma_ema - 1).abs().max() > 1e-4 for l in san_layers(model))
    with torch.no_grad():
        want = model(**inputs).logits

    # save -> load into a fresh base reproduces the logits exactly
    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, want)
    assert not any(p.requires_grad for p in loaded.parameters())

    # merge -> a plain transformers LLaVA with the same eval-mode logits
    merged = merge_san(model)
    assert type(merged).__name__ == "LlavaForConditionalGeneration"
    assert not any("lora" in n or "san_" in n for n, _ in merged.named_parameters())
    assert not any("lora" in n or "san_" in n for n in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, want, rtol=1e-4, atol=1e-4)
    # the merged model saves and reloads as an ordinary checkpoint
    merged.save_pretrained(tmp_path / "merged")
    from transformers import LlavaForConditionalGeneration

    again = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, want, rtol=1e-4, atol=1e-4)


def test_adapter_folder_contents(base_and_inputs, tmp_path):
    base, inputs, labels = base_and_inputs
    model = trained(base, inputs, labels, True, SanConfig(propagation="random"), steps=2)
    out = save_adapter(model, tmp_path / "a")
    files = sorted(os.listdir(out))
    # a SAN folder: adapter_config.json refuses stock peft, the LoRA config is lora_config.json
    assert files == sorted(["adapter_config.json", "lora_config.json", "adapter_model.safetensors",
                            "san_config.json", "san_state.safetensors", "llava_san_adapter.json", "README.md"])
    peft_sd = load_file(str(out / "adapter_model.safetensors"))
    magnitudes = [k for k in peft_sd if "lora_magnitude_vector" in k]
    assert len(magnitudes) == 7 * SPEC.text_layers  # the DoRA magnitudes are saved
    san_sd = load_file(str(out / "san_state.safetensors"))
    assert all(k.endswith(".san_gamma_ema") for k in san_sd) and len(san_sd) == 7 * SPEC.text_layers
    # the projector is saved whole, as stock peft saves a modules_to_save module
    projector = {k for k in peft_sd if "multi_modal_projector" in k}
    assert projector == {"base_model.model." + n for n, _ in model.base_model.model.named_parameters()
                         if "multi_modal_projector" in n}
    assert json.loads((out / "lora_config.json").read_text())["modules_to_save"] == ["model.multi_modal_projector"]
    cfg = json.loads((out / "san_config.json").read_text())
    assert cfg["propagation"] == "random" and cfg["pairs"] == [list(p) for p in model._san_state.cfg.pairs]
    # the loaded random pairing is the saved one
    loaded = load_adapter(copy.deepcopy(base), out)
    assert loaded._san_state.cfg.pairs == model._san_state.cfg.pairs
    # magnitudes round-trip (they moved in training)
    for n, p in loaded.named_parameters():
        if "lora_magnitude_vector" in n:
            assert torch.equal(p, dict(model.named_parameters())[n])


def test_loading_onto_another_architecture_fails_clearly(base_and_inputs, tmp_path):
    base, inputs, labels = base_and_inputs
    model = trained(base, inputs, labels, False, SanConfig(), steps=1)
    save_adapter(model, tmp_path / "a")
    other, _ = build_tiny_llava(TinyLlavaSpec(text_layers=3, text_hidden=32, text_intermediate=64), seed=0)
    with pytest.raises(ValueError, match="was trained on LlavaForConditionalGeneration .* load it onto the base"):
        load_adapter(other, tmp_path / "a")
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        load_adapter(build_tiny_llama(SPEC), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(copy.deepcopy(base), tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a llava-san adapter folder"):
        load_adapter(copy.deepcopy(base), tmp_path / "empty")
    # a truncated weights file is reported by name
    f = tmp_path / "a" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="adapter_model.safetensors cannot be read"):
        load_adapter(copy.deepcopy(base), tmp_path / "a")


def test_failed_save_leaves_nothing_behind(base_and_inputs, tmp_path, monkeypatch):
    base, inputs, labels = base_and_inputs
    model = trained(base, inputs, labels, False, SanConfig(), steps=1)
    save_adapter(model, tmp_path / "a")
    before = sorted(os.listdir(tmp_path / "a"))
    import llava_san.peft.adapter_io as io

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(io, "san_config_json", boom)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "a")
    assert sorted(os.listdir(tmp_path)) == ["a"]  # no temporary folder left
    assert sorted(os.listdir(tmp_path / "a")) == before  # the previous adapter is intact


def test_only_language_tower_is_adapted_and_trainable_set(base_and_inputs):
    base, _, _ = base_and_inputs
    for dora in (False, True):
        model = get_san_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, use_dora=dora), SanConfig())
        names = adapted_module_names(model)
        expected = {f"model.language_model.layers.{i}.{p}.{t}" for i in range(SPEC.text_layers)
                    for p, ts in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                  ("mlp", ("gate_proj", "up_proj", "down_proj"))) for t in ts}
        assert set(names) == expected
        suffixes = ["lora_A.default.weight", "lora_B.default.weight"] + (
            ["lora_magnitude_vector.default.weight"] if dora else [])
        want = {f"{n}.{s}" for n in expected for s in suffixes}
        assert set(trainable_parameters(model)) == want
        set_projector_trainable(model)
        proj = {n for n, _ in base.named_parameters() if n.startswith("model.multi_modal_projector.")}
        assert set(trainable_parameters(model)) == want | proj
    # module types as a list never reach the CLIP tower
    model = get_san_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert all(".language_model." in n for n in adapted_module_names(model))
    assert len(adapted_module_names(model)) == 2 * SPEC.text_layers
    with pytest.raises(ValueError, match="outside the language tower"):
        get_san_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=r".*q_proj"))


def test_plain_llama_causal_lm(tmp_path):
    base = build_tiny_llama(SPEC)
    model = get_san_model(copy.deepcopy(base), LoraConfig(r=2, use_dora=True), SanConfig(propagation="layerwise"))
    ids = torch.randint(3, 700, (2, 7))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(load_adapter(copy.deepcopy(base), tmp_path / "a")(input_ids=ids).logits, want)
        torch.testing.assert_close(merge_san(model)(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
