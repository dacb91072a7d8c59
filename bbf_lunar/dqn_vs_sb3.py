"""Our `dqn` (run.py's VARIANTS["dqn"] through job.py and agent.py) against stable-baselines3's DQN with
the same rl-baselines3-zoo settings (peer.ZOO_DQN), checked piece by piece without a long run. The
comparison these checks back is DQN_VS_SB3.md.

- settings: optimizer, network size and learning rate, read from the two live objects.
- schedule: both DQNs act in LunarLander-v3 for --steps environment steps. At every action the
  check records epsilon and the gradient steps done so far; at every target copy, the environment
  step and the gradient steps done. The two traces must agree, and the two epsilon schedules must
  agree at every step of a 100k-step run.
- scores: the committed final scores (results/peer_sb3.json: seeds 0-4 of each; our seeds 0-9 from
  results/ablation_curves.json, dqn), P(ours > sb3) with its Newcombe interval, and the exact
  permutation p-value of that P if both lists came from one distribution of runs.
- update: both start from the same weights (sb3's, copied into ours) and take --grad-steps gradient
  steps on the same batches of the same stored transitions, with terminations and time-limit
  truncations among them. The target network gets a hard copy every --copy-every steps. Losses and
  parameters must agree to float32 rounding.

stable-baselines3 is an optional extra: pip install stable-baselines3.

    python bbf_lunar/dqn_vs_sb3.py
"""

from __future__ import annotations

import io
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's common, not an installed one
import peer  # noqa: E402
import run as bbf_run  # noqa: E402
from agent import Agent, AgentConfig, ModelConfig, ReplayBuffer, warmup_epsilon  # noqa: E402
from job import ENV_ID, Job  # noqa: E402

from common import parse_args, read_json, run_main  # noqa: E402

TOTAL_STEPS = 100_000  # the protocol's run length: sb3's exploration clock is a fraction of it
RESULTS = Path(__file__).resolve().parent / "results"
ROUNDING = 1e-4  # largest parameter or loss difference taken as float32 rounding


@dataclass
class Args:
    seed: int = 0  # seeds both DQNs and the stored transitions
    steps: int = 1001  # env steps of the schedule trace (a target copy every 250)
    grad_steps: int = 300  # gradient steps of the update check
    copy_every: int = 100  # gradient steps between hard target copies in the update check
    transitions: int = 3000  # transitions stored for the update check (random actions)
    max_episode_steps: int = 80  # time limit of the stored episodes: crashes and truncations both occur


def check_args(a: Args) -> None:
    for name in ("steps", "grad_steps", "copy_every", "transitions", "max_episode_steps"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(a, name)})")


def zoo_spec(seed: int, folder: Path) -> dict:
    """run.py's `dqn` job for one seed, at the protocol's 100k steps."""
    return bbf_run.job_spec(bbf_run.Args(seeds=1, seed=seed), "dqn", [seed], folder)


def sb3_dqn(seed: int, env=None):
    import gymnasium as gym
    from stable_baselines3 import DQN
    from stable_baselines3.common.logger import Logger

    model = DQN("MlpPolicy", env or gym.make(ENV_ID), seed=seed, device="cpu", **peer.ZOO_DQN)
    model.set_logger(Logger(None, []))  # train() records its loss here without learn()'s set-up
    return model


# ---------------------------------------------------------------------------------------------
# Settings and schedules


def settings(seed: int) -> dict:
    """{name: (sb3, ours)} read from the live objects."""
    model = sb3_dqn(seed)
    with tempfile.TemporaryDirectory() as tmp:
        spec = zoo_spec(seed, Path(tmp))
    opt, cfg = model.policy.optimizer, AgentConfig(**spec["agent"])
    layout = bbf_run.Layout(ModelConfig(**spec["model"]))
    return {
        "optimizer": (type(opt).__name__, "AdamW"),
        "learning rate": (opt.defaults["lr"], cfg.lr),
        "Adam eps": (opt.defaults["eps"], cfg.adam_eps),
        "Adam betas": (tuple(opt.defaults["betas"]), "(0.9, 0.999) in Agent._adamw_"),
        "weight decay": (opt.defaults["weight_decay"], cfg.weight_decay),
        "max grad norm": (model.max_grad_norm, cfg.max_grad_norm),
        "parameters": (sum(p.numel() for p in model.q_net.parameters()), layout.size),
        "double DQN": ("no (DQN.train)", cfg.double),
        "init bound": (spread(sb3_scaled(model.q_net)), spread(our_scaled(layout, seed))),
    }


