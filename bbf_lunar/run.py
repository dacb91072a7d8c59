"""Bigger, Better, Faster (Schwarzer et al. 2023, arXiv 2305.19452) on gymnasium's LunarLander-v3,
scored with the interquartile mean and stratified-bootstrap intervals of Agarwal et al. 2021
(arXiv 2108.13264).

Every (variant, seed) pair is one job in a pool of worker processes (one torch thread each). A job
trains for --total-steps environment steps, evaluates the greedy policy on --eval-episodes seeded
episodes every --eval-every steps, checkpoints itself, and writes jobs/<variant>_seed<k>/result.json.
The parent then writes summary.json and the plots (learning curves, final IQM, performance profiles,
probability of improvement) into the run folder.

Full ablation (5 seeds x 6 variants):
    python bbf_lunar/run.py --seeds 5 --variants bbf,no_nstep_anneal,no_gamma_anneal,no_resets,small_net,dqn
Tiny smoke run (seconds):
    python bbf_lunar/run.py --seeds 2 --variants bbf,dqn --total-steps 600 --eval-every 300 \\
        --learning-starts 200 --eval-episodes 2 --clearml off
Resume an interrupted run, or redo only the statistics and plots from the per-job results:
    python bbf_lunar/run.py --out runs/bbf_lunar/<run> --resume [same flags]
    python bbf_lunar/run.py --out runs/bbf_lunar/<run> --summarize-only
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, also in spawned workers
from agent import Agent, AgentConfig, ModelConfig, QNetwork, ReplayBuffer, linear_epsilon, param_count  # noqa: E402
from report import make_plots, print_table, summarize  # noqa: E402

from common import RunLogger, UserError, default_data_dir, parse_args, run_main, run_name, write_json  # noqa: E402

ENV_ID = "LunarLander-v3"
EVAL_SEED_BASE = 1_000_000  # evaluation episodes use seeds 1e6 + i: the same episodes for every run


@dataclass
class Args:
    seed: int = 0  # first seed; the jobs use seed, seed+1, ..., seed+seeds-1
    seeds: int = 5  # independent runs per variant
    variants: str = "bbf"  # comma-separated: bbf,no_nstep_anneal,no_gamma_anneal,no_resets,small_net,dqn
    workers: int = os.cpu_count() or 1  # parallel worker processes (1 = run jobs in this process)
    total_steps: int = 100_000  # environment steps per run
    eval_every: int = 10_000  # environment steps between greedy evaluations (also at step 0 and the end)
    eval_episodes: int = 10  # evaluation episodes per evaluation point
    learning_starts: int = 2_000  # uniformly random actions before the first gradient step
    replay_ratio: float = 1.0  # gradient steps per environment step
    batch_size: int = 64  # transitions per gradient step
    lr: float = 3e-4  # AdamW learning rate (BBF: 1e-4; 3e-4 was better here, see README)
    weight_decay: float = 0.1  # AdamW weight decay
    tau: float = 0.005  # target network EMA rate per gradient step
    width: int = 128  # hidden units of the encoder
    blocks: int = 1  # residual blocks in the encoder
    n_max: int = 10  # n-step horizon after each reset
    n_min: int = 3  # n-step horizon after annealing
    gamma_start: float = 0.97  # discount after each reset
    gamma_end: float = 0.997  # discount after annealing
    anneal_steps: int = 10_000  # gradient steps to anneal n and gamma after each reset
    reset_every: int = 40_000  # gradient steps between resets (0 = never)
    eps_start: float = 1.0  # epsilon-greedy exploration at step 0
    eps_end: float = 0.01  # epsilon after decay
    eps_decay_steps: int = 10_000  # environment steps of linear epsilon decay
    checkpoint_every: int = 10_000  # environment steps between per-job checkpoints
    bootstrap_reps: int = 2000  # bootstrap replicates for every confidence interval
    resume: bool = False  # continue the run in --out: finished jobs are kept, others resume from checkpoints
    summarize_only: bool = False  # no training: statistics and plots from the result files in --out
    data_dir: str = default_data_dir()  # unused: LunarLander is simulated (kept for the shared command line)
    out: str | None = None  # run folder (default runs/bbf_lunar/<name>)
    clearml: Literal["auto", "offline", "online", "off"] = "auto"  # ClearML tracking mode
    clearml_queue: str | None = None  # enqueue on this ClearML agent queue instead of running here


# Ablations as overrides of Args fields. `no_*_anneal` hold n / gamma at the annealed value.
# small network: SB3's default DQN MLP, two hidden layers of 64
SMALL_NET = {"width": 64, "blocks": 1, "residual": False, "layer_norm": False}
VARIANTS = {
    "bbf": lambda a: {},
    "no_nstep_anneal": lambda a: {"n_max": a.n_min},
    "no_gamma_anneal": lambda a: {"gamma_start": a.gamma_end},
    "no_resets": lambda a: {"reset_every": 0},
    "small_net": lambda a: dict(SMALL_NET),
    "dqn": lambda a: {
        **SMALL_NET,
        "replay_ratio": 0.25,
        "n_max": 1,
        "n_min": 1,
        "gamma_start": 0.99,
        "gamma_end": 0.99,
        "reset_every": 0,
    },
}


def variant_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def check_args(a: Args) -> None:
    unknown = [v for v in variant_list(a.variants) if v not in VARIANTS]
    if unknown or not variant_list(a.variants):
        raise ValueError(
            f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}"
        )
    for name in (
        "seeds",
        "workers",
        "total_steps",
        "eval_every",
        "eval_episodes",
        "batch_size",
        "width",
        "n_max",
        "n_min",
        "checkpoint_every",
        "bootstrap_reps",
    ):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(a, name)})")
    for name in ("replay_ratio", "lr", "tau"):
        if getattr(a, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(a, name)})")
    if a.eval_every > a.total_steps:
        raise ValueError(f"--eval-every ({a.eval_every}) must be <= --total-steps ({a.total_steps})")
    if not 0 <= a.learning_starts < a.total_steps:
        raise ValueError(f"--learning-starts must be in [0, --total-steps) (got {a.learning_starts})")
    for name in ("gamma_start", "gamma_end", "eps_start", "eps_end", "tau"):
        if not 0 <= getattr(a, name) <= 1:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1] (got {getattr(a, name)})")
    if min(a.blocks, a.anneal_steps, a.reset_every, a.eps_decay_steps, a.weight_decay) < 0:
        raise ValueError(
            "--blocks, --anneal-steps, --reset-every, --eps-decay-steps and --weight-decay must be >= 0"
        )
    if (a.resume or a.summarize_only) and not a.out:
        raise ValueError("--resume and --summarize-only need --out <run folder>")


def job_spec(a: Args, variant: str, seed: int, job_dir: Path) -> dict:
    """Everything one worker needs, as plain data (it crosses a process boundary and is saved)."""
    s = {**asdict(a), "residual": True, "layer_norm": True, **VARIANTS[variant](a)}
    model = ModelConfig(
        width=s["width"], num_blocks=s["blocks"], residual=s["residual"], layer_norm=s["layer_norm"]
    )
    agent_fields = {f.name for f in fields(AgentConfig)}
    agent = AgentConfig(**{k: v for k, v in s.items() if k in agent_fields})
    run = {
        k: s[k]
        for k in (
            "total_steps",
            "eval_every",
            "eval_episodes",
            "learning_starts",
            "replay_ratio",
            "eps_start",
            "eps_end",
            "eps_decay_steps",
            "checkpoint_every",
        )
    }
    return {
        "variant": variant,
        "seed": seed,
        "job_dir": str(job_dir),
        "model": asdict(model),
        "agent": asdict(agent),
        "run": run,
    }


# ---------------------------------------------------------------------------------------------
# One job: train, evaluate, checkpoint (runs in a worker process)


def evaluate(agent: Agent, envs: list) -> np.ndarray:
    """Greedy returns of len(envs) episodes with fixed seeds, stepped together for batched inference."""
    obs = np.stack([env.reset(seed=EVAL_SEED_BASE + i)[0] for i, env in enumerate(envs)])
    returns, active = np.zeros(len(envs)), np.ones(len(envs), dtype=bool)
    while active.any():
        idx = np.flatnonzero(active)
        for i, action in zip(idx, agent.greedy(obs[idx])):
            obs[i], reward, terminated, truncated, _ = envs[i].step(int(action))
            returns[i] += reward
            active[i] = not (terminated or truncated)
    return returns


def save_checkpoint(path: Path, **state) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


class PlainProgress:
    """Stand-in for tqdm where it is not installed: one line per evaluation."""

    def __init__(self, total, initial, desc, **_):
        self.total, self.n, self.desc = total, initial, desc

    def update(self, k):
        self.n += k

    def set_postfix(self, refresh=True, **kw):
        print(
            f"{self.desc}: {self.n}/{self.total} steps, " + ", ".join(f"{k}={v}" for k, v in kw.items()),
            file=sys.stderr,
            flush=True,
        )

    def close(self):
        pass


def train_job(spec: dict, slots=None) -> dict:
    import gymnasium as gym
    import torch

    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = PlainProgress

    torch.set_num_threads(1)
    variant, seed, run = spec["variant"], spec["seed"], spec["run"]
    job_dir = Path(spec["job_dir"])
    job_dir.mkdir(parents=True, exist_ok=True)
    write_json(job_dir / "spec.json", spec)
    ckpt_path = job_dir / "checkpoint.pt"

    # setup: seed everything from the job seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    agent = Agent(ModelConfig(**spec["model"]), AgentConfig(**spec["agent"]))
    buffer = ReplayBuffer(run["total_steps"], agent.model_cfg.obs_dim)  # BBF keeps the whole run in replay
    state = {
        "env_step": 0,
        "updates_owed": 0.0,
        "eval_steps": [],
        "eval_returns": [],
        "seconds": 0.0,
        "episodes": 0,
        "resumes": 0,
    }
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        agent.load_state_dict(ckpt["agent"])
        buffer.load_state_dict(ckpt["buffer"])
        rng.bit_generator.state = ckpt["numpy_rng"]
        torch.set_rng_state(ckpt["torch_rng"])
        state = ckpt["state"]
        state["resumes"] += 1
        # the interrupted episode cannot be continued: cut it like a time limit so n-step windows stop there
        buffer.truncated[(buffer.ptr - 1) % buffer.capacity] = True
    env = gym.make(ENV_ID)
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed + 7919 * state["resumes"])
    eval_envs = [gym.make(ENV_ID) for _ in range(run["eval_episodes"])]
    progress = open(job_dir / "progress.jsonl", "a")

    def record_eval():
        returns = evaluate(agent, eval_envs)
        state["eval_steps"].append(state["env_step"])
        state["eval_returns"].append(returns.tolist())
        progress.write(json.dumps({"step": state["env_step"], "eval/return": float(returns.mean())}) + "\n")
        progress.flush()
        return float(returns.mean())

    t0, session_start_step = time.perf_counter(), state["env_step"]
    last_eval = record_eval() if state["env_step"] == 0 else float(np.mean(state["eval_returns"][-1]))
    position = slots.get() if slots is not None else 0
    bar = tqdm(
        total=run["total_steps"],
        initial=state["env_step"],
        position=position,
        leave=False,
        desc=f"{variant} seed {seed}",
        unit="step",
        dynamic_ncols=True,
        mininterval=2.0 if sys.stderr.isatty() else 30.0,
    )  # a log file gets a line every 30 s
    episode_return, episode_length, losses = 0.0, 0, []
    try:
        while state["env_step"] < run["total_steps"]:
            # act
            step = state["env_step"]
            if step < run["learning_starts"]:
                action = int(rng.integers(agent.model_cfg.num_actions))
            else:
                epsilon = linear_epsilon(step, run["eps_start"], run["eps_end"], run["eps_decay_steps"])
                action = agent.act(obs, epsilon, rng)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            buffer.add(obs, action, reward, next_obs, terminated, truncated)
            obs, episode_return, episode_length = next_obs, episode_return + reward, episode_length + 1
            state["env_step"] = step = step + 1
            if terminated or truncated:
                state["episodes"] += 1
                progress.write(
                    json.dumps(
                        {
                            "step": step,
                            "train/return": episode_return,
                            "train/length": episode_length,
                            "train/n": agent.n_step,
                            "train/gamma": agent.gamma,
                        }
                    )
                    + "\n"
                )
                obs, _ = env.reset()
                episode_return, episode_length = 0.0, 0

            # learn: replay_ratio gradient steps per environment step, fractional ratios carried over
            if step > run["learning_starts"]:
                state["updates_owed"] += run["replay_ratio"]
                while state["updates_owed"] >= 1:
                    losses.append(agent.update(buffer, rng)["loss"])
                    state["updates_owed"] -= 1

            # evaluate, log, checkpoint
            if step % 1000 == 0:
                bar.update(step - bar.n)
                if losses:
                    progress.write(
                        json.dumps(
                            {
                                "step": step,
                                "train/loss": float(np.mean(losses)),
                                "train/grad_steps": agent.grad_steps,
                            }
                        )
                        + "\n"
                    )
                    losses = []
            if step % run["eval_every"] == 0 or step == run["total_steps"]:
                last_eval = record_eval()
                bar.set_postfix(eval_return=f"{last_eval:.0f}", resets=agent.num_resets, refresh=False)
            if step % run["checkpoint_every"] == 0 and step < run["total_steps"]:
                seconds = state["seconds"]
                state["seconds"] = seconds + time.perf_counter() - t0
                save_checkpoint(
                    ckpt_path,
                    agent=agent.state_dict(),
                    buffer=buffer.state_dict(),
                    state=state,
                    numpy_rng=rng.bit_generator.state,
                    torch_rng=torch.get_rng_state(),
                )
                state["seconds"] = seconds
    finally:
        bar.close()
        progress.close()
        if slots is not None:
            slots.put(position)

    # save: the result file marks the job done; the checkpoint is no longer needed
    seconds = state["seconds"] + time.perf_counter() - t0
    result = {
        "variant": variant,
        "seed": seed,
        "eval_steps": state["eval_steps"],
        "eval_returns": state["eval_returns"],
        "final_return": float(np.mean(state["eval_returns"][-1])),
        "env_steps": state["env_step"],
        "grad_steps": agent.grad_steps,
        "resets": agent.num_resets,
        "episodes": state["episodes"],
        "seconds": seconds,
        "env_steps_per_second": (state["env_step"] - session_start_step) / (time.perf_counter() - t0),
        "resumed": state["resumes"],
        "spec": spec,
    }
    write_json(job_dir / "result.json", result)
    ckpt_path.unlink(missing_ok=True)
    return result


def job_cost(spec: dict) -> float:
    """Rough relative cost: gradient steps x weights per layer (fixed overhead of 0.2 per step)."""
    return spec["run"]["replay_ratio"] * (
        spec["model"]["width"] ** 2 * (2 * spec["model"]["num_blocks"] + 1) / 128**2 / 5 + 0.2
    )


def _settings(spec: dict) -> dict:
    """A spec without its folder, so a run folder can be moved and still resumed."""
    return json.loads(json.dumps({k: v for k, v in spec.items() if k != "job_dir"}))


def _train_job_star(packed):
    return train_job(*packed)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    # setup
    args = parse_args(Args, check=check_args, description=__doc__)
    if args.summarize_only and not (Path(args.out) / "jobs").is_dir():
        raise UserError(
            f"--summarize-only: no jobs/ folder in {args.out}; point --out at the folder of an earlier run"
        )
    variants = variant_list(args.variants)
    seeds = list(range(args.seed, args.seed + args.seeds))
    log = RunLogger(
        "bbf_lunar",
        run_name("bbf", args.seed),
        asdict(args),
        out=args.out,
        clearml=args.clearml,
        clearml_queue=args.clearml_queue,
        resume=args.resume or args.summarize_only,
    )
    jobs_dir = log.path("jobs")

    # jobs: finished ones are kept, the rest train (resuming from their checkpoints)
    if args.summarize_only:
        results = [json.loads(p.read_text()) for p in sorted(jobs_dir.glob("*/result.json"))]
        pending = []
    else:
        specs = [job_spec(args, v, s, jobs_dir / f"{v}_seed{s}") for v in variants for s in seeds]
        for spec in specs:
            saved = Path(spec["job_dir"]) / "spec.json"
            if saved.exists() and _settings(json.loads(saved.read_text())) != _settings(spec):
                raise UserError(
                    f"{saved.parent} was started with other settings; use the original flags or a new --out"
                )
        results = [
            json.loads((Path(s["job_dir"]) / "result.json").read_text())
            for s in specs
            if (Path(s["job_dir"]) / "result.json").exists()
        ]
        pending = [s for s in specs if not (Path(s["job_dir"]) / "result.json").exists()]
        pending.sort(key=job_cost, reverse=True)  # longest first, so the pool finishes together
        for v in variants:
            spec = next(s for s in specs if s["variant"] == v)
            grad = max(0, args.total_steps - args.learning_starts) * spec["run"]["replay_ratio"]
            print(
                f"{v:<17} {param_count(QNetwork(ModelConfig(**spec['model']))):>7,} params, "
                f"{grad:,.0f} gradient steps/run, model {spec['model']}, agent {spec['agent']}",
                flush=True,
            )
        print(
            f"{len(specs)} jobs ({len(specs) - len(pending)} already done), {args.workers} workers -> "
            f"{log.run_dir}",
            flush=True,
        )

    # loop: one job per (variant, seed), in a pool of single-threaded workers
    if pending:
        if args.workers == 1 or len(pending) == 1:
            results += [train_job(spec) for spec in pending]
        else:
            ctx = mp.get_context("spawn")
            with ctx.Manager() as manager:
                slots = manager.Queue()
                for i in range(min(args.workers, len(pending))):
                    slots.put(i)
                with ctx.Pool(min(args.workers, len(pending))) as pool:
                    for result in pool.imap_unordered(_train_job_star, [(s, slots) for s in pending]):
                        results.append(result)
                        print(
                            f"done {result['variant']} seed {result['seed']}: final return "
                            f"{result['final_return']:.1f} ({result['seconds'] / 60:.1f} min)",
                            flush=True,
                        )
                    pool.close()
                    pool.join()
    if not results:
        raise UserError(f"no finished jobs under {jobs_dir}")

    # evaluate: IQM, bootstrap CIs, probability of improvement, profiles
    s = summarize(results, args.bootstrap_reps, args.seed)
    for j, step in enumerate(next(iter(s["curves"].values()))["steps"]):
        log.log(
            step,
            {
                f"eval/{k}_{name}": c[k][j]
                for name, c in s["curves"].items()
                if j < len(c["steps"])
                for k in ("iqm", "ci_low", "ci_high")
            },
        )

    # save
    make_plots(s, log)
    log.write_summary(s)
    print_table(s)
    log.close()


if __name__ == "__main__":
    run_main(main)
