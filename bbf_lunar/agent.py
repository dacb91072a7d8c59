"""BBF-style value agent for small vector observations: network, replay buffer, schedules, updates.

Bigger, Better, Faster (Schwarzer et al. 2023, arXiv 2305.19452) ported from Atari pixels to an
MLP on LunarLander's 8-dimensional state. Each BBF ingredient is a field of `AgentConfig` so an
ablation is a different config, not a code copy:

    bigger network      ModelConfig(width, num_blocks, residual, layer_norm)
    high replay ratio   the caller does `replay_ratio` calls of `Agent.update` per env step
    n-step annealing    n_max -> n_min over `anneal_steps` gradient steps after each reset
    gamma annealing     gamma_start -> gamma_end on the same clock
    resets              every `reset_every` gradient steps: shrink-and-perturb encoder, fresh head

Pure computation: no file I/O, prints or global seeding; randomness comes from the caller's
torch generator state and the numpy `Generator` passed in.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    obs_dim: int = 8  # LunarLander-v3 state size
    num_actions: int = 4  # LunarLander-v3 discrete actions
    width: int = 128  # hidden units of every encoder layer
    num_blocks: int = 1  # residual blocks (or plain hidden layers when residual=False) after the input layer
    residual: bool = True  # pre-norm residual MLP blocks (BBF's ResNet encoder, as an MLP)
    layer_norm: bool = True  # LayerNorm inside blocks and on the encoder output


@dataclass
class AgentConfig:
    batch_size: int = 64  # transitions per gradient step
    lr: float = 1e-4  # AdamW learning rate (BBF: 1e-4)
    weight_decay: float = 0.1  # AdamW decoupled weight decay (BBF: 0.1)
    adam_eps: float = 1.5e-4  # AdamW epsilon (BBF / Dopamine: 1.5e-4)
    max_grad_norm: float = 10.0  # global gradient-norm clip
    tau: float = 0.005  # target network EMA rate per gradient step (BBF: 0.005)
    n_max: int = 10  # n-step horizon right after a reset (BBF: 10)
    n_min: int = 3  # n-step horizon after annealing (BBF: 3)
    gamma_start: float = 0.97  # discount right after a reset (BBF: 0.97)
    gamma_end: float = 0.997  # discount after annealing (BBF: 0.997)
    anneal_steps: int = 10_000  # gradient steps for both anneals (BBF: 10k)
    reset_every: int = 40_000  # gradient steps between resets, 0 = never (BBF: 40k)
    shrink: float = 0.5  # encoder keeps this fraction of its weights at a reset (BBF: 0.5)


# ---------------------------------------------------------------------------------------------
# Schedules (BBF section 3: "receding update horizon" and "increasing discount factor")


def exponential_anneal(start: float, end: float, step: int, anneal_steps: int) -> float:
    """start * (end / start) ** (step / anneal_steps), held at `end` afterwards."""
    if anneal_steps <= 0 or start == end:
        return float(end)
    frac = min(max(step, 0) / anneal_steps, 1.0)
    return start * (end / start) ** frac


def n_step_at(step: int, n_max: int, n_min: int, anneal_steps: int) -> int:
    """BBF: n = round(10 * 0.3 ** (t / 10k)) for n_max=10, n_min=3."""
    return int(round(exponential_anneal(n_max, n_min, step, anneal_steps)))


def gamma_at(step: int, gamma_start: float, gamma_end: float, anneal_steps: int) -> float:
    """BBF: gamma = 1 - 0.03 * 0.1 ** (t / 10k), i.e. 1 - gamma anneals exponentially."""
    return 1.0 - exponential_anneal(1.0 - gamma_start, 1.0 - gamma_end, step, anneal_steps)


# ---------------------------------------------------------------------------------------------
# Network


class ResidualBlock(nn.Module):
    def __init__(self, width: int, layer_norm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(width) if layer_norm else nn.Identity()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x):  # (B, width) -> (B, width)
        return x + self.fc2(F.relu(self.fc1(self.norm(x))))


class Encoder(nn.Module):
    """State -> feature vector. Residual: Linear, blocks, LayerNorm, ReLU. Plain: a ReLU MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(cfg.obs_dim, cfg.width)]
        if cfg.residual:
            layers += [ResidualBlock(cfg.width, cfg.layer_norm) for _ in range(cfg.num_blocks)]
            if cfg.layer_norm:
                layers.append(nn.LayerNorm(cfg.width))
            layers.append(nn.ReLU())
        else:
            layers.append(nn.ReLU())
            for _ in range(cfg.num_blocks):
                layers += [nn.Linear(cfg.width, cfg.width), nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, obs):  # (B, obs_dim) -> (B, width)
        return self.net(obs)


