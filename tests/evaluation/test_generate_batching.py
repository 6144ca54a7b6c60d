"""llava_san.generation: batch = N gives exactly the answers of batch = 1 (left padding, masks, positions),
greedy equals transformers' generate, stop tokens and per-row limits, training's encoding."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llava_san.generation import GenerationInput, PromptEncoder, decode, generate, generate_batch

QUESTIONS = [
    "What color is the shape?",
    "Is there a red circle in the image? Look carefully at every corner before answering.",
    "shape?",
    "Does the image contain a blue triangle?",
    "What is the color of the rectangle in the middle of this rather long and wordy question text?",
    "Is there a green shape?",
]
SIZES = [(64, 48), (30, 70), (64, 64), (100, 20), (33, 33), (50, 64)]


def _trained_ish(model, seed=0):
    """A SAN-LoRA model with random non-zero LoRA B and random γ̄, as after training (eval mode)."""
    from peft import LoraConfig

    from llava_san.peft import SanConfig, get_san_model

    m = get_san_model(model, LoraConfig(r=8, lora_alpha=16), SanConfig())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for mod in m.modules():
            if hasattr(mod, "san_gamma_ema"):
                mod.san_gamma_ema.copy_(0.5 + torch.rand(mod.san_gamma_ema.shape, generator=g))
    return m.eval()


@pytest.fixture(scope="module")
def setup():
    from llava_san.models import build_tiny

    model, processor = build_tiny(seed=0, dtype="float32")
    model = _trained_ish(model)
    enc = PromptEncoder(processor)
    rng = np.random.default_rng(0)
    inputs = []
    for i, (q, size) in enumerate(zip(QUESTIONS, SIZES)):
        img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
        inputs.append(enc(f"<image>\n{q}", img, 12 + 2 * i))
    inputs.insert(3, enc("What is two plus two? Answer briefly.", None, 16))  # a text-only row
    return model, processor, inputs


def _run(model, processor, inputs, bs):
    tok = processor.tokenizer
    out = []
    for i in range(0, len(inputs), bs):
        out += generate_batch(model, inputs[i:i + bs], pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id)
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_batch_n_equals_batch_1(setup, attn):
    model, processor, inputs = setup
    model.base_model.model.set_attn_implementation(attn)
    try:
        lengths = {len(x.input_ids) for x in inputs}
        assert len(lengths) >= 5  # prompts of different lengths: real left padding
        one = _run(model, processor, inputs, 1)
        assert all(len(x) == gi.max_new_tokens for x, gi in zip(one, inputs))  # non-trivial: to their limits
        assert len({tuple(x) for x in one}) == len(one)  # and all different
        for bs in (2, 3, len(inputs)):
            assert _run(model, processor, inputs, bs) == one, f"batch {bs} differs from batch 1 ({attn})"
    finally:
        model.base_model.model.set_attn_implementation("sdpa")


def test_padded_logits_match_unpadded(setup):
    """Why answers are identical: a padded row's last logits equal the unpadded ones to float noise."""
    model, processor, inputs = setup
    short, long_ = inputs[2], inputs[1]
    assert len(short.input_ids) < len(long_.input_ids)
    pad = processor.tokenizer.pad_token_id
    t = len(long_.input_ids)
    n = len(short.input_ids)
    ids = torch.full((2, t), pad)
    mask = torch.zeros(2, t, dtype=torch.long)
    ids[0], mask[0] = torch.tensor(long_.input_ids), 1
    ids[1, t - n:], mask[1, t - n:] = torch.tensor(short.input_ids), 1
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                        pixel_values=torch.stack([long_.pixel_values, short.pixel_values])).logits[1, -1]
        alone = model(input_ids=torch.tensor([short.input_ids]),
                      pixel_values=short.pixel_values[None]).logits[0, -1]
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_greedy_equals_transformers_generate(setup):
    """LLaVA's loader calls model.generate(do_sample=False, num_beams=1) one question at a time."""
    model, processor, inputs = setup
    tok = processor.tokenizer
    for gi in (inputs[0], inputs[3], inputs[5]):
        kw = {"pixel_values": gi.pixel_values[None]} if gi.pixel_values is not None else {}
        ids = torch.tensor([list(gi.input_ids)])
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=gi.max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                             **kw)[0, ids.shape[1]:].tolist()
        ref = ref[: ref.index(tok.eos_token_id)] if tok.eos_token_id in ref else ref
        got = generate_batch(model, [gi], pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        assert got[0] == ref


def test_stop_token_and_row_limits(setup):
    model, processor, inputs = setup
    tok = processor.tokenizer
    free = _run(model, processor, inputs, len(inputs))
    stop = free[0][4]  # pretend the 5th token of row 0 is </s>
    got = generate_batch(model, inputs, pad_token_id=tok.pad_token_id, eos_token_id=[tok.eos_token_id, stop])
    for row, ref in zip(got, free):  # every row stops before its own first `stop`, the others unaffected
        assert row == (ref[: ref.index(stop)] if stop in ref else ref)
    assert len(got[0]) == free[0].index(stop) <= 4
    short = [GenerationInput(x.input_ids, x.pixel_values, 2 if i % 2 else x.max_new_tokens)
             for i, x in enumerate(inputs)]
    got = generate_batch(model, short, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    assert got == [ref[:2] if i % 2 else ref for i, ref in enumerate(free)]


def test_decode_and_generate_texts(setup):
    model, processor, inputs = setup
    tok = processor.tokenizer
    ids = tok("  yes </s>", add_special_tokens=True)["input_ids"]
    assert decode(tok, ids) == "yes"  # skip_special_tokens + strip, as LLaVA
    model.train()
    with pytest.raises(ValueError, match="eval"):
        generate_batch(model, inputs[:1], pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    texts = generate(model, processor, inputs, batch_size=3)  # puts the model in eval, restores train
    assert model.training
    model.eval()
    assert texts == [decode(tok, x) for x in _run(model, processor, inputs, 1)]


def test_prompt_encoder_is_the_training_encoding(setup):
    from llava_san.conversation import get_template
    from llava_san.data import image_token_count, process_image, tokenize_prompt

    _, processor, _ = setup
    enc = PromptEncoder(processor)
    img = Image.new("RGB", (40, 64), (10, 200, 30))
    gi = enc("<image>\nWhat color?", img, 7)
    prompt = get_template("vicuna_v1").render_prompt("<image>\nWhat color?")
    assert prompt.endswith("USER: <image>\nWhat color? ASSISTANT:")
    assert list(gi.input_ids) == tokenize_prompt(prompt, processor.tokenizer, processor.image_token_id,
                                                 image_token_count(processor))
    assert list(gi.input_ids).count(processor.image_token_id) == image_token_count(processor)
    ref = process_image(img, processor.image_processor, "pad")
    torch.testing.assert_close(gi.pixel_values, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="placeholder"):
        enc("What color?", img)
    with pytest.raises(ValueError, match="placeholder"):
        enc("<image>\nWhat color?", None)


def test_training_evaluator_uses_the_generator(setup, monkeypatch):
    """The easy-vqa check at the end of training asks the prompts `python -m evaluation` asks, through
    the shared answer loop (recorded by patching llava_san.generation.generate_batch, which
    answer_questions calls)."""
    from evaluation.resolve import resolve_benchmark
    from llava_san import generation
    from llava_san.data.images import load_image
    from llava_san.training.easyvqa_eval import EasyVqaEvaluator

    model, processor, _ = setup
    cache = str(Path(__file__).resolve().parents[2] / ".cache" / "easyvqa")
    seen = []

    real_generate_batch = generation.generate_batch

    def recording_generate_batch(model, inputs, **kwargs):
        seen.extend(inputs)
        return real_generate_batch(model, inputs, **kwargs)

    monkeypatch.setattr(generation, "generate_batch", recording_generate_batch)
    EasyVqaEvaluator(cache_dir=cache, limit=5, max_new_tokens=4, batch_size=2)(model, processor)
    enc = PromptEncoder(processor)
    questions = resolve_benchmark("easyvqa", overrides={"cache_dir": cache}, limit=5).questions
    assert len(seen) == 5
    for q, got in zip(questions, seen):
        ref = enc(q.model_prompt(), load_image(str(q.image)), 4)
        assert list(got.input_ids) == list(ref.input_ids)
        torch.testing.assert_close(got.pixel_values, ref.pixel_values, rtol=0, atol=0)
