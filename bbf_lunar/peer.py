"""stable-baselines3's DQN with the rl-baselines3-zoo LunarLander-v3 hyperparameters, scored with this
folder's evaluation protocol, so `dqn` can be checked against the implementation the zoo tuned.

Used by `benchmark.py --peer sb3`. stable-baselines3 is an optional extra (not in requirements.txt):
`pip install stable-baselines3`. The protocol is job.py's: --eval-episodes greedy episodes on the
fixed evaluation seeds 1e6 + i, every --eval-every steps and at step 0; a run's score is the mean of
its last 3 evaluation points.
"""

from __future__ import annotations

import time

import numpy as np
from job import ENV_ID, SCORE_POINTS, evaluate_policy

# rl-baselines3-zoo hyperparams/dqn.yml, LunarLander-v3 (the setting run.py's `dqn` copies)
ZOO_DQN = {
    "learning_rate": 6.3e-4,
    "batch_size": 128,
    "buffer_size": 50_000,
    "learning_starts": 0,
    "gamma": 0.99,
    "target_update_interval": 250,
    "train_freq": 4,
    "gradient_steps": -1,
    "exploration_fraction": 0.12,
    "exploration_final_eps": 0.1,
    "policy_kwargs": {"net_arch": [256, 256]},
}


def require_sb3():
    try:
        import stable_baselines3
    except ImportError:
        from common import UserError

        raise UserError(
            "--peer sb3 needs stable-baselines3 (an optional extra): pip install stable-baselines3"
        ) from None
    return stable_baselines3


def evaluate_sb3(model, episodes: int) -> float:
    """Mean greedy return of an sb3 model on job.py's evaluation episodes, played in lockstep."""
    import gymnasium as gym

    envs = [[gym.make(ENV_ID) for _ in range(episodes)]]

    def policy(obs: np.ndarray) -> np.ndarray:  # (1, E, obs_dim) -> (1, E)
        return model.predict(obs[0], deterministic=True)[0][None]

    returns = evaluate_policy(policy, envs)
    for env in envs[0]:
        env.close()
    return float(returns.mean())


def train_sb3_dqn(seed: int, total_steps: int, eval_every: int, eval_episodes: int, progress=print) -> dict:
    """One seed of the zoo DQN for total_steps env steps; result dict shaped like job.py's."""
    import gymnasium as gym
    import torch
    from stable_baselines3 import DQN
    from stable_baselines3.common.callbacks import BaseCallback

    torch.set_num_threads(1)
    steps, points = [], []

    def record(model, step):
        points.append(evaluate_sb3(model, eval_episodes))
        steps.append(step)
        progress(f"sb3 dqn seed {seed}: step {step:,}/{total_steps:,}, eval return {points[-1]:.0f}")

    class Every(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps % eval_every == 0 or self.num_timesteps == total_steps:
                record(self.model, self.num_timesteps)
            return True

    model = DQN("MlpPolicy", gym.make(ENV_ID), seed=seed, device="cpu", **ZOO_DQN)
    t0 = time.perf_counter()
    record(model, 0)
    model.learn(total_timesteps=total_steps, callback=Every())
    seconds = time.perf_counter() - t0
    return {
        "variant": "sb3_dqn",
        "seed": seed,
        "eval_steps": steps,
        "eval_points": points,
        "score": float(np.mean(points[-SCORE_POINTS:])),
        "seconds": seconds,
        "seed_steps_per_second": total_steps / seconds,
    }
