"""The confirmatory test of PROTOCOL.md: a finished run folder -> bbf_lunar/results/confirmation.json.

Reads jobs/<variant>_seed<k>/result.json for bbf and dqn, checks that the run is the one the
protocol names (seeds 1000-1019, 100k environment steps, evaluations every 10k), scores each run as
the mean of its last three evaluation points, and writes per variant the IQM with its percentile
bootstrap interval, P(bbf > dqn) with its Newcombe interval, the IQM difference bbf - dqn with its
bootstrap interval, and the decision: confirmed iff the Newcombe lower bound is above 0.5.

    python bbf_lunar/confirm.py --run runs/bbf_lunar/confirmation --protocol-commit HASH
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's common, not an installed one
import stats  # noqa: E402

from common import UserError, parse_args, read_json, run_main, write_json  # noqa: E402

SEEDS = list(range(1000, 1020))
VARIANTS = ("bbf", "dqn")
TOTAL_STEPS = 100_000
EVAL_STEPS = list(range(0, TOTAL_STEPS + 1, 10_000))
SCORE_POINTS = 3
REPS = 100_000  # bootstrap replicates (20 runs: C(39, 20) resamples, too many to enumerate)
BOOTSTRAP_SEED = 0
THRESHOLD = 0.5  # confirmed iff the Newcombe lower bound of P(bbf > dqn) is above this


@dataclass
class Args:
    """Score the confirmation run of PROTOCOL.md and write its result file."""

    run: str = "runs/bbf_lunar/confirmation"  # the finished run.py folder (its jobs/ holds the result files)
    protocol_commit: str = ""  # the commit that added PROTOCOL.md (recorded in the result)
    out: str = "bbf_lunar/results/confirmation.json"  # the result file to write


def check_args(a: Args) -> None:
    if not a.protocol_commit.strip():
        raise ValueError("--protocol-commit: give the hash of the commit that added bbf_lunar/PROTOCOL.md")


def run_score(result: dict) -> float:
    """Mean of the last three evaluation points, each the mean of its evaluation episodes."""
    points = [float(np.mean(x)) for x in result["eval_returns"]]
    return float(np.mean(points[-SCORE_POINTS:]))


def load_scores(run_dir: Path) -> tuple[dict[str, list[float]], list[str]]:
    """({variant: scores in seed order}, ["variant seed" of each run that was resumed after an
    interruption]); UserError when a seed is missing, unfinished or off-protocol."""
    scores, resumed = {}, []
    for variant in VARIANTS:
        scores[variant] = []
        for seed in SEEDS:
            path = run_dir / "jobs" / f"{variant}_seed{seed}" / "result.json"
            if not path.exists():
                raise UserError(
                    f"{path} is missing: the run is not finished (resume it with run.py --resume)"
                )
            r = read_json(path)
            if (r["variant"], r["seed"], r["env_steps"]) != (variant, seed, TOTAL_STEPS):
                raise UserError(
                    f"{path}: {r['variant']} seed {r['seed']} at {r['env_steps']} steps, not the protocol's"
                )
            if r["eval_steps"] != EVAL_STEPS:
                raise UserError(f"{path}: evaluated at {r['eval_steps']}, the protocol says every 10k")
            scores[variant].append(run_score(r))
            if r.get("resumed"):
                resumed.append(f"{variant} {seed}")
    return scores, resumed


def iqm_difference_with_ci(x, y, reps: int = REPS, seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> dict:
    """IQM(x) - IQM(y) with its percentile bootstrap interval: x and y resampled independently,
    `reps` replicates each (the r-th x resample with the r-th y resample)."""
    x, y = np.sort(np.asarray(x, dtype=np.float64)), np.sort(np.asarray(y, dtype=np.float64))
    rng = np.random.default_rng(seed)
    (ix, wx), (iy, _) = stats.resamples(len(x), reps, rng, False), stats.resamples(len(y), reps, rng, False)

    def iqms(v, idx):  # rows of idx are sorted, so are v[idx]
        cut = int(0.25 * len(v))
        return v[idx][:, cut : len(v) - cut].mean(axis=1)

    low, high = stats.weighted_interval(iqms(x, ix) - iqms(y, iy), wx, level)
    return {"diff": stats.iqm(x) - stats.iqm(y), "ci_low": low, "ci_high": high, "reps": reps}


def confirmation(scores: dict[str, list[float]], protocol_commit: str, resumed: list[str]) -> dict:
    """confirmation.json's content."""
    variants = {}
    for v in VARIANTS:
        ci = stats.iqm_with_ci(scores[v], REPS, BOOTSTRAP_SEED)
        variants[v] = {
            "iqm": ci["iqm"],
            "ci_low": ci["ci_low"],
            "ci_high": ci["ci_high"],
            "scores": scores[v],
        }
    p = stats.probability_of_improvement_with_ci(scores["bbf"], scores["dqn"], REPS, BOOTSTRAP_SEED)
    confirmed = p["newcombe_low"] > THRESHOLD
    return {
        "protocol_commit": protocol_commit,
        "seeds": SEEDS,
        "variants": variants,
        "poi": {
            "poi": p["poi"],
            "newcombe_low": p["newcombe_low"],
            "newcombe_high": p["newcombe_high"],
            "pairs_won": p["pairs_won"],
            "pairs_tied": p["pairs_tied"],
            "pairs": p["pairs"],
        },
        "iqm_difference": iqm_difference_with_ci(scores["bbf"], scores["dqn"]),
        "score": f"mean of the last {SCORE_POINTS} evaluation points (10 episodes each)",
        "bootstrap": f"percentile, 95%, {REPS} replicates, seed {BOOTSTRAP_SEED}",
        "decision_rule": f"confirmed iff the Newcombe 95% lower bound of P(bbf > dqn) > {THRESHOLD}",
        "confirmed": bool(confirmed),
        "resumed_runs": resumed,  # runs continued from a checkpoint after an interruption
    }


def main() -> None:
    args = parse_args(Args, check=check_args)
    run_dir = Path(args.run)
    if not (run_dir / "jobs").is_dir():
        raise UserError(f"{run_dir} has no jobs/ folder: give the run.py run folder with --run")
    scores, resumed = load_scores(run_dir)
    out = confirmation(scores, args.protocol_commit.strip(), resumed)
    write_json(Path(args.out), out)
    p, d = out["poi"], out["iqm_difference"]
    print(
        f"P(bbf > dqn) = {p['poi']:.3f}, Newcombe [{p['newcombe_low']:.3f}, {p['newcombe_high']:.3f}]; "
        f"IQM bbf {out['variants']['bbf']['iqm']:.1f}, dqn {out['variants']['dqn']['iqm']:.1f}, "
        f"difference {d['diff']:.1f} [{d['ci_low']:.1f}, {d['ci_high']:.1f}]; "
        f"{'confirmed' if out['confirmed'] else 'NOT confirmed'} -> {args.out}"
    )


if __name__ == "__main__":
    run_main(main)
