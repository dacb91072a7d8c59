"""Statistics of the channel-importance study, pure numpy/scipy: folds, clusters, rank stability, reports.

Kept apart from importance.py so each piece is tested on made-up numbers (no images, no backbone).
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from scipy.stats import hypergeom, spearmanr
from sklearn.model_selection import KFold, StratifiedKFold

from common import UserError


def repeated_folds(
    n_train: int, test_types: list[str], n_folds: int, n_repeats: int, seed: int
) -> list[dict]:
    """Repeated k-fold: n_repeats different shuffles of n_folds folds each.

    Fold (r, k) fits on the other train/good folds of shuffle r and validates on test fold k of shuffle r
    (stratified by defect type). Returns [{"repeat", "fold", "fit": train indices, "val": test indices}].
    """
    counts = {t: test_types.count(t) for t in set(test_types)}
    if min(counts.values()) < n_folds:
        raise UserError(
            f"every test type needs at least {n_folds} images for {n_folds}-fold stratified CV "
            f"(have {counts}); lower --folds"
        )
    if n_train < 2 * n_folds:
        raise UserError(f"{n_train} training images are too few for {n_folds} folds")
    folds = []
    for r in range(n_repeats):
        train = KFold(n_folds, shuffle=True, random_state=seed + 1000 * r).split(np.zeros(n_train))
        test = StratifiedKFold(n_folds, shuffle=True, random_state=seed + 1000 * r).split(
            np.zeros(len(test_types)), test_types
        )
        for k, ((fit, _), (_, val)) in enumerate(zip(train, test)):
            folds.append({"repeat": r, "fold": k, "fit": fit, "val": val})
    return folds


def split_halves(test_types: list[str], n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """n_splits random splits of the test images into two disjoint halves, stratified by defect type.

    Split s is scikit-learn's 2-fold StratifiedKFold shuffled with seed + 1000 s: every type is divided
    as evenly as it can be, and the halves of one split share no image. Returns [(half_a, half_b)].
    """
    counts = {t: test_types.count(t) for t in set(test_types)}
    if min(counts.values()) < 2:
        raise UserError(
            f"every test type needs at least 2 images to split the test set in halves (have {counts})"
        )
    splits = []
    for s in range(n_splits):
        halves = StratifiedKFold(2, shuffle=True, random_state=seed + 1000 * s).split(
            np.zeros(len(test_types)), test_types
        )
        (_, a), (_, b) = halves
        splits.append((a, b))
    return splits


def cluster_channels(activations: np.ndarray, threshold: float) -> np.ndarray:
    """Hierarchical clusters of correlated channels: activations (n_patches, C) -> labels (C,), 0-based.

    Distance = 1 - |Spearman rho| between channels, average linkage, cut at `threshold` (0.5 joins
    channels whose average |rho| is at least 0.5), as scikit-learn's guide to permutation importance
    with multicollinear features does. A constant channel is its own cluster.
    """
    n_channels = activations.shape[1]
    if n_channels == 1:
        return np.zeros(1, dtype=int)
    rho = spearmanr(activations).statistic if n_channels > 2 else np.array([[1.0, 0.0], [0.0, 1.0]])
    if n_channels == 2:
        rho[0, 1] = rho[1, 0] = spearmanr(activations[:, 0], activations[:, 1]).statistic
    rho = np.nan_to_num(np.asarray(rho, dtype=np.float64), nan=0.0)
    distance = 1.0 - np.abs(rho)
    np.fill_diagonal(distance, 0.0)
    distance = (distance + distance.T) / 2
    tree = linkage(squareform(distance, checks=False), method="average")
    return fcluster(tree, t=threshold, criterion="distance") - 1


def rank_of(importance: np.ndarray) -> np.ndarray:
    """Rank 1 = most important; ties broken by index (stable)."""
    order = np.argsort(-importance, kind="stable")
    ranks = np.empty(len(importance), dtype=int)
    ranks[order] = np.arange(1, len(importance) + 1)
    return ranks


def stability(per_fold: np.ndarray, top: int = 10, pairs: list | None = None) -> dict:
    """Agreement of the rankings of pairs of folds: per_fold (F, C) importances.

    spearman: rank correlation of the two importance vectors; top10_overlap: channels shared by the
    two top-`top` sets (0..top). `pairs` defaults to every pair (itertools.combinations order).
    """
    pairs = list(itertools.combinations(range(len(per_fold)), 2)) if pairs is None else pairs
    rhos, overlaps = [], []
    for a, b in pairs:
        with warnings.catch_warnings():  # a constant vector (no channel changed the AUROC) -> nan
            warnings.simplefilter("ignore")
            rhos.append(float(spearmanr(per_fold[a], per_fold[b]).statistic))
        top_a = set(np.argsort(-per_fold[a], kind="stable")[:top].tolist())
        top_b = set(np.argsort(-per_fold[b], kind="stable")[:top].tolist())
        overlaps.append(len(top_a & top_b))
    return {
        "pairs": [list(p) for p in pairs],
        "spearman": rhos,
        f"top{top}_overlap": overlaps,
        "spearman_mean": _quiet(np.nanmean, rhos),
        "spearman_min": _quiet(np.nanmin, rhos),
        "spearman_max": _quiet(np.nanmax, rhos),
        "spearman_std": _quiet(np.nanstd, rhos),
        f"top{top}_overlap_mean": float(np.mean(overlaps)) if overlaps else float("nan"),
        f"top{top}_overlap_min": int(np.min(overlaps)) if overlaps else None,
    }


def same_shuffle_pairs(folds: list[dict]) -> list[list[int]]:
    """Pairs of folds of one shuffle: their validation images are disjoint (and their fit sets differ)."""
    return [
        [a, b]
        for a, b in itertools.combinations(range(len(folds)), 2)
        if folds[a]["repeat"] == folds[b]["repeat"]
    ]


def _quiet(reduce, values) -> float:
    """nan-aware mean/min that is nan (without a warning) when every value is nan."""
    finite = [v for v in values if np.isfinite(v)]
    return float(reduce(finite)) if finite else float("nan")


def bootstrap_rank_ci(per_fold: np.ndarray, n_boot: int, seed: int, level: float = 0.95) -> np.ndarray:
    """(C, 2) percentile interval of each channel's rank when the folds are resampled with replacement.

    The folds of different shuffles share images, so this interval is narrower than one from
    independent data sets would be; it shows which ranks the folds agree on, not a population CI.
    """
    rng = np.random.default_rng(seed)
    n_folds = len(per_fold)
    ranks = np.stack(
        [rank_of(per_fold[rng.integers(0, n_folds, n_folds)].mean(axis=0)) for _ in range(n_boot)]
    )
    tail = (1 - level) / 2 * 100
    return np.percentile(ranks, [tail, 100 - tail], axis=0).T


def percentile_of(value: float, distribution) -> float:
    """Where `value` falls among `distribution`, 0-100: share below it, ties counted half."""
    d = np.asarray(distribution, dtype=np.float64)
    return float(100 * ((d < value).sum() + 0.5 * (d == value).sum()) / len(d))


def chance_overlap(n: int, k: int, observed: int) -> dict:
    """Two random k-subsets of n channels share k*k/n channels on average (hypergeometric).

    Returns the expectation, the central 95% range and P(overlap >= observed) under independence.
    """
    law = hypergeom(n, k, k)  # population n, k marked (one class's top-k), k drawn (the other's)
    return {
        "observed": int(observed),
        "expected": k * k / n,
        "range95": [int(law.ppf(0.025)), int(law.ppf(0.975))],
        "p_at_least": float(law.sf(observed - 1)),
    }


def jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else float("nan")


def cross_class_report(
    per_class: dict[str, dict], top: int = 10, top_clusters: int = 3, ks: tuple[int, ...] = (10, 25, 50)
) -> dict:
    """How much classes agree on what matters.

    per_class[name] = {"importance": {channel index: score} over the same channels, "clusters": [[channel
    indices], ...] ordered most important first, "layers": {layer: score}}. Per class pair: Jaccard of the
    top-`top` channels, Spearman of the channel scores, Jaccard of the channels in the top-`top_clusters`
    clusters, and for every k the top-k overlap against what two random k-sets would share
    (`chance_overlap`); per class: the layers ordered by importance.
    """
    names = sorted(per_class)
    pairs = {}
    for a, b in itertools.combinations(names, 2):
        ia, ib = per_class[a]["importance"], per_class[b]["importance"]
        shared = sorted(set(ia) & set(ib))
        top_a = sorted(ia, key=lambda c: -ia[c])[:top]
        top_b = sorted(ib, key=lambda c: -ib[c])[:top]
        clusters_a = {c for cluster in per_class[a]["clusters"][:top_clusters] for c in cluster}
        clusters_b = {c for cluster in per_class[b]["clusters"][:top_clusters] for c in cluster}
        rho = (
            spearmanr([ia[c] for c in shared], [ib[c] for c in shared]).statistic if len(shared) > 2 else None
        )
        order_a = sorted(shared, key=lambda c: -ia[c])
        order_b = sorted(shared, key=lambda c: -ib[c])
        overlap = {
            str(k): chance_overlap(len(shared), k, len(set(order_a[:k]) & set(order_b[:k])))
            for k in ks
            if k < len(shared)
        }
        pairs[f"{a}|{b}"] = {
            "topk_overlap": overlap,
            f"top{top}_jaccard": jaccard(top_a, top_b),
            "spearman": None if rho is None else float(rho),
            f"top{top_clusters}_clusters_jaccard": jaccard(clusters_a, clusters_b),
            "shared_channels": len(shared),
        }
    layers = {
        name: sorted(per_class[name]["layers"], key=lambda k: -per_class[name]["layers"][k]) for name in names
    }
    return {"classes": names, "pairs": pairs, "layers_by_importance": layers}


def heldout_summary(top, bottom, random) -> dict:
    """Top-k and bottom-k chosen on one half, scored on the other, placed among random k-subsets.

    top, bottom: (E,) a metric on E held-out evaluations (splits x directions); random: (n_random, E),
    the same random subsets scored on the same halves. `percentile` places top-k's mean over the
    evaluations among the random subsets' means; per evaluation, top-k is placed among the random
    subsets scored on that half. With n random subsets a percentile moves in steps of 100 / n, and
    "above all of them" means p < 1 / (n + 1) at best.
    """
    top, bottom, random = (np.asarray(x, dtype=np.float64) for x in (top, bottom, random))
    random_means = random.mean(axis=1)
    per_evaluation = [percentile_of(top[e], random[:, e]) for e in range(len(top))]
    p95 = np.percentile(random, 95, axis=0)  # (E,)
    return {
        "top": float(top.mean()),
        "bottom": float(bottom.mean()),
        "random_mean": float(random_means.mean()),
        "random_std": float(random_means.std(ddof=1)) if len(random_means) > 1 else 0.0,
        "random_p95": float(np.percentile(random_means, 95)),
        "percentile": percentile_of(top.mean(), random_means),
        "percentile_min": float(min(per_evaluation)),
        "evaluations_above_p95": int((top > p95).sum()),
        "n_evaluations": len(top),
        "n_random": len(random_means),
        "resolution": 100 / len(random_means),
        "top_values": top.tolist(),
        "bottom_values": bottom.tolist(),
        "random_values": random_means.tolist(),
    }
