"""The importance study's statistics on made-up numbers: folds, clusters, stability, percentiles, classes."""

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import hypergeom, spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "padim_anomaly"))

import study  # noqa: E402


def test_repeated_folds_partition_each_shuffle_and_differ_between_shuffles():
    types = ["good"] * 9 + ["crack"] * 6 + ["hole"] * 6
    folds = study.repeated_folds(30, types, n_folds=3, n_repeats=2, seed=0)
    assert [(f["repeat"], f["fold"]) for f in folds] == [(r, k) for r in range(2) for k in range(3)]
    for r in range(2):
        shuffle = [f for f in folds if f["repeat"] == r]
        vals = np.concatenate([f["val"] for f in shuffle])
        assert sorted(vals.tolist()) == list(range(len(types)))  # every test image validated once
        for f in shuffle:  # stratified: each type split evenly
            assert sorted(types[i] for i in f["val"]).count("crack") == 2
            assert len(f["fit"]) == 20  # the other two train folds
    assert not np.array_equal(folds[0]["val"], folds[3]["val"])
    with pytest.raises(study.UserError, match="lower --folds"):
        study.repeated_folds(30, ["good"] * 5 + ["crack"] * 2, n_folds=3, n_repeats=1, seed=0)


def test_clusters_recover_groups_of_correlated_channels():
    rng = np.random.default_rng(0)
    sources = rng.normal(size=(2000, 3))
    # channels 0-2 follow source 0 (one through a monotone map: Spearman sees it as perfect), 3-4 source 1,
    # 5 source 2, 6 is noise of its own
    columns = [
        sources[:, 0],
        np.exp(sources[:, 0]),
        sources[:, 0] + 0.3 * rng.normal(size=2000),
        sources[:, 1],
        -sources[:, 1] + 0.3 * rng.normal(size=2000),  # anti-correlated counts too (|rho|)
        sources[:, 2],
        rng.normal(size=2000),
    ]
    labels = study.cluster_channels(np.stack(columns, axis=1), threshold=0.5)
    assert labels[0] == labels[1] == labels[2]
    assert labels[3] == labels[4] != labels[0]
    assert len({labels[5], labels[6], labels[0], labels[3]}) == 4


def test_stability_and_bootstrap_intervals():
    base = np.arange(20, dtype=float)[::-1]  # channel 0 most important
    same = study.stability(np.stack([base, base, base]), top=10)
    assert same["spearman"] == [1.0, 1.0, 1.0] and same["top10_overlap"] == [10, 10, 10]
    flipped = study.stability(np.stack([base, base[::-1]]), top=10)
    assert flipped["spearman"] == [pytest.approx(-1.0)] and flipped["top10_overlap"] == [0]
    rng = np.random.default_rng(1)
    noisy = np.stack([base + rng.normal(scale=3, size=20) for _ in range(4)])
    got = study.stability(noisy, top=10)
    assert got["pairs"] == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    assert got["spearman"][1] == pytest.approx(spearmanr(noisy[0], noisy[2]).statistic)
    top = set(np.argsort(-noisy[1])[:10]) & set(np.argsort(-noisy[3])[:10])
    assert got["top10_overlap"][4] == len(top)
    # a channel far ahead in every fold has the interval [1, 1]; a middling one a wide interval
    per_fold = np.stack([base + rng.normal(scale=1, size=20) for _ in range(6)])
    per_fold[:, 0] += 100
    interval = study.bootstrap_rank_ci(per_fold, n_boot=200, seed=0)
    assert interval.shape == (20, 2) and tuple(interval[0]) == (1.0, 1.0)
    assert (interval[:, 0] <= interval[:, 1]).all() and (interval[:, 1] - interval[:, 0]).max() >= 1


def test_rank_and_percentile():
    assert study.rank_of(np.array([0.1, 0.5, 0.3])).tolist() == [3, 1, 2]
    assert study.percentile_of(5, [1, 2, 3, 4]) == 100.0
    assert study.percentile_of(2, [1, 2, 3, 4]) == pytest.approx(37.5)  # one below, one tie (half)
    assert study.percentile_of(0, [1, 2, 3, 4]) == 0.0