def sb3_scaled(q_net) -> torch.Tensor:
    """sb3's initial weights and biases, each times sqrt(fan_in) of its layer."""
    linears = [m for m in q_net.q_net if isinstance(m, torch.nn.Linear)]
    return torch.cat(
        [torch.cat([m.weight.reshape(-1), m.bias]) * m.in_features**0.5 for m in linears]
    ).detach()


def our_scaled(layout, seed: int) -> torch.Tensor:
    """Our initial weights and biases (Layout.init), each times sqrt(fan_in) of its layer."""
    flat = layout.init(torch.Generator().manual_seed(seed))
    return torch.cat([flat[s.start : s.stop] * s.fan_in**0.5 for s in layout.slots.values()])


def spread(x: torch.Tensor) -> str:
    """U(-1, 1) has max |x| 1 and standard deviation 0.577."""
    return f"max {x.abs().max():.3f}, std {x.std():.3f}"


def epsilon_gap() -> float:
    """Largest |epsilon_sb3 - epsilon_ours| over every step of a 100k-step run."""
    from stable_baselines3.common.utils import LinearSchedule

    z = peer.ZOO_DQN
    schedule = LinearSchedule(1.0, z["exploration_final_eps"], z["exploration_fraction"])
    spec_run = bbf_run.settings(bbf_run.Args(), "dqn")
    return max(
        abs(
            schedule(1 - t / TOTAL_STEPS)
            - warmup_epsilon(t, spec_run["learning_starts"], spec_run["eps_decay_steps"], spec_run["eps_end"])
        )
        for t in range(TOTAL_STEPS + 1)
    )


def our_trace(seed: int, steps: int, actions: np.ndarray, max_episode_steps: int) -> dict:
    """Our training loop (job.py) playing the given actions: epsilon and gradient steps done at each
    action, (env step, gradient steps done) at each target copy, and the stored transitions."""
    import gymnasium as gym

    with tempfile.TemporaryDirectory() as tmp:
        job = Job(zoo_spec(seed, Path(tmp)))
        job.envs = gym.vector.SyncVectorEnv(  # job.py's vector env, with a shorter time limit
            [lambda: gym.make(ENV_ID, max_episode_steps=max_episode_steps)],
            autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
        )
        agent, trace = job.agent, {"epsilon": [], "grad_steps": [], "copies": []}
        done = [0]
        update, copy = agent.update, agent.hard_update_target

        def counted_act(obs, epsilon, rngs, target=False):
            trace["epsilon"].append(float(epsilon))
            trace["grad_steps"].append(done[0])
            return actions[len(trace["epsilon"]) - 1 : len(trace["epsilon"])]

        def counted_update(*a):
            done[0] += 1
            return update(*a)

        def counted_copy():
            trace["copies"].append((job.state["env_step"], done[0]))
            copy()

        agent.act, agent.update, agent.hard_update_target = counted_act, counted_update, counted_copy
        obs, losses = job.start_envs(), []
        for _ in range(steps):
            obs = job.env_step(obs, io.StringIO(), losses)
    b = job.buffer
    trace["stored"] = {
        "obs": b.obs[0], "next_obs": b.next_obs[0], "action": b.actions[0], "reward": b.rewards[0],
        "terminated": b.terminated[0], "truncated": b.truncated[0],
    }  # fmt: skip
    trace["copies"] = [c for c in trace["copies"] if c[0] < steps]
    return trace


