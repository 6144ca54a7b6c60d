"""Batched greedy generation (``llava_san.generation``, what ``python -m evaluation`` runs) against
one question at a time as LLaVA's ``model_vqa_loader`` does it (``model.generate(do_sample=False,
num_beams=1, max_new_tokens=N, use_cache=True)``, batch 1), on the tiny model. Prints one JSON object.

The model is the tiny LLaVA with a "trained-ish" SAN-LoRA adapter (random non-zero LoRA B, random γ̄),
merged into the weights as ``python -m evaluation`` does by default. The questions are the first
``--questions`` easy-vqa test questions, encoded once (training's template, tokenization and image
preprocessing); only generation is timed. Two regimes:

* ``long``: ``max_new_tokens=128`` (LLaVA's setting for short-answer benchmarks); the random model
  never emits ``</s>``, so every answer is 128 tokens (the decode-bound worst case);
* ``short``: ``max_new_tokens=4``, the length of a trained model's one-word answer + ``</s>``
  (prefill-bound, the common case on VQAv2/GQA/POPE).

Arms run interleaved (batched, one-at-a-time, batched, ...) ``--repeats`` times; questions/s are
medians, from wall time and from process CPU time (this machine is shared: CPU time is steadier).
``identical_answers`` compares the decoded answers of every arm with the one-at-a-time arm. A third
arm, ``ours_batch_1`` (this generator at batch size 1), separates the gain of batching from that of
the leaner decode loop.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/generation.py [--questions 64] [--batch-size 16] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def trained_ish(seed: int = 0):
    """Tiny LLaVA + SAN-LoRA (r=8) with random B and γ̄, merged (eval mode), and its processor."""
    from peft import LoraConfig

    from llava_san.models import build_tiny
    from llava_san.peft import SanConfig, get_san_model, merge_san

    model, processor = build_tiny(seed=seed, dtype="float32")
    m = get_san_model(model, LoraConfig(r=8, lora_alpha=16), SanConfig())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for mod in m.modules():
            if hasattr(mod, "san_gamma_ema"):
                mod.san_gamma_ema.copy_(0.5 + torch.rand(mod.san_gamma_ema.shape, generator=g))
    return merge_san(m).eval(), processor


def one_at_a_time(model, processor, inputs) -> list[str]:
    """LLaVA's model_vqa_loader loop: one question per generate call, greedy, decode + strip."""
    tok = processor.tokenizer
    texts = []
    with torch.inference_mode():
        for x in inputs:
            ids = torch.tensor([list(x.input_ids)])
            kw = {"pixel_values": x.pixel_values[None]} if x.pixel_values is not None else {}
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 num_beams=1, max_new_tokens=x.max_new_tokens, use_cache=True,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw)
            texts.append(tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)[0].strip())
    return texts


def batched(model, processor, inputs, batch_size) -> list[str]:
    from llava_san.generation import generate

    with torch.inference_mode():
        return generate(model, processor, inputs, batch_size=batch_size)


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    p.add_argument("--regimes", default="long,short",
                   help="comma list of long (128 tokens), short (4 tokens)")
    p.add_argument("--no-ours-batch-1", dest="ours_batch_1", action="store_false",
                   help="skip the third arm (our generator at batch size 1)")
    p.add_argument("--cache-dir", default=str(Path(__file__).resolve().parents[1] / ".cache" / "easyvqa"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from evaluation.generate import question_image
    from evaluation.resolve import resolve_benchmark
    from llava_san.generation import GenerationInput, PromptEncoder

    model, processor = trained_ish()
    questions = resolve_benchmark("easyvqa", overrides={"cache_dir": args.cache_dir},
                                  limit=args.questions).questions
    enc = PromptEncoder(processor)
    t0 = time.perf_counter()
    encoded = [enc(q.model_prompt(), question_image(q)) for q in questions]
    encode_s = time.perf_counter() - t0

    result = {
        "benchmark": "generation",
        "model": "tiny LLaVA + random SAN-LoRA (merged), float32, CPU",
        "questions": len(questions),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "torch_threads": args.threads,
        "prompt_tokens": {"min": min(len(x.input_ids) for x in encoded),
                          "max": max(len(x.input_ids) for x in encoded)},
        "encode_questions_per_s": len(questions) / encode_s,
        "regimes": {},
    }
    regimes = {"long": 128, "short": 4}
    for name in args.regimes.split(","):
        n_new = regimes[name]
        inputs = [GenerationInput(x.input_ids, x.pixel_values, n_new) for x in encoded]
        arms = {
            "batched": lambda: batched(model, processor, inputs, args.batch_size),
            "one_at_a_time": lambda: one_at_a_time(model, processor, inputs),
            "ours_batch_1": lambda: batched(model, processor, inputs, 1),
        }
        if not args.ours_batch_1:
            del arms["ours_batch_1"]
        times = {arm: [] for arm in arms}
        answers = {}
        for _ in range(args.repeats):
            for arm, fn in arms.items():
                texts, wall, cpu = timed(fn)
                times[arm].append((wall, cpu))
                if answers.setdefault(arm, texts) != texts:
                    raise RuntimeError(f"{arm}: answers changed between repeats")
        n = len(inputs)
        row = {"max_new_tokens": n_new}
        for arm, ts in times.items():
            row[arm] = {"questions_per_s_wall": n / statistics.median(t[0] for t in ts),
                        "questions_per_s_cpu": n / statistics.median(t[1] for t in ts)}
        for unit in ("wall", "cpu"):
            row[f"speedup_{unit}"] = (row["batched"][f"questions_per_s_{unit}"]
                                      / row["one_at_a_time"][f"questions_per_s_{unit}"])
        if "ours_batch_1" in times:  # the share of the speed-up that batching alone gives
            row["speedup_cpu_vs_ours_batch_1"] = (row["batched"]["questions_per_s_cpu"]
                                                  / row["ours_batch_1"]["questions_per_s_cpu"])
        row["identical_answers"] = all(a == answers["one_at_a_time"] for a in answers.values())
        row["distinct_answers"] = len(set(answers["batched"]))
        row["mean_answer_chars"] = statistics.mean(len(t) for t in answers["batched"])
        result["regimes"][name] = row
    result["identical_answers"] = all(r["identical_answers"] for r in result["regimes"].values())
    result["target_met"] = result["identical_answers"] and all(
        r["speedup_cpu"] >= 4.0 for r in result["regimes"].values())
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
