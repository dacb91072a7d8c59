"""One job: a batch of seeds of one variant, trained together in this process (run.py's workers).

The seeds share one gymnasium vector env of LunarLander-v3 (one sub-env per seed, each seeded with
its own seed; autoreset in SAME_STEP mode, so a finished episode's true last state comes from
info["final_obs"] and the returned observation already starts the next episode) and one `Agent`
whose tensors have a leading seed axis. The job evaluates every --eval-every steps, checkpoints
itself, and writes one result.json per seed, so results do not depend on how seeds were batched.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from agent import Agent, AgentConfig, ModelConfig, ReplayBuffer, warmup_epsilon

from common import CHECKPOINT_PT, UserError, load_torch, save_torch, write_json

ENV_ID = "LunarLander-v3"
EVAL_SEED_BASE = 1_000_000  # evaluation episodes use seeds 1e6 + i: the same episodes for every run
RESUME_SEED_STRIDE = 7919  # after a resume, seed s's env restarts with seed s + 7919 * resumes
SCORE_POINTS = 3  # a run's score: mean of its last 3 evaluation points


def require_env() -> None:
    """One line, before any worker starts, when gymnasium or LunarLander's Box2D / pygame is missing."""
    hint = "install it with: pip install 'gymnasium[box2d]'"
    try:
        import gymnasium as gym
    except ImportError as e:
        raise UserError(f"{ENV_ID} needs gymnasium ({e}); {hint}") from None
    try:
        gym.make(ENV_ID).close()
    except (ImportError, gym.error.DependencyNotInstalled) as e:
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise UserError(f"{ENV_ID} cannot be made ({first}); {hint}") from None


def require_cuda(flag: str) -> None:
    """--cuda-graph / --device cuda: one line up front when torch sees no CUDA GPU."""
    if not torch.cuda.is_available():
        raise UserError(f"{flag} needs a CUDA GPU, and torch sees none here; run without it")


COMPILERS = ("g++", "clang++", "c++", "gcc", "clang", "cc")


def require_compiler(which=shutil.which) -> None:
    """--compile: one line up front when no C/C++ compiler is found (torch.compile's inductor builds its
    CPU kernels, and Triton its GPU launchers, with one), instead of a traceback from every worker."""
    if os.environ.get("CXX") or os.environ.get("CC") or any(which(c) for c in COMPILERS):
        return
    raise UserError(
        f"--compile needs a C/C++ compiler (none of {', '.join(COMPILERS)} on PATH, CXX and CC unset); "
        "install one (e.g. apt install g++) or run without --compile"
    )


def seed_dir(jobs_dir: Path, variant: str, seed: int) -> Path:
    return jobs_dir / f"{variant}_seed{seed}"


def reset_schedule(total_steps: int, reset_every: int, no_resets_after: int) -> list[int]:
    """The environment steps at which a run resets: every reset_every steps, skipping any after which
    fewer than reset_every steps remain before no_resets_after (spr_agent.py, reset_weights: the reset
    at step t happens iff t + interval <= no_resets_after; BBF.gin: reset_every 20_000,
    no_resets_after 100_000 = the run's length, so 20k, 40k, 60k and 80k)."""
    if reset_every <= 0:
        return []
    return [t for t in range(reset_every, total_steps + 1, reset_every) if t + reset_every <= no_resets_after]


def evaluate(
    agent: Agent, envs: list[list], target: bool = False, epsilon: float = 0.0, rngs=None
) -> np.ndarray:
    """Returns (S, E): envs[s][i] plays episode i (seed 1e6 + i) with seed s's online (or target)
    network, epsilon-greedy; with epsilon > 0 seed s draws from rngs[s] (E uniforms, then E actions,
    per step)."""

    def policy(obs):  # every seed's network on all its episodes at once
        actions = agent.greedy(obs, target)
        if epsilon > 0:
            E, A = actions.shape[1], agent.model_cfg.num_actions
            for s, rng in enumerate(rngs):
                explore, random_actions = rng.random(E) < epsilon, rng.integers(A, size=E)
                actions[s] = np.where(explore, random_actions, actions[s])
        return actions

    return evaluate_policy(policy, envs)


