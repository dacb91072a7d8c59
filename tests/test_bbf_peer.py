"""bbf_lunar/benchmark.py --peer sb3: stable-baselines3's zoo DQN beside ours under one protocol.
stable-baselines3 is an optional extra; .ci/run installs it so these run in CI."""

import json
import sys

import numpy as np
import pytest
from conftest import REPO, one_line_error, run_script

sys.path.insert(0, str(REPO / "bbf_lunar"))
import peer  # noqa: E402
import run as R  # noqa: E402

BENCH = "bbf_lunar/benchmark.py"
TINY = ["--total-steps", "600", "--eval-every", "200", "--eval-episodes", "2"]


def test_peer_hyperparameters_are_the_ones_our_dqn_copies():
    ours, zoo = R.settings(R.Args(), "dqn"), peer.ZOO_DQN
    assert ours["lr"] == zoo["learning_rate"] and ours["batch_size"] == zoo["batch_size"]
    assert ours["buffer_size"] == zoo["buffer_size"] and ours["learning_starts"] == zoo["learning_starts"]
    assert ours["gamma_start"] == ours["gamma_end"] == zoo["gamma"]
    assert ours["target_every"] == zoo["target_update_interval"] and ours["train_freq"] == zoo["train_freq"]
    assert ours["replay_ratio"] == 1.0 and zoo["gradient_steps"] == -1  # one gradient step per env step
    assert ours["eps_decay_steps"] == zoo["exploration_fraction"] * 100_000
    assert ours["eps_end"] == zoo["exploration_final_eps"] and zoo["policy_kwargs"]["net_arch"] == [256, 256]
    assert ours["width"] == 256 and ours["blocks"] == 1 and not ours["residual"]  # two hidden layers of 256


@pytest.mark.slow
def test_sb3_beside_ours_and_again_from_a_finished_run(tmp_path):
    pytest.importorskip("stable_baselines3")
    out = tmp_path / "bench" / "peer.json"
    proc = run_script(BENCH, "--peer", "sb3", "--peer-seeds", "2", *TINY, "--out", out)
    result = json.loads(out.read_text())["peer"]
    theirs = sorted((tmp_path / "bench" / "peer" / "sb3").glob("seed*.json"))
    assert len(theirs) == 2 and result["seeds"] == [0, 1]
    for path, score in zip(theirs, result["sb3_dqn"]["scores"]):
        run = json.loads(path.read_text())
        assert run["eval_steps"] == [0, 200, 400, 600]
        assert score == pytest.approx(np.mean(run["eval_points"][-3:]))  # our scoring rule
    sb3, ours = result["sb3_dqn"], result["our_dqn"]
    assert sb3["iqm"] == pytest.approx(np.mean(sb3["scores"]))  # 2 runs: nothing trimmed
    assert result["ours_inside_sb3_ci"] == (sb3["ci_low"] <= ours["iqm"] <= sb3["ci_high"])
    assert result["poi_ours_vs_sb3"]["pairs"] == 4 and "P(ours > sb3)" in proc.stdout

    # ours from a finished run.py folder (same seeds, same protocol); sb3's saved seeds are reused
    folder = tmp_path / "run"
    flags = ["--learning-starts", "100", "--bootstrap-reps", "200", "--clearml", "off"]
    run_script("bbf_lunar/run.py", "--seeds", "2", "--variants", "dqn", "--out", folder, *TINY, *flags)
    stamps = [p.stat().st_mtime_ns for p in theirs]
    run_script(BENCH, "--peer", "sb3", "--peer-seeds", "2", *TINY, "--out", out, "--against", folder)
    again = json.loads(out.read_text())["peer"]
    assert [p.stat().st_mtime_ns for p in theirs] == stamps and again["sb3_dqn"] == sb3
    assert again["our_dqn"]["scores"] == ours["scores"]  # the same seeds train the same dqn


def test_sb3_evaluation_in_lockstep_is_the_plain_episode_loop():
    pytest.importorskip("stable_baselines3")
    import gymnasium as gym
    from stable_baselines3 import DQN

    model = DQN("MlpPolicy", gym.make(peer.ENV_ID), seed=3, device="cpu", **peer.ZOO_DQN)
    env, returns = gym.make(peer.ENV_ID), []
    for i in range(3):  # the protocol written out: episode i from seed 1e6 + i, greedy, undiscounted
        obs, _ = env.reset(seed=1_000_000 + i)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(int(model.predict(obs, deterministic=True)[0]))
            total, done = total + float(reward), terminated or truncated
        returns.append(total)
    assert peer.evaluate_sb3(model, 3) == pytest.approx(np.mean(returns), abs=1e-9)


def test_peer_bad_input_is_one_line(tmp_path):
    proc = run_script(BENCH, "--peer", "rllib", rc=2)
    assert "--peer: unknown rllib" in one_line_error(proc)
    proc = run_script(BENCH, "--against", str(tmp_path), rc=2)
    assert "--against goes with --peer sb3" in one_line_error(proc)


def test_missing_sb3_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "stable_baselines3", None)  # import fails as if not installed
    with pytest.raises(Exception, match="pip install stable-baselines3"):
        peer.require_sb3()
