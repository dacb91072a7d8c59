"""Value agents for LunarLander's 8-dimensional state, with S independent seeds trained as one batch.

Bigger, Better, Faster (Schwarzer et al. 2023, arXiv 2305.19452) as an MLP, and a tuned DQN, share
this code; each ingredient is a field of `ModelConfig` / `AgentConfig` so an ablation is a config:

    bigger network      ModelConfig(width, num_blocks, residual, layer_norm, projection)
    high replay ratio   the caller does `replay_ratio` calls of `Agent.update` per environment step
    n-step annealing    n_max -> n_min over `anneal_steps` gradient steps after each reset
    gamma annealing     gamma_start -> gamma_end on the same clock
    resets              shrink-and-perturb the encoder, re-initialise projection and head (online
                        and target, each towards its own fresh draw), fresh Adam state for every
                        parameter, as the official BBF code (spr_agent.py, jit_reset) does
    target acting       the EMA target network acts, in training and evaluation (BBF.gin:
                        target_action_selection = True)

Seeds as a batch dimension: every parameter of the S networks lives in one flat (S, D) tensor, a
layer is `torch.baddbmm` over the seed axis, and the optimizer (AdamW with per-seed step counts),
gradient clipping, target update, replay buffer and random streams are per seed. Seed k's numbers
depend only on seed k: its torch generator draws its initialisations, its numpy generator its
exploration and replay samples, so seed k trained in a batch of S follows the trajectory it follows
alone (tests/test_bbf_agent.py checks this), and S = 1 is the single-seed agent.

Pure computation: no file I/O, prints or global random state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class ModelConfig:
    obs_dim: int = 8  # LunarLander-v3 state size
    num_actions: int = 4  # LunarLander-v3 discrete actions
    width: int = 128  # hidden units of every layer
    num_blocks: int = 1  # residual blocks (plain hidden layers when residual=False) after the input layer
    residual: bool = True  # pre-norm residual MLP blocks (BBF's ResNet encoder, as an MLP)
    layer_norm: bool = True  # LayerNorm inside blocks and on the encoder output
    projection: bool = True  # a width x width ReLU layer between encoder and head (BBF's projection)
    dueling: bool = True  # Q = V + A - mean A (Wang et al. 2016); else one linear Q head


@dataclass
class AgentConfig:
    batch_size: int = 64  # transitions per gradient step
    lr: float = 3e-4  # Adam(W) learning rate
    weight_decay: float = 0.1  # decoupled weight decay on weight matrices only (not biases, LayerNorm)
    adam_eps: float = 1.5e-4  # Adam epsilon (BBF / Dopamine: 1.5e-4)
    max_grad_norm: float = 0.0  # per-seed global gradient-norm clip, 0 = none (BBF: none; SB3's DQN: 10)
    double: bool = True  # double-DQN target (online argmax, target value); else max of the target
    tau: float = 0.005  # target EMA rate per gradient step; 1 with target_every > 0 = hard copies
    n_max: int = 10  # n-step horizon right after a reset (BBF: 10)
    n_min: int = 3  # n-step horizon after annealing (BBF: 3)
    gamma_start: float = 0.97  # discount right after a reset (BBF: 0.97)
    gamma_end: float = 0.997  # discount after annealing (BBF: 0.997)
    anneal_steps: int = 10_000  # gradient steps for both anneals (BBF: 10k)
    shrink: float = 0.5  # encoder keeps this fraction of its weights at a reset (BBF: 0.5)
    perturb: float = 0.5  # ... and adds this fraction of a fresh initialisation (BBF: 0.5)
    compile: bool = False  # torch.compile the TD loss (forward and backward) of the gradient step
    cuda_graph: bool = False  # CUDA only: capture the whole gradient step once, replay it per update


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


def linear_epsilon(step: int, start: float, end: float, decay_steps: int) -> float:
    if decay_steps <= 0:
        return end
    return start + (end - start) * min(step / decay_steps, 1.0)


def warmup_epsilon(step: int, warmup: int, decay_steps: int, end: float) -> float:
    """1 for the first `warmup` steps, then linear 1 -> end over `decay_steps` steps: Dopamine's
    linearly_decaying_epsilon(decay_period, step, warmup_steps, epsilon), which BBF acts with."""
    return 1.0 if step < warmup else linear_epsilon(step - warmup, 1.0, end, decay_steps)


# ---------------------------------------------------------------------------------------------
# Network: parameters of S seeds in one flat (S, D) tensor


@dataclass(frozen=True)
class Slot:
    name: str
    shape: tuple[int, int]  # per seed; a bias or LayerNorm vector is (1, width)
    start: int
    kind: str  # "weight" (uniform +-1/sqrt(fan_in), decayed), "bias" (same bound), "gain" (1), "zero" (0)
    fan_in: int

    @property
    def stop(self) -> int:
        return self.start + self.shape[0] * self.shape[1]


class Layout:
    """Names, shapes and flat offsets of one network's parameters. The encoder comes first (columns
    [0, encoder_size)), then the projection and head, which a reset re-initialises completely."""

    def __init__(self, cfg: ModelConfig):
        self.cfg, self.slots, self.size = cfg, {}, 0
        w = cfg.width
        self._linear("in", cfg.obs_dim, w)
        for i in range(cfg.num_blocks):
            if cfg.residual:
                if cfg.layer_norm:
                    self._norm(f"block{i}.norm", w)
                self._linear(f"block{i}.fc1", w, w)
                self._linear(f"block{i}.fc2", w, w)
            else:
                self._linear(f"hidden{i}", w, w)
        if cfg.residual and cfg.layer_norm:
            self._norm("out_norm", w)
        self.encoder_size = self.size
        if cfg.projection:
            self._linear("projection", w, w)
        self._linear("head", w, cfg.num_actions + (1 if cfg.dueling else 0))

    def _add(self, name, shape, kind, fan_in):
        self.slots[name] = Slot(name, shape, self.size, kind, fan_in)
        self.size += shape[0] * shape[1]

    def _linear(self, name, fan_in, fan_out):
        self._add(name + ".w", (fan_in, fan_out), "weight", fan_in)
        self._add(name + ".b", (1, fan_out), "bias", fan_in)

    def _norm(self, name, width):
        self._add(name + ".g", (1, width), "gain", width)
        self._add(name + ".b", (1, width), "zero", width)

    def init(self, generator: torch.Generator) -> torch.Tensor:
        """One seed's fresh parameters (D,): PyTorch's nn.Linear / nn.LayerNorm initialisation."""
        parts = []
        for s in self.slots.values():
            n = s.shape[0] * s.shape[1]
            if s.kind in ("weight", "bias"):
                bound = 1.0 / math.sqrt(s.fan_in)
                parts.append(torch.rand(n, generator=generator) * (2 * bound) - bound)
            else:
                parts.append(torch.full((n,), 1.0 if s.kind == "gain" else 0.0))
        return torch.cat(parts)

    def decay_mask(self) -> torch.Tensor:
        """(D,) 1 on weight matrices, 0 on biases and LayerNorm parameters (BBF's AdamW mask)."""
        mask = torch.zeros(self.size)
        for s in self.slots.values():
            if s.kind == "weight":
                mask[s.start : s.stop] = 1.0
        return mask

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """(S, D) -> {name: (S, *shape)} views sharing flat's storage."""
        n = flat.shape[0]
        return {k: flat[:, s.start : s.stop].view(n, *s.shape) for k, s in self.slots.items()}


def _linear(p, name, x):  # x (S, B, in) -> (S, B, out)
    return torch.baddbmm(p[name + ".b"], x, p[name + ".w"])


def _norm(p, name, x):
    x = F.layer_norm(x, x.shape[-1:])
    return torch.addcmul(p[name + ".b"], x, p[name + ".g"])


def q_values(layout: Layout, p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Parameters {name: (S, ...)} and states (S, B, obs_dim) -> Q-values (S, B, num_actions)."""
    cfg = layout.cfg
    h = _linear(p, "in", x)
    if not cfg.residual:
        h = F.relu(h)
    for i in range(cfg.num_blocks):
        if cfg.residual:
            y = _norm(p, f"block{i}.norm", h) if cfg.layer_norm else h
            h = h + _linear(p, f"block{i}.fc2", F.relu(_linear(p, f"block{i}.fc1", y)))
        else:
            h = F.relu(_linear(p, f"hidden{i}", h))
    if cfg.residual:
        h = F.relu(_norm(p, "out_norm", h) if cfg.layer_norm else h)
    if cfg.projection:
        h = F.relu(_linear(p, "projection", h))
    out = _linear(p, "head", h)
    if not cfg.dueling:
        return out
    value, advantage = out[..., :1], out[..., 1:]
    return value + advantage - advantage.mean(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------------
# Replay: one circular buffer per seed, filled in lockstep (one transition per seed per env step)


class ReplayBuffer:
    """(S, capacity) transitions; `sample` builds n-step targets for each seed's current n and gamma.

    Storing `next_obs` with each transition lets a window end on a time-limit truncation and still
    bootstrap from the true last state, while a termination stops bootstrapping.
    """

    def __init__(self, num_seeds: int, capacity: int, obs_dim: int):
        shape = (num_seeds, capacity)
        self.capacity = capacity
        self.obs = np.zeros((*shape, obs_dim), dtype=np.float32)
        self.next_obs = np.zeros((*shape, obs_dim), dtype=np.float32)
        self.actions = np.zeros(shape, dtype=np.int64)
        self.rewards = np.zeros(shape, dtype=np.float32)
        self.terminated = np.zeros(shape, dtype=bool)
        self.truncated = np.zeros(shape, dtype=bool)
        self.ptr = 0  # next slot to write
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, obs, actions, rewards, next_obs, terminated, truncated) -> None:
        """One transition per seed: arrays with a leading seed axis."""
        i = self.ptr
        self.obs[:, i], self.next_obs[:, i] = obs, next_obs
        self.actions[:, i], self.rewards[:, i] = actions, rewards
        self.terminated[:, i], self.truncated[:, i] = terminated, truncated
        self.ptr = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def n_step(self, idx: np.ndarray, n, gamma):
        """Start indices idx (S, B), per-seed n (S,) and gamma (S,) -> n-step return, bootstrap state
        and its discount, each (S, B, ...).

        The window stops early at the first episode end (terminated or truncated) and at the newest
        stored transition; discount = gamma**k for a k-step window, 0 when it ends on a termination.
        """
        n, gamma = np.broadcast_to(n, idx.shape[:1]), np.broadcast_to(gamma, idx.shape[:1])
        offsets = np.arange(int(n.max()))
        window = (idx[..., None] + offsets) % self.capacity  # (S, B, n)
        seed = np.arange(idx.shape[0])[:, None, None]
        if self.size == self.capacity:  # transitions stored at or after idx, oldest first
            available = (self.ptr - idx - 1) % self.capacity + 1
        else:
            available = self.size - idx
        ended = self.terminated[seed, window] | self.truncated[seed, window]
        ended_before = (np.cumsum(ended, axis=2) - ended) > 0  # an episode end strictly earlier
        mask = (offsets < available[..., None]) & ~ended_before & (offsets < n[:, None, None])
        k = mask.sum(axis=2)  # (S, B) window length, >= 1
        powers = gamma[:, None, None] ** offsets  # (S, 1, n)
        returns = (mask * self.rewards[seed, window] * powers).sum(axis=2)
        last = np.take_along_axis(window, (k - 1)[..., None], axis=2)[..., 0]  # (S, B)
        seed2 = seed[..., 0]
        discount = np.where(self.terminated[seed2, last], 0.0, gamma[:, None] ** k)
        return returns.astype(np.float32), self.next_obs[seed2, last], discount.astype(np.float32)

    def sample(self, batch_size: int, n, gamma, rngs: list[np.random.Generator]) -> dict:
        """Seed s draws its B indices from rngs[s] only."""
        idx = np.stack([rng.integers(0, self.size, size=batch_size) for rng in rngs])  # (S, B)
        returns, bootstrap_obs, discount = self.n_step(idx, n, gamma)
        seed = np.arange(len(rngs))[:, None]
        return {
            "obs": self.obs[seed, idx],
            "actions": self.actions[seed, idx],
            "returns": returns,
            "bootstrap_obs": bootstrap_obs,
            "discount": discount,
        }

    def truncate_newest(self) -> None:
        """Cut the episode the newest transition belongs to, as if by a time limit (after a resume)."""
        if self.size:
            self.truncated[:, (self.ptr - 1) % self.capacity] = True

    def state_dict(self) -> dict:
        keys = ("obs", "next_obs", "actions", "rewards", "terminated", "truncated")
        return {**{k: torch.from_numpy(getattr(self, k)) for k in keys}, "ptr": self.ptr, "size": self.size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("obs", "next_obs", "actions", "rewards", "terminated", "truncated"):
            setattr(self, key, state[key].numpy().copy())
        self.ptr, self.size = int(state["ptr"]), int(state["size"])
        self.capacity = self.rewards.shape[1]


# ---------------------------------------------------------------------------------------------
# Agent


def td_loss(layout: Layout, online: dict, target: dict, batch: dict, double: bool):
    """Per-seed Huber TD loss (S,) and Q of the taken actions (S, B). Double-DQN target: the online
    net picks a', the target net values it; otherwise the target's own max."""
    q = q_values(layout, online, batch["obs"]).gather(2, batch["actions"][..., None]).squeeze(2)
    with torch.no_grad():
        next_target = q_values(layout, target, batch["bootstrap_obs"])  # (S, B, A)
        if double:
            next_action = q_values(layout, online, batch["bootstrap_obs"]).argmax(dim=2, keepdim=True)
            next_q = next_target.gather(2, next_action).squeeze(2)
        else:
            next_q = next_target.max(dim=2).values
        td_target = batch["returns"] + batch["discount"] * next_q
    loss = F.smooth_l1_loss(q, td_target, reduction="none").mean(dim=1)  # (S,)
    return loss, q.detach()


class Agent:
    """S seeds' online and target networks, AdamW, the anneal clocks and resets, as (S, ...) tensors.

    seeds: one integer per seed; seed s's torch generator (its initialisations) is seeded with it.
    """

    def __init__(self, model_cfg: ModelConfig, cfg: AgentConfig, seeds: list[int], device="cpu"):
        self.model_cfg, self.cfg, self.device = model_cfg, cfg, torch.device(device)
        if cfg.cuda_graph and (cfg.compile or self.device.type != "cuda"):
            raise ValueError(f"cuda_graph needs a CUDA device and no compile (device {self.device})")
        self.layout = Layout(model_cfg)
        self.num_seeds = len(seeds)
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.online = torch.stack([self.layout.init(g) for g in self.generators]).to(self.device)
        self.target = self.online.clone()
        self.decay = self.layout.decay_mask().to(self.device)[None, :]  # (1, D)
        self.exp_avg = torch.zeros_like(self.online)
        self.exp_avg_sq = torch.zeros_like(self.online)
        self.grad = torch.zeros_like(self.online)  # preallocated: the views below stay valid
        # torch's fused Adam sees each seed's encoder and projection + head as separate tensors with
        # their own step counts (BBF's two masked AdamWs); no seed's state touches another's
        e = self.layout.encoder_size
        groups = [(s, cols) for s in range(self.num_seeds) for cols in (slice(0, e), slice(e, None))]
        self._adam_lists = [
            [t[s, cols] for s, cols in groups]
            for t in (self.online, self.grad, self.exp_avg, self.exp_avg_sq)
        ]
        self.adam_steps = [torch.zeros((), dtype=torch.float32, device=self.device) for _ in groups]
        # views made once (every update is in place): the online ones are the autograd leaves
        self._online_views = {k: v.requires_grad_(True) for k, v in self.layout.views(self.online).items()}
        self._target_views = self.layout.views(self.target)
        self.grad_steps = np.zeros(self.num_seeds, dtype=np.int64)
        self.steps_since_reset = np.zeros(self.num_seeds, dtype=np.int64)  # the anneal clock
        self.num_resets = np.zeros(self.num_seeds, dtype=np.int64)
        # compiled: fused elementwise work (layer norms, ReLUs, the Huber loss) in forward and backward;
        # the same maths to float rounding, so a compiled run does not repeat an eager one bit for bit
        self._td_loss = torch.compile(td_loss, dynamic=False) if cfg.compile else td_loss
        self._graph = None  # captured at the first update (cuda_graph)

    @property
    def n_step(self) -> np.ndarray:
        c = self.cfg
        return np.array([n_step_at(int(t), c.n_max, c.n_min, c.anneal_steps) for t in self.steps_since_reset])

    @property
    def gamma(self) -> np.ndarray:
        c = self.cfg
        return np.array(
            [gamma_at(int(t), c.gamma_start, c.gamma_end, c.anneal_steps) for t in self.steps_since_reset]
        )

    @torch.no_grad()
    def greedy(self, obs: np.ndarray, target: bool = False) -> np.ndarray:
        """(S, B, obs_dim) states -> (S, B) greedy actions of each seed's online (or target) network."""
        x = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        views = self._target_views if target else self._online_views
        return q_values(self.layout, views, x).argmax(dim=2).cpu().numpy()

    def act(
        self, obs: np.ndarray, epsilon: float, rngs: list[np.random.Generator], target: bool = False
    ) -> np.ndarray:
        """(S, obs_dim) -> (S,) epsilon-greedy actions of the online (or target) network; seed s draws
        from rngs[s] (two draws per step)."""
        draws = [(rng.random(), rng.integers(self.model_cfg.num_actions)) for rng in rngs]
        greedy = (
            self.greedy(obs[:, None], target)[:, 0] if epsilon < 1 else np.zeros(len(rngs), dtype=np.int64)
        )
        return np.array([a if u < epsilon else g for (u, a), g in zip(draws, greedy)], dtype=np.int64)

    def update(self, buffer: ReplayBuffer, rngs: list[np.random.Generator]) -> dict[str, torch.Tensor]:
        """One gradient step per seed on a fresh batch each, then the target EMA (tau < 1).

        Returns loss, mean Q of the batch and gradient norm, each (S,), as tensors on the agent's device:
        reading them waits for the GPU there, so a caller reads them when it logs, not every step."""
        sample = buffer.sample(self.cfg.batch_size, self.n_step, self.gamma, rngs)
        if self.cfg.cuda_graph:
            loss, q, grad_norm = self._replay(sample)
        else:
            loss, q, grad_norm = self._learn(
                {k: torch.from_numpy(v).to(self.device) for k, v in sample.items()}
            )
        self.grad_steps += 1
        self.steps_since_reset += 1
        return {"loss": loss, "q": q, "grad_norm": grad_norm}

    def _learn(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The gradient step on a batch already on the device, every write in place (capturable)."""
        # leaves are views of the flat parameters: their gradients are concatenated back into (S, D)
        views = self._online_views
        loss, q = self._td_loss(self.layout, views, self._target_views, batch, self.cfg.double)
        grads = torch.autograd.grad(loss.sum(), list(views.values()))  # seeds' losses are independent
        torch.cat([g.reshape(self.num_seeds, -1) for g in grads], dim=1, out=self.grad)
        grad_norm = self._clip_(self.grad)
        self._adamw_()
        if self.cfg.tau < 1:
            self.target.lerp_(self.online, self.cfg.tau)
        return loss.detach(), q.mean(dim=1), grad_norm

    # CUDA graph: on a GPU the step of a 35k-weight network is ~100 kernels of a few microseconds, each
    # launched from Python; a replay submits them at once. The batch travels in one packed copy.

    BATCH_FIELDS = ("obs", "actions", "returns", "bootstrap_obs", "discount")

    def _replay(self, sample: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The gradient step as a replay of the CUDA graph captured at the first call. The batch goes
        into a pinned float32 staging buffer (actions as floats: exact below 2^24), then one
        asynchronous copy to the graph's input; the staging buffer is reused once that copy is done."""
        sizes = [sample[k].size for k in self.BATCH_FIELDS]
        if self._graph is None:
            self._staging = torch.empty(sum(sizes), dtype=torch.float32, pin_memory=True)
            self._input = torch.empty(sum(sizes), dtype=torch.float32, device=self.device)
            self._copied = torch.cuda.Event()
            self._copied.record()
        self._copied.synchronize()  # the previous batch has left the staging buffer
        np.concatenate([sample[k].reshape(-1) for k in self.BATCH_FIELDS], out=self._staging.numpy())
        self._input.copy_(self._staging, non_blocking=True)
        self._copied.record()
        if self._graph is None:
            self._capture([sample[k].shape for k in self.BATCH_FIELDS], sizes)
        self._graph.replay()
        return tuple(t.clone() for t in self._outputs)  # the graph's outputs are rewritten by each replay

    def _capture(self, shapes: list[tuple], sizes: list[int]) -> None:
        def step():  # the packed input viewed as the batch; the actions' cast is a kernel of the graph
            batch = {
                k: x.view(shape) for k, x, shape in zip(self.BATCH_FIELDS, self._input.split(sizes), shapes)
            }
            return self._learn(batch | {"actions": batch["actions"].long()})

        # one warm-up step off the capture stream (torch.cuda.graph's recipe); the state it changed is
        # then put back, so the first replay is the first step, as in eager mode
        live = (self.online, self.target, self.exp_avg, self.exp_avg_sq, *self.adam_steps)
        saved = [t.clone() for t in live]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for t, s in zip(live, saved):
                t.copy_(s)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._outputs = step()

    def hard_update_target(self) -> None:
        self.target.copy_(self.online)

    @torch.no_grad()
    def _clip_(self, grad: torch.Tensor) -> torch.Tensor:
        """Per seed: scale the gradient to norm <= max_grad_norm (torch's clip_grad_norm_ formula); with
        max_grad_norm 0 the gradient is left as it is. Returns the norms before clipping."""
        norm = torch.linalg.vector_norm(grad, dim=1, keepdim=True)  # (S, 1)
        if self.cfg.max_grad_norm > 0:
            grad.mul_((self.cfg.max_grad_norm / (norm + 1e-6)).clamp_(max=1.0))
        return norm[:, 0]

    @torch.no_grad()
    def _adamw_(self) -> None:
        """AdamW (torch's fused Adam after a decoupled decay of the weight matrices only)."""
        c = self.cfg
        if c.weight_decay:
            self.online.mul_(1.0 - c.lr * c.weight_decay * self.decay)
        params, grads, exp_avgs, exp_avg_sqs = self._adam_lists
        torch._foreach_add_(self.adam_steps, 1)
        torch._fused_adam_(
            params, grads, exp_avgs, exp_avg_sqs, [], self.adam_steps,
            lr=c.lr, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=c.adam_eps, amsgrad=False, maximize=False,
        )  # fmt: skip

    @torch.no_grad()
    def reset(self, seeds=None) -> None:
        """BBF reset of the given seed indices (default all), as in the official code (spr_agent.py,
        jit_reset): the encoder is shrunk and perturbed towards a fresh draw (online and target each
        towards their own draw), projection and head are re-initialised, the Adam state of every
        parameter restarts (moments and step count: jit_reset's copy_params does not descend into the
        optax.chain of masked AdamWs, so the fresh optimizer.init state is kept whole), and the n /
        gamma anneal restarts."""
        c, e = self.cfg, self.layout.encoder_size
        for s in range(self.num_seeds) if seeds is None else seeds:
            fresh_online = self.layout.init(self.generators[s]).to(self.device)
            fresh_target = self.layout.init(self.generators[s]).to(self.device)
            for params, fresh in ((self.online, fresh_online), (self.target, fresh_target)):
                params[s, :e].mul_(c.shrink).add_(fresh[:e], alpha=c.perturb)
                params[s, e:] = fresh[e:]
            self.exp_avg[s] = 0.0
            self.exp_avg_sq[s] = 0.0
            self.adam_steps[2 * s].zero_()
            self.adam_steps[2 * s + 1].zero_()
            self.steps_since_reset[s] = 0
            self.num_resets[s] += 1

    def state_dict(self) -> dict:
        return {
            "online": self.online.cpu(),
            "target": self.target.cpu(),
            "exp_avg": self.exp_avg.cpu(),
            "exp_avg_sq": self.exp_avg_sq.cpu(),
            "adam_steps": torch.stack(self.adam_steps).cpu(),
            "generators": [g.get_state() for g in self.generators],
            **{
                k: torch.from_numpy(getattr(self, k))
                for k in ("grad_steps", "steps_since_reset", "num_resets")
            },
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("online", "target", "exp_avg", "exp_avg_sq"):
            getattr(self, key).copy_(state[key])
        for step, saved in zip(self.adam_steps, state["adam_steps"], strict=True):
            step.copy_(saved)
        for g, s in zip(self.generators, state["generators"], strict=True):
            g.set_state(s)
        for key in ("grad_steps", "steps_since_reset", "num_resets"):
            setattr(self, key, state[key].numpy().copy())

    def param_count(self) -> int:
        return self.layout.size
