"""The pixel cache's effect on the default run's data loading: dataloader-worker CPU per sample, off vs on.

Prints one JSON object. The default run's data (``conf/train.yaml``: easy-vqa, tiny processor, batch 32,
one dataloader worker) is composed through Hydra and its real training loader iterated for
``--batches`` batches, once with ``data.image_cache_mb=0`` and once with the configured cache, the two
arms alternating ``--repeats`` times. A pass starts a fresh worker (the default run's workers are not
persistent), so the cache warms up inside each pass as it does in each training epoch. Measured per
arm: the worker's CPU seconds per 1,000 samples (``RUSAGE_CHILDREN`` of the finished worker; steady
on a shared machine, the figure to read) and the pass's wall time; ``image_cached`` is the share of
samples whose image came from the cache. The batches of the two arms are compared for equality.

In the default run the worker shares the machine with the training process; when two runs share the
2 cores (the SAN study runs its jobs two at a time), the worker's CPU is taken from the training.
``--pair-steps N`` measures that case too: two shortened default runs started together
(``python -m train seed=0`` and ``seed=1``, ``trainer.max_steps=N``, no evaluation), cache off then on
then off then on; ``pairs`` holds each pair's wall time (the later of the two runs) and
``pair_wall_ratio_on_vs_off`` the ratio of the medians.

    python benchmarks/pixel_cache.py [--batches 300] [--repeats 3] [--pair-steps 600]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def make_datamodule(image_cache_mb: float | None, cache_dir: str | None):
    """The default run's datamodule, set up; ``image_cache_mb`` None keeps the configured cache."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    overrides = [] if image_cache_mb is None else [f"data.image_cache_mb={image_cache_mb}"]
    if cache_dir:
        overrides.append(f"paths.cache_dir={cache_dir}")
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    processor = instantiate(cfg.model.processor)
    dm = instantiate(cfg.data, processor=processor, world_size=1, rank=0, grad_accum=1)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def one_pass(dm, n_batches: int) -> tuple[dict, list]:
    """Iterate ``n_batches`` of a fresh training loader; the worker's CPU, wall time and cache hits."""
    loader = dm.train_dataloader()
    cpu0, t0 = children_cpu_s(), time.perf_counter()
    it = iter(loader)
    checks = []
    for i in range(n_batches):
        batch = next(it)
        if i % 50 == 0:  # a fingerprint of some batches, for the equality of the arms
            checks.append((batch["input_ids"].sum().item(), float(batch["pixel_values"].double().sum())))
    totals = loader.epoch_totals()
    del it  # the worker exits; its CPU time joins RUSAGE_CHILDREN once it is reaped
    gc.collect()
    time.sleep(0.5)
    wall, cpu = time.perf_counter() - t0, children_cpu_s() - cpu0
    samples = totals.get("seen", 0)
    return {"worker_cpu_s_per_1000": 1000 * cpu / max(samples, 1), "wall_s": wall, "samples": samples,
            "image_cached": totals.get("image_cached", 0) / max(samples, 1)}, checks


def run_pair(steps: int, image_cache_mb: float | None, cache_dir: str | None, out_dir: str) -> float:
    """Wall seconds of two shortened default runs (seeds 0 and 1) started together."""
    import subprocess

    procs = []
    t0 = time.perf_counter()
    for seed in (0, 1):
        cmd = [sys.executable, "-m", "train", f"seed={seed}", f"trainer.max_steps={steps}", "evaluate=null",
               "callbacks.progress_bar.refresh_rate=0", f"hydra.run.dir={out_dir}/seed{seed}"]
        if image_cache_mb is not None:
            cmd.append(f"data.image_cache_mb={image_cache_mb}")
        if cache_dir:
            cmd.append(f"paths.cache_dir={cache_dir}")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"a paired run failed:\n{err[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-dir", default=None, help="paths.cache_dir (default: the config's)")
    p.add_argument("--pair-steps", type=int, default=0, help="also time two shortened default runs at once")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    arms = {name: make_datamodule(mb, args.cache_dir) for name, mb in (("off", 0), ("on", None))}
    on_mb = arms["on"].image_cache_mb
    if not on_mb:
        p.error("the configured data.image_cache_mb is 0: nothing to compare")
    results = {name: [] for name in arms}
    fingerprints = {}
    for r in range(args.repeats):
        for name in (("off", "on") if r % 2 == 0 else ("on", "off")):
            res, checks = one_pass(arms[name], args.batches)
            results[name].append(res)
            fingerprints.setdefault(name, checks)
    out = {"config": {**vars(args), "image_cache_mb": on_mb, "batch_size": arms["on"].batch_size,
                      "num_workers": arms["on"].num_workers},
           "same_batches": fingerprints["off"] == fingerprints["on"]}
    for name, runs in results.items():
        out[name] = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    out["worker_cpu_ratio_on_vs_off"] = out["on"]["worker_cpu_s_per_1000"] / out["off"]["worker_cpu_s_per_1000"]
    if args.pair_steps:
        import tempfile

        pairs = {"off": [], "on": []}
        with tempfile.TemporaryDirectory() as tmp:
            for i, name in enumerate(("off", "on", "off", "on")):
                pairs[name].append(run_pair(args.pair_steps, 0 if name == "off" else None, args.cache_dir,
                                            f"{tmp}/{i}"))
        out["pairs"] = pairs
        out["pair_wall_ratio_on_vs_off"] = statistics.median(pairs["on"]) / statistics.median(pairs["off"])
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
