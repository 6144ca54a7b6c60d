"""causal_lm_loss (logits on the trained positions only) equals transformers' full-logits loss."""
import pytest
import torch
from peft import LoraConfig

from llava_san.peft import LoraRecipe, SanConfig, get_san_model
from llava_san.training.loss import causal_lm_loss

TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def _batch(processor, b=3, t=30, n_img=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (b, t), generator=g)
    ids[:, 1:1 + n_img] = processor.image_token_id
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]
    mask = torch.ones_like(ids)
    mask[0, -3:], labels[0, -3:] = 0, -100  # a right-padded row: its trained tokens end earlier
    ids[0, -3:] = processor.tokenizer.pad_token_id
    labels[1, -2] = -100  # an untrained token inside the answer span
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "pixel_values": torch.randn(b, 3, 64, 64, generator=g)}


@pytest.mark.parametrize("peft", ["none", "dora", "san_dora"])
def test_equals_transformers_loss_and_gradients(tiny_llava, peft):
    model, processor = tiny_llava(seed=1)
    if peft != "none":
        model = get_san_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True,
                                                init_lora_weights=False),
                              SanConfig() if peft == "san_dora" else None)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    batch = _batch(processor)

    ref = model(**batch).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    ours = causal_lm_loss(model, batch)
    ours.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_only_trained_positions_reach_the_head(tiny_llava):
    model, processor = tiny_llava()
    batch = _batch(processor)
    rows = []
    handle = model.lm_head.register_forward_hook(lambda m, i, o: rows.append(i[0].shape))
    causal_lm_loss(model, batch)
    handle.remove()
    n_trained = int((batch["labels"][:, 1:] != -100).sum())
    assert rows == [torch.Size([n_trained, model.config.text_config.hidden_size])]


def test_training_step_skips_a_batch_of_only_bad_samples():
    """The collator returns (0, 0) tensors when every sample of a batch was skipped: no step, no NaN."""
    from peft import LoraConfig

    from llava_san.models import build_tiny
    from llava_san.module import LlavaSanModule

    module = LlavaSanModule(lambda: build_tiny(seed=0),
                            adapter=LoraRecipe(LoraConfig(r=2, target_modules=TARGETS)))
    module.configure_model()
    empty = torch.zeros(0, 0, dtype=torch.long)
    assert module.training_step({"input_ids": empty, "attention_mask": empty, "labels": empty}, 0) is None
