"""The tiny offline LLaVA behaves like a real LLaVA-1.5 checkpoint."""
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from llava_san.models import IMAGE_TOKEN, TinyLlavaSpec, build_tiny_llava, build_tiny_tokenizer


def test_tokenizer_is_llama_like():
    tok = build_tiny_tokenizer()
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens(3) == "<0x00>" and tok.convert_ids_to_tokens(258) == "<0xFF>"
    ids = tok("what color is the shape?").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] != tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids[1]).startswith("▁")
    # unseen characters fall back to bytes, and decode round-trips
    text = "wörld 😀 ASSISTANT: blue"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    assert tok.unk_token_id not in tok(text).input_ids
    # special tokens are single ids and the build is deterministic
    assert len(tok(IMAGE_TOKEN, add_special_tokens=False).input_ids) == 1
    assert build_tiny_tokenizer().get_vocab() == tok.get_vocab()


def test_tiny_llava_forward_and_roundtrip(tmp_path):
    spec = TinyLlavaSpec()
    model, processor = build_tiny_llava(spec, seed=3)
    assert spec.image_tokens == 16
    img = Image.new("RGB", (64, 64), (255, 0, 0))
    enc = processor(images=[img], text=[f"USER: {IMAGE_TOKEN}\nwhat color? ASSISTANT:"], return_tensors="pt")
    assert int((enc.input_ids == model.config.image_token_id).sum()) == spec.image_tokens
    logits = model(**enc).logits
    assert logits.shape == (1, enc.input_ids.shape[1], len(processor.tokenizer))
    # same seed -> same weights; save/load like a hub checkpoint gives the same logits
    again, _ = build_tiny_llava(spec, seed=3)
    assert torch.equal(again(**enc).logits, logits)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    loaded_proc = AutoProcessor.from_pretrained(tmp_path, backend="pil")  # training's pixels (torchvision is installed)
    enc2 = loaded_proc(images=[img], text=[f"USER: {IMAGE_TOKEN}\nwhat color? ASSISTANT:"], return_tensors="pt")
    assert torch.equal(enc2.input_ids, enc.input_ids) and torch.equal(enc2.pixel_values, enc.pixel_values)
    assert torch.equal(loaded(**enc2).logits, logits)
