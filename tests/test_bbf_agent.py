"""bbf_lunar agent: n-step returns, schedules, shrink-and-perturb, resets, the double-DQN loss."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

BBF_DIR = Path(__file__).resolve().parent.parent / "bbf_lunar"


def _load(name: str, file: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BBF_DIR / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


A = _load("bbf_lunar_agent", "agent.py")


def filled_buffer(rewards, capacity, terminated=(), truncated=()):
    """Transition t has reward rewards[t] and next_obs filled with t + 1 (to identify bootstraps)."""
    buffer = A.ReplayBuffer(capacity, obs_dim=2)
    for t, r in enumerate(rewards):
        buffer.add(np.full(2, t), 0, r, np.full(2, t + 1), t in terminated, t in truncated)
    return buffer


def n_step(buffer, idx, n=3, gamma=0.5):
    returns, bootstrap, discount = buffer.n_step(np.array(idx), n, gamma)
    return returns.tolist(), bootstrap[:, 0].tolist(), discount.tolist()


def test_n_step_without_episode_end_and_at_the_newest_transition():
    buffer = filled_buffer([1, 2, 3, 4, 5], capacity=10)
    # idx 0: 1 + .5*2 + .25*3; idx 3: only 2 stored steps left; idx 4: one step
    assert n_step(buffer, [0, 3, 4]) == ([2.75, 6.5, 5.0], [3.0, 5.0, 5.0], [0.125, 0.25, 0.5])


def test_n_step_stops_at_termination_without_bootstrap():
    buffer = filled_buffer([1, 2, 3, 4, 5], capacity=10, terminated={1})
    returns, bootstrap, discount = n_step(buffer, [0, 1, 2])
    assert returns == [2.0, 2.0, 6.25]  # idx 2 starts the next episode: 3 + .5*4 + .25*5
    assert discount == [0.0, 0.0, 0.125]
    assert bootstrap[2] == 5.0


def test_n_step_truncation_bootstraps_from_the_last_real_state():
    buffer = filled_buffer([1, 2, 3, 4, 5], capacity=10, truncated={1})
    assert n_step(buffer, [0, 1]) == ([2.0, 2.0], [2.0, 2.0], [0.25, 0.5])


def test_n_step_wraps_around_a_full_buffer():
    buffer = filled_buffer([1, 2, 3, 4, 5, 6], capacity=4)  # slots hold t = 4, 5, 2, 3; next write slot 2
    assert buffer.ptr == 2 and len(buffer) == 4
    returns, bootstrap, discount = n_step(buffer, [2, 0, 1])
    assert returns == [3 + 0.5 * 4 + 0.25 * 5, 5 + 0.5 * 6, 6.0]
    assert bootstrap == [5.0, 6.0, 6.0]
    assert discount == [0.125, 0.25, 0.5]


def test_n_step_of_one_is_the_plain_td_target():
    buffer = filled_buffer([1, 2, 3], capacity=5, terminated={2})
    returns, bootstrap, discount = n_step(buffer, [0, 1, 2], n=1, gamma=0.9)
    assert returns == [1, 2, 3] and bootstrap == [1, 2, 3]
    assert discount == pytest.approx([0.9, 0.9, 0.0])


def test_sample_matches_n_step_for_its_indices():
    buffer = filled_buffer(list(range(50)), capacity=64, terminated={10, 30})
    batch = buffer.sample(16, 4, 0.9, np.random.default_rng(0))
    idx = batch["obs"][:, 0].astype(int)  # obs of transition t is filled with t
    returns, bootstrap, discount = buffer.n_step(idx, 4, 0.9)
    np.testing.assert_allclose(batch["returns"], returns)
    np.testing.assert_allclose(batch["bootstrap_obs"], bootstrap)
    np.testing.assert_allclose(batch["discount"], discount)


def test_schedules_at_known_points():
    # BBF: n = round(10 * 0.3 ** (t / 10k)), gamma = 1 - 0.03 * 0.1 ** (t / 10k)
    assert [A.n_step_at(t, 10, 3, 10_000) for t in (0, 5_000, 10_000, 50_000)] == [10, 5, 3, 3]
    assert A.n_step_at(2_000, 10, 3, 10_000) == 8  # 10 * 0.3 ** 0.2 = 7.86
    gammas = [A.gamma_at(t, 0.97, 0.997, 10_000) for t in (0, 5_000, 10_000, 30_000)]
    assert gammas == pytest.approx([0.97, 1 - 0.03 * 0.1**0.5, 0.997, 0.997])
    assert A.gamma_at(123, 0.99, 0.99, 10_000) == 0.99 and A.n_step_at(5, 1, 1, 10) == 1
    assert A.linear_epsilon(0, 1.0, 0.01, 100) == 1.0 and A.linear_epsilon(50, 1.0, 0.0, 100) == 0.5
    assert A.linear_epsilon(500, 1.0, 0.01, 100) == pytest.approx(0.01)


def test_shrink_and_perturb_arithmetic():
    old, fresh = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        old.weight.copy_(torch.tensor([[2.0, -4.0], [0.0, 1.0]]))
        old.bias.fill_(1.0)
        fresh.weight.copy_(torch.tensor([[4.0, 0.0], [2.0, -1.0]]))
        fresh.bias.fill_(-3.0)
    A.shrink_and_perturb_(old, fresh, 0.5)
    assert old.weight.tolist() == [[3.0, -2.0], [1.0, 0.0]] and old.bias.tolist() == [-1.0, -1.0]
    A.shrink_and_perturb_(old, fresh, 0.25)  # 0.25 * old + 0.75 * fresh
    assert old.weight.tolist() == [[3.75, -0.5], [1.75, -0.75]]


def test_reset_perturbs_encoder_reinitialises_head_and_restarts_the_clocks():
    torch.manual_seed(0)
    agent = A.Agent(
        A.ModelConfig(obs_dim=2, width=16, num_blocks=1), A.AgentConfig(batch_size=8, reset_every=5)
    )
    buffer = filled_buffer(list(np.linspace(-1, 1, 40)), capacity=64, terminated={20})
    rng = np.random.default_rng(0)
    for _ in range(4):
        agent.update(buffer, rng)
    assert agent.steps_since_reset == 4 and agent.num_resets == 0 and agent.optimizer.state_dict()["state"]
    agent.update(buffer, rng)  # the 5th gradient step triggers the reset
    assert agent.num_resets == 1 and agent.steps_since_reset == 0 and agent.grad_steps == 5
    assert agent.n_step == 10 and agent.gamma == pytest.approx(0.97)
    assert agent.optimizer.state_dict()["state"] == {}  # fresh Adam moments
    for p, q in zip(agent.online.parameters(), agent.target.parameters()):
        assert torch.equal(p, q)  # target restarts from the reset online network


def test_reset_formula_against_a_manual_oracle():
    torch.manual_seed(0)
    agent = A.Agent(A.ModelConfig(width=8, num_blocks=1), A.AgentConfig())
    before = {k: v.clone() for k, v in agent.online.state_dict().items()}
    torch.manual_seed(7)
    agent.reset()
    torch.manual_seed(7)
    fresh = A.QNetwork(agent.model_cfg)  # the same draws the reset made
    after = agent.online.state_dict()
    for key, value in fresh.state_dict().items():
        expected = 0.5 * before[key] + 0.5 * value if key.startswith("encoder") else value
        torch.testing.assert_close(after[key], expected)


def test_double_dqn_loss_uses_online_argmax_and_target_value():
    class Fixed(nn.Module):  # Q(s) = scale * s (or reversed): a hand-checkable "network"
        def __init__(self, scale, flip):
            super().__init__()
            self.scale, self.flip = scale, flip

        def forward(self, x):
            return self.scale * (x.flip(1) if self.flip else x)

    batch = {
        "obs": torch.tensor([[1.0, 5.0]]),
        "actions": torch.tensor([1]),
        "returns": torch.tensor([1.0]),
        "bootstrap_obs": torch.tensor([[3.0, 1.0]]),
        "discount": torch.tensor([0.5]),
    }
    # online picks a' = 0 at [3, 1]; target values it at 2 * 1 = 2 (not its own max 6): td = 1 + .5 * 2 = 2
    loss, q = A.double_dqn_loss(Fixed(1.0, False), Fixed(2.0, True), batch)
    assert q.tolist() == [5.0] and loss.item() == pytest.approx(3.0 - 0.5)  # Huber, |error| = 3


def test_dueling_head_is_value_plus_centred_advantage():
    head = A.DuelingHead(3, 4)
    x = torch.randn(5, 3)
    q = head(x)
    torch.testing.assert_close(q.mean(dim=1, keepdim=True), head.value(x))
    torch.testing.assert_close(
        q - q.mean(dim=1, keepdim=True), head.advantage(x) - head.advantage(x).mean(dim=1, keepdim=True)
    )


def test_update_reduces_td_error_on_a_fixed_batch():
    torch.manual_seed(0)
    cfg = A.AgentConfig(batch_size=32, lr=1e-3, tau=1.0, weight_decay=0.0, reset_every=0)
    agent = A.Agent(A.ModelConfig(obs_dim=2, width=32, num_blocks=1), cfg)
    buffer = filled_buffer([1.0] * 32, capacity=32, terminated=set(range(32)))  # every target = reward = 1
    rng = np.random.default_rng(0)
    losses = [agent.update(buffer, rng)["loss"] for _ in range(200)]
    assert losses[-1] < 0.05 * losses[0]
