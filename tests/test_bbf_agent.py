"""bbf_lunar agent: n-step returns, schedules, the batched network, AdamW, clipping, resets, and
seed k in a batch of S following the trajectory it follows alone."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

BBF_DIR = Path(__file__).resolve().parent.parent / "bbf_lunar"
sys.path.insert(0, str(BBF_DIR))  # job.py imports agent as a sibling, as in run.py's workers


def _load(name: str, file: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BBF_DIR / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


A = _load("agent", "agent.py")
torch.set_num_threads(1)  # tiny networks: threads only add contention
TINY = A.ModelConfig(obs_dim=2, width=8, num_blocks=1)


def filled_buffer(rewards, capacity, terminated=(), truncated=(), seeds=1):
    """Transition t has reward rewards[t] and next_obs filled with t + 1 (to identify bootstraps)."""
    buffer = A.ReplayBuffer(seeds, capacity, obs_dim=2)
    ones = np.ones(seeds)
    for t, r in enumerate(rewards):
        buffer.add(
            np.full((seeds, 2), t), 0, r * ones, np.full((seeds, 2), t + 1), t in terminated, t in truncated
        )
    return buffer


def n_step(buffer, idx, n=3, gamma=0.5):
    returns, bootstrap, discount = buffer.n_step(np.array([idx]), n, gamma)
    return returns[0].tolist(), bootstrap[0, :, 0].tolist(), discount[0].tolist()


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


def test_n_step_uses_each_seeds_own_horizon_and_discount():
    buffer = filled_buffer([1, 2, 3, 4, 5], capacity=10, seeds=2)
    returns, bootstrap, discount = buffer.n_step(np.array([[0], [0]]), np.array([1, 3]), np.array([0.9, 0.5]))
    assert returns[:, 0].tolist() == [1.0, 2.75] and bootstrap[:, 0, 0].tolist() == [1.0, 3.0]
    assert discount[:, 0] == pytest.approx([0.9, 0.125])


def test_sample_draws_each_seeds_indices_from_its_own_generator():
    buffer = filled_buffer(list(range(50)), capacity=64, terminated={10, 30}, seeds=3)
    rngs = [np.random.default_rng(k) for k in (5, 6, 7)]
    batch = buffer.sample(16, 4, 0.9, rngs)
    for s, k in enumerate((5, 6, 7)):
        expected = np.random.default_rng(k).integers(0, 50, size=16)
        assert batch["obs"][s, :, 0].astype(int).tolist() == expected.tolist()  # obs of t is filled with t
    returns, bootstrap, discount = buffer.n_step(batch["obs"][..., 0].astype(int), 4, 0.9)
    np.testing.assert_allclose(batch["returns"], returns)
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


def torch_oracle(layout, flat: torch.Tensor) -> nn.Module:
    """The same network built from torch.nn layers, loaded from one seed's flat parameters."""
    cfg, p = layout.cfg, {k: v[0] for k, v in layout.views(flat[None]).items()}

    def linear(name):
        layer = nn.Linear(*p[name + ".w"].shape)
        layer.weight.data, layer.bias.data = p[name + ".w"].T.clone(), p[name + ".b"][0].clone()
        return layer

    def norm(name):
        layer = nn.LayerNorm(cfg.width)
        layer.weight.data, layer.bias.data = p[name + ".g"][0].clone(), p[name + ".b"][0].clone()
        return layer

    class Block(nn.Module):
        def __init__(self, i):
            super().__init__()
            self.norm, self.fc1, self.fc2 = (
                norm(f"block{i}.norm"),
                linear(f"block{i}.fc1"),
                linear(f"block{i}.fc2"),
            )

        def forward(self, x):
            return x + self.fc2(torch.relu(self.fc1(self.norm(x))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            layers = [linear("in"), *[Block(i) for i in range(cfg.num_blocks)], norm("out_norm"), nn.ReLU()]
            self.encoder = nn.Sequential(*layers, linear("projection"), nn.ReLU())
            self.head = linear("head")

        def forward(self, x):
            out = self.head(self.encoder(x))
            return out[:, :1] + out[:, 1:] - out[:, 1:].mean(dim=1, keepdim=True)

    return Net()


def test_batched_network_matches_torch_nn_layers_for_every_seed():
    agent = A.Agent(A.ModelConfig(width=16, num_blocks=2), A.AgentConfig(), seeds=[3, 4, 5])
    x = torch.randn(3, 7, 8)
    q = A.q_values(agent.layout, agent.layout.views(agent.online), x)
    for s in range(3):
        torch.testing.assert_close(q[s], torch_oracle(agent.layout, agent.online[s])(x[s]))
    assert not torch.equal(agent.online[0], agent.online[1])  # seeds differ


def test_initialisation_follows_each_seeds_own_generator_and_torch_bounds():
    alone = A.Agent(TINY, A.AgentConfig(), seeds=[7])
    batch = A.Agent(TINY, A.AgentConfig(), seeds=[6, 7])
    assert torch.equal(alone.online[0], batch.online[1]) and torch.equal(batch.online, batch.target)
    w = alone.layout.views(alone.online)["block0.fc1.w"]
    assert w.abs().max() <= 1 / 8**0.5 and w.abs().max() > 0.5 / 8**0.5  # U(-1/sqrt(fan_in), ...)
    assert torch.equal(alone.layout.views(alone.online)["out_norm.g"], torch.ones(1, 1, 8))


def test_adamw_matches_torch_adamw_with_decay_only_on_weight_matrices():
    agent = A.Agent(TINY, A.AgentConfig(lr=0.01, weight_decay=0.1, adam_eps=1e-3), seeds=[0, 1])
    layout, start = agent.layout, agent.online[1].clone()
    params = {k: v[0].clone().requires_grad_() for k, v in layout.views(start[None]).items()}
    decayed = [v for k, v in params.items() if layout.slots[k].kind == "weight"]
    other = [v for k, v in params.items() if layout.slots[k].kind != "weight"]
    oracle = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}], lr=0.01, eps=1e-3
    )
    for _ in range(5):
        grad = torch.randn_like(agent.grad)
        agent.grad.copy_(grad)
        agent._adamw_()
        for k, v in params.items():
            v.grad = layout.views(grad[1:])[k][0].clone()
        oracle.step()
    expected = torch.cat([params[k].detach().reshape(-1) for k in layout.slots])
    torch.testing.assert_close(agent.online[1], expected)