def sb3_trace(seed: int, steps: int, actions: np.ndarray, max_episode_steps: int) -> dict:
    """The same trace from sb3's own learn() loop, its predict and target update instrumented."""
    import gymnasium as gym
    import stable_baselines3.dqn.dqn as sb3_module
    from stable_baselines3.common.callbacks import BaseCallback

    model = sb3_dqn(seed, gym.make(ENV_ID, max_episode_steps=max_episode_steps))
    trace, polyak = {"epsilon": [], "grad_steps": [], "copies": []}, sb3_module.polyak_update

    def counted_predict(obs, state=None, episode_start=None, deterministic=False):
        trace["epsilon"].append(float(model.exploration_rate))
        trace["grad_steps"].append(model._n_updates)
        return actions[len(trace["epsilon"]) - 1 : len(trace["epsilon"])], None

    def counted_polyak(params, target_params, tau):
        if params is not model.batch_norm_stats:  # the second call copies BatchNorm statistics (none)
            trace["copies"].append((model.num_timesteps, model._n_updates))
        polyak(params, target_params, tau)

    class Stop(BaseCallback):  # called after env step t, before that step's transition is stored
        def _on_step(self) -> bool:
            return self.num_timesteps < steps

    model.predict = counted_predict
    sb3_module.polyak_update = counted_polyak
    try:
        model.learn(total_timesteps=TOTAL_STEPS, callback=Stop())
    finally:
        sb3_module.polyak_update = polyak
    b = model.replay_buffer
    dones, timeouts = b.dones[:, 0] > 0, b.timeouts[:, 0] > 0
    trace["stored"] = {"obs": b.observations[:, 0], "next_obs": b.next_observations[:, 0],
                       "action": b.actions[:, 0, 0], "reward": b.rewards[:, 0],
                       "terminated": dones & ~timeouts, "truncated": timeouts}  # fmt: skip
    trace["copies"] = [c for c in trace["copies"] if c[0] < steps]
    return trace


def compare_traces(ours: dict, theirs: dict, steps: int) -> dict:
    """Where the two loops differ: actions whose epsilon differs, the target copies of each, and
    whether the transitions both stored (the first steps - 1) are identical."""
    eps = [
        i
        for i, (x, y) in enumerate(zip(ours["epsilon"], theirs["epsilon"], strict=True))
        if abs(x - y) > 1e-9
    ]
    n = steps - 1  # sb3 stops before storing the last step's transition
    stored = all(np.array_equal(ours["stored"][k][:n], theirs["stored"][k][:n]) for k in ours["stored"])
    return {
        "epsilon_differs_at": [(i, ours["epsilon"][i], theirs["epsilon"][i]) for i in eps],
        "grad_steps_equal": ours["grad_steps"] == theirs["grad_steps"],
        "grad_steps": ours["grad_steps"][-1],
        "copies": (ours["copies"], theirs["copies"]),
        "stored_equal": stored,
        "episode_ends": (
            int(ours["stored"]["terminated"][:n].sum()),
            int(ours["stored"]["truncated"][:n].sum()),
        ),
    }


# ---------------------------------------------------------------------------------------------
# One gradient step at a time, from the same weights on the same batches


class Draw:
    """Stands in for a seed's numpy Generator in ReplayBuffer.sample: returns the given indices."""

    def __init__(self, idx: np.ndarray):
        self.idx = idx

    def integers(self, low, high, size=None):
        assert low == 0 and self.idx.max() < high and len(self.idx) == size
        return self.idx


def sb3_flat(q_net, layout) -> torch.Tensor:
    """sb3's Sequential(Linear, ReLU, Linear, ReLU, Linear) as one seed's flat vector in our layout."""
    linears = [m for m in q_net.q_net if isinstance(m, torch.nn.Linear)]
    parts = {}
    for name, linear in zip(("in", "hidden0", "head"), linears, strict=True):
        parts[name + ".w"] = linear.weight.detach().T  # nn.Linear keeps (out, in); ours (in, out)
        parts[name + ".b"] = linear.bias.detach()[None]
    assert set(parts) == set(layout.slots), (sorted(parts), sorted(layout.slots))
    flat = torch.empty(layout.size)
    for key, slot in layout.slots.items():
        flat[slot.start : slot.stop] = parts[key].reshape(-1)
    return flat


