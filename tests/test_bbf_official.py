"""bbf_lunar's `bbf` against the official BBF agent (google-research bigger_better_faster: BBF.gin and
bbf/agents/spr_agent.py, read for this port): reset steps, the optimizer state after a reset, the
acting network in training and evaluation, the exploration schedule, warm-up and gradient steps per
environment step. The numbers below are BBF.gin's; the oracles re-state the official control flow."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "bbf_lunar"))
import agent as A  # noqa: E402
import job as J  # noqa: E402
import run as R  # noqa: E402

torch.set_num_threads(1)

# BBF.gin
MIN_REPLAY_HISTORY = 2000
EPSILON_DECAY_PERIOD = 2001
EPSILON_TRAIN, EPSILON_EVAL = 0.0, 0.001
REPLAY_RATIO, BATCH_SIZE, N_ENVS = 64, 32, 1
RESET_EVERY, NO_RESETS_AFTER, TRAINING_STEPS = 20_000, 100_000, 100_000


def official_reset_steps(training_steps, reset_every, no_resets_after):
    """BBFAgent._train_step / reset_weights: next_reset starts at reset_every; at a step with
    training_steps >= next_reset, next_reset = training_steps + interval, and the reset is skipped
    when next_reset > no_resets_after."""
    resets, next_reset = [], reset_every
    for step in range(training_steps):  # training_steps before its increment
        if reset_every > 0 and step >= next_reset:
            next_reset = step + reset_every
            if next_reset <= no_resets_after:
                resets.append(step)
    return resets


def dopamine_epsilon(decay_period, step, warmup_steps, epsilon):
    """dopamine.jax.agents.dqn.dqn_agent.linearly_decaying_epsilon."""
    steps_left = decay_period + warmup_steps - step
    bonus = (1.0 - epsilon) * steps_left / decay_period
    return epsilon + np.clip(bonus, 0.0, 1.0 - epsilon)


def test_bbf_settings_are_the_official_config_where_it_has_a_lunarlander_meaning():
    spec = R.job_spec(R.Args(), "bbf", [0], Path("jobs"))
    a, r = spec["agent"], spec["run"]
    assert r["learning_starts"] == MIN_REPLAY_HISTORY
    assert (r["eps_decay_steps"], r["eps_end"]) == (EPSILON_DECAY_PERIOD, EPSILON_TRAIN)
    assert r["eval_epsilon"] == EPSILON_EVAL
    assert r["act_with_target"] is True  # target_action_selection = True
    assert (r["reset_every"], r["no_resets_after"]) == (RESET_EVERY, NO_RESETS_AFTER)
    # set_replay_settings: max(1, replay_ratio * n_envs // batch_size) gradient steps every update_period
    assert r["replay_ratio"] == max(1, REPLAY_RATIO * N_ENVS // BATCH_SIZE) and r["train_freq"] == 1
    assert max(1, BATCH_SIZE // REPLAY_RATIO * N_ENVS) == r["train_freq"]  # update_period
    assert (a["tau"], a["weight_decay"], a["adam_eps"], a["max_grad_norm"]) == (0.005, 0.1, 1.5e-4, 0.0)
    assert (a["n_max"], a["n_min"], a["gamma_start"], a["gamma_end"], a["anneal_steps"]) == (
        10, 3, 0.97, 0.997, 10_000
    )  # fmt: skip
    agent_cfg = A.AgentConfig(**a)  # shrink_factor, perturb_factor: AgentConfig's defaults
    assert (agent_cfg.shrink, agent_cfg.perturb, a["double"]) == (0.5, 0.5, True) and spec["model"]["dueling"]


@pytest.mark.parametrize(
    "total, every, expected",
    [(TRAINING_STEPS, RESET_EVERY, [20_000, 40_000, 60_000, 80_000]), (4000, 1000, [1000, 2000, 3000])],
)
def test_reset_steps_follow_the_official_rule(total, every, expected):
    assert J.reset_schedule(total, every, total) == expected
    # the official counter is the step before its increment: its step t is after our env step t
    assert official_reset_steps(total, every, total) == expected
    assert J.reset_schedule(10_000, 3000, 10_000) == official_reset_steps(10_000, 3000, 10_000)
    assert J.reset_schedule(10_000, 3000, 10_000) == [3000, 6000]
    assert J.reset_schedule(total, 0, total) == []


def test_epsilon_is_dopamines_linear_decay_after_the_random_warm_up():
    steps = range(0, 6000, 7)
    ours = [A.warmup_epsilon(t, MIN_REPLAY_HISTORY, EPSILON_DECAY_PERIOD, EPSILON_TRAIN) for t in steps]
    official = [dopamine_epsilon(EPSILON_DECAY_PERIOD, t, MIN_REPLAY_HISTORY, EPSILON_TRAIN) for t in steps]
    assert ours == pytest.approx(official, abs=1e-12)
    assert ours[0] == 1.0 and A.warmup_epsilon(4001, 2000, 2001, 0.0) == 0.0  # greedy from step 4001
    # dqn (warm-up 0): SB3's linear schedule from step 0, unchanged
    assert A.warmup_epsilon(6000, 0, 12_000, 0.1) == A.linear_epsilon(6000, 1.0, 0.1, 12_000) == 0.55


def tiny_job(tmp_path, seeds, **kw):
    args = dict(total_steps=300, eval_every=300, learning_starts=100, eval_episodes=1, width=16)
    args |= dict(anneal_steps=50, reset_every=100, checkpoint_every=300, workers=1, replay_ratio=2.0)
    return J.Job(R.job_spec(R.Args(**(args | kw)), "bbf", seeds, tmp_path / "jobs"))


def run_loop(job):
    with open(os.devnull, "w") as sink:
        job.loop(sink, lambda *a: None)


def test_job_resets_at_the_official_steps_and_takes_two_gradient_steps_per_env_step(tmp_path):
    job = tiny_job(tmp_path, [0])
    run_loop(job)
    assert job.state["reset_steps"] == [100, 200] == J.reset_schedule(300, 100, 300)  # 300 + 100 > 300
    assert job.agent.num_resets[0] == 2
    # updates once add_count > min_replay_history: env steps 101..300, 2 each
    assert job.agent.grad_steps[0] == 2 * (300 - 100)


def test_after_a_reset_every_parameter_takes_a_fresh_adam_first_step():
    """Adam's first step from zero moments with bias correction is lr * g / (|g| + eps) per entry:
    the encoder's entries (biases and LayerNorm, not decayed) move by exactly that after a reset."""
    cfg = A.AgentConfig(batch_size=8, lr=0.01, adam_eps=1e-3)
    agent = A.Agent(A.ModelConfig(obs_dim=2, width=8), cfg, seeds=[5])
    buffer = A.ReplayBuffer(1, 64, obs_dim=2)
    rng = np.random.default_rng(0)
    for _ in range(40):
        obs, next_obs = rng.normal(size=(1, 2)), rng.normal(size=(1, 2))
        buffer.add(obs, rng.integers(4, size=1), rng.normal(size=1), next_obs, False, False)
    rngs = [np.random.default_rng(1)]
    for _ in range(5):
        agent.update(buffer, rngs)
    agent.reset()
    before = agent.online[0].clone()
    agent.update(buffer, rngs)
    step = agent.online[0] - before
    expected = -cfg.lr * agent.grad[0] / (agent.grad[0].abs() + cfg.adam_eps)
    free = agent.decay[0] == 0  # no weight decay on these
    assert free[: agent.layout.encoder_size].any()
    torch.testing.assert_close(step[free], expected[free], rtol=1e-4, atol=1e-7)
    assert [float(t) for t in agent.adam_steps] == [1.0, 1.0]


