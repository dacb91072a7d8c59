"""bbf_lunar statistics: IQM, stratified bootstrap CIs, probability of improvement, profiles."""

import importlib.util
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
    x = np.random.default_rng(n).normal(size=(n, 2)) * 100
    assert S.iqm(x) == pytest.approx(scipy.stats.trim_mean(x, 0.25, axis=None))


def test_iqm_ci_on_hand_computable_arrays():
    assert S.iqm_with_ci([5, 5, 5, 5]) == {"iqm": 5.0, "ci_low": 5.0, "ci_high": 5.0}
    # two runs {0, 1}: resampled IQMs are 0, .5, 1 with probabilities 1/4, 1/2, 1/4 -> 95% CI [0, 1]
    assert S.iqm_with_ci([0, 1], reps=4000, seed=1) == {"iqm": 0.5, "ci_low": 0.0, "ci_high": 1.0}
    ci = S.iqm_with_ci([0, 1], reps=4000, seed=1, level=0.4)  # central 40%: only 0.5 lies there
    assert ci["ci_low"] == ci["ci_high"] == 0.5


def test_iqm_ci_agrees_with_scipy_bootstrap_and_is_seeded():
    x = np.random.default_rng(3).normal(100, 50, size=12)
    ours = S.iqm_with_ci(x, reps=20000, seed=0)
    theirs = scipy.stats.bootstrap(
        (x,),
        lambda s, axis: scipy.stats.trim_mean(s, 0.25, axis=axis),
        n_resamples=20000,
        method="percentile",
        random_state=0,
    ).confidence_interval
    assert ours["ci_low"] == pytest.approx(theirs.low, abs=4.0)  # Monte Carlo error of two bootstraps
    assert ours["ci_high"] == pytest.approx(theirs.high, abs=4.0)
    assert ours["ci_low"] < ours["iqm"] < ours["ci_high"]
    assert S.iqm_with_ci(x, reps=500, seed=5) == S.iqm_with_ci(x, reps=500, seed=5)


def test_stratified_resampling_stays_within_each_task():
    x = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    r = S.stratified_resample(x, 50, np.random.default_rng(0))
    assert r.shape == (50, 3, 2)
    assert set(np.unique(r[:, :, 0])) <= {1.0, 2.0, 3.0} and set(np.unique(r[:, :, 1])) <= {10.0, 20.0, 30.0}


def test_iqm_curve_is_pointwise():
    x = np.array([[0.0, 10.0], [0.0, 20.0], [0.0, 30.0], [0.0, 40.0]])
    c = S.iqm_curve(x, reps=200)
    assert c["iqm"] == [0.0, 25.0] and c["ci_low"][0] == c["ci_high"][0] == 0.0


def test_probability_of_improvement_known_cases():
    assert S.probability_of_improvement([5, 6, 7], [1, 2]) == 1.0
    assert S.probability_of_improvement([1, 2], [5, 6, 7]) == 0.0
    assert S.probability_of_improvement([3, 3], [3, 3, 3]) == 0.5  # ties count half
    assert S.probability_of_improvement([1, 3], [2, 2]) == 0.5
    assert S.probability_of_improvement([1, 2, 3], [2]) == 0.5  # 1/3 greater + 1/2 * 1/3 equal
    assert S.probability_of_improvement([4, 1], [0, 2, 3]) == pytest.approx(4 / 6)


def test_probability_of_improvement_is_mann_whitney_u_over_nm():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 10, size=7).astype(float), rng.integers(0, 10, size=5).astype(float)  # with ties
    u = scipy.stats.mannwhitneyu(x, y).statistic
    assert S.probability_of_improvement(x, y) == pytest.approx(u / (7 * 5))


def test_probability_of_improvement_ci():
    p = S.probability_of_improvement_with_ci([5, 6, 7], [1, 2], reps=300)
    assert p == {"poi": 1.0, "ci_low": 1.0, "ci_high": 1.0}
    rng = np.random.default_rng(1)
    p = S.probability_of_improvement_with_ci(rng.normal(1, 1, 10), rng.normal(0, 1, 10), reps=2000)
    assert 0 <= p["ci_low"] <= p["poi"] <= p["ci_high"] <= 1 and p["ci_high"] - p["ci_low"] > 0.1


def test_performance_profile_counts_runs_strictly_above():
    scores = [0, 10, 20, 30]
    assert S.performance_profile(scores, [-1, 5, 10, 30]).tolist() == [1.0, 0.75, 0.5, 0.0]
    p = S.performance_profile_with_ci(scores, [-1, 100], reps=200)
    assert p["fraction"] == [1.0, 0.0] and p["ci_low"] == [1.0, 0.0] and p["ci_high"] == [1.0, 0.0]


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="runs"):
        S.iqm_with_ci([])
    with pytest.raises(ValueError, match="tasks"):
        S.probability_of_improvement(np.ones((3, 2)), np.ones((3, 1)))
