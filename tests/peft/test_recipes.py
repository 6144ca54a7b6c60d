"""Adapter recipes (``llava_san.peft.recipes``): each conf/peft YAML gives its recipe, and every recipe's
apply → save → load round trip is bit-exact, through the registry of folder kinds."""
import copy
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from peft import LoraConfig
from PIL import Image

from llava_san.models import TinyLlavaSpec, build_tiny_llava
from llava_san.peft import (
    AdapterRecipe,
    FullFinetune,
    LoraRecipe,
    NoAdapter,
    SanConfig,
    apply_adapter_folder,
    load_adapter,
    san_layers,
    set_projector_trainable,
)
from llava_san.peft.recipes import recipe_for_folder, registered_kinds

ROOT = Path(__file__).resolve().parents[2]
SPEC = TinyLlavaSpec(text_layers=2)


@pytest.fixture(scope="module")
def base_and_inputs():
    base, proc = build_tiny_llava(SPEC, seed=0)
    enc = proc(images=[Image.new("RGB", (64, 64), (200, 10, 10))],
               text=["USER: <image>\nwhat color is the shape? ASSISTANT: red</s>"], return_tensors="pt")
    return base, dict(enc)


def lora(dora):
    return LoraConfig(r=4, lora_alpha=8, use_dora=dora)


RECIPES = {
    "none": lambda: NoAdapter(),
    "full": lambda: FullFinetune(),
    "lora": lambda: LoraRecipe(lora(False)),
    "dora": lambda: LoraRecipe(lora(True)),
    "san_lora": lambda: LoraRecipe(lora(False), SanConfig(propagation="layerwise")),
    "san_dora": lambda: LoraRecipe(lora(True), SanConfig(dora_norm="scaled")),
}


def trained(recipe: AdapterRecipe, base):
    """``recipe`` applied to a copy of ``base`` with the projector trainable, every trained tensor and γ̄
    moved to seeded random values (as training would)."""
    model = recipe.apply(copy.deepcopy(base))
    set_projector_trainable(model, True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for layer in san_layers(model):
            layer.san_gamma_ema.copy_(1 + 0.1 * torch.randn(layer.san_gamma_ema.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_apply_save_load_round_trip_is_bit_exact(base_and_inputs, tmp_path, name):
    base, inputs = base_and_inputs
    recipe = RECIPES[name]()
    model = trained(recipe, base)
    with torch.no_grad():
        want = model(**inputs).logits
    recipe.save(model, tmp_path / "a")

    kind = json.loads((tmp_path / "a" / "llava_san_adapter.json").read_text())["kind"]
    assert kind in recipe.kinds
    cls = recipe_for_folder(tmp_path / "a")
    assert cls is type(recipe)
    loaded = cls.load(copy.deepcopy(base), tmp_path / "a").eval()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, want)
    trained_now = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for n, p in loaded.named_parameters():
        if n in trained_now:
            assert torch.equal(p, trained_now[n]), n

    # the merged model (what export and evaluation build) computes the same logits
    merged = apply_adapter_folder(copy.deepcopy(base), tmp_path / "a", merge=True).eval()
    assert type(merged).__name__ == "LlavaForConditionalGeneration"
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, want, rtol=1e-4, atol=1e-5)


def test_describe_is_the_checkpoint_fingerprint_of_before():
    """Checkpoints written before recipes existed resume: the identity each recipe gives is unchanged."""
    assert NoAdapter().describe() == {"adapter": None, "san": None}
    assert FullFinetune().describe() == {"adapter": None, "san": None, "full_finetune": True}
    assert LoraRecipe(lora(True), SanConfig(propagation="random")).describe() == {
        "adapter": {"r": 4, "use_dora": True}, "san": "random"}
    assert LoraRecipe(lora(False)).describe() == {"adapter": {"r": 4, "use_dora": False}, "san": None}


def test_registry_maps_every_kind_to_one_recipe(tmp_path):
    kinds = registered_kinds()
    assert kinds["adapter"] is LoraRecipe
    assert kinds["projector_only"] is NoAdapter and kinds["trained_weights"] is FullFinetune
    with pytest.raises(ValueError, match="belongs to"):
        type("Clash", (AdapterRecipe,), {"kinds": ("adapter",)})


def test_folders_of_before_load_unchanged(base_and_inputs, tmp_path):
    """A manifest without ``kind`` is a LoRA/DoRA adapter; a san_config.json without the fields added
    since (weight_side_scaling) loads with their defaults."""
    base, inputs = base_and_inputs
    model = trained(RECIPES["san_lora"](), base)
    with torch.no_grad():
        want = model(**inputs).logits
    model_dir = tmp_path / "a"
    RECIPES["san_lora"]().save(model, model_dir)
    manifest = json.loads((model_dir / "llava_san_adapter.json").read_text())
    del manifest["kind"]
    (model_dir / "llava_san_adapter.json").write_text(json.dumps(manifest))
    san = json.loads((model_dir / "san_config.json").read_text())
    del san["weight_side_scaling"]
    (model_dir / "san_config.json").write_text(json.dumps(san))
    assert recipe_for_folder(model_dir) is LoraRecipe
    loaded = load_adapter(copy.deepcopy(base), model_dir)  # evaluation's entry point, unchanged
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, want)


def test_unknown_kind_is_refused(base_and_inputs, tmp_path):
    base, _ = base_and_inputs
    NoAdapter().save(trained(NoAdapter(), base), tmp_path / "a")
    path = tmp_path / "a" / "llava_san_adapter.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "kind": "not_a_kind"}))
    with pytest.raises(ValueError, match="unknown kind 'not_a_kind'"):
        apply_adapter_folder(copy.deepcopy(base), tmp_path / "a")


@pytest.mark.parametrize("option,expected", [("none", NoAdapter), ("full", FullFinetune), ("lora", LoraRecipe),
                                             ("dora", LoraRecipe), ("san_lora", LoraRecipe),
                                             ("san_dora", LoraRecipe)])
def test_each_peft_yaml_instantiates_its_recipe(option, expected):
    vision = {"linear_probe", "ssf", "san_ssf", "moppa", "vit_lora"}  # tests/vision/test_train_vision.py
    assert sorted(p.stem for p in (ROOT / "conf" / "peft").glob("*.yaml")) == sorted(set(RECIPES) | vision)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["paths.output_dir=/tmp/unused", f"peft={option}",
                                                      "data=synthetic"])
    recipe = instantiate(cfg.peft)
    assert type(recipe) is expected
    if expected is LoraRecipe:
        assert recipe.lora_config.use_dora == option.endswith("dora")
        assert (recipe.san is not None) == option.startswith("san_")