class DuelingHead(nn.Module):
    """Q(s, a) = V(s) + A(s, a) - mean_a A(s, a) (Wang et al. 2016)."""

    def __init__(self, width: int, num_actions: int):
        super().__init__()
        self.value = nn.Linear(width, 1)
        self.advantage = nn.Linear(width, num_actions)

    def forward(self, features):  # (B, width) -> (B, num_actions)
        advantage = self.advantage(features)
        return self.value(features) + advantage - advantage.mean(dim=1, keepdim=True)


class QNetwork(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.head = DuelingHead(cfg.width, cfg.num_actions)

    def forward(self, obs):  # (B, obs_dim) -> (B, num_actions)
        return self.head(self.encoder(obs))


@torch.no_grad()
def shrink_and_perturb_(module: nn.Module, fresh: nn.Module, shrink: float) -> None:
    """In place: every parameter becomes shrink * old + (1 - shrink) * fresh (Ash & Adams 2020; BBF 0.5)."""
    for old, new in zip(module.parameters(), fresh.parameters(), strict=True):
        old.mul_(shrink).add_(new, alpha=1.0 - shrink)


# ---------------------------------------------------------------------------------------------
# Replay buffer with n-step returns computed when sampling


class ReplayBuffer:
    """Circular buffer of single transitions; `sample` builds n-step targets for the current n, gamma.

    Storing `next_obs` with each transition lets a window end on a time-limit truncation and still
    bootstrap from the true last state, while a termination stops bootstrapping.
    """

    def __init__(self, capacity: int, obs_dim: int):
        self.capacity = capacity
        self.obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=bool)
        self.truncated = np.zeros(capacity, dtype=bool)
        self.ptr = 0  # next slot to write
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, obs, action: int, reward: float, next_obs, terminated: bool, truncated: bool) -> None:
        i = self.ptr
        self.obs[i], self.next_obs[i] = obs, next_obs
        self.actions[i], self.rewards[i] = action, reward
        self.terminated[i], self.truncated[i] = terminated, truncated
        self.ptr = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def n_step(self, idx: np.ndarray, n: int, gamma: float):
        """For start indices idx (B,): n-step return, bootstrap state and its discount.

        The window stops early at the first episode end (terminated or truncated) and at the newest
        stored transition; discount = gamma**k for a k-step window, 0 when it ends on a termination.
        """
        offsets = np.arange(n)
        window = (idx[:, None] + offsets[None, :]) % self.capacity  # (B, n)
        # transitions stored at or after idx, oldest first: the window must not run past the newest one
        if self.size == self.capacity:
            available = (self.ptr - idx - 1) % self.capacity + 1  # (B,)
        else:
            available = self.size - idx
        ended = self.terminated[window] | self.truncated[window]  # (B, n)
        ended_before = (np.cumsum(ended, axis=1) - ended) > 0  # an episode end strictly earlier in the window
        mask = (offsets[None, :] < available[:, None]) & ~ended_before  # (B, n) steps that count
        k = mask.sum(axis=1)  # (B,) window length, >= 1
        returns = (mask * self.rewards[window] * gamma ** offsets[None, :]).sum(axis=1)
        last = window[np.arange(len(idx)), k - 1]  # (B,) index of the window's final transition
        discount = np.where(self.terminated[last], 0.0, gamma**k)
        return returns.astype(np.float32), self.next_obs[last], discount.astype(np.float32)

    def sample(self, batch_size: int, n: int, gamma: float, rng: np.random.Generator) -> dict:
        idx = rng.integers(0, self.size, size=batch_size)
        returns, bootstrap_obs, discount = self.n_step(idx, n, gamma)
        return {
            "obs": self.obs[idx],
            "actions": self.actions[idx],
            "returns": returns,
            "bootstrap_obs": bootstrap_obs,
            "discount": discount,
        }

    def state_dict(self) -> dict:
        return {
            k: getattr(self, k)
            for k in ("obs", "next_obs", "actions", "rewards", "terminated", "truncated", "ptr", "size")
        }

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        self.capacity = len(self.rewards)


# ---------------------------------------------------------------------------------------------
# Agent


def double_dqn_loss(online: QNetwork, target: QNetwork, batch: dict[str, torch.Tensor]):
    """Huber TD loss with a double-DQN target: online net picks a', target net values it."""
    q = online(batch["obs"]).gather(1, batch["actions"][:, None]).squeeze(1)  # (B,)
    with torch.no_grad():
        next_action = online(batch["bootstrap_obs"]).argmax(dim=1, keepdim=True)  # (B, 1)
        next_q = target(batch["bootstrap_obs"]).gather(1, next_action).squeeze(1)  # (B,)
        td_target = batch["returns"] + batch["discount"] * next_q
    return F.smooth_l1_loss(q, td_target), q.detach()


