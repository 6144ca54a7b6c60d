"""SAN's cost over its base method: training step time and peak memory, and merged inference, per sequence length.

Prints one JSON object. Arms ``lora``, ``san_lora``, ``dora``, ``san_dora`` train the same LLaMA-shaped
text model (~60M parameters by default, batch 4, CPU; blockwise SAN, r=32, dropout 0.05) at each length
of ``--seq-lens`` (tokens per step = batch x length). What is measured, per length:

* **time**: the four arms step interleaved (one step of each arm in turn, the order alternating),
  ``--repeats`` times after ``--warmup``; per arm the median wall (``step_s``) and process-CPU
  (``step_cpu_s``) time. Ratios: ``step_ratio`` (of the medians), ``step_ratio_paired_median`` and
  ``cpu_ratio_paired_median`` (median over repeats of the two arms' ratio within a repeat: load drifts
  of a shared machine cancel; the figure to read).
* **memory**, per arm in a fresh process (a fork of a server that only imported the libraries,
  ``benchmarks/_fresh.py``), after the arm is built and the process's high-water mark reset:
  ``peak_mb``, the peak RSS growth over the resident model during ``--mem-steps`` training steps
  (activations, gradients, optimizer state); ``peak_alloc_mb``, the peak of the bytes allocated through
  torch's CPU allocator during one step (profiler memory events; deterministic, blind to the allocator's
  caching); ``saved_activation_mb``, the distinct storage autograd keeps for backward (deterministic).
  Ratios ``peak_mb_ratio``, ``peak_alloc_mb_ratio``, ``saved_activation_ratio``.
* **merged** (``merged``): each trained SAN arm folded with ``merge_san`` and its base arm folded with
  peft's ``merge_and_unload`` are plain models of the same architecture (``same_architecture``), so the
  ratio is 1.00 by construction; measured anyway: no-grad forward time interleaved
  (``forward_ratio_paired_median``, process CPU time) and the forward's peak allocation
  (``peak_alloc_mb_ratio``).
* with ``--profile``: one profiled step per arm; ``san_op_ms`` is the self CPU time of the operators
  (by name and input shapes) whose call count differs from the base arm's step — SAN's own ops — and
  ``san_op_share`` its share of the base step's total; ``top`` the largest.

The top-level keys ``lora`` ... ``san_dora``, ``san_lora_vs_lora``, ``san_dora_vs_dora`` and
``merged_vs_base`` (merged SAN-DoRA against the plain base model, forward CPU time) are those of the default
length ``--seq`` (or the first of ``--seq-lens`` when it is not among them); ``by_seq_len`` holds every
length. CPU timings on shared machines vary 10-15 %: set ``OMP_WAIT_POLICY=PASSIVE``, read the paired
ratios, and take >= 30 repeats for a few-percent effect.

With ``--out FILE`` the JSON is also written to ``FILE`` (atomically) after every length, marked
``"complete": false`` until the merged check has run, so a long run that is stopped keeps what it measured.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/san_overhead.py --batch 1 --seq-lens 162 512 2048 --repeats 30 \
        --threads 1 --profile --out benchmarks/results_san_overhead_by_len.json   # 162/512/2048 tokens per step
    python benchmarks/san_overhead.py --smoke        # seconds: small model, two short lengths (the smoke test)
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _fresh  # noqa: E402
from _fresh import run_fresh  # noqa: E402

if __name__ == "__main__":
    _fresh.start()  # the memory processes' fork server imports the libraries alongside this process

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


from llava_san.peft import SanConfig, get_san_model, merge_san  # noqa: E402
from llava_san.utils.atomic import atomic_file  # noqa: E402

ARMS = {
    "lora": (False, None),
    "san_lora": (False, SanConfig()),
    "dora": (True, None),
    "san_dora": (True, SanConfig()),
}
PAIRS = (("san_lora", "lora"), ("san_dora", "dora"))
#: the default model and adapters (a 58.5M-parameter LLaMA shape; LoRA/DoRA r=32, dropout 0.05)
MODEL = {"hidden": 512, "intermediate": 1408, "layers": 8, "heads": 8, "vocab": 32000, "rank": 32, "dropout": 0.05}
#: --smoke: the smallest settings that run every code path
SMOKE = {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "vocab": 500, "batch": 2, "rank": 4,
         "repeats": 2, "warmup": 1, "mem_steps": 1, "seq": 32, "seq_lens": [16, 32]}


def build_base(args) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=max(args.seq_lens))
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


def batch(args, seed, seq_len):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, args.vocab, (args.batch, seq_len), generator=g)
    return {"input_ids": ids, "labels": ids}


def step(model, opt, inputs) -> tuple[float, float]:
    """One training step; returns (wall seconds, process CPU seconds)."""
    t, c = time.perf_counter(), time.process_time()
    loss = model(**inputs).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t, time.process_time() - c


def peak_alloc_mb(fn) -> float:
    """Peak of the bytes allocated through torch's CPU allocator while ``fn()`` runs, over what was
    allocated before (MB), from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0]
    return max(totals, default=0) / 2**20