def evaluate_policy(policy, envs: list[list]) -> np.ndarray:
    """Undiscounted returns (S, E) of the evaluation protocol: envs[s][i] plays episode i from seed
    1e6 + i, all in lockstep; policy maps states (S, E, obs_dim) to actions (S, E)."""
    S, E = len(envs), len(envs[0])
    obs = np.stack([[env.reset(seed=EVAL_SEED_BASE + i)[0] for i, env in enumerate(row)] for row in envs])
    returns, active = np.zeros((S, E)), np.ones((S, E), dtype=bool)
    while active.any():
        actions = policy(obs)
        for s, i in zip(*np.nonzero(active)):
            obs[s, i], reward, terminated, truncated, _ = envs[s][i].step(int(actions[s, i]))
            returns[s, i] += reward
            active[s, i] = not (terminated or truncated)
    return returns


class Job:
    """Set-up, restore, loop and save of one seed batch, as named stages."""

    def __init__(self, spec: dict, device: str = "cpu"):
        import gymnasium as gym

        self.spec, self.run, self.seeds = spec, spec["run"], spec["seeds"]
        self.dir = Path(spec["job_dir"])
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / "spec.json", spec)
        self.ckpt_path = self.dir / CHECKPOINT_PT
        if spec["agent"].get("compile"):  # one graph per network and seed count: room for every job of a run
            import torch._dynamo

            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.agent = Agent(ModelConfig(**spec["model"]), AgentConfig(**spec["agent"]), self.seeds, device)
        S, obs_dim = len(self.seeds), self.agent.model_cfg.obs_dim
        self.buffer = ReplayBuffer(S, self.run["buffer_size"], obs_dim)
        self.rngs = [np.random.default_rng(s) for s in self.seeds]
        self.state = {"env_step": 0, "updates_owed": 0.0, "eval_steps": [], "eval_returns": []}
        self.state |= {"seconds": 0.0, "episodes": [0] * S, "resumes": 0, "reset_steps": []}
        self.envs = gym.vector.SyncVectorEnv(
            [lambda: gym.make(ENV_ID) for _ in self.seeds], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
        )
        self.eval_envs = [[gym.make(ENV_ID) for _ in range(self.run["eval_episodes"])] for _ in self.seeds]

    # restore

    def restore(self) -> None:
        """Continue from checkpoint.pt when there is one (UserError naming it when it is damaged)."""
        if not self.ckpt_path.exists():
            return
        ckpt = load_torch(self.ckpt_path)
        try:
            self.agent.load_state_dict(ckpt["agent"])
            self.buffer.load_state_dict(ckpt["buffer"])
            for rng, state in zip(self.rngs, ckpt["numpy_rngs"], strict=True):
                rng.bit_generator.state = json.loads(state)
            self.state = ckpt["state"]
            self.state.setdefault("reset_steps", [])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            from common import UserError

            raise UserError(f"{self.ckpt_path} does not fit this job ({type(e).__name__}: {e})") from None
        self.state["resumes"] += 1
        self.buffer.truncate_newest()  # the interrupted episodes cannot go on: cut them like a time limit

    def save_checkpoint(self, seconds: float) -> None:
        state = {**self.state, "seconds": seconds}
        save_torch(
            {
                "agent": self.agent.state_dict(),
                "buffer": self.buffer.state_dict(),
                "numpy_rngs": [json.dumps(rng.bit_generator.state) for rng in self.rngs],
                "state": state,
            },
            self.ckpt_path,
        )

    # loop

    def act(self, obs: np.ndarray, step: int) -> np.ndarray:
        """Uniformly random for the first learning_starts steps, then epsilon 1 -> eps_end over
        eps_decay_steps (BBF: Dopamine's linearly_decaying_epsilon from min_replay_history; dqn:
        learning_starts 0, as SB3's schedule starts at step 0); the target network acts when
        act_with_target (BBF.gin: target_action_selection = True)."""
        r = self.run
        epsilon = warmup_epsilon(step, r["learning_starts"], r["eps_decay_steps"], r["eps_end"])
        return self.agent.act(obs, epsilon, self.rngs, target=r["act_with_target"])

    def learn(self, step: int, losses: list) -> None:
        """After env step `step` (1-based): every train_freq steps, replay_ratio * train_freq gradient
        steps (fractions carried over); target copies every target_every steps; resets."""
        r, agent = self.run, self.agent
        if step > r["learning_starts"] and step % r["train_freq"] == 0:
            self.state["updates_owed"] += r["replay_ratio"] * r["train_freq"]
            while self.state["updates_owed"] >= 1:
                losses.append(agent.update(self.buffer, self.rngs)["loss"])
                self.state["updates_owed"] -= 1
        if r["target_every"] and step % r["target_every"] == 0:
            agent.hard_update_target()
        # spr_agent.py reset_weights: no reset after which less than an interval remains before
        # no_resets_after (the run's length): at 20k, 40k, 60k and 80k of 100k (see reset_schedule)
        every = r["reset_every"]
        if every and step % every == 0 and step + every <= r["no_resets_after"]:
            agent.reset()
            self.state["reset_steps"].append(step)

    def record_eval(self, progress) -> np.ndarray:
        r, step = self.run, self.state["env_step"]
        # evaluation's own exploration draws, seeded by (seed, step): the training streams are untouched
        rngs = [np.random.default_rng([EVAL_SEED_BASE, seed, step]) for seed in self.seeds]
        returns = evaluate(self.agent, self.eval_envs, r["act_with_target"], r["eval_epsilon"], rngs)
        self.state["eval_steps"].append(self.state["env_step"])
        self.state["eval_returns"].append(returns.tolist())
        row = {"step": self.state["env_step"], "eval/return": returns.mean(axis=1).tolist()}
        progress.write(json.dumps(row) + "\n")
        progress.flush()
        return returns.mean(axis=1)

    def env_step(self, obs: np.ndarray, progress, losses: list) -> np.ndarray:
        """One step of every seed's env (autoreset in SAME_STEP mode), stored, then the learning."""
        actions = self.act(obs, self.state["env_step"])
        next_obs, rewards, terminated, truncated, info = self.envs.step(actions)
        done = terminated | truncated
        true_next = next_obs.copy()  # the real last state of a finished episode, not the next reset
        if done.any():
            true_next[done] = np.stack(info["final_obs"][done])
        self.buffer.add(obs, actions, rewards, true_next, terminated, truncated)
        self.episode_return += rewards
        self.state["env_step"] = step = self.state["env_step"] + 1
        if done.any():
            self._log_episodes(progress, step, done, self.episode_return)
            self.episode_return[done] = 0.0
        self.learn(step, losses)
        return next_obs

    def start_envs(self) -> np.ndarray:
        self.episode_return = np.zeros(len(self.seeds))
        resumes = self.state["resumes"]
        return self.envs.reset(seed=[s + RESUME_SEED_STRIDE * resumes for s in self.seeds])[0]

    def loop(self, progress, report) -> float:
        """Train to total_steps; returns the wall seconds of this session."""
        r, st, agent = self.run, self.state, self.agent
        t0, start_step = time.perf_counter(), st["env_step"]
        if st["env_step"] == 0:
            self.record_eval(progress)
        obs, losses = self.start_envs(), []
        while st["env_step"] < r["total_steps"]:
            obs = self.env_step(obs, progress, losses)
            step = st["env_step"]
            if step % 1000 == 0 and losses:
                row = {
                    "step": step,
                    "train/loss": torch.stack(losses).double().mean(dim=0).tolist(),  # one GPU wait
                    "train/n": int(agent.n_step[0]),
                }
                progress.write(json.dumps(row | {"train/gamma": float(agent.gamma[0])}) + "\n")
                losses = []
            if step % 1000 == 0:
                progress.flush()  # the parent's progress lines follow this file (progress.py)
            if step % r["eval_every"] == 0 or step == r["total_steps"]:
                report(step, self.record_eval(progress), (step - start_step) / (time.perf_counter() - t0))
            if step % r["checkpoint_every"] == 0 and step < r["total_steps"]:
                self.save_checkpoint(st["seconds"] + time.perf_counter() - t0)
        return time.perf_counter() - t0

    def _log_episodes(self, progress, step, done, episode_return) -> None:
        for s in np.flatnonzero(done):
            self.state["episodes"][s] += 1
        row = {
            "step": step,
            "train/return": {str(self.seeds[s]): episode_return[s] for s in np.flatnonzero(done)},
        }
        progress.write(json.dumps(row, default=float) + "\n")

    # save

    def finish(self, seconds: float, session_steps: int, session_seconds: float) -> list[dict]:
        """One result.json per seed (the job is done when all are written); the checkpoint goes."""
        st, results = self.state, []
        eval_returns = np.array(st["eval_returns"])  # (points, S, E)
        for s, seed in enumerate(self.seeds):
            per_point = eval_returns[:, s].mean(axis=1)
            result = {
                "variant": self.spec["variant"],
                "seed": seed,
                "eval_steps": st["eval_steps"],
                "eval_returns": eval_returns[:, s].tolist(),
                "score": float(per_point[-SCORE_POINTS:].mean()),
                "final_return": float(per_point[-1]),
                "env_steps": st["env_step"],
                "grad_steps": int(self.agent.grad_steps[s]),
                "resets": int(self.agent.num_resets[s]),
                "reset_steps": st["reset_steps"],
                "episodes": st["episodes"][s],
                "seconds": seconds,
                "seeds_in_process": len(self.seeds),
                "seed_steps_per_second": session_steps * len(self.seeds) / max(session_seconds, 1e-9),
                "resumed": st["resumes"],
                "spec": {k: v for k, v in self.spec.items() if k not in ("job_dir", "seeds")},
            }
            path = Path(self.spec["seed_dirs"][s]) / "result.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, result)
            results.append(result)
        self.ckpt_path.unlink(missing_ok=True)
        return results