def test_cross_class_report_on_made_up_classes():
    channels = list(range(12))
    a = {c: 12 - c for c in channels}  # top 3: 0, 1, 2
    b = {c: 12 - c if c != 2 else -5 for c in channels}  # top 3: 0, 1, 3
    c_ = {c: c for c in channels}  # reversed: top 3: 11, 10, 9
    per_class = {
        "widget": {
            "importance": a,
            "clusters": [[0, 1], [2], [3, 4]],
            "layers": {"layer1": 0.1, "layer3": 0.3},
        },
        "gadget": {"importance": b, "clusters": [[0, 1], [3, 4]], "layers": {"layer1": 0.5, "layer3": 0.2}},
        "gizmo": {"importance": c_, "clusters": [[11], [10, 9]], "layers": {"layer1": 0.0, "layer3": 0.1}},
    }
    report = study.cross_class_report(per_class, top=3, top_clusters=2)
    assert report["classes"] == ["gadget", "gizmo", "widget"]
    pair = report["pairs"]["gadget|widget"]
    assert pair["top3_jaccard"] == pytest.approx(2 / 4)  # {0,1,3} vs {0,1,2}
    assert pair["top2_clusters_jaccard"] == pytest.approx(2 / 5)  # {0,1,3,4} vs {0,1,2}
    assert pair["spearman"] == pytest.approx(
        spearmanr([a[c] for c in channels], [b[c] for c in channels]).statistic
    )
    assert report["pairs"]["gizmo|widget"]["spearman"] == pytest.approx(-1.0)
    assert report["pairs"]["gizmo|widget"]["top3_jaccard"] == 0.0
    overlap = study.cross_class_report(per_class, ks=(3, 5))["pairs"]["gadget|widget"]["topk_overlap"]
    assert overlap["3"]["observed"] == 2 and overlap["5"]["observed"] == 4  # {0,1,3,4,5} vs {0,1,2,3,4}
    assert overlap["3"]["expected"] == pytest.approx(9 / 12)
    assert report["layers_by_importance"] == {
        "gadget": ["layer1", "layer3"],
        "gizmo": ["layer3", "layer1"],
        "widget": ["layer3", "layer1"],
    }


def test_split_halves_are_disjoint_stratified_and_differ_between_splits():
    types = ["good"] * 10 + ["crack"] * 7 + ["hole"] * 4
    splits = study.split_halves(types, n_splits=4, seed=0)
    assert len(splits) == 4
    for a, b in splits:
        assert not set(a) & set(b) and sorted([*a, *b]) == list(range(len(types)))
        for t in ("good", "crack", "hole"):  # each type divided as evenly as it can be
            n_a, n_b = (sum(types[i] == t for i in half) for half in (a, b))
            assert abs(n_a - n_b) <= 1
    assert len({tuple(sorted(a)) for a, _ in splits}) == 4
    with pytest.raises(study.UserError, match="at least 2 images"):
        study.split_halves(["good"] * 4 + ["crack"], n_splits=1, seed=0)


def test_stability_on_chosen_pairs_and_same_shuffle_pairs():
    folds = [{"repeat": r, "fold": k} for r in range(2) for k in range(3)]
    pairs = study.same_shuffle_pairs(folds)
    assert pairs == [[0, 1], [0, 2], [1, 2], [3, 4], [3, 5], [4, 5]]  # no pair across shuffles
    rng = np.random.default_rng(2)
    values = rng.normal(size=(6, 15))
    got = study.stability(values, pairs=pairs)
    expected = [spearmanr(values[a], values[b]).statistic for a, b in pairs]
    assert got["spearman"] == pytest.approx(expected)
    assert got["spearman_min"] == pytest.approx(min(expected))
    assert got["spearman_mean"] == pytest.approx(np.mean(expected))


def test_chance_overlap_is_the_hypergeometric_law():
    got = study.chance_overlap(100, 10, 3)
    assert got["expected"] == pytest.approx(1.0)  # 10 * 10 / 100
    brute = sum(hypergeom(100, 10, 10).pmf(x) for x in range(3, 11))
    assert got["p_at_least"] == pytest.approx(brute)
    assert got["range95"][0] <= 1 <= got["range95"][1]
    # simulation as an independent oracle: two random 10-sets of 100 share >= 3 channels this often
    rng = np.random.default_rng(3)
    shared = [len(set(rng.choice(100, 10, replace=False)) & set(range(10))) for _ in range(20000)]
    assert np.mean(np.array(shared) >= 3) == pytest.approx(got["p_at_least"], abs=0.01)
    assert study.chance_overlap(100, 10, 0)["p_at_least"] == pytest.approx(1.0)


def test_heldout_summary_places_top_among_random_subsets():
    rng = np.random.default_rng(4)
    random = rng.normal(0.9, 0.01, size=(100, 6))  # 100 random subsets on 6 held-out halves
    top = random.max(axis=0) + 0.001  # above every random subset on every half
    bottom = random.min(axis=0) - 0.001
    got = study.heldout_summary(top, bottom, random)
    assert got["percentile"] == 100.0 and got["percentile_min"] == 100.0
    assert got["evaluations_above_p95"] == 6 and got["n_evaluations"] == 6
    assert got["resolution"] == 1.0 and got["n_random"] == 100
    assert got["random_p95"] == pytest.approx(np.percentile(random.mean(axis=1), 95))
    assert got["top"] == pytest.approx(top.mean()) and got["bottom"] == pytest.approx(bottom.mean())
    middling = study.heldout_summary(np.median(random, axis=0), bottom, random)
    assert (
        30 < middling["percentile_min"] <= middling["percentile"] + 20
        and middling["evaluations_above_p95"] == 0
    )
