"""Seeds as a batch dimension, measured: seed-steps per second of one process training S seeds
together against one process training a single seed, on one core (one torch thread).

A seed-step is one environment step of one seed with everything that belongs to it at the same
replay ratio: action selection, the env step, the replay buffer and the gradient steps. Each round
times every S in turn in this one process (so a busy machine slows them alike), after --warmup
random-action steps that fill the buffers; the median over rounds is reported and written to
--out as {"vectorised": {"<S>": {"one_process_steps_per_s", "separate_steps_per_s", "speedup"}}}.

    python bbf_lunar/benchmark.py                       # bbf at replay ratio 1, S = 5 and 10
    python bbf_lunar/benchmark.py --replay-ratio 8 --steps 300 --rounds 2
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bbf_run  # noqa: E402
from job import Job  # noqa: E402

from common import parse_args, run_main, write_json  # noqa: E402


@dataclass
class Args:
    variant: str = "bbf"  # variant to time (see run.py --variants)
    seeds: list[int] | None = None  # seed counts S to compare with S = 1 (default: 5 10)
    replay_ratio: float = 1.0  # bbf's gradient steps per environment step (dqn keeps its own)
    steps: int = 1000  # timed learning steps per S and round
    warmup: int = 300  # random-action steps before the timed ones (they fill the buffers)
    rounds: int = 3  # alternating rounds; the median is reported
    seed: int = 0  # first seed of every process
    out: str = "runs/bbf_lunar/benchmark.json"  # where the JSON result goes


def check_args(a: Args) -> None:
    if a.variant not in bbf_run.VARIANTS:
        raise ValueError(f"--variant: unknown {a.variant}; choose from {', '.join(bbf_run.VARIANTS)}")
    if any(s < 2 for s in a.seeds or []):
        raise ValueError("--seeds: each seed count must be >= 2 (S = 1 is the reference)")
    if a.replay_ratio <= 0 or min(a.steps, a.rounds) < 1:
        raise ValueError("--replay-ratio must be > 0, --steps and --rounds >= 1")


def seed_steps_per_second(args: Args, num_seeds: int, folder: Path) -> float:
    """Train a fresh S-seed job for warmup + steps env steps; time the last `steps`."""
    import torch

    torch.set_num_threads(1)
    total = args.warmup + args.steps
    base = replace(bbf_run.Args(), total_steps=total + 1, eval_every=total + 1, learning_starts=args.warmup)
    base = replace(base, eval_episodes=1, checkpoint_every=10 * total, replay_ratio=args.replay_ratio)
    seeds = list(range(args.seed, args.seed + num_seeds))
    job = Job(bbf_run.job_spec(base, args.variant, seeds, folder), "cpu")
    progress, losses = io.StringIO(), []
    obs = job.start_envs()
    for _ in range(args.warmup):
        obs = job.env_step(obs, progress, losses)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        obs = job.env_step(obs, progress, losses)
    return num_seeds * args.steps / (time.perf_counter() - t0)


def main() -> None:
    args = parse_args(Args, check=check_args, description=__doc__)
    counts = args.seeds or [5, 10]
    rates: dict[int, list[float]] = {s: [] for s in [1, *counts]}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for s in rates:
                rates[s].append(seed_steps_per_second(args, s, Path(tmp) / f"{s}_{r}"))
    median = {s: float(np.median(v)) for s, v in rates.items()}
    result = {
        "variant": args.variant,
        "replay_ratio": args.replay_ratio,
        "threads": 1,
        "cpu": os.cpu_count(),
        "rounds": {str(s): v for s, v in rates.items()},
        "vectorised": {
            str(s): {
                "one_process_steps_per_s": median[s],
                "separate_steps_per_s": median[1],
                "speedup": median[s] / median[1],
            }
            for s in counts
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(
        f"{args.variant} at replay ratio {args.replay_ratio:g}, one torch thread, median of {args.rounds} "
        f"rounds of {args.steps} steps (after {args.warmup} random ones):"
    )
    print(f"  S = 1 (a single-seed process): {median[1]:8.0f} seed-steps/s")
    for s in counts:
        print(
            f"  S = {s:<2} (one process)        : {median[s]:8.0f} seed-steps/s  x{median[s] / median[1]:.2f}"
        )
    print(f"-> {args.out}")


if __name__ == "__main__":
    run_main(main)
