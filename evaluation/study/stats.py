"""Mean ± standard deviation over seeds and the paired bootstrap confidence interval of a difference."""
from __future__ import annotations

import random
import statistics
from typing import Optional, Sequence


def mean_std(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """(mean, sample standard deviation ``ddof=1``; ``None`` for a single value)."""
    if not values:
        raise ValueError("mean_std of no values")
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) if len(values) > 1 else None)


def paired_bootstrap_ci(diffs: Sequence[float], samples: int = 10000, level: float = 0.95,
                        seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of paired differences (one per seed): the seeds are resampled
    with replacement ``samples`` times with a fixed generator, so the interval is reproducible. With
    3-5 seeds it is coarse (at most ``n**n`` distinct resamples) and tends to be narrow; read it with
    the per-seed differences beside it."""
    if not diffs:
        raise ValueError("paired_bootstrap_ci of no differences")
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(statistics.fmean(rng.choices(diffs, k=n)) for _ in range(samples))
    lo = means[int(((1 - level) / 2) * (samples - 1))]
    hi = means[int((1 - (1 - level) / 2) * (samples - 1))]
    return lo, hi
