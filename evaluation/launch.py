"""Multi-process sharding: start the ``K`` chunk workers of a run, one per device, and wait for them.

Each worker is ``python -m evaluation --config-path <output_dir> --config-name eval_config
chunk_idx=i``: the run's resolved config (``eval_config.yaml``) plus its chunk, with
``CUDA_VISIBLE_DEVICES`` set to one device of ``devices`` (default: every visible GPU).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["launch_chunks"]


def _devices(devices: Optional[Sequence[Any]]) -> list[Any]:
    """The configured devices, else every visible GPU (none on a CPU machine)."""
    if devices:
        return list(devices)
    import torch  # imported here: only a launching run needs it

    return list(range(torch.cuda.device_count()))


def _worker_command(out: Path, i: int) -> list[str]:
    cfg_file = out / "eval_config.yaml"
    return [sys.executable, "-m", "evaluation", "--config-path", str(out.resolve()), "--config-name",
            cfg_file.stem, f"chunk_idx={i}", f"hydra.run.dir={out.resolve() / 'logs' / f'chunk_{i}'}",
            "hydra.output_subdir=null"]


def launch_chunks(out: Path, k: int, devices: Optional[Sequence[Any]] = None) -> None:
    """Start the ``k`` chunk workers (same resolved config, ``out/eval_config.yaml``), one per device,
    each logging to ``out/logs/chunk_<k>_<i>.log``, and wait for all; a failed worker raises after
    the others finished."""
    devices = _devices(devices)
    procs = []
    for i in range(k):
        env = dict(os.environ)
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = str(devices[i % len(devices)])
        log_file = out / "logs" / f"chunk_{k}_{i}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = open(log_file, "w")
        proc = subprocess.Popen(_worker_command(out, i), env=env, stdout=fh, stderr=subprocess.STDOUT)
        procs.append((i, proc, fh, log_file))
    failed = []
    for i, proc, fh, log_file in procs:
        rc = proc.wait()
        fh.close()
        if rc != 0:
            failed.append(f"chunk {i} (exit {rc}, log {log_file})")
    if failed:
        raise RuntimeError("chunk worker(s) failed: " + "; ".join(failed) + "; rerun to resume them")
