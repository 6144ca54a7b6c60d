"""Training-step throughput and peak memory of LLaVA + each peft option, through ``LlavaSanModule``.

Prints one JSON object. Models: ``tiny`` (the default run's tiny LLaVA, batch 32, 64 image + 58 text
tokens, r=16) and ``100m`` (a LLaMA-shaped ~100M-parameter language model, 12 layers x 768, SwiGLU
2560, behind a small CLIP tower; batch 2, 16 image + 65 text tokens, r=64). Arms: ``none`` (projector
only), ``lora``, ``dora``, ``san_lora``, ``san_dora`` (all seven projections). One step is
``LlavaSanModule.training_step`` (the training system's loss, SAN regulariser included) + ``backward``
+ AdamW ``step`` over the module's own parameter groups
(:func:`llava_san.training.optim.build_optimizer`), on fixed random LLaVA batches (loss on the last 4
tokens). Each step advances the trainer's optimizer-step count as ``fit`` does, so SAN's γ statistics are
logged every ``log_gamma_every_n_steps`` steps as in a real run (``--log-gamma-every``, default the module's
50; 1 logs every step, the cost of a logging step).

* **speed**: the arms of a model are built side by side and stepped interleaved (one step each, order
  alternating), ``--repeats`` times after ``--warmup``; per arm the median wall and process-CPU time
  of a step -> ``samples_per_s`` (wall) and ``samples_per_cpu_s``. Machine noise hits every arm alike:
  read the ratios (``san_lora/lora``, ``san_dora/dora``, ``dora/lora``, ``none/lora``; > 1 = faster):
  of the medians (``speed``, ``cpu_speed``), and ``speed_paired`` / ``cpu_speed_paired``, the median
  over repeats of the two arms' ratio within a repeat (steps run back to back, so the machine's load
  drifts cancel; the steadier figure on a shared machine).
* **memory**: per arm in a fresh process (a fork of a server that only imported the libraries,
  :mod:`_fresh`): ``ru_maxrss`` growth over the resident
  model while training ``--mem-steps`` steps (activations, gradients, optimizer state) and the peak
  ``ru_maxrss``; ratios ``arm/base`` (> 1 = more memory).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/train_step.py [--models tiny 100m] [--repeats 15] [--batch N]
    python benchmarks/train_step.py --smoke       # seconds: tiny model, batch 2, 2 repeats (the smoke test)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import warnings
from typing import Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # libgomp's active wait adds ~4 ms per parallel op here
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _fresh  # noqa: E402
from _fresh import run_fresh  # noqa: E402

if __name__ == "__main__":
    _fresh.start()  # the memory processes' fork server imports the libraries alongside this process

import torch  # noqa: E402


ARMS = ("none", "lora", "dora", "san_lora", "san_dora")
RATIOS = (("san_lora", "lora"), ("san_dora", "dora"), ("dora", "lora"), ("none", "lora"))
#: build_tiny keywords of each model, and its batch / text length / LoRA rank.
MODELS = {
    "tiny": {"spec": {"patch_size": 8}, "batch": 32, "text": 57, "rank": 16},  # conf/model/tiny.yaml
    "100m": {"spec": {"image_size": 64, "patch_size": 16, "vision_hidden": 128, "vision_layers": 2,
                      "vision_heads": 4, "text_hidden": 768, "text_layers": 12, "text_heads": 12,
                      "text_kv_heads": 12, "text_intermediate": 2560, "vocab_size": 1024},
             "batch": 2, "text": 64, "rank": 64},
}


def recipe(model: str, arm: str):
    """The adapter recipe of an arm, as ``conf/peft/<arm>.yaml`` builds it (``none``: None, the module's
    :class:`~llava_san.peft.recipes.NoAdapter`), at the model's rank, alpha = 2r, no dropout, on the seven
    projections of the language tower."""
    if arm == "none":
        return None
    from peft import LoraConfig

    from llava_san.peft import LLAMA_MODULE_TYPES, LoraRecipe, SanConfig

    r = MODELS[model]["rank"]
    lora = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, bias="none", use_dora=arm.endswith("dora"),
                      target_modules=list(LLAMA_MODULE_TYPES))
    return LoraRecipe(lora, SanConfig() if arm.startswith("san_") else None)


def build_module(model: str, arm: str, log_gamma_every: Optional[int] = None):
    """A configured ``LlavaSanModule`` (model built, adapters applied) with a barebones trainer attached.

    ``log_gamma_every``: the module's ``log_gamma_every_n_steps`` (None: its default)."""
    import lightning as L

    from llava_san.models import build_tiny
    from llava_san.module import LlavaSanModule
    from llava_san.training import OptimConfig

    m = MODELS[model]
    extra = {} if log_gamma_every is None else {"log_gamma_every_n_steps": log_gamma_every}
    module = LlavaSanModule(lambda: build_tiny(seed=0, **m["spec"]), adapter=recipe(model, arm),
                            optim=OptimConfig(lr=1e-4, projector_lr=2e-5), train_projector=True, **extra)
    module.configure_model()
    # barebones: self.log() is a no-op, the step code is the training code
    module.trainer = L.Trainer(barebones=True, accelerator="cpu", devices=1, logger=False)
    from llava_san.training.optim import build_optimizer

    return module, build_optimizer(module.named_parameters(), module.optim)