def test_gradient_clipping_is_per_seed_like_clip_grad_norm():
    agent = A.Agent(TINY, A.AgentConfig(max_grad_norm=1.0), seeds=[0, 1])
    grad = torch.stack([torch.full((agent.layout.size,), 0.001), torch.full((agent.layout.size,), 1.0)])
    reference = [g.clone().requires_grad_() for g in grad]
    for r in reference:
        r.grad = r.detach().clone()
    norms = agent._clip_(grad)
    for s in range(2):
        torch.nn.utils.clip_grad_norm_([reference[s]], 1.0)
        torch.testing.assert_close(grad[s], reference[s].grad)
    assert norms.tolist() == pytest.approx([0.001 * agent.layout.size**0.5, agent.layout.size**0.5])


def test_reset_follows_the_official_bbf_recipe():
    agent = A.Agent(TINY, A.AgentConfig(batch_size=8), seeds=[3])
    buffer = filled_buffer(list(np.linspace(-1, 1, 40)), capacity=64, terminated={20})
    rngs = [np.random.default_rng(0)]
    for _ in range(6):
        agent.update(buffer, rngs)
    online, target = agent.online[0].clone(), agent.target[0].clone()
    exp_avg, gen_state = agent.exp_avg[0].clone(), agent.generators[0].get_state()
    agent.reset()
    oracle = torch.Generator()
    oracle.set_state(gen_state)
    fresh_online, fresh_target = agent.layout.init(oracle), agent.layout.init(oracle)  # its own draw each
    e = agent.layout.encoder_size
    torch.testing.assert_close(agent.online[0, :e], 0.5 * online[:e] + 0.5 * fresh_online[:e])
    torch.testing.assert_close(agent.target[0, :e], 0.5 * target[:e] + 0.5 * fresh_target[:e])
    assert torch.equal(agent.online[0, e:], fresh_online[e:]) and torch.equal(
        agent.target[0, e:], fresh_target[e:]
    )
    assert not torch.equal(agent.online[0], agent.target[0])  # the target is not a copy of the online net
    assert exp_avg.abs().sum() > 0  # there was Adam state to lose
    # fresh Adam state for every parameter, encoder included (moments and step counts)
    assert agent.exp_avg[0].abs().sum() == 0 and agent.exp_avg_sq[0].abs().sum() == 0
    assert [float(t) for t in agent.adam_steps] == [0.0, 0.0]
    assert agent.steps_since_reset[0] == 0 and agent.grad_steps[0] == 6 and agent.num_resets[0] == 1
    assert agent.n_step[0] == 10 and agent.gamma[0] == pytest.approx(0.97)


