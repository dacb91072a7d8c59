"""Throughput of one worker: environment steps per second for each variant, measured side by side.

Runs short training jobs of every variant in alternating rounds in this one process (one torch
thread, like a pool worker), so a busy machine slows all of them alike, and prints env steps/s,
the ratio to `dqn`, and the extrapolated minutes for a --total-steps run.

    python bbf_lunar/benchmark.py                      # bbf vs dqn, 3 rounds of 3000 learning steps
    python bbf_lunar/benchmark.py --variants bbf,small_net,dqn --steps 1000 --rounds 1
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bbf_run  # noqa: E402

from common import parse_args, run_main  # noqa: E402


@dataclass
class Args:
    variants: str = "bbf,dqn"  # comma-separated variants to time
    steps: int = 3000  # learning environment steps per timed job (after --warmup random steps)
    warmup: int = 500  # random-action steps before learning (not timed separately)
    rounds: int = 3  # alternating rounds; the median is reported
    total_steps: int = 100_000  # run length to extrapolate to
    seed: int = 0  # job seed


def check_args(a: Args) -> None:
    unknown = [v for v in bbf_run.variant_list(a.variants) if v not in bbf_run.VARIANTS]
    if unknown:
        raise ValueError(
            f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(bbf_run.VARIANTS)}"
        )
    if min(a.steps, a.rounds, a.total_steps) < 1 or a.warmup < 0:
        raise ValueError("--steps, --rounds and --total-steps must be >= 1, --warmup >= 0")


def main() -> None:
    args = parse_args(Args, check=check_args, description=__doc__)
    variants = bbf_run.variant_list(args.variants)
    total = args.warmup + args.steps
    base = replace(
        bbf_run.Args(),
        total_steps=total,
        eval_every=total,
        eval_episodes=1,
        learning_starts=args.warmup,
        checkpoint_every=10 * total,
    )
    rates: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for v in variants:
                spec = bbf_run.job_spec(base, v, args.seed, Path(tmp) / f"{v}_{r}")
                rates[v].append(bbf_run.train_job(spec)["env_steps_per_second"])
    print(
        f"\nenv steps/s per worker (one torch thread), median of {args.rounds} rounds of {total} steps "
        f"({args.warmup} random + {args.steps} learning; includes 2 one-episode evaluations)"
    )
    ref = float(np.median(rates[variants[-1]]))
    for v in variants:
        sps = float(np.median(rates[v]))
        print(
            f"{v:<17}{sps:>8.0f} steps/s   x{sps / ref:.2f} vs {variants[-1]}   "
            f"{args.total_steps / sps / 60:>5.1f} min per {args.total_steps:,}-step run"
        )


if __name__ == "__main__":
    run_main(main)