def at_step(result: dict, step: int) -> dict:
    """A result dict cut to its evaluations up to `step`, scored there (for --score-step)."""
    keep = [i for i, t in enumerate(result["eval_steps"]) if t <= step]
    if len(keep) < SCORE_POINTS:
        from common import UserError

        raise UserError(
            f"--score-step {step}: {result['variant']} seed {result['seed']} has no 3 evaluations by then"
        )
    points = [float(np.mean(result["eval_returns"][i])) for i in keep]
    return result | {
        "eval_steps": [result["eval_steps"][i] for i in keep],
        "eval_returns": [result["eval_returns"][i] for i in keep],
        "score": float(np.mean(points[-SCORE_POINTS:])),
        "final_return": points[-1],
        "env_steps": result["eval_steps"][keep[-1]],
    }


def progress_results(spec: dict) -> list[dict]:
    """Result dicts of an unfinished job from the evaluations in its progress.jsonl (per-point means;
    a row repeated after a resume counts once). No timing: seconds and steps/s are NaN."""
    by_step = {}
    path = Path(spec["job_dir"]) / "progress.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        row = json.loads(line)
        if "eval/return" in row:
            by_step[row["step"]] = row["eval/return"]
    steps = sorted(by_step)
    return [
        {
            "variant": spec["variant"],
            "seed": seed,
            "eval_steps": steps,
            "eval_returns": [[by_step[t][s]] for t in steps],
            "seeds_in_process": len(spec["seeds"]),
            "seconds": float("nan"),
            "seed_steps_per_second": float("nan"),
        }
        for s, seed in enumerate(spec["seeds"])
    ]


def train_job(spec: dict, report=None) -> list[dict]:
    """Train one seed batch to the end (resuming from its checkpoint); one result dict per seed."""
    torch.set_num_threads(1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    job = Job(spec, device)
    job.restore()
    start_step = job.state["env_step"]
    if report is None:
        report = print_progress(spec)
    with open(job.dir / "progress.jsonl", "a") as progress:
        session = job.loop(progress, report)
    seconds = job.state["seconds"] + session
    return job.finish(seconds, job.state["env_step"] - start_step, session)


def print_progress(spec: dict):
    label = f"{spec['variant']} seeds {spec['seeds'][0]}-{spec['seeds'][-1]}"

    def report(step: int, returns: np.ndarray, seed_sps: float) -> None:
        print(
            f"{label}: step {step:,}/{spec['run']['total_steps']:,}, eval return per seed "
            f"[{', '.join(f'{x:.0f}' for x in returns)}], {seed_sps * len(returns):.0f} seed-steps/s",
            flush=True,
        )

    return report
