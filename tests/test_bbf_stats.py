"""bbf_lunar statistics: IQM, exact and Monte-Carlo bootstrap intervals, probability of improvement
with pair counts and Newcombe's interval, performance profiles."""

import importlib.util
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

BBF_DIR = Path(__file__).resolve().parent.parent / "bbf_lunar"


def _load(name: str, file: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BBF_DIR / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


S = _load("bbf_lunar_stats", "stats.py")


def test_iqm_hand_computed():
    assert S.iqm([1, 2, 3, 4, 5, 6, 7, 8]) == 4.5  # drops 1, 2 and 7, 8
    assert S.iqm([100, 3, 1, 4, 2]) == 3.0  # 5 runs: floor(1.25) = 1 dropped each side -> mean(2, 3, 4)
    assert S.iqm([7.0]) == 7.0 and S.iqm([1, 3]) == 2.0 and S.iqm([1, 2, 3, 10]) == 2.5


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 10, 13, 40])
def test_iqm_matches_scipy_trim_mean(n):
    x = np.random.default_rng(n).normal(size=n) * 100
    assert S.iqm(x) == pytest.approx(scipy.stats.trim_mean(x, 0.25))


def test_exact_resamples_are_every_multiset_with_its_multinomial_probability():
    idx, w = S.resamples(5, 10, np.random.default_rng(0))
    assert len(idx) == S.resample_count(5) == math.comb(9, 5) == 126 and w.sum() == pytest.approx(1.0)
    # oracle: all 5**5 ordered draws, each with probability 5**-5, grouped by their sorted tuple
    ordered = {}
    for draw in itertools.product(range(5), repeat=5):
        key = tuple(sorted(draw))
        ordered[key] = ordered.get(key, 0) + 5**-5
    assert {tuple(r): p for r, p in zip(idx.tolist(), w)} == pytest.approx(ordered)
    assert S.resample_count(10) == 92_378 <= S.EXACT_LIMIT < S.resample_count(11)


def test_exact_iqm_interval_equals_brute_force_over_all_ordered_resamples():
    x = np.array([-40.0, 3.0, 100.0, 150.0, 220.0])
    values = [S.iqm(x[list(d)]) for d in itertools.product(range(5), repeat=5)]
    expected_low, expected_high = np.percentile(values, [2.5, 97.5], method="inverted_cdf")
    ci = S.iqm_with_ci(x)
    assert ci["exact"] and ci["iqm"] == S.iqm(x)
    assert (ci["ci_low"], ci["ci_high"]) == pytest.approx((expected_low, expected_high))


def test_two_runs_hand_computable_interval():
    # two runs {0, 1}: resampled IQMs 0, .5, 1 with probabilities 1/4, 1/2, 1/4
    assert S.iqm_with_ci([0, 1]) == {"iqm": 0.5, "ci_low": 0.0, "ci_high": 1.0, "exact": True}
    ci = S.iqm_with_ci([0, 1], level=0.4)  # central 40%: only 0.5 lies there
    assert ci["ci_low"] == ci["ci_high"] == 0.5
    assert S.iqm_with_ci([5, 5, 5, 5])["ci_low"] == 5.0


def test_monte_carlo_path_for_many_runs_agrees_with_scipy_and_is_seeded():
    x = np.random.default_rng(3).normal(100, 50, size=12)  # C(23, 12) > EXACT_LIMIT: random resamples
    ours = S.iqm_with_ci(x, reps=20_000, seed=0)
    theirs = scipy.stats.bootstrap(
        (x,),
        lambda s, axis: scipy.stats.trim_mean(s, 0.25, axis=axis),
        n_resamples=20_000,
        method="percentile",
        random_state=0,
    ).confidence_interval
    assert not ours["exact"]
    assert ours["ci_low"] == pytest.approx(theirs.low, abs=4.0)  # Monte Carlo error of two bootstraps
    assert ours["ci_high"] == pytest.approx(theirs.high, abs=4.0)
    assert S.iqm_with_ci(x, reps=500, seed=5) == S.iqm_with_ci(x, reps=500, seed=5)