class Agent:
    """Online and EMA-target Q-networks, AdamW, the anneal clock and resets."""

    def __init__(self, model_cfg: ModelConfig, cfg: AgentConfig):
        self.model_cfg, self.cfg = model_cfg, cfg
        self.online = QNetwork(model_cfg)
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        self.optimizer = self._make_optimizer()
        self._online_params = list(self.online.parameters())  # reset / load copy into these in place
        self._target_params = list(self.target.parameters())
        self.grad_steps = 0
        self.steps_since_reset = 0  # the anneal clock
        self.num_resets = 0

    def _make_optimizer(self):
        return torch.optim.AdamW(
            self.online.parameters(),
            lr=self.cfg.lr,
            weight_decay=self.cfg.weight_decay,
            eps=self.cfg.adam_eps,
            foreach=True,
        )

    @property
    def n_step(self) -> int:
        return n_step_at(self.steps_since_reset, self.cfg.n_max, self.cfg.n_min, self.cfg.anneal_steps)

    @property
    def gamma(self) -> float:
        cfg = self.cfg
        return gamma_at(self.steps_since_reset, cfg.gamma_start, cfg.gamma_end, cfg.anneal_steps)

    @torch.no_grad()
    def greedy(self, obs: np.ndarray) -> np.ndarray:
        """(B, obs_dim) states -> (B,) greedy actions."""
        return self.online(torch.as_tensor(obs, dtype=torch.float32)).argmax(dim=1).numpy()

    def act(self, obs: np.ndarray, epsilon: float, rng: np.random.Generator) -> int:
        if rng.random() < epsilon:
            return int(rng.integers(self.model_cfg.num_actions))
        return int(self.greedy(obs[None])[0])

    def update(self, buffer: ReplayBuffer, rng: np.random.Generator) -> dict[str, float]:
        """One gradient step on a fresh batch, the target EMA, and a reset when one is due."""
        sample = buffer.sample(self.cfg.batch_size, self.n_step, self.gamma, rng)
        batch = {k: torch.from_numpy(v) for k, v in sample.items()}
        loss, q = double_dqn_loss(self.online, self.target, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self._online_params, self.cfg.max_grad_norm, foreach=True)
        self.optimizer.step()
        with torch.no_grad():  # target <- target + tau * (online - target), one fused call per step
            torch._foreach_lerp_(self._target_params, self._online_params, self.cfg.tau)
        self.grad_steps += 1
        self.steps_since_reset += 1
        if self.cfg.reset_every > 0 and self.grad_steps % self.cfg.reset_every == 0:
            self.reset()
        return {"loss": loss.item(), "q": q.mean().item(), "grad_norm": float(grad_norm)}

    def reset(self) -> None:
        """BBF reset: shrink-and-perturb the encoder, re-initialise the head, fresh optimizer state,
        target set to the new online network, and the n / gamma anneal restarts."""
        fresh = QNetwork(self.model_cfg)
        shrink_and_perturb_(self.online.encoder, fresh.encoder, self.cfg.shrink)
        self.online.head.load_state_dict(fresh.head.state_dict())
        self.target.load_state_dict(self.online.state_dict())
        self.optimizer = self._make_optimizer()  # Adam moments of the old weights would misguide the new ones
        self.steps_since_reset = 0
        self.num_resets += 1

    def state_dict(self) -> dict:
        return {
            "online": self.online.state_dict(),
            "target": self.target.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "grad_steps": self.grad_steps,
            "steps_since_reset": self.steps_since_reset,
            "num_resets": self.num_resets,
        }

    def load_state_dict(self, state: dict) -> None:
        self.online.load_state_dict(state["online"])
        self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.grad_steps, self.steps_since_reset = state["grad_steps"], state["steps_since_reset"]
        self.num_resets = state["num_resets"]


def linear_epsilon(step: int, start: float, end: float, decay_steps: int) -> float:
    if decay_steps <= 0:
        return end
    return start + (end - start) * min(step / decay_steps, 1.0)


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "ModelConfig",
    "AgentConfig",
    "Agent",
    "ReplayBuffer",
    "QNetwork",
    "shrink_and_perturb_",
    "n_step_at",
    "gamma_at",
    "exponential_anneal",
    "double_dqn_loss",
    "linear_epsilon",
    "param_count",
]
