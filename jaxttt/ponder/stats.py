"""Statistics for the method table: recovery, IQM, bootstrap confidence intervals."""
from __future__ import annotations

import numpy as np


def recovery(skip: float, method: float, oracle: float) -> float:
    """(SKIP - method) / (SKIP - oracle); nan when the oracle gains nothing."""
    gap = skip - oracle
    return float((skip - method) / gap) if gap > 0 else float("nan")


def iqm(values) -> float:
    """Interquartile mean: the mean of the middle 50% (sorted; with n < 4, the middle values)."""
    v = np.sort(np.asarray(values, np.float64).ravel())
    n = len(v)
    lo, hi = int(np.floor(n * 0.25)), int(np.ceil(n * 0.75))
    return float(v[lo:max(hi, lo + 1)].mean())


def bootstrap_ci(per_seed_chunks: list[np.ndarray], stat=np.mean, *, n: int = 2000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of the mean over seeds of `stat`(chunk values), resampling chunks within
    each seed and seeds themselves (a two-level bootstrap)."""
    rng = np.random.default_rng(seed)
    S = len(per_seed_chunks)
    out = np.empty(n)
    for i in range(n):
        seeds = rng.integers(0, S, S) if S > 1 else np.zeros(1, int)
        vals = []
        for s in seeds:
            x = per_seed_chunks[s]
            vals.append(stat(x[rng.integers(0, len(x), len(x))]))
        out[i] = np.mean(vals)
    a = (1 - level) / 2
    return float(np.quantile(out, a)), float(np.quantile(out, 1 - a))


def paired_bootstrap_ci(per_seed_cols: list[np.ndarray], fn, *, n: int = 2000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of fn(mean over seeds of the column means) where each seed's [C, k] array
    is resampled by chunk (the same rows for all k columns: paired) and seeds are resampled."""
    rng = np.random.default_rng(seed)
    S = len(per_seed_cols)
    out = np.empty(n)
    for i in range(n):
        seeds = rng.integers(0, S, S) if S > 1 else np.zeros(1, int)
        means = [per_seed_cols[s][rng.integers(0, len(per_seed_cols[s]), len(per_seed_cols[s]))]
                 .mean(0) for s in seeds]
        out[i] = fn(np.mean(means, axis=0))
    a = (1 - level) / 2
    return float(np.nanquantile(out, a)), float(np.nanquantile(out, 1 - a))


def pareto_front(costs, losses) -> list[int]:
    """Indices of the points no other point beats on both cost and loss (lower is better)."""
    pts = list(zip(costs, losses))
    return [i for i, (c, l) in enumerate(pts)
            if not any((c2 <= c and l2 <= l) and (c2 < c or l2 < l) for c2, l2 in pts)]
