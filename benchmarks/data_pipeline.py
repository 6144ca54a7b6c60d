"""Benchmark: the packed record index vs a LLaVA-style list-of-dicts dataset, at MVIT-665K scale.

    python benchmarks/data_pipeline.py [--records 665000] [--workers 4] [--throughput-samples 400]

1. Builds a synthetic ``llava_v1_5_mix665k.json``-like file (same record mix and lengths as the real
   one: ~6% text-only ShareGPT-like conversations, ~24% LLaVA-Instruct-like long answers, the rest
   short-answer VQA / region / caption records with several turns) plus a pool of COCO-sized JPEGs.
2. For each loader -- ``ours`` (:class:`llava_san.data.RecordIndex`) and ``llava_list_of_dicts``
   (``json.load`` kept in the dataset, LLaVA's ``LazySupervisedDataset``) -- in a fresh process:
   * index build time and the parent's resident memory growth (RSS) for it;
   * one full pass over every record with ``--workers`` forked dataloader workers in random order,
     each ``__getitem__`` fetching the record like the real dataset does (ours: ``pread`` + parse;
     LLaVA: list lookup + ``copy.deepcopy`` of the conversations), and each worker's growth in
     *private* memory (USS: private clean + dirty pages, shared pages excluded) from its first to
     its last batch;
   * samples/s of the full preprocessing (image load + pad + CLIP at 336 px + tokenize with the
     576-token image span) in one single-threaded process, i.e. per worker: samples per CPU-second
     of that process (what one worker does on a dedicated core, robust to other load on the
     machine) and, for reference, per wall-clock second.
3. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MB = 1024 * 1024
SHORT_PROMPT = "Answer the question using a single word or phrase."


# ---------------------------------------------------------------------- synthetic data
def make_dataset(out_dir: str, n_records: int, n_images: int = 48, seed: int = 0) -> dict:
    """Write ``records.json`` (JSON array) and ``images/*.jpg`` under ``out_dir``; return stats."""
    import random

    import numpy as np
    from PIL import Image

    nrng = np.random.default_rng(seed)
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    sizes = [(640, 480), (480, 640), (640, 427), (500, 375), (640, 360), (375, 500), (1024, 768), (800, 600)]
    for k in range(n_images):
        w, h = sizes[k % len(sizes)]
        base = nrng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        img.save(os.path.join(img_dir, f"{k:03d}.jpg"), quality=90)
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "pe", "da", "zu", "fo", "ge", "hi", "jo", "be"]
    vocab = ["".join(rng.choices(syll, k=rng.randint(1, 3))) for _ in range(3000)] + \
        ["the", "a", "of", "is", "in", "on", "and", "what", "color", "image", "man", "table"]

    def words(lo, hi):
        return " ".join(rng.choices(vocab, k=rng.randint(lo, hi - 1)))

    path = os.path.join(out_dir, "records.json")
    n_text = 0
    t0 = time.perf_counter()
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n")
        for i in range(n_records):
            u = rng.random()
            rec = {"id": f"{i:09d}"}
            if u < 0.061:  # ShareGPT-like text-only: a few long turns
                n_text += 1
                conv = []
                for _ in range(rng.randint(1, 5)):
                    conv.append({"from": "human", "value": words(8, 80)})
                    conv.append({"from": "gpt", "value": words(60, 400)})
            else:
                rec["image"] = f"images/{rng.randrange(n_images):03d}.jpg"
                if u < 0.30:  # LLaVA-Instruct-like: 1-5 turns, long answers
                    turns, alen, prompt = rng.randint(1, 5), (20, 200), ""
                else:  # VQAv2 / GQA / OCR-VQA / VG / RefCOCO-like: many short QA turns
                    turns, alen, prompt = rng.randint(1, 11), (1, 4), "\n" + SHORT_PROMPT
                conv = []
                for t in range(turns):
                    q = words(5, 16) + "?" + prompt
                    conv.append({"from": "human", "value": ("<image>\n" + q) if t == 0 else q})
                    conv.append({"from": "gpt", "value": words(*alen)})
            rec["conversations"] = conv
            f.write(json.dumps(rec, ensure_ascii=False))
            f.write(",\n" if i + 1 < n_records else "\n")
        f.write("]\n")
    return {"records": n_records, "text_only": n_text, "file_mb": round(os.path.getsize(path) / MB, 1),
            "images": n_images, "generate_s": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------------- measurement helpers
def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / MB


def uss_mb(pid: int) -> float:
    """Private memory of a process (USS = Private_Clean + Private_Dirty [+ private swap])."""
    import psutil

    return psutil.Process(pid).memory_full_info().uss / MB


class _OursTouch:
    """What our dataset does to fetch a record: pread + json.loads + LLaVA turn normalisation."""

    def __init__(self, index):
        self.index = index

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        from llava_san.data.records import normalize_turns

        rec = self.index[i]
        turns, _ = normalize_turns(rec, self.index.position(i), self.index.path)
        return len(turns)


class _LlavaTouch:
    """LLaVA's ``LazySupervisedDataset.__getitem__`` record access: list lookup + deepcopy."""

    def __init__(self, records):
        self.list_data_dict = records

    def __len__(self):
        return len(self.list_data_dict)

    def __getitem__(self, i):
        import copy

        sources = [self.list_data_dict[i]]
        if "image" in sources[0]:
            _ = sources[0]["image"]
        convs = copy.deepcopy([e["conversations"] for e in sources])
        return len(convs[0])


def _count(batch):
    return len(batch)


def full_pass(dataset, workers: int, seed: int = 0) -> dict:
    """One pass over all items in random order with forked workers; per-worker USS growth."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=512, sampler=RandomSampler(dataset, generator=g),
                        num_workers=workers, collate_fn=_count, multiprocessing_context="fork",
                        prefetch_factor=2)
    t0 = time.perf_counter()
    it = iter(loader)
    first = next(it)
    pids = [w.pid for w in it._workers]
    start = {pid: uss_mb(pid) for pid in pids}
    n = first
    end = None
    while n < len(dataset):
        n += next(it)
    # The last batch is in: every worker has finished its share but is still alive (the iterator only
    # shuts them down on the next call), so this is their memory after the full pass.
    end = {pid: uss_mb(pid) for pid in pids}
    seconds = time.perf_counter() - t0
    del it
    growth = [round(end[p] - start[p], 1) for p in pids]
    return {"pass_s": round(seconds, 2), "items": n,
            "worker_private_start_mb": [round(start[p], 1) for p in pids],
            "worker_private_growth_mb": growth, "worker_private_growth_mb_max": max(growth)}


def _bench_processor(image_size: int, patch: int):
    """A LLaVA-1.5-shaped processor: CLIP image processor at ``image_size`` + the offline tokenizer."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from llava_san.models.tokenizer import IMAGE_TOKEN, build_tiny_tokenizer

    ip = CLIPImageProcessor(size={"shortest_edge": image_size},
                            crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=ip, tokenizer=build_tiny_tokenizer(), patch_size=patch,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token=IMAGE_TOKEN)


def throughput(get_sample, n_items: int, n_samples: int, seed: int = 1) -> dict:
    """Rate of ``get_sample(i)`` in this process over ``n_samples`` random items (after 5 warm-up).

    ``per_cpu_s`` divides by this process's CPU time: the rate of one worker on a dedicated core,
    insensitive to other load on the machine; ``per_wall_s`` is the wall-clock rate.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_items, n_samples + 5)
    for i in idx[:5]:
        get_sample(int(i))
    w0, c0 = time.perf_counter(), time.process_time()
    for i in idx[5:]:
        get_sample(int(i))
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"per_cpu_s": round(n_samples / cpu, 1), "per_wall_s": round(n_samples / wall, 1)}


def run_variant(variant: str, data_dir: str, workers: int, n_samples: int, image_size: int,
                patch: int) -> dict:
    """Measure one loader in this (fresh) process."""
    import torch

    torch.set_num_threads(1)  # one core per dataloader worker, as in training
    from llava_san.data import LlavaDataset, LlavaPreprocessor, RecordIndex
    from llava_san.data.errors import BadSample

    processor = _bench_processor(image_size, patch)
    pre = LlavaPreprocessor.from_processor(processor, image_folder=data_dir, model_max_length=2048)
    path = os.path.join(data_dir, "records.json")
    gc.collect()
    rss0 = rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    if variant == "ours":
        index = RecordIndex.build(path)
        build_s, build_cpu = time.perf_counter() - t0, time.process_time() - c0
        gc.collect()
        out = {"index_build_s": round(build_s, 2), "index_build_cpu_s": round(build_cpu, 2),
               "index_resident_mb": round(rss_mb() - rss0, 1),
               "index_arrays_mb": round(index.memory_bytes / MB, 1)}
        touch = _OursTouch(index)
        dataset = LlavaDataset(index, pre)
        get_sample = dataset.__getitem__
    else:
        with open(path, "r") as f:
            records = json.load(f)
        # LLaVA also computes modality_lengths (the same word count) when it builds its sampler
        lengths = [sum(len(c["value"].split()) for c in r["conversations"]) for r in records]
        build_s, build_cpu = time.perf_counter() - t0, time.process_time() - c0
        del lengths
        gc.collect()
        out = {"index_build_s": round(build_s, 2), "index_build_cpu_s": round(build_cpu, 2),
               "index_resident_mb": round(rss_mb() - rss0, 1)}
        touch = _LlavaTouch(records)

        def get_sample(i):
            import copy

            try:
                return pre(copy.deepcopy(records[i]), i, path)
            except BadSample:
                return None

    out.update(full_pass(touch, workers))
    rate = throughput(get_sample, len(touch), n_samples)
    out["preprocess_samples_per_s_per_worker"] = rate["per_cpu_s"]  # one worker on a dedicated core
    out["preprocess_samples_per_wall_s"] = rate["per_wall_s"]
    out["image_tokens"] = pre.encoder.image_tokens
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=665_000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--throughput-samples", type=int, default=400)
    ap.add_argument("--image-size", type=int, default=336)
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--data-dir", default=None, help="reuse / keep the synthetic data here")
    ap.add_argument("--variant", choices=["ours", "llava_list_of_dicts"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if args.variant:  # child process: one measurement
        res = run_variant(args.variant, args.data_dir, args.workers, args.throughput_samples, args.image_size,
                          args.patch)
        print(json.dumps(res))
        return res

    tmp = None
    data_dir = args.data_dir
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="llava_bench_")
        data_dir = tmp.name
    try:
        if os.path.isfile(os.path.join(data_dir, "records.json")) and os.path.isfile(
                os.path.join(data_dir, "stats.json")):
            with open(os.path.join(data_dir, "stats.json")) as f:
                stats = json.load(f)
        else:
            os.makedirs(data_dir, exist_ok=True)
            stats = make_dataset(data_dir, args.records)
            with open(os.path.join(data_dir, "stats.json"), "w") as f:
                json.dump(stats, f)
        result = {"dataset": stats, "workers": args.workers, "image_size": args.image_size,
                  "throughput_samples": args.throughput_samples}
        for variant in ("ours", "llava_list_of_dicts"):
            cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--data-dir", data_dir,
                   "--workers", str(args.workers), "--throughput-samples", str(args.throughput_samples),
                   "--image-size", str(args.image_size), "--patch", str(args.patch)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                raise RuntimeError(f"{variant} benchmark failed:\n{proc.stderr[-4000:]}")
            result[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        ours = result["ours"]
        result["targets"] = {"index_resident_mb_max": 1024, "worker_private_growth_mb_max": 50}
        result["meets_targets"] = bool(ours["index_resident_mb"] <= 1024
                                       and ours["worker_private_growth_mb_max"] <= 50)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