def test_no_gradient_clipping_by_default():
    agent = A.Agent(A.ModelConfig(obs_dim=2, width=8), A.AgentConfig(), seeds=[0])
    grad = torch.full((1, agent.layout.size), 5.0)
    norm = agent._clip_(grad)
    assert torch.equal(grad, torch.full_like(grad, 5.0)) and norm[0] > 10


def disagreeing_agent(seeds):
    """An agent whose online and target networks pick different greedy actions on some states."""
    agent = A.Agent(A.ModelConfig(obs_dim=8, width=16), A.AgentConfig(), seeds=seeds)
    with torch.no_grad():
        agent.online.add_(torch.randn(agent.online.shape, generator=torch.Generator().manual_seed(9)))
    return agent


def test_the_target_network_acts_in_training(tmp_path):
    job = tiny_job(tmp_path, list(range(16)))
    job.agent = disagreeing_agent(job.seeds)
    obs = np.random.default_rng(3).normal(size=(16, 8)).astype(np.float32)
    target = job.agent.greedy(obs[:, None], target=True)[:, 0]
    assert (target != job.agent.greedy(obs[:, None])[:, 0]).any()
    assert np.array_equal(job.act(obs, step=10_000), target)  # epsilon 0 once the decay is over
    warm = job.act(obs, step=0)  # uniformly random during the warm-up
    assert warm.shape == (16,) and set(warm) <= set(range(4))


class FixedEnv:
    """One-step episodes with a constant state; the reward is the action taken."""

    def reset(self, seed=None):
        return np.full(8, 0.5, dtype=np.float32), {}

    def step(self, action):
        return np.full(8, 0.5, dtype=np.float32), float(action), True, False, {}


def test_evaluation_uses_the_target_network_with_epsilon_0001(tmp_path, monkeypatch):
    agent = disagreeing_agent([0])
    envs = [[FixedEnv() for _ in range(400)]]
    state = np.full((1, 1, 8), 0.5, dtype=np.float32)
    greedy_target = agent.greedy(state, target=True)[0, 0]
    returns = J.evaluate(agent, envs, target=True, epsilon=0.0)
    assert (returns == greedy_target).all()
    # epsilon 1: every action is the seed's generator's uniform draw (E uniforms, then E actions)
    rng = np.random.default_rng(4)
    returns = J.evaluate(agent, envs, target=True, epsilon=1.0, rngs=[np.random.default_rng(4)])
    rng.random(400)
    assert returns[0].tolist() == rng.integers(4, size=400).tolist()
    # the job evaluates with its settings: the target network, epsilon 0.001 (bbf)
    job = tiny_job(tmp_path, [0, 1])
    calls = []
    monkeypatch.setattr(J, "evaluate", lambda *a: calls.append(a[2:4]) or np.zeros((2, 1)))
    with open(os.devnull, "w") as sink:
        job.record_eval(sink)
    assert calls == [(True, EPSILON_EVAL)]
