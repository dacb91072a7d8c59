"""bbf_lunar/confirm.py: a made-up finished run folder (per-seed result files as run.py writes them)
-> confirmation.json with the protocol's shape, scores, intervals and decision."""

import json
import sys

import numpy as np
import pytest
from conftest import REPO, run_script
from scipy.stats import trim_mean

sys.path.insert(0, str(REPO / "bbf_lunar"))
import confirm as C  # noqa: E402
import stats  # noqa: E402

SCRIPT = "bbf_lunar/confirm.py"


def fake_run(tmp_path, score_of, skip=()):
    """jobs/<variant>_seed<k>/result.json for seeds 1000-1019; each evaluation point's two episodes
    average to score_of(variant, seed) at the last three points and to -1000 before."""
    run = tmp_path / "run"
    for variant in C.VARIANTS:
        for seed in C.SEEDS:
            if (variant, seed) in skip:
                continue
            s = score_of(variant, seed)
            points = [[-1000.0, -1000.0]] * 8 + [[s - 5, s + 5]] * 3
            result = {"variant": variant, "seed": seed, "env_steps": 100_000, "eval_steps": C.EVAL_STEPS}
            result["resumed"] = int((variant, seed) == ("dqn", 1004))
            path = run / "jobs" / f"{variant}_seed{seed}" / "result.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps(result | {"eval_returns": points, "score": s}))
    return run


def shifted(variant, seed):  # bbf = dqn + 30 on every seed: it wins 380 pairs, ties 10
    return float(seed - 1000) * 10 + (30.0 if variant == "bbf" else 0.0)


def test_confirmation_file_has_the_protocols_shape_and_numbers(tmp_path):
    run = fake_run(tmp_path, shifted)
    out = tmp_path / "confirmation.json"
    proc = run_script(SCRIPT, "--run", run, "--protocol-commit", "abc123", "--out", out)
    c = json.loads(out.read_text())
    assert {"protocol_commit", "seeds", "variants", "poi"} <= set(c) and c["protocol_commit"] == "abc123"
    assert c["seeds"] == list(range(1000, 1020))
    for v in ("bbf", "dqn"):
        assert set(c["variants"][v]) == {"iqm", "ci_low", "ci_high", "scores"}
    dqn, bbf = np.arange(20) * 10.0, np.arange(20) * 10.0 + 30
    assert c["variants"]["dqn"]["scores"] == dqn.tolist() and c["variants"]["bbf"]["scores"] == bbf.tolist()
    assert c["variants"]["bbf"]["iqm"] == pytest.approx(trim_mean(bbf, 0.25))
    assert c["variants"]["bbf"]["ci_low"] <= c["variants"]["bbf"]["iqm"] <= c["variants"]["bbf"]["ci_high"]
    wins = sum((b > d) + 0.5 * (b == d) for b in bbf for d in dqn)  # an independent pair count
    assert c["poi"]["poi"] == pytest.approx(wins / 400)
    low, high = stats.newcombe_interval(wins / 400, 20, 20)
    assert (c["poi"]["newcombe_low"], c["poi"]["newcombe_high"]) == pytest.approx((low, high))
    assert c["iqm_difference"]["diff"] == pytest.approx(30.0) and c["iqm_difference"]["reps"] >= 50_000
    assert c["iqm_difference"]["ci_low"] < 30 < c["iqm_difference"]["ci_high"]
    assert low < 0.5 and c["confirmed"] is False and "NOT confirmed" in proc.stdout
    assert c["resumed_runs"] == ["dqn 1004"]


def test_a_clear_win_is_confirmed(tmp_path):
    run = fake_run(tmp_path, lambda v, k: (1000.0 if v == "bbf" else 0.0) + k)
    out = tmp_path / "c.json"
    run_script(SCRIPT, "--run", run, "--protocol-commit", "abc", "--out", out)
    c = json.loads(out.read_text())
    assert c["poi"]["poi"] == 1.0 and c["poi"]["newcombe_low"] > 0.5 and c["confirmed"] is True


def test_iqm_difference_interval_narrows_with_less_spread():
    rng = np.random.default_rng(0)
    x, y = rng.normal(100, 50, 20), rng.normal(50, 50, 20)
    wide = C.iqm_difference_with_ci(x, y, reps=50_000)
    narrow = C.iqm_difference_with_ci(x / 10, y / 10, reps=50_000)
    assert wide["diff"] == pytest.approx(trim_mean(x, 0.25) - trim_mean(y, 0.25))
    assert narrow["ci_high"] - narrow["ci_low"] == pytest.approx((wide["ci_high"] - wide["ci_low"]) / 10)


def test_a_missing_or_off_protocol_run_is_one_line(tmp_path):
    run = fake_run(tmp_path, shifted, skip={("dqn", 1007)})
    proc = run_script(SCRIPT, "--run", run, "--protocol-commit", "abc", "--out", tmp_path / "c.json", rc=1)
    assert "dqn_seed1007/result.json is missing" in proc.stderr and not (tmp_path / "c.json").exists()
    path = run / "jobs" / "bbf_seed1003" / "result.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"env_steps": 50_000}))
    with pytest.raises(C.UserError, match="50000 steps, not the protocol's"):
        C.load_scores(run)
    proc = run_script(SCRIPT, "--run", run, rc=2)
    assert "--protocol-commit" in proc.stderr