def memory_child(args, name: str, seq_len: int) -> dict:
    """In a fresh process (:func:`_fresh.run_fresh`): the memory figures of arm ``name`` at ``seq_len``."""
    import warnings

    import psutil

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    model, opt = build_arm(build_base(args), args, name, copy_base=False)
    gc.collect()
    before = psutil.Process().memory_info().rss / 2**20
    reset = _fresh.reset_peak_rss()
    for i in range(args.mem_steps):
        step(model, opt, batch(args, i, seq_len))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 - before
    alloc = peak_alloc_mb(lambda: step(model, opt, batch(args, 0, seq_len)))
    return {"peak_mb": peak, "peak_alloc_mb": alloc, "hwm_reset": reset,
            "saved_activation_mb": saved_activation_mb(model, batch(args, 0, seq_len))}


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


def paired_forward(a, b, inputs, args) -> dict:
    """Interleaved no-grad forward CPU time of two models: medians and the paired median ratio a/b."""
    ta, tb = [], []
    for r in range(args.warmup + args.repeats):
        order = ((a, ta), (b, tb)) if r % 2 == 0 else ((b, tb), (a, ta))
        for model, out in order:
            dt = timed_forward(model, inputs)
            if r >= args.warmup:
                out.append(dt)
    return {"forward_cpu_s": statistics.median(ta), "base_forward_cpu_s": statistics.median(tb),
            "forward_ratio_paired_median": statistics.median(x / y for x, y in zip(ta, tb))}


def same_architecture(a, b) -> bool:
    """Same class, same parameter and buffer names, shapes and dtypes."""
    def sig(m):
        return type(m), [(n, tuple(t.shape), t.dtype) for n, t in list(m.named_parameters()) + list(m.named_buffers())]

    return sig(a) == sig(b)


