"""bbf_lunar/dqn_vs_sb3.py: our `dqn` against stable-baselines3's DQN with the zoo settings, piece by
piece (the checks behind bbf_lunar/DQN_VS_SB3.md). stable-baselines3 is an optional extra."""

import sys

import numpy as np
import pytest
from conftest import REPO, run_script

pytest.importorskip("stable_baselines3")
sys.path.insert(0, str(REPO / "bbf_lunar"))
import dqn_vs_sb3 as D  # noqa: E402


def test_settings_read_from_both_objects_agree():
    s = D.settings(0)
    for name in ("learning rate", "Adam eps", "weight decay", "max grad norm", "parameters"):
        theirs, ours = s[name]
        assert theirs == ours, name
    assert s["parameters"][0] == 8 * 256 + 256 + 256 * 256 + 256 + 256 * 4 + 4  # [256, 256] MLP, 4 actions
    assert s["double DQN"][1] is False


def test_both_initialisations_are_uniform_within_one_over_root_fan_in():
    model = D.sb3_dqn(0)
    layout = D.bbf_run.Layout(D.ModelConfig(**D.zoo_spec(0, REPO / "unused")["model"]))
    for x in (D.sb3_scaled(model.q_net), D.our_scaled(layout, 0)):  # weights and biases times sqrt(fan_in)
        assert 0.99 < float(x.abs().max()) <= 1.0
        assert abs(float(x.std()) - 3**-0.5) < 0.01  # U(-1, 1)


def test_epsilon_schedules_agree_at_every_step():
    assert D.epsilon_gap() < 1e-12


@pytest.mark.parametrize("clip", [None, 0.05])
def test_one_gradient_step_at_a_time_is_sb3s(clip):
    r = D.update_check(
        seed=1, grad_steps=40, copy_every=15, transitions=1000, max_episode_steps=80, max_grad_norm=clip
    )
    assert r["terminated"] > 0 and r["truncated"] > 0  # both kinds of episode end are in the batches
    assert r["moved"] > 0.01  # the parameters moved far more than they differ
    assert max(r["online"], r["target"], r["loss"]) < 1e-5
    if clip is not None:
        assert r["grad_norm"] > clip  # the clip was active


def test_a_different_learning_rate_is_caught():
    """The check can fail: our agent at another rate drifts away from sb3's within a few steps."""
    zoo = D.peer.ZOO_DQN["learning_rate"]
    D.peer.ZOO_DQN["learning_rate"] = zoo * 1.5
    try:
        r = D.update_check(seed=1, grad_steps=5, copy_every=100, transitions=300, max_episode_steps=60)
    finally:
        D.peer.ZOO_DQN["learning_rate"] = zoo
    assert r["online"] > 1e-4


@pytest.mark.slow
def test_training_loops_store_the_same_data_on_the_same_clock():
    steps, actions = 501, np.random.default_rng(0).integers(0, 4, size=501)
    ours, theirs = D.our_trace(0, steps, actions, 80), D.sb3_trace(0, steps, actions, 80)
    t = D.compare_traces(ours, theirs, steps)
    assert t["stored_equal"] and min(t["episode_ends"]) > 0
    assert t["grad_steps_equal"] and t["grad_steps"] == 500  # 4 gradient steps after every 4th env step
    assert [i for i, _, _ in t["epsilon_differs_at"]] == [0]  # sb3's first action is greedy
    (ours_copies, sb3_copies) = t["copies"]
    assert [c[0] for c in ours_copies] == [c[0] for c in sb3_copies] == [250, 500]
    assert all(abs(a[1] - b[1]) <= 4 for a, b in zip(ours_copies, sb3_copies))  # within one train_freq


@pytest.mark.slow
def test_script_runs_as_a_user_would():
    flags = ["--steps", "260", "--grad-steps", "20", "--copy-every", "10", "--transitions", "400"]
    proc = run_script("bbf_lunar/dqn_vs_sb3.py", *flags, timeout=300)
    assert "stored transitions identical: True" in proc.stdout and "largest difference: online" in proc.stdout


def test_score_statistics_read_the_committed_results():
    rows = D.score_statistics()
    peer = D.read_json(D.RESULTS / "peer_sb3.json")["peer"]["poi_ours_vs_sb3"]
    assert [r["label"] for r in rows] == ["ours 0-4", "ours 0-9"]
    assert rows[0]["won"] == peer["pairs_won"] and rows[0]["newcombe"][0] == peer["newcombe_low"]
    assert rows[1]["pairs"] == 50 and 0 < rows[0]["p"] < 0.05
