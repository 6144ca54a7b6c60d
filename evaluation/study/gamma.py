"""γ over training (from a run's CSV log) and the paper's Fig. 8 analogue (from its saved γ̄).

Curves: the module logs ``san/<type>/{mean,std,clamped,...}`` every ``log_gamma_every_n_steps``
optimiser steps (:func:`llava_san.peft.san_gamma_stats`); :func:`gamma_curves` reads them back from
``csv/version_*/metrics.csv``.

Fig. 8 analogue: the paper compares the scaling vectors of the same module type in consecutive blocks
with those of different types. γ̄ starts at 1 and stays near it, so the cosine of raw γ̄ vectors is ~1
for any pair; :func:`gamma_similarity` takes the cosine of the *deviations* ``γ̄ - 1`` instead, for
(a) the same type in blocks ``i`` and ``i+1`` and (b) two different types of the same width in the
same block (``q, k, v, o, down`` all have the hidden width; ``gate, up`` the MLP width).
"""
from __future__ import annotations

import csv
import itertools
import math
import re
from pathlib import Path
from typing import Optional

GAMMA_KEY = re.compile(r"^san/(?P<mtype>[a-z_]+)/(?P<stat>mean|std|clamped|ema_mean)$")
EMA_NAME = re.compile(r"layers\.(?P<block>\d+)\.(?:self_attn|mlp)\.(?P<mtype>[a-z_]+)\.san_gamma_ema$")


def gamma_curves(run_dir: str | Path) -> dict[str, dict[str, list[float]]]:
    """``{module type: {"step": [...], "mean": [...], "std": [...], "clamped": [...], "ema_mean": [...]}}``
    from the CSV log of a run (empty for runs without SAN)."""
    files = sorted(Path(run_dir).glob("csv/version_*/metrics.csv"))
    curves: dict[str, dict[str, list[float]]] = {}
    for path in files[-1:]:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                step = row.get("step")
                values = {k: v for k, v in row.items() if k and v not in (None, "") and GAMMA_KEY.match(k)}
                if not values or step in (None, ""):
                    continue
                by_type: dict[str, dict[str, float]] = {}
                for k, v in values.items():
                    m = GAMMA_KEY.match(k)
                    by_type.setdefault(m["mtype"], {})[m["stat"]] = float(v)
                for mtype, stats in by_type.items():
                    c = curves.setdefault(mtype, {"step": [], "mean": [], "std": [], "clamped": [], "ema_mean": []})
                    c["step"].append(int(float(step)))
                    for stat in ("mean", "std", "clamped", "ema_mean"):
                        c[stat].append(stats.get(stat, math.nan))
    return curves


def load_gamma_ema(adapter_dir: str | Path) -> dict[tuple[int, str], list[float]]:
    """``{(block, module type): γ̄ as a list}`` from ``<adapter>/san_state.safetensors`` (empty if none)."""
    from safetensors.torch import load_file

    path = Path(adapter_dir) / "san_state.safetensors"
    if not path.is_file():
        return {}
    out = {}
    for name, t in load_file(str(path)).items():
        m = EMA_NAME.search(name)
        if m:
            out[(int(m["block"]), m["mtype"])] = [float(x) for x in t.float().flatten()]
    return out


def _cos(a: list[float], b: list[float]) -> Optional[float]:
    da, db = [x - 1.0 for x in a], [x - 1.0 for x in b]
    na, nb = math.sqrt(sum(x * x for x in da)), math.sqrt(sum(x * x for x in db))
    if na == 0.0 or nb == 0.0:
        return None
    return sum(x * y for x, y in zip(da, db)) / (na * nb)


def gamma_similarity(ema: dict[tuple[int, str], list[float]]) -> dict[str, Optional[float]]:
    """Mean cosine of ``γ̄ - 1`` over same-type consecutive-block pairs and over different-type
    same-block pairs of equal width, plus the per-type consecutive-block means."""
    same, diff, per_type = [], [], {}
    for (block, mtype), g in ema.items():
        nxt = ema.get((block + 1, mtype))
        if nxt is not None and len(nxt) == len(g):
            c = _cos(g, nxt)
            if c is not None:
                same.append(c)
                per_type.setdefault(mtype, []).append(c)
    blocks = sorted({b for b, _ in ema})
    for block in blocks:
        here = sorted((t, g) for (b, t), g in ema.items() if b == block)
        for (t1, g1), (t2, g2) in itertools.combinations(here, 2):
            if len(g1) == len(g2):
                c = _cos(g1, g2)
                if c is not None:
                    diff.append(c)

    def mean(xs):
        return sum(xs) / len(xs) if xs else None

    out: dict[str, Optional[float]] = {"same_type_next_block": mean(same), "other_type_same_block": mean(diff)}
    out.update({f"same_type_next_block/{t}": mean(v) for t, v in sorted(per_type.items())})
    return out
