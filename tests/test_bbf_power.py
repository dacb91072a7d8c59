"""bbf_lunar/power.py: seeds per variant needed to resolve an effect of the observed size."""

import json
import sys
from statistics import NormalDist

import numpy as np
import pytest
import scipy.stats
from conftest import REPO, run_script

sys.path.insert(0, str(REPO / "bbf_lunar"))
import power  # noqa: E402
import stats  # noqa: E402

SUMMARY = REPO / "bbf_lunar/results/ablation_curves.json"
POWER = REPO / "bbf_lunar/results/ablation_seed_power.json"
# two made-up score sets with P(X > Y) = 0.68, no ties between them
X = np.array([245.5, 209.5, 276.5, 224.5, 191.5, 262.5, 219.5, 236.5, 166.5, 254.5])
Y = np.array([196.0, 232.0, 224.0, 177.5, 204.0, 183.0, 246.0, 230.0, 200.0, 211.0])


def test_deterministic_with_a_fixed_generator_and_nested_over_n():
    a = power.resolved_fractions(X, Y, seed_counts=(10, 20, 40), sims=200, seed=5)
    assert a == power.resolved_fractions(X, Y, seed_counts=(10, 20, 40), sims=200, seed=5)
    assert a != power.resolved_fractions(X, Y, seed_counts=(10, 20, 40), sims=200, seed=6)
    # draws are nested: a shorter list of seed counts gives the same numbers for the counts it has
    b = power.resolved_fractions(X, Y, seed_counts=(10, 20), sims=200, seed=5)
    assert b["resolved"] == a["resolved"][:2] and b["mean_poi"] == a["mean_poi"][:2]


def test_a_huge_effect_needs_the_fewest_seeds():
    r = power.seed_power(X + 1000, Y, seed_counts=(10, 15, 20), sims=100)
    assert r["observed_poi"] == 1.0 and r["resolved"] == [1.0, 1.0, 1.0]
    assert r["seeds_needed"] == 10 and not r["spans_half"]
    # the same effect the other way round is resolved on the other side
    assert power.seed_power(Y, X + 1000, seed_counts=(10,), sims=50)["seeds_needed"] == 10


def test_no_effect_is_never_resolved_within_the_cap():
    r = power.seed_power(Y, Y.copy(), sims=200)
    assert r["observed_poi"] == 0.5 and r["seeds_needed"] is None
    assert max(r["resolved"]) < 0.1  # the interval's false-positive rate, about 5%, at every n


def test_resolved_fraction_grows_with_n():
    r = power.resolved_fractions(X, Y, seed_counts=(10, 20, 40, 80, 160), sims=400)
    f = np.array(r["resolved"])
    assert np.all(np.diff(f) >= -0.02) and f[-1] - f[0] > 0.5


def test_simulated_experiments_have_the_observed_effect():
    # scores drawn with replacement from each observed list: E[P-hat] is the observed P(X > Y)
    r = power.resolved_fractions(X, Y, seed_counts=(10, 60), sims=2000)
    assert r["observed_poi"] == stats.probability_of_improvement(X, Y) == 0.68
    assert r["mean_poi"] == pytest.approx([0.68, 0.68], abs=0.01)  # standard errors about 0.003


def test_resolved_fraction_matches_a_normal_approximation():
    """Oracle: the U-statistic's exact variance under the two empirical distributions (Hoeffding),
    a normal P-hat, and the smallest P whose Newcombe interval at n excludes 0.5."""
    n, theta = 60, stats.probability_of_improvement(X, Y)
    q1 = np.mean([np.mean(Y < x) ** 2 for x in X])  # P(X > Y1, X > Y2)
    q2 = np.mean([np.mean(X > y) ** 2 for y in Y])  # P(X1 > Y, X2 > Y)
    var = (theta * (1 - theta) + (n - 1) * (q1 - theta**2) + (n - 1) * (q2 - theta**2)) / n**2
    lo, hi = 0.5, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if stats.newcombe_interval(mid, n, n)[0] > 0.5 else (mid, hi)
    expected = 1 - NormalDist(theta, var**0.5).cdf(hi)
    got = power.resolved_fractions(X, Y, seed_counts=(n,), sims=2000)["resolved"][0]
    assert got == pytest.approx(expected, abs=0.04)


def test_seeds_needed_is_the_first_count_reaching_the_power():
    fractions = {"seed_counts": [10, 20, 40], "resolved": [0.3, 0.8, 0.95]}
    assert power.seeds_needed(fractions, 0.8) == 20 and power.seeds_needed(fractions, 0.9) == 40
    assert power.seeds_needed(fractions, 0.99) is None


