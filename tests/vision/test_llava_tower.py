"""``python -m train peft=san_dora peft.vision=san_ssf``: SAN-DoRA on the language tower and SAN-SSF on
LLaVA's CLIP tower, trained together; the adapter folder reloads (unmerged = merged = export), and the
default run (no ``peft.vision``) adds nothing to the tower."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[2]
FAST = ["data=synthetic", "trainer.accelerator=cpu", "evaluate=null", "callbacks.progress_bar.refresh_rate=0",
        "trainer.max_steps=4", "data.num_samples=16", "data.batch_size=4"]


def _cfg(out, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=[f"paths.output_dir={out}", *FAST, *overrides])


def _batch(processor, n=2):
    from PIL import Image

    images = [Image.new("RGB", (40, 30), (200, 40 * i, 10)) for i in range(n)]
    texts = [f"USER: <image>\nwhat colour {i}? ASSISTANT:" for i in range(n)]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("vision", ["san_ssf", "ssf"])
def test_san_dora_with_a_tuned_vision_tower(vision, tmp_path):
    from train.run import run

    from llava_san.peft.recipes import apply_adapter_folder
    from llava_san.vision.ssf import ssf_sites

    cfg = _cfg(tmp_path, "peft=san_dora", f"peft.vision={vision}", "export=true")
    metrics = run(cfg)
    assert metrics["train/global_step"] == 4
    import json

    manifest = json.loads((tmp_path / "adapter" / "llava_san_adapter.json").read_text())
    assert manifest["vision"] == vision and manifest["san"] is True
    tower = [n for n in manifest["extra_trainable"] if "ssf_" in n]
    assert tower and all("vision_tower" in n for n in tower)
    last = instantiate(cfg.model.build)()[0].config.vision_config.num_hidden_layers - 1
    assert not any(f"layers.{last}." in n or "post_layernorm" in n for n in tower)  # never reaches the projector

    fresh = lambda: instantiate(cfg.model.build)()  # noqa: E731
    base, processor = fresh()
    unmerged = apply_adapter_folder(base, tmp_path / "adapter", merge=False)
    assert ssf_sites(unmerged.get_base_model())
    merged = apply_adapter_folder(fresh()[0], tmp_path / "adapter", merge=True)
    assert not any("ssf_" in n for n, _ in merged.named_parameters())
    assert set(merged.state_dict()) == set(fresh()[0].state_dict())  # a plain LLaVA
    from transformers import LlavaForConditionalGeneration

    exported = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    batch = _batch(processor)
    with torch.no_grad():
        ref = unmerged.eval()(**batch).logits
        torch.testing.assert_close(merged.eval()(**batch).logits, ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(exported(**batch).logits, ref, atol=1e-4, rtol=1e-4)
    # training moved the tower's vectors: the merged tower's weights differ from the frozen ones
    name = next(k for k in merged.state_dict() if "vision_tower" in k and k.endswith("fc1.weight"))
    assert not torch.equal(merged.state_dict()[name], fresh()[0].state_dict()[name])


def test_default_recipe_leaves_the_tower_alone():
    cfg = _cfg("/tmp/unused")
    recipe = instantiate(cfg.peft)
    assert recipe.vision is None and "vision" not in recipe.describe()
    model = recipe.apply(instantiate(cfg.model.build)()[0])
    assert not any("ssf_" in n for n, _ in model.named_parameters())
    assert not any(p.requires_grad for n, p in model.named_parameters() if "vision_tower" in n)


def test_unknown_vision_method_is_refused():
    with pytest.raises(Exception, match="peft.vision"):
        instantiate(_cfg("/tmp/unused", "peft=san_dora", "peft.vision=moppa").peft)
