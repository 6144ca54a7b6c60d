"""A one-minute CPU demo of SAN-DoRA on a tiny random LLaVA with real easy-vqa images.

    python -m llava_san.demo [--steps 60]

It builds the tiny LLaVA, applies DoRA + SAN (blockwise) to the language tower, trains the adapters
and the projector for a few steps on easy-vqa questions, prints the loss and the γ statistics, then
checks that the merged plain model gives the same logits and that a saved adapter reloads exactly.
The full training job is ``python -m train``.
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import torch


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()

    from easy_vqa import get_train_image_paths, get_train_questions
    from peft import LoraConfig
    from PIL import Image

    from llava_san.models import build_tiny_llava
    from llava_san.peft import (SanConfig, get_san_model, load_adapter, merge_san, san_gamma_stats,
                                save_adapter, set_gamma_logging, set_projector_trainable)

    torch.manual_seed(0)
    base, processor = build_tiny_llava(seed=0)
    model = get_san_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, use_dora=True),
                          SanConfig(propagation="blockwise"))
    set_projector_trainable(model)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"tiny LLaVA: {sum(p.numel() for p in base.parameters()):,} parameters, {n_train:,} trainable "
          f"(DoRA r=16 + projector), SAN blockwise")

    questions, answers, image_ids = get_train_questions()
    paths = get_train_image_paths()
    tok = processor.tokenizer
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)

    def make_batch(idx):
        prompts = [f"USER: <image>\n{questions[i]} ASSISTANT:" for i in idx]
        texts = [f"{p} {answers[i]}</s>" for p, i in zip(prompts, idx)]
        images = [Image.open(paths[image_ids[i]]).convert("RGB") for i in idx]
        enc = processor(images=images, text=texts, return_tensors="pt", padding=True)
        labels = enc.input_ids.clone()
        for row, prompt in enumerate(prompts):  # train on the answer and </s> only
            n_prompt = len(processor(images=images[row], text=prompt, return_tensors="pt").input_ids[0])
            labels[row, :n_prompt] = -100
        labels[enc.attention_mask == 0] = -100
        return dict(enc), labels

    model.train()
    t0 = time.time()
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(questions), (args.batch,), generator=gen).tolist()
        inputs, labels = make_batch(idx)
        set_gamma_logging(model, step == args.steps)
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 1 or step % 20 == 0:
            print(f"step {step:4d}  loss {loss.item():.3f}  ({time.time() - t0:.1f}s)")
    stats = san_gamma_stats(model)
    print("γ per module type (mean / min / max of the last batch):")
    for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        if f"san/{t}/mean" in stats:
            print(f"  {t:9s} {stats[f'san/{t}/mean']:.4f} / {stats[f'san/{t}/min']:.4f} / {stats[f'san/{t}/max']:.4f}")

    model.eval()
    inputs, _ = make_batch(list(range(4)))
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        want = model(**inputs).logits
        save_adapter(model, os.path.join(tmp, "adapter"))
        reloaded = load_adapter(copy.deepcopy(base), os.path.join(tmp, "adapter"))
        same = torch.equal(reloaded(**inputs).logits, want)
        merged = merge_san(model)
        diff = (merged(**inputs).logits - want).abs().max().item()
    print(f"saved adapter reloads bit-exactly: {same}; merged model max |Δlogit| = {diff:.2e}")


if __name__ == "__main__":
    main()