def test_bad_seed_counts_are_refused():
    for counts in ((), (0, 10), (20, 10), (10, 10)):
        with pytest.raises(ValueError, match="seed_counts"):
            power.resolved_fractions(X, Y, seed_counts=counts, sims=10)


def test_committed_power_file_is_computed_from_the_committed_ablation():
    curves, result = json.loads(SUMMARY.read_text()), json.loads(POWER.read_text())
    ref = curves["variants"]["bbf"]["scores"]
    assert result["source"] == "bbf_lunar/results/ablation_curves.json"
    assert set(result["comparisons"]) == set(curves["variants"]) - {"bbf"}
    for variant, r in result["comparisons"].items():
        assert r["observed_poi"] == stats.probability_of_improvement(
            ref, curves["variants"][variant]["scores"]
        )
        assert r["seeds_needed"] == power.seeds_needed(r, result["power"])


def test_scores_are_read_from_a_curves_file_or_a_compare_summary_and_anything_else_is_one_line(tmp_path):
    curves = {"variants": {"dqn": {"scores": [1.0]}, "bbf": {"scores": [2.0]}}}
    summary = {"reference": "b", "items": {"a": {"scores": [1.0]}, "b": {"scores": [3.0]}}}
    for name, data, expected in (
        ("c.json", curves, ("bbf", {"dqn": [1.0], "bbf": [2.0]})),
        ("s.json", summary, ("b", {"a": [1.0], "b": [3.0]})),
    ):
        (tmp_path / name).write_text(json.dumps(data))
        assert power.read_scores(str(tmp_path / name)) == expected
    for data, message in (
        ([1, 2], "neither an export.py curves file"),
        ({"variants": {"dqn": {"scores": [1.0]}}}, "no reference 'bbf' among dqn"),
        ({"reference": "b", "items": {"b": {"scores": [1.0]}, "a": {}}}, "no 'scores' for a"),
    ):
        (tmp_path / "bad.json").write_text(json.dumps(data))
        with pytest.raises(power.UserError, match=message):
            power.read_scores(str(tmp_path / "bad.json"))


@pytest.mark.slow
def test_cli_writes_every_variant_against_the_reference(tmp_path):
    summary = {"reference": "a", "items": {"a": {"scores": list(X + 1000)}, "b": {"scores": list(Y)}}}
    (tmp_path / "s.json").write_text(json.dumps(summary))
    out = tmp_path / "p.json"
    proc = run_script("bbf_lunar/power.py", "--summary", tmp_path / "s.json", "--out", out, "--sims", "20")
    result = json.loads(out.read_text())
    assert list(result["comparisons"]) == ["b"] and result["comparisons"]["b"]["seeds_needed"] == 10
    assert result["sims"] == 20 and "--sims 20" in result["command"] and "b " in proc.stdout


# the exact permutation test used beside the probability of improvement (stats.permutation_p_value)


@pytest.mark.parametrize("n,m", [(5, 5), (10, 5), (4, 7)])
def test_permutation_p_value_is_scipys_exact_mann_whitney(n, m):
    rng = np.random.default_rng(n * 10 + m)
    x, y = rng.normal(size=n), rng.normal(size=m)
    expected = scipy.stats.mannwhitneyu(x, y, alternative="greater", method="exact").pvalue
    assert stats.permutation_p_value(x, y) == pytest.approx(expected, rel=1e-12)


def test_permutation_p_value_with_ties_is_scipys_permutation_test():
    x, y = np.array([1.0, 2.0, 2.0, 3.0]), np.array([2.0, 2.0, 0.0, 1.0, 5.0])
    u = lambda a, b: scipy.stats.mannwhitneyu(a, b).statistic  # noqa: E731
    expected = scipy.stats.permutation_test(
        (x, y), u, alternative="greater", permutation_type="independent", n_resamples=np.inf
    ).pvalue
    assert stats.permutation_p_value(x, y) == pytest.approx(expected, rel=1e-12)


def test_permutation_p_value_of_a_complete_separation_is_one_split():
    assert stats.permutation_p_value([5, 6, 7, 8, 9], [0, 1, 2, 3, 4]) == pytest.approx(1 / 252)  # C(10, 5)
    with pytest.raises(ValueError, match="limit"):
        stats.permutation_p_value(np.arange(30), np.arange(30), limit=1000)
