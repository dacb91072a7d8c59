"""Aggregate statistics for few-run RL results (Agarwal et al. 2021, arXiv 2108.13264, "rliable").

Scores are 1-D arrays, one score per run. Confidence intervals are percentile bootstrap intervals
over runs resampled with replacement. With n runs there are only C(2n - 1, n) distinct resamples
(126 for 5 runs, 92,378 for 10), so when they are few (<= EXACT_LIMIT) every one is enumerated with
its multinomial probability and the interval has no Monte-Carlo error; otherwise `reps` random
resamples are drawn (seeded). Caveat: with 5-10 runs a 95% percentile bootstrap interval covers the
true value less often than 95% (it cannot reach beyond the observed runs); read it as a lower bound
on the uncertainty.

Pure functions; randomness only from the `seed` argument.
"""

from __future__ import annotations

import math
from functools import lru_cache
from itertools import combinations, combinations_with_replacement

import numpy as np

EXACT_LIMIT = 100_000  # enumerate all distinct resamples (or pairs of them) up to this many
COVERAGE_CAVEAT = (
    "with 5-10 runs a 95% percentile bootstrap interval covers the true value less often than 95%"
)


def _runs(scores) -> np.ndarray:
    x = np.asarray(scores, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("scores must hold at least one run")
    return x


def iqm(scores) -> float:
    """Interquartile mean: mean of the scores left after dropping floor(25%) from each end of the
    sorted scores (scipy.stats.trim_mean(x, 0.25) on all of them pooled)."""
    x = np.sort(_runs(scores))
    cut = int(0.25 * len(x))
    return float(x[cut : len(x) - cut].mean())


def resample_count(n: int) -> int:
    """Distinct resamples (multisets) of n runs drawn with replacement: C(2n - 1, n)."""
    return math.comb(2 * n - 1, n)


@lru_cache(maxsize=8)
def _all_resamples(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every multiset of n indices as a sorted row (M, n), and its probability under resampling."""
    idx = np.array(list(combinations_with_replacement(range(n), n)), dtype=np.int64)
    counts = _counts(idx, n)
    lgam = np.array([math.lgamma(c + 1) for c in range(n + 1)])
    log_p = math.lgamma(n + 1) - lgam[counts.astype(int)].sum(axis=1) - n * math.log(n)
    return idx, np.exp(log_p)


def resamples(n: int, reps: int, rng: np.random.Generator, exact: bool | None = None):
    """(idx (M, n) with sorted rows, weights (M,) summing to 1): all resamples when there are at most
    EXACT_LIMIT of them (or exact=True), else `reps` random ones with equal weights."""
    if exact if exact is not None else resample_count(n) <= EXACT_LIMIT:
        return _all_resamples(n)
    return np.sort(rng.integers(0, n, size=(reps, n)), axis=1), np.full(reps, 1.0 / reps)


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    counts = np.zeros((len(idx), n))
    np.add.at(counts, (np.arange(len(idx))[:, None], idx), 1)
    return counts


def weighted_interval(values, weights, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of a discrete distribution: the smallest values whose cumulative weight
    reaches (1 - level) / 2 and (1 + level) / 2 (numpy's 'inverted_cdf' for equal weights)."""
    order = np.argsort(values, kind="stable")
    v, cdf = np.asarray(values)[order], np.cumsum(np.asarray(weights)[order])
    cdf /= cdf[-1]
    lo, hi = np.searchsorted(cdf, [(1 - level) / 2 - 1e-12, (1 + level) / 2 - 1e-12])
    return float(v[min(lo, len(v) - 1)]), float(v[min(hi, len(v) - 1)])


def iqm_with_ci(scores, reps: int = 50_000, seed: int = 0, level: float = 0.95) -> dict:
    """{"iqm", "ci_low", "ci_high", "exact"}: percentile bootstrap interval of the IQM."""
    x = np.sort(_runs(scores))
    n = len(x)
    idx, w = resamples(n, reps, np.random.default_rng(seed))
    cut = int(0.25 * n)
    stats = x[idx][:, cut : n - cut].mean(axis=1)  # rows are sorted, so is x[idx]
    low, high = weighted_interval(stats, w, level)
    return {"iqm": iqm(x), "ci_low": low, "ci_high": high, "exact": resample_count(n) <= EXACT_LIMIT}


def iqm_curve(scores_over_time, reps: int = 50_000, seed: int = 0, level: float = 0.95) -> dict:
    """(runs, points) -> {"iqm", "ci_low", "ci_high"}: lists, one entry per evaluation point."""
    x = np.asarray(scores_over_time, dtype=np.float64)
    per_point = [iqm_with_ci(x[:, j], reps, seed, level) for j in range(x.shape[1])]
    return {key: [p[key] for p in per_point] for key in ("iqm", "ci_low", "ci_high")}


def _win_matrix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])


def probability_of_improvement(x_scores, y_scores) -> float:
    """P(X > Y) + 0.5 P(X = Y) over all run pairs: the Mann-Whitney U statistic of X over N * M."""
    return float(_win_matrix(_runs(x_scores), _runs(y_scores)).mean())