def profile_step(model, opt, inputs) -> dict:
    """Self CPU ms and call count of every operator (by name and input shapes) of one step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step(model, opt, inputs)
    return {(e.key, str(e.input_shapes)): (e.self_cpu_time_total / 1e3, e.count)
            for e in prof.key_averages(group_by_input_shape=True)}


def san_ops(san: dict, base: dict) -> dict:
    """SAN's own operators: those whose call count differs from the base arm's (their time difference)."""
    diffs = []
    for key in set(san) | set(base):
        (ts, cs), (tb, cb) = san.get(key, (0.0, 0)), base.get(key, (0.0, 0))
        if cs != cb:
            diffs.append((ts - tb, key))
    total_base = sum(t for t, _ in base.values())
    san_ms = sum(d for d, _ in diffs)
    top = [{"op": k[0], "shapes": k[1], "ms": round(d, 3)} for d, k in sorted(diffs, reverse=True)[:8]]
    return {"san_op_ms": san_ms, "base_step_ms": total_base, "san_op_share": san_ms / total_base, "top": top}


def ratios(res: dict, times: dict, cpu: dict, san: str, base: str) -> dict:
    a, b = res[san], res[base]
    return {
        "step_ratio": a["step_s"] / b["step_s"],
        "step_ratio_paired_median": statistics.median(x / y for x, y in zip(times[san], times[base])),
        "cpu_ratio_paired_median": statistics.median(x / y for x, y in zip(cpu[san], cpu[base])),
        "peak_mb_ratio": a["peak_mb"] / max(b["peak_mb"], 1e-9),
        "peak_alloc_mb_ratio": a["peak_alloc_mb"] / max(b["peak_alloc_mb"], 1e-9),
        "saved_activation_ratio": a["saved_activation_mb"] / max(b["saved_activation_mb"], 1e-9),
    }


def bench_length(arms: dict, args, seq_len: int) -> dict:
    """Interleaved steps of every arm at ``seq_len``, then one fresh memory process per arm."""
    times = {name: [] for name in ARMS}
    cpu = {name: [] for name in ARMS}
    for r in range(args.warmup + args.repeats):
        inputs = batch(args, r, seq_len)
        order = list(ARMS) if r % 2 == 0 else list(reversed(ARMS))  # alternate the order too
        for name in order:
            dt, dc = step(*arms[name], inputs)
            if r >= args.warmup:
                times[name].append(dt)
                cpu[name].append(dc)
    res: dict = {"seq_len": seq_len, "tokens_per_step": args.batch * seq_len}
    for name in ARMS:
        mem = run_fresh(memory_child, args, name, seq_len)
        res[name] = {"step_s": statistics.median(times[name]), "step_cpu_s": statistics.median(cpu[name]),
                     "peak_mb": round(mem["peak_mb"], 1), "peak_alloc_mb": round(mem["peak_alloc_mb"], 1),
                     "saved_activation_mb": round(mem["saved_activation_mb"], 1), "hwm_reset": mem["hwm_reset"]}
    for san, base in PAIRS:
        res[f"{san}_vs_{base}"] = ratios(res, times, cpu, san, base)
    if args.profile:
        profs = {name: profile_step(*arms[name], batch(args, 0, seq_len)) for name in ARMS}
        res["profile"] = {f"{san}_vs_{base}": san_ops(profs[san], profs[base]) for san, base in PAIRS}
    return res


def bench_merged(arms: dict, base_model, args, default_len: int) -> tuple[dict, float]:
    """The merged check at every length (consumes ``arms``) and merged SAN-DoRA vs the plain base."""
    merged = {}
    for name in ARMS:
        model = arms[name][0]
        merged[name] = (merge_san(model) if ARMS[name][1] is not None else model.merge_and_unload()).eval()
    out: dict = {str(n): {} for n in args.seq_lens}
    for san, base in PAIRS:
        same = same_architecture(merged[san], merged[base])
        for n in args.seq_lens:
            inputs = batch(args, 0, n)
            entry = paired_forward(merged[san], merged[base], inputs, args)
            entry["same_architecture"] = same
            a = peak_alloc_mb(lambda: timed_forward(merged[san], inputs))
            b = peak_alloc_mb(lambda: timed_forward(merged[base], inputs))
            entry.update({"peak_alloc_mb": a, "base_peak_alloc_mb": b, "peak_alloc_mb_ratio": a / max(b, 1e-9)})
            out[str(n)][f"{san}_vs_{base}"] = entry
    vs_base = paired_forward(merged["san_dora"], base_model.eval(), batch(args, 0, default_len), args)
    return out, vs_base["forward_ratio_paired_median"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=MODEL["hidden"])
    p.add_argument("--intermediate", type=int, default=MODEL["intermediate"])
    p.add_argument("--layers", type=int, default=MODEL["layers"])
    p.add_argument("--heads", type=int, default=MODEL["heads"])
    p.add_argument("--vocab", type=int, default=MODEL["vocab"])
    p.add_argument("--seq", type=int, default=512, help="the default length (its results are also top-level)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=None,
                   help="sequence lengths to measure (tokens per step = batch x length); default: --seq")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=MODEL["rank"])
    p.add_argument("--dropout", type=float, default=MODEL["dropout"])
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mem-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--profile", action="store_true", help="attribute step time to SAN's own operators")
    p.add_argument("--smoke", action="store_true", help="smallest settings, for the test (seconds)")
    p.add_argument("--out", default=None, help="also write the JSON here, after every length (partial until done)")
    args = p.parse_args()
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    args.seq_lens = args.seq_lens or [args.seq]
    if min(args.seq_lens) < 2 or args.repeats < 1:
        p.error("--seq-lens must be >= 2 and --repeats >= 1")
    torch.set_num_threads(args.threads)

    base = build_base(args)
    n_params = sum(p.numel() for p in base.parameters())
    arms = {name: build_arm(base, args, name) for name in ARMS}
    _fresh.wait_ready()  # the fork server's imports are done before anything is timed
    default_len = args.seq if args.seq in args.seq_lens else args.seq_lens[0]
    result = {"config": vars(args), "params": n_params, "default_seq_len": default_len, "complete": False,
              "by_seq_len": {}}
    for n in args.seq_lens:
        result["by_seq_len"][str(n)] = bench_length(arms, args, n)
        write_partial(args.out, result)
    merged, merged_vs_base = bench_merged(arms, base, args, default_len)
    del arms
    by_len = result.pop("by_seq_len")
    for n, entry in merged.items():
        by_len[n]["merged"] = entry
    top = by_len[str(default_len)]
    for key in (*ARMS, *(f"{s}_vs_{b}" for s, b in PAIRS)):
        result[key] = top[key]
    result["merged_vs_base"] = merged_vs_base
    result["by_seq_len"] = by_len
    result["complete"] = True
    write_partial(args.out, result)
    print(json.dumps(result, indent=2))


def write_partial(path, result: dict) -> None:
    """Write ``result`` to ``path`` atomically (nothing when ``path`` is None)."""
    if path:
        with atomic_file(path) as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