def test_double_dqn_and_max_targets_on_a_hand_case():
    cfg = A.ModelConfig(obs_dim=2, num_actions=2, width=2, num_blocks=0, residual=False, layer_norm=False)
    cfg.projection, cfg.dueling = False, False
    layout = A.Layout(cfg)  # Q(s) = W_head relu(W_in s): set W_in = I, biases 0, then Q = W_head s for s >= 0

    def params(head):
        flat = torch.zeros(1, layout.size)
        p = layout.views(flat)
        p["in.w"][0] = torch.eye(2)
        p["head.w"][0] = torch.tensor(head)
        return layout.views(flat)

    online, target = params([[1.0, 0.0], [0.0, 1.0]]), params([[0.0, 2.0], [2.0, 0.0]])
    batch = {
        "obs": torch.tensor([[[1.0, 5.0]]]),
        "actions": torch.tensor([[1]]),
        "returns": torch.tensor([[1.0]]),
        "bootstrap_obs": torch.tensor([[[3.0, 1.0]]]),
        "discount": torch.tensor([[0.5]]),
    }
    # online picks a' = 0 at [3, 1]; target values it at 2 * 1 = 2 (its own max is 6): td = 1 + .5 * 2 = 2
    loss, q = A.td_loss(layout, online, target, batch, double=True)
    assert q.tolist() == [[5.0]] and loss.item() == pytest.approx(3.0 - 0.5)  # Huber, |error| = 3
    loss, _ = A.td_loss(layout, online, target, batch, double=False)  # td = 1 + .5 * 6 = 4
    assert loss.item() == pytest.approx(1.0 - 0.5)


def test_update_reduces_td_error_on_a_fixed_batch():
    cfg = A.AgentConfig(batch_size=32, lr=1e-3, tau=1.0, weight_decay=0.0)
    agent = A.Agent(A.ModelConfig(obs_dim=2, width=32), cfg, seeds=[0, 1])
    buffer = filled_buffer([1.0] * 32, capacity=32, terminated=set(range(32)), seeds=2)  # every target = 1
    rngs = [np.random.default_rng(0), np.random.default_rng(1)]
    losses = [agent.update(buffer, rngs)["loss"] for _ in range(150)]
    assert (losses[-1] < 0.05 * losses[0]).all()


def test_seed_in_a_batch_updates_exactly_like_the_seed_alone():
    """Agent level, 250 updates with a reset in between: same losses and parameters to the bit."""
    cfg = A.AgentConfig(batch_size=16, anneal_steps=50)
    batch, alone = A.Agent(TINY, cfg, seeds=[0, 1, 2]), A.Agent(TINY, cfg, seeds=[1])
    rng = np.random.default_rng(0)
    big, small = A.ReplayBuffer(3, 300, 2), A.ReplayBuffer(1, 300, 2)
    for _ in range(300):
        obs, nxt, r = rng.normal(size=(3, 2)), rng.normal(size=(3, 2)), rng.normal(size=3)
        term, act = rng.random(3) < 0.05, rng.integers(4, size=3)
        big.add(obs, act, r, nxt, term, False)
        small.add(obs[1:2], act[1:2], r[1:2], nxt[1:2], term[1:2], False)
    rngs_batch = [np.random.default_rng(100 + k) for k in range(3)]
    rngs_alone = [np.random.default_rng(101)]
    for step in range(250):
        a = batch.update(big, rngs_batch)["loss"][1]
        b = alone.update(small, rngs_alone)["loss"][0]
        assert a == b, step
        if step == 120:
            batch.reset()
            alone.reset()
    assert torch.equal(batch.online[1], alone.online[0]) and torch.equal(batch.target[1], alone.target[0])
    obs = rng.normal(size=(3, 2)).astype(np.float32)
    acts = batch.act(obs, 0.3, rngs_batch)
    assert acts[1] == alone.act(obs[1:2], 0.3, rngs_alone)[0]