def make_batch(module, model: str, seed: int) -> dict:
    """Random LLaVA batch: ``<s>``, the image tokens, text; loss on the last 4 tokens. ``(B, T)``."""
    from llava_san.peft.adapters import base_transformers_model

    m, cfg = MODELS[model], base_transformers_model(module.model).config
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    g = torch.Generator().manual_seed(seed)
    b = m["batch"]
    high = min(cfg.image_token_id, cfg.pad_token_id if cfg.pad_token_id is not None else cfg.image_token_id)
    text = torch.randint(3, high, (b, m["text"]), generator=g)  # ordinary tokens (no <image>, no <pad>)
    ids = torch.cat([torch.ones(b, 1, dtype=torch.long), torch.full((b, n_img), cfg.image_token_id), text], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]
    size = cfg.vision_config.image_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixel_values": torch.randn(b, 3, size, size, generator=g)}


def step(module, opt, batch, i: int) -> tuple[float, float]:
    """training_step + backward + optimizer step; (wall s, process CPU s)."""
    t, c = time.perf_counter(), time.process_time()
    loss = module.training_step(batch, i)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    dt, dc = time.perf_counter() - t, time.process_time() - c
    # what fit() counts after an optimizer step: trainer.global_step (which paces the γ statistics) advances
    progress = module.trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress
    progress.optimizer.step.increment_completed()
    return dt, dc


def child_memory(model: str, arm: str, steps: int, log_gamma_every: Optional[int], threads: int,
                 batch_size: int) -> dict:
    """In a fresh process (:func:`_fresh.run_fresh`): peak RSS growth (MB) over the built model during
    ``steps`` training steps.

    The high-water mark is reset after the build (build and import transients do not count), so
    ``ru_maxrss - resident`` is what training adds: activations, gradients, optimizer state.
    """
    import gc

    import psutil

    torch.set_num_threads(threads)
    MODELS[model]["batch"] = batch_size
    _quiet()
    module, opt = build_module(model, arm, log_gamma_every)
    batch = make_batch(module, model, 0)
    gc.collect()
    resident = psutil.Process().memory_info().rss / 2**20
    reset = _fresh.reset_peak_rss()
    for i in range(steps):
        step(module, opt, batch, i)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {"train_rss_growth_mb": peak - resident, "peak_rss_mb": peak, "hwm_reset": reset}


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def bench_model(model: str, args) -> dict:
    """Interleaved step timing of every arm of ``model``, then one fresh memory process per arm."""
    modules = {arm: build_module(model, arm, args.log_gamma_every) for arm in args.arms}
    _fresh.wait_ready()  # the fork server's imports are done before anything is timed
    first = modules[args.arms[0]][0]
    n_params = sum(p.numel() for p in first.model.parameters() if not p.requires_grad) + sum(
        p.numel() for n, p in first.model.named_parameters() if p.requires_grad and "lora_" not in n)
    wall = {a: [] for a in args.arms}
    cpu = {a: [] for a in args.arms}
    batches = [make_batch(first, model, s) for s in range(2)]
    for r in range(args.warmup + args.repeats):
        order = list(args.arms) if r % 2 == 0 else list(reversed(args.arms))
        for arm in order:
            dt, dc = step(*modules[arm], batches[r % 2], r)
            if r >= args.warmup:
                wall[arm].append(dt)
                cpu[arm].append(dc)
    trainable = {a: sum(p.numel() for p in m.parameters() if p.requires_grad)
                 for a, (m, _) in modules.items()}
    del modules
    b = MODELS[model]["batch"]
    arms = {}
    for arm in args.arms:
        w, c = statistics.median(wall[arm]), statistics.median(cpu[arm])
        arms[arm] = {"step_ms": 1e3 * w, "step_cpu_ms": 1e3 * c, "samples_per_s": b / w,
                     "samples_per_cpu_s": b / c, "trainable_params": trainable[arm]}
        arms[arm].update(run_fresh(child_memory, model, arm, args.mem_steps, args.log_gamma_every, args.threads,
                                   MODELS[model]["batch"]))
    ratios = {}
    for a, base in RATIOS:
        if a in arms and base in arms:
            ratios[f"{a}/{base}"] = {
                "speed": arms[a]["samples_per_s"] / arms[base]["samples_per_s"],
                "cpu_speed": arms[a]["samples_per_cpu_s"] / arms[base]["samples_per_cpu_s"],
                "speed_paired": statistics.median(x / y for x, y in zip(wall[base], wall[a])),
                "cpu_speed_paired": statistics.median(x / y for x, y in zip(cpu[base], cpu[a])),
                "memory_growth": arms[a]["train_rss_growth_mb"]
                / max(arms[base]["train_rss_growth_mb"], 1e-9),
                "peak_memory": arms[a]["peak_rss_mb"] / arms[base]["peak_rss_mb"],
            }
    m = MODELS[model]
    return {"base_params": n_params, "batch": m["batch"], "seq_len": batches[0]["input_ids"].shape[1],
            "lora_r": m["rank"], "arms": arms, "ratios": ratios}


def main() -> None:
    """Parse the options, run every model, print the JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mem-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--log-gamma-every", type=int, default=None,
                   help="log_gamma_every_n_steps of the module (default: its own, 50; 1 = every step)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: the model's own)")
    p.add_argument("--smoke", action="store_true",
                   help="smallest settings, for the test: tiny model, batch 2, 1 warm-up, 2 repeats, 1 memory step")
    args = p.parse_args()
    if args.smoke:
        args.models, args.batch, args.warmup, args.repeats, args.mem_steps = ["tiny"], 2, 1, 2, 1
    if args.batch is not None:
        if args.batch < 1:
            p.error("--batch must be >= 1")
        for m in MODELS.values():
            m["batch"] = args.batch
    torch.set_num_threads(args.threads)
    _quiet()
    t0 = time.perf_counter()
    result = {"config": vars(args),
              "env": {"torch": torch.__version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                      "cpus": os.cpu_count()},
              "models": {}}
    for model in args.models:
        result["models"][model] = bench_model(model, args)
    result["seconds"] = time.perf_counter() - t0
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