def stored_transitions(count: int, seed: int, max_episode_steps: int) -> list[tuple]:
    import gymnasium as gym

    env, rng, rows = gym.make(ENV_ID, max_episode_steps=max_episode_steps), np.random.default_rng(seed), []
    obs, _ = env.reset(seed=seed)
    for _ in range(count):
        action = int(rng.integers(4))
        next_obs, reward, terminated, truncated, _ = env.step(action)
        rows.append((obs, action, float(reward), next_obs, terminated, truncated))
        obs = env.reset()[0] if terminated or truncated else next_obs
    return rows


def update_check(seed: int, grad_steps: int, copy_every: int, transitions: int, max_episode_steps: int,
                 max_grad_norm: float | None = None) -> dict:  # fmt: skip
    """{"online", "target", "loss", "moved", "grad_norm", "terminated", "truncated"}: largest
    differences of the parameters and losses, how far the parameters moved, the largest gradient
    norm before clipping, and the episode ends among the transitions. max_grad_norm: both clips set
    to it (default: the zoo's 10)."""
    from stable_baselines3.common.utils import polyak_update

    model = sb3_dqn(seed)
    with tempfile.TemporaryDirectory() as tmp:
        spec = zoo_spec(seed, Path(tmp))
    cfg = AgentConfig(**spec["agent"])
    if max_grad_norm is not None:
        model.max_grad_norm = cfg.max_grad_norm = max_grad_norm
    agent = Agent(ModelConfig(**spec["model"]), cfg, [seed])
    buffer = ReplayBuffer(1, spec["run"]["buffer_size"], agent.model_cfg.obs_dim)
    rows = stored_transitions(transitions, seed, max_episode_steps)
    for obs, action, reward, next_obs, terminated, truncated in rows:
        info = {"TimeLimit.truncated": truncated and not terminated}
        model.replay_buffer.add(obs[None], next_obs[None], np.array([[action]]), np.array([reward]),
                                np.array([terminated or truncated]), [info])  # fmt: skip
        buffer.add(obs[None], np.array([action]), np.array([reward]), next_obs[None],
                   np.array([terminated]), np.array([truncated]))  # fmt: skip
    start = sb3_flat(model.q_net, agent.layout)
    with torch.no_grad():
        agent.online[0].copy_(start)
        agent.target[0].copy_(sb3_flat(model.q_net_target, agent.layout))
    rng, batch, loss_gap, norm = np.random.default_rng(seed), cfg.batch_size, 0.0, 0.0
    for k in range(grad_steps):
        idx = rng.integers(0, len(rows), size=batch)
        model.replay_buffer.sample = lambda batch_size, env=None, idx=idx: model.replay_buffer._get_samples(
            idx
        )
        model.train(gradient_steps=1, batch_size=batch)
        ours = agent.update(buffer, [Draw(idx)])
        loss_gap = max(loss_gap, abs(float(ours["loss"][0]) - model.logger.name_to_value["train/loss"]))
        norm = max(norm, float(ours["grad_norm"][0]))
        if (k + 1) % copy_every == 0:
            polyak_update(model.q_net.parameters(), model.q_net_target.parameters(), 1.0)
            agent.hard_update_target()
    online = sb3_flat(model.q_net, agent.layout)
    return {
        "online": float((online - agent.online[0].cpu()).abs().max()),
        "target": float((sb3_flat(model.q_net_target, agent.layout) - agent.target[0].cpu()).abs().max()),
        "loss": loss_gap,
        "moved": float((online - start).abs().max()),
        "grad_norm": norm,
        "terminated": sum(r[4] for r in rows),
        "truncated": sum(r[5] and not r[4] for r in rows),
    }