def test_iqm_curve_is_pointwise():
    x = np.array([[0.0, 10.0], [0.0, 20.0], [0.0, 30.0], [0.0, 40.0]])
    c = S.iqm_curve(x)
    assert c["iqm"] == [0.0, 25.0] and c["ci_low"][0] == c["ci_high"][0] == 0.0


def test_probability_of_improvement_known_cases():
    assert S.probability_of_improvement([5, 6, 7], [1, 2]) == 1.0
    assert S.probability_of_improvement([1, 2], [5, 6, 7]) == 0.0
    assert S.probability_of_improvement([3, 3], [3, 3, 3]) == 0.5  # ties count half
    assert S.probability_of_improvement([1, 2, 3], [2]) == 0.5  # 1/3 greater + 1/2 * 1/3 equal
    assert S.probability_of_improvement([4, 1], [0, 2, 3]) == pytest.approx(4 / 6)


def test_probability_of_improvement_is_mann_whitney_u_over_nm():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 10, size=7).astype(float), rng.integers(0, 10, size=5).astype(float)  # with ties
    u = scipy.stats.mannwhitneyu(x, y).statistic
    assert S.probability_of_improvement(x, y) == pytest.approx(u / (7 * 5))


def test_exact_poi_interval_equals_brute_force_and_reports_pairs():
    x, y = np.array([5.0, 1.0, 7.0]), np.array([2.0, 5.0, 3.0])
    values = [
        S.probability_of_improvement(x[list(a)], y[list(b)])
        for a in itertools.product(range(3), repeat=3)
        for b in itertools.product(range(3), repeat=3)
    ]
    expected = np.percentile(values, [2.5, 97.5], method="inverted_cdf")
    p = S.probability_of_improvement_with_ci(x, y)
    assert p["exact"] and (p["ci_low"], p["ci_high"]) == pytest.approx(tuple(expected))
    assert (p["pairs_won"], p["pairs_tied"], p["pairs"]) == (5, 1, 9) and p["poi"] == pytest.approx(5.5 / 9)


def test_every_pair_won_gives_a_degenerate_bootstrap_but_an_honest_newcombe_interval():
    p = S.probability_of_improvement_with_ci([5, 6, 7, 8, 9], [1, 2, 3, 4, 4.5])
    assert p["poi"] == 1.0 and p["ci_low"] == p["ci_high"] == 1.0  # the bootstrap cannot see beyond
    assert p["pairs_won"] == 25 and 0.5 < p["newcombe_low"] < 0.9 and p["newcombe_high"] == 1.0


def test_newcombe_interval_properties():
    low, high = S.newcombe_interval(0.5, 10, 10)
    assert low == pytest.approx(1 - high) and low < 0.5 < high  # symmetric around 1/2
    for p in (0.0, 0.3, 0.8, 1.0):
        lo, hi = S.newcombe_interval(p, 8, 8)
        assert lo <= p <= hi and hi - lo > 0.05
        lo2, hi2 = S.newcombe_interval(p, 40, 40)
        assert hi2 - lo2 < hi - lo  # more runs, narrower
    assert S.newcombe_interval(0.0, 5, 5)[0] == 0.0 and S.newcombe_interval(0.0, 5, 5)[1] > 0.1


def test_performance_profile_counts_runs_strictly_above():
    scores = [0, 10, 20, 30]
    assert S.performance_profile(scores, [-1, 5, 10, 30]).tolist() == [1.0, 0.75, 0.5, 0.0]
    p = S.performance_profile_with_ci(scores, [-1, 100, 15])
    assert (
        p["fraction"] == [1.0, 0.0, 0.5] and p["ci_low"][:2] == [1.0, 0.0] and p["ci_high"][:2] == [1.0, 0.0]
    )
    assert p["ci_low"][2] == 0.0 and p["ci_high"][2] == 1.0  # 4 runs: any resample fraction can occur


def test_empty_scores_are_rejected():
    with pytest.raises(ValueError, match="at least one run"):
        S.iqm_with_ci([])
