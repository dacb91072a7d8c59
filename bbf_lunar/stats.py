"""Aggregate statistics for few-run RL results (Agarwal et al. 2021, arXiv 2108.13264, "rliable").

Scores are arrays of shape (runs,) or (runs, tasks). Confidence intervals come from a stratified
bootstrap: runs are resampled with replacement within each task, the statistic is recomputed, and the
2.5 / 97.5 percentiles of the replicates bound a 95% interval. Pure functions; randomness only from
the `seed` argument.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _as_matrix(scores) -> np.ndarray:
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]  # (runs, 1): one task
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"scores must have shape (runs,) or (runs, tasks) with runs >= 1, got {x.shape}")
    return x


def iqm(scores) -> float:
    """Interquartile mean: mean of the scores left after dropping floor(25%) from each end of the
    sorted pooled scores (scipy.stats.trim_mean(x, 0.25) on all runs and tasks together)."""
    x = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    cut = int(0.25 * len(x))
    return float(x[cut : len(x) - cut].mean())


def _iqm_last_axis(x: np.ndarray) -> np.ndarray:
    """IQM over the last axis for a stack of replicates: (..., n) -> (...)."""
    x = np.sort(x, axis=-1)
    cut = int(0.25 * x.shape[-1])
    return x[..., cut : x.shape[-1] - cut].mean(axis=-1)


def stratified_resample(x: np.ndarray, reps: int, rng: np.random.Generator) -> np.ndarray:
    """(runs, tasks) -> (reps, runs, tasks): each task's runs resampled with replacement."""
    runs, tasks = x.shape
    idx = rng.integers(0, runs, size=(reps, runs, tasks))
    return x[idx, np.arange(tasks)[None, None, :]]


def percentile_ci(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    alpha = 100 * (1 - level) / 2
    low, high = np.percentile(replicates, [alpha, 100 - alpha])
    return float(low), float(high)


def iqm_with_ci(scores, reps: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """{"iqm", "ci_low", "ci_high"} with a stratified bootstrap percentile interval."""
    x = _as_matrix(scores)
    replicates = stratified_resample(x, reps, np.random.default_rng(seed))  # (reps, runs, tasks)
    stats = _iqm_last_axis(replicates.reshape(reps, -1))  # (reps,)
    low, high = percentile_ci(stats, level)
    return {"iqm": iqm(x), "ci_low": low, "ci_high": high}


def iqm_curve(scores_over_time, reps: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """(runs, points) -> {"iqm", "ci_low", "ci_high"}: lists, one entry per evaluation point."""
    x = np.asarray(scores_over_time, dtype=np.float64)
    per_point = [iqm_with_ci(x[:, j], reps, seed, level) for j in range(x.shape[1])]
    return {key: [p[key] for p in per_point] for key in ("iqm", "ci_low", "ci_high")}


def probability_of_improvement(x_scores, y_scores) -> float:
    """P(X > Y) + 0.5 P(X = Y) over all run pairs, averaged over tasks: the Mann-Whitney U statistic
    of X divided by N * M."""
    x, y = _as_matrix(x_scores), _as_matrix(y_scores)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y need the same number of tasks, got {x.shape[1]} and {y.shape[1]}")
    greater = (x[:, None, :] > y[None, :, :]).mean(axis=(0, 1))  # (tasks,)
    equal = (x[:, None, :] == y[None, :, :]).mean(axis=(0, 1))
    return float(np.mean(greater + 0.5 * equal))


def probability_of_improvement_with_ci(
    x_scores, y_scores, reps: int = 2000, seed: int = 0, level: float = 0.95
) -> dict:
    """{"poi", "ci_low", "ci_high"}; X and Y runs are resampled independently (stratified by task)."""
    x, y = _as_matrix(x_scores), _as_matrix(y_scores)
    rng = np.random.default_rng(seed)
    xs, ys = stratified_resample(x, reps, rng), stratified_resample(y, reps, rng)
    greater = (xs[:, :, None, :] > ys[:, None, :, :]).mean(axis=(1, 2))  # (reps, tasks)
    equal = (xs[:, :, None, :] == ys[:, None, :, :]).mean(axis=(1, 2))
    low, high = percentile_ci((greater + 0.5 * equal).mean(axis=1), level)
    return {"poi": probability_of_improvement(x, y), "ci_low": low, "ci_high": high}


def performance_profile(scores, thresholds) -> np.ndarray:
    """Fraction of runs (pooled over tasks) whose score is strictly above each threshold."""
    x = np.asarray(scores, dtype=np.float64).ravel()
    tau = np.asarray(thresholds, dtype=np.float64)
    return (x[None, :] > tau[:, None]).mean(axis=1)


def performance_profile_with_ci(
    scores, thresholds, reps: int = 2000, seed: int = 0, level: float = 0.95
) -> dict:
    """{"fraction", "ci_low", "ci_high"}: lists over thresholds, bootstrap over runs."""
    x = _as_matrix(scores)
    replicates = stratified_resample(x, reps, np.random.default_rng(seed)).reshape(reps, -1)
    tau = np.asarray(thresholds, dtype=np.float64)
    fractions = (replicates[:, None, :] > tau[None, :, None]).mean(axis=2)  # (reps, thresholds)
    alpha = 100 * (1 - level) / 2
    low, high = np.percentile(fractions, [alpha, 100 - alpha], axis=0)
    return {
        "fraction": performance_profile(x, tau).tolist(),
        "ci_low": low.tolist(),
        "ci_high": high.tolist(),
    }


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float], scores, reps: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Generic stratified-bootstrap percentile interval for any statistic of a (runs, tasks) matrix."""
    x = _as_matrix(scores)
    replicates = stratified_resample(x, reps, np.random.default_rng(seed))
    return percentile_ci(np.array([statistic(r) for r in replicates]), level)