def test_compiled_update_follows_the_eager_one():
    """--compile: torch.compile'd TD loss (forward and backward) against the eager agent on the same
    batches, 30 updates with a reset in between: the same losses and parameters up to float rounding."""
    cfg = A.AgentConfig(batch_size=16, anneal_steps=20)
    eager = A.Agent(TINY, cfg, seeds=[0, 1])
    compiled = A.Agent(TINY, A.AgentConfig(batch_size=16, anneal_steps=20, compile=True), seeds=[0, 1])
    rng = np.random.default_rng(0)
    buffer = A.ReplayBuffer(2, 100, 2)
    for _ in range(100):
        obs, nxt, r = rng.normal(size=(2, 2)), rng.normal(size=(2, 2)), rng.normal(size=2)
        buffer.add(obs, rng.integers(4, size=2), r, nxt, rng.random(2) < 0.05, False)
    rngs = {name: [np.random.default_rng(k) for k in range(2)] for name in ("eager", "compiled")}
    for step in range(30):
        a, b = eager.update(buffer, rngs["eager"]), compiled.update(buffer, rngs["compiled"])
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-4, atol=1e-6, err_msg=f"step {step}")
        if step == 12:
            eager.reset()
            compiled.reset()
    torch.testing.assert_close(compiled.online, eager.online, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled.target, eager.target, rtol=1e-4, atol=1e-5)
    assert compiled._td_loss is not A.td_loss  # the compiled path did run


def random_buffer(seeds: int, size: int, rng: np.random.Generator) -> A.ReplayBuffer:
    buffer = A.ReplayBuffer(seeds, size, 2)
    for _ in range(size):
        obs, nxt, r = rng.normal(size=(seeds, 2)), rng.normal(size=(seeds, 2)), rng.normal(size=seeds)
        buffer.add(obs, rng.integers(4, size=seeds), r, nxt, rng.random(seeds) < 0.05, False)
    return buffer


def test_cuda_graph_needs_a_gpu_and_no_compile():
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device and no compile"):
        A.Agent(TINY, A.AgentConfig(cuda_graph=True), seeds=[0], device="cpu")
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device and no compile"):
        A.Agent(TINY, A.AgentConfig(cuda_graph=True, compile=True), seeds=[0], device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("tau", [0.005, 1.0])
def test_cuda_graph_update_follows_the_eager_one(tau):
    """On a GPU: the gradient step replayed as a CUDA graph against the eager step on the same batches,
    40 updates with a reset and (tau = 1) hard target copies in between: the same losses, Q, gradient
    norms and parameters up to float rounding; the warm-up before capture leaves no trace."""
    cfg = dict(batch_size=16, anneal_steps=20, tau=tau)
    eager = A.Agent(TINY, A.AgentConfig(**cfg), seeds=[0, 1, 2], device="cuda")
    graphed = A.Agent(TINY, A.AgentConfig(**cfg, cuda_graph=True), seeds=[0, 1, 2], device="cuda")
    buffer = random_buffer(3, 100, np.random.default_rng(0))
    rngs = {name: [np.random.default_rng(k) for k in range(3)] for name in ("eager", "graphed")}
    for step in range(40):
        a, b = eager.update(buffer, rngs["eager"]), graphed.update(buffer, rngs["graphed"])
        for key in ("loss", "q", "grad_norm"):
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=f"{key} at step {step}")
        if step == 15:
            eager.reset([1])
            graphed.reset([1])
        if tau == 1 and step % 10 == 9:
            eager.hard_update_target()
            graphed.hard_update_target()
    assert graphed._graph is not None  # the replayed path did run
    for key in ("online", "target", "exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(getattr(graphed, key), getattr(eager, key), rtol=1e-4, atol=1e-5)
    assert [float(t) for t in graphed.adam_steps] == [float(t) for t in eager.adam_steps]