def score_statistics() -> list[dict]:
    """P(ours > sb3), Newcombe interval and exact permutation p-value, for our seeds 0-4 and 0-9, and
    how often 10 fresh seeds per side would resolve an effect of that size (power.py)."""
    import power
    import stats

    peer_result = read_json(RESULTS / "peer_sb3.json")["peer"]
    sb3 = peer_result["sb3_dqn"]["scores"]
    ours10 = read_json(RESULTS / "ablation_curves.json")["variants"]["dqn"]["scores"]
    rows = []
    for label, ours in (("ours 0-4", peer_result["our_dqn"]["scores"]), ("ours 0-9", ours10)):
        ci = stats.probability_of_improvement_with_ci(ours, sb3)
        fresh = power.resolved_fractions(ours, sb3, seed_counts=(10,))["resolved"][0]
        rows.append({
            "label": label, "poi": ci["poi"], "won": ci["pairs_won"], "pairs": ci["pairs"],
            "newcombe": (ci["newcombe_low"], ci["newcombe_high"]),
            "p": stats.permutation_p_value(ours, sb3), "fresh_10": fresh,
        })  # fmt: skip
    return rows


def main() -> None:
    a = parse_args(Args, check=check_args, description=__doc__)
    peer.require_sb3()
    torch.set_num_threads(1)
    print("settings (sb3 | ours):")
    for name, (theirs, ours) in settings(a.seed).items():
        print(f"  {name:<14} {theirs!s:>22} | {ours}")
    print(f"epsilon at every step of a {TOTAL_STEPS:,}-step run: largest difference {epsilon_gap():.1e}")
    print("final scores against sb3's seeds 0-4 (P(ours > sb3), pairs won, Newcombe, permutation p):")
    rows = score_statistics()
    for r in rows:
        low, high = r["newcombe"]
        print(
            f"  {r['label']}: {r['poi']:.2f}, {r['won']} of {r['pairs']}, [{low:.2f}, {high:.2f}], "
            f"p = {r['p']:.4f}"
        )
    print(f"  an effect of the size of ours 0-9 vs sb3 0-4, at 10 fresh seeds per side: Newcombe above 0.5 "
          f"with probability {rows[1]['fresh_10']:.2f} (power.py)")  # fmt: skip

    actions = np.random.default_rng(a.seed).integers(0, 4, size=a.steps)  # both loops play these
    ours = our_trace(a.seed, a.steps, actions, a.max_episode_steps)
    theirs = sb3_trace(a.seed, a.steps, actions, a.max_episode_steps)
    t = compare_traces(ours, theirs, a.steps)
    print(f"training loops, {a.steps} env steps of the same actions ({t['episode_ends'][0]} terminations, "
          f"{t['episode_ends'][1]} truncations at a {a.max_episode_steps}-step limit):")  # fmt: skip
    print(f"  stored transitions identical: {t['stored_equal']}")
    print(f"  gradient steps before every action equal: {t['grad_steps_equal']} ({t['grad_steps']} in all)")
    print(f"  epsilon differs at (action, ours, sb3): {t['epsilon_differs_at']}")
    print(f"  target copies (env step, gradient steps done): ours {t['copies'][0]}")
    print(f"                                                 sb3  {t['copies'][1]}")

    for clip in (None, 0.1):
        r = update_check(a.seed, a.grad_steps, a.copy_every, a.transitions, a.max_episode_steps, clip)
        label = "zoo clip 10" if clip is None else f"both clips at {clip}"
        print(f"update, {a.grad_steps} gradient steps from the same weights on the same batches ({label}; "
              f"{r['terminated']} terminations, {r['truncated']} truncations stored):")  # fmt: skip
        print(
            f"  largest difference: online {r['online']:.1e}, target {r['target']:.1e}, "
            f"loss {r['loss']:.1e}; parameters moved up to {r['moved']:.3f}; "
            f"gradient norm up to {r['grad_norm']:.2f}"
        )


if __name__ == "__main__":
    run_main(main)
