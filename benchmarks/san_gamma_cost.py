"""How much of SAN's step-time overhead is γ's pooling: LoRA, SAN-LoRA, and SAN-LoRA with a free γ.

Prints one JSON object. The model and arms are ``san_overhead.py``'s (58.5M-parameter LLaMA shape,
r=32, dropout 0.05, blockwise SAN), at batch 1 and ``--seq`` tokens. The third arm is SAN-LoRA whose
γ pooling is replaced by a constant γ = 1 that reads no activation (``_emit_gamma`` swapped for the
arm's steps only; the row scaling, the EMA update and every other part of SAN still run). It is a
counterfactual lower bound: what SAN would cost if γ's computation were free. Arms step interleaved,
the order alternating; ratios are medians of paired ratios against LoRA.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/san_gamma_cost.py --seq 162 --repeats 30
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import llava_san.peft.san as san_module  # noqa: E402
from san_overhead import MODEL, batch, build_arm, build_base, step  # noqa: E402  (this folder is on sys.path)


def free_gamma(slot, h_prime: torch.Tensor, h: torch.Tensor) -> None:
    """γ = 1 for every channel, without reading the activations."""
    gamma = torch.ones(h_prime.shape[-1], dtype=torch.float32)
    slot.record(gamma, gamma)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=162)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model_args = argparse.Namespace(**MODEL, batch=1, seq_lens=[args.seq])
    base = build_base(model_args)
    real_emit = san_module._emit_gamma
    arms = {"lora": (build_arm(base, model_args, "lora"), real_emit),
            "san_lora": (build_arm(base, model_args, "san_lora"), real_emit),
            "san_lora_free_gamma": (build_arm(base, model_args, "san_lora"), free_gamma)}
    inputs = batch(model_args, 0, args.seq)
    times = {name: [] for name in arms}
    try:
        for r in range(args.warmup + args.repeats):
            for name in (list(arms) if r % 2 == 0 else list(reversed(arms))):
                (model, opt), emit = arms[name]
                san_module._emit_gamma = emit
                wall, _ = step(model, opt, inputs)
                if r >= args.warmup:
                    times[name].append(wall)
    finally:
        san_module._emit_gamma = real_emit
    out = {"config": vars(args), "step_s": {k: statistics.median(v) for k, v in times.items()},
           "ratio_vs_lora_paired_median": {k: statistics.median(a / b for a, b in zip(v, times["lora"]))
                                           for k, v in times.items() if k != "lora"}}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
