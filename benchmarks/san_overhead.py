"""SAN's cost over its base method: training step time and peak memory, and merged inference.

Prints one JSON object. Arms ``lora``, ``san_lora``, ``dora``, ``san_dora`` train the same LLaMA-shaped
text model (~60M parameters by default, sequence 512, batch 4, CPU). Step times are measured
interleaved (one step of each arm in turn, repeated) and reported as medians, so machine noise hits
every arm alike; ratios are what to read. Both wall time and process CPU time are reported; the
paired CPU-time ratio is the most robust on a shared machine. Peak memory is measured per arm in a fresh subprocess
(``ru_maxrss`` growth over the resident model during training steps: activations, gradients,
optimizer state). ``merged_vs_base``
compares the forward time of a SAN-DoRA model merged with ``merge_san`` against the plain base.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/san_overhead.py [--repeats 12] [--layers 8] [--hidden 512]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from llava_san.peft import SanConfig, get_san_model, merge_san  # noqa: E402

ARMS = {
    "lora": (False, None),
    "san_lora": (False, SanConfig()),
    "dora": (True, None),
    "san_dora": (True, SanConfig()),
}


def build_base(args) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=args.seq)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def build_arm(base, args, name, copy_base=True):
    dora, san = ARMS[name]
    torch.manual_seed(0)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.dropout, use_dora=dora)
    model = get_san_model(copy.deepcopy(base) if copy_base else base, lora, copy.deepcopy(san))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def batch(args, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g)
    return {"input_ids": ids, "labels": ids}


def step(model, opt, inputs) -> tuple[float, float]:
    """One training step; returns (wall seconds, process CPU seconds)."""
    t, c = time.perf_counter(), time.process_time()
    loss = model(**inputs).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t, time.process_time() - c


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_memory_child(args, name) -> dict:
    """In a fresh process: peak RSS growth (MB) over the resident model while training ``name`` for a
    few steps, and the bytes autograd keeps for backward in one step (deterministic)."""
    import psutil

    model, opt = build_arm(build_base(args), args, name, copy_base=False)
    before = psutil.Process().memory_info().rss / 2**20  # resident now (the HWM may hold build transients)
    for i in range(args.mem_steps):
        step(model, opt, batch(args, i))
    peak = rss_mb() - before
    return {"peak_mb": peak, "saved_activation_mb": saved_activation_mb(model, batch(args, 0))}


def saved_activation_mb(model, inputs) -> float:
    """MB of distinct tensor storage that autograd saves for backward during one forward."""
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**inputs).loss
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = sum(n for ptr, n in seen.items() if ptr not in params)  # activations only, not weights
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total / 2**20


def timed_forward(model, inputs) -> float:
    t = time.process_time()
    with torch.no_grad():
        model(**inputs)
    return time.process_time() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mem-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args.child_memory:
        print(json.dumps(peak_memory_child(args, args.child_memory)))
        return

    base = build_base(args)
    n_params = sum(p.numel() for p in base.parameters())
    arms = {name: build_arm(base, args, name) for name in ARMS}
    times = {name: [] for name in ARMS}
    cpu = {name: [] for name in ARMS}
    for r in range(args.warmup + args.repeats):
        inputs = batch(args, r)
        order = list(ARMS) if r % 2 == 0 else list(reversed(ARMS))  # alternate the order too
        for name in order:
            dt, dc = step(*arms[name], inputs)
            if r >= args.warmup:
                times[name].append(dt)
                cpu[name].append(dc)

    # merged SAN-DoRA vs the plain base: forward time, interleaved
    merged = merge_san(arms["san_dora"][0]).eval()
    plain = base.eval()
    inputs = batch(args, 0)
    inf = {"merged": [], "base": []}
    for r in range(args.warmup + args.repeats):
        for name, model in (("merged", merged), ("base", plain)) if r % 2 == 0 else (("base", plain), ("merged", merged)):
            dt = timed_forward(model, inputs)  # process CPU seconds
            if r >= args.warmup:
                inf[name].append(dt)
    del arms, merged

    result = {"config": {k: v for k, v in vars(args).items() if k != "child_memory"}, "params": n_params}
    for name in ARMS:
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child-memory", name],
                             capture_output=True, text=True, check=True)
        mem = json.loads(out.stdout.strip().splitlines()[-1])
        result[name] = {"step_s": statistics.median(times[name]), "step_cpu_s": statistics.median(cpu[name]),
                        "peak_mb": round(mem["peak_mb"], 1), "saved_activation_mb": round(mem["saved_activation_mb"], 1)}
    for san, plain_name in (("san_lora", "lora"), ("san_dora", "dora")):
        result[f"{san}_vs_{plain_name}"] = {
            "step_ratio": result[san]["step_s"] / result[plain_name]["step_s"],
            "step_ratio_paired_median": statistics.median(a / b for a, b in zip(times[san], times[plain_name])),
            "cpu_ratio_paired_median": statistics.median(a / b for a, b in zip(cpu[san], cpu[plain_name])),
            "peak_mb_ratio": result[san]["peak_mb"] / max(result[plain_name]["peak_mb"], 1e-9),
            "saved_activation_ratio": result[san]["saved_activation_mb"] / result[plain_name]["saved_activation_mb"],
        }
    result["merged_vs_base"] = statistics.median(inf["merged"]) / statistics.median(inf["base"])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