def newcombe_interval(p: float, n: int, m: int, level: float = 0.95) -> tuple[float, float]:
    """Score-type interval for P(X > Y) (Newcombe 2006, method 5): solve (p - t)^2 = z^2 V(t) with
    V(t) = t (1 - t) / (n m) [(2N - 1) - (3N - 3) / ((2 - t)(1 + t))], N = (n + m) / 2. Like Wilson's
    interval for a proportion it does not collapse to a point when every pair is won."""
    from statistics import NormalDist

    z, big_n = NormalDist().inv_cdf((1 + level) / 2), (n + m) / 2

    def gap(t):  # < 0 inside the interval, > 0 outside
        v = t * (1 - t) / (n * m) * ((2 * big_n - 1) - (3 * big_n - 3) / ((2 - t) * (1 + t)))
        return (p - t) ** 2 - z * z * max(v, 0.0)

    def root(inside, outside):
        for _ in range(60):
            mid = (inside + outside) / 2
            inside, outside = (mid, outside) if gap(mid) <= 0 else (inside, mid)
        return (inside + outside) / 2

    low = 0.0 if gap(0.0) <= 0 else root(p, 0.0)
    high = 1.0 if gap(1.0) <= 0 else root(p, 1.0)
    return low, high


def probability_of_improvement_with_ci(
    x_scores, y_scores, reps: int = 50_000, seed: int = 0, level: float = 0.95
) -> dict:
    """{"poi", "ci_low", "ci_high", "pairs_won", "pairs_tied", "pairs", "newcombe_low",
    "newcombe_high", "exact"}. Bootstrap: X and Y runs resampled independently (every pair of
    resamples when there are at most EXACT_LIMIT pairs)."""
    x, y = _runs(x_scores), _runs(y_scores)
    n, m = len(x), len(y)
    win = _win_matrix(x, y) / (n * m)  # (n, m)
    exact = resample_count(n) * resample_count(m) <= EXACT_LIMIT
    rng = np.random.default_rng(seed)
    (ix, wx), (iy, wy) = resamples(n, reps, rng, exact), resamples(m, reps, rng, exact)
    cx, cy = _counts(ix, n), _counts(iy, m)
    if exact:  # every pair of resamples: (Mx, My) statistics weighted by the product of probabilities
        stats, weights = (cx @ win @ cy.T).ravel(), np.outer(wx, wy).ravel()
    else:  # the r-th X resample with the r-th Y resample
        stats, weights = np.einsum("ri,ij,rj->r", cx, win, cy), wx
    low, high = weighted_interval(stats, weights, level)
    poi = probability_of_improvement(x, y)
    nlow, nhigh = newcombe_interval(poi, n, m, level)
    return {
        "poi": poi,
        "ci_low": low,
        "ci_high": high,
        "pairs_won": int((x[:, None] > y[None, :]).sum()),
        "pairs_tied": int((x[:, None] == y[None, :]).sum()),
        "pairs": n * m,
        "newcombe_low": nlow,
        "newcombe_high": nhigh,
        "exact": exact,
    }


def performance_profile(scores, thresholds) -> np.ndarray:
    """Fraction of runs whose score is strictly above each threshold."""
    x, tau = _runs(scores), np.asarray(thresholds, dtype=np.float64)
    return (x[None, :] > tau[:, None]).mean(axis=1)


def performance_profile_with_ci(
    scores, thresholds, reps: int = 50_000, seed: int = 0, level: float = 0.95
) -> dict:
    """{"fraction", "ci_low", "ci_high"}: lists over thresholds, bootstrap over runs."""
    x, tau = _runs(scores), np.asarray(thresholds, dtype=np.float64)
    idx, w = resamples(len(x), reps, np.random.default_rng(seed))
    above = _counts(idx, len(x)) @ (x[:, None] > tau[None, :]) / len(x)  # (M, thresholds)
    bounds = [weighted_interval(above[:, j], w, level) for j in range(len(tau))]
    return {
        "fraction": performance_profile(x, tau).tolist(),
        "ci_low": [b[0] for b in bounds],
        "ci_high": [b[1] for b in bounds],
    }


def permutation_p_value(x_scores, y_scores, limit: int = 1_000_000) -> float:
    """Exact one-sided p-value of P(X > Y) under exchangeability (both lists from one distribution):
    the fraction of the C(n + m, n) ways to split the pooled runs into n and m whose probability of
    improvement is at least the observed one (the exact Mann-Whitney test, ties at mid-ranks)."""
    x, y = _runs(x_scores), _runs(y_scores)
    n, m = len(x), len(y)
    if math.comb(n + m, n) > limit:
        raise ValueError(f"C({n + m}, {n}) splits is over the limit of {limit:,}")
    pooled = np.concatenate([x, y])
    order = np.argsort(pooled, kind="stable")
    ranks = np.empty(n + m)
    ranks[order] = np.arange(1, n + m + 1)
    for value in np.unique(pooled):  # tied runs share their mean rank
        tied = pooled == value
        ranks[tied] = ranks[tied].mean()
    splits = np.array(list(combinations(range(n + m), n)), dtype=np.int64)  # (C, n)
    poi = (ranks[splits].sum(axis=1) - n * (n + 1) / 2) / (n * m)
    observed = probability_of_improvement(x, y)
    return float(np.mean(poi >= observed - 1e-12))
