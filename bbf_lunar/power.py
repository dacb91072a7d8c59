"""How many seeds per variant would resolve an effect of the observed size: a simulation from the
observed per-seed scores.

The observed scores of each variant stand in for its population. For n seeds per variant, a
simulated experiment draws n scores from each variant's observed scores (with replacement,
independently) and computes the probability of improvement P(reference > variant) with its 95%
Newcombe interval (stats.py). The experiment resolves the effect when the interval excludes 0.5 on
the side of the observed effect. The population P(X > Y) of two such empirical distributions is
the observed P(X > Y), so every simulated experiment has a true effect of exactly the observed
size. Draws are nested across seed counts (the first n of one long draw), so the curve over n is
smooth. The answer is the smallest listed n whose resolved fraction reaches --power; none when no
listed n does. The observed scores are a small sample: the answer inherits their error.

    python bbf_lunar/power.py --summary bbf_lunar/results/ablation_curves.json \\
        --out bbf_lunar/results/ablation_seed_power.json --label "what made the scores"

--summary is an export.py curves file (every variant against bbf) or a compare.py summary (every
item against its reference).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's common, not an installed one
import stats  # noqa: E402

from common import UserError, parse_args, read_json, run_main, write_json  # noqa: E402

SEED_COUNTS = (10, 15, 20, 30, 40, 60, 80, 100, 150, 200, 300, 400)  # seeds per variant tried, in order


def resolved_fractions(x_scores, y_scores, seed_counts=SEED_COUNTS, sims: int = 2000, level: float = 0.95,
                       seed: int = 0) -> dict:  # fmt: skip
    """{"observed_poi", "seed_counts", "resolved", "mean_poi"}: for each n in seed_counts, the
    fraction of `sims` simulated n-vs-n experiments whose Newcombe interval for P(X > Y) excludes
    0.5 on the observed side (either side when the observed P is 0.5), and their mean P(X > Y)."""
    x, y = np.asarray(x_scores, dtype=np.float64), np.asarray(y_scores, dtype=np.float64)
    counts = [int(n) for n in seed_counts]
    if not counts or min(counts) < 1 or counts != sorted(set(counts)):
        raise ValueError(f"seed_counts must be increasing positive integers (got {list(seed_counts)})")
    if sims < 1 or x.size == 0 or y.size == 0:
        raise ValueError("sims and both score lists must be non-empty")
    observed = stats.probability_of_improvement(x, y)
    # nested: experiment r at n uses ix[r, :n], and drawing seed by seed (one generator per variant)
    # makes those numbers the same whatever the largest count
    gen_x, gen_y = np.random.default_rng(seed).spawn(2)
    ix = gen_x.integers(0, x.size, size=(counts[-1], sims)).T  # (sims, max n)
    iy = gen_y.integers(0, y.size, size=(counts[-1], sims)).T
    resolved, mean_poi = [], []
    for n in counts:
        pois = np.array([stats.probability_of_improvement(x[ix[r, :n]], y[iy[r, :n]]) for r in range(sims)])
        bounds = {p: stats.newcombe_interval(p, n, n, level) for p in np.unique(pois)}
        low = np.array([bounds[p][0] for p in pois])
        high = np.array([bounds[p][1] for p in pois])
        if observed > 0.5:
            hit = low > 0.5
        elif observed < 0.5:
            hit = high < 0.5
        else:
            hit = (low > 0.5) | (high < 0.5)
        resolved.append(float(hit.mean()))
        mean_poi.append(float(pois.mean()))
    return {"observed_poi": observed, "seed_counts": counts, "resolved": resolved, "mean_poi": mean_poi}


def seeds_needed(fractions: dict, power: float = 0.8) -> int | None:
    """The smallest seed count whose resolved fraction reaches `power`; None when none does."""
    for n, f in zip(fractions["seed_counts"], fractions["resolved"]):
        if f >= power:
            return n
    return None


def seed_power(x_scores, y_scores, seed_counts=SEED_COUNTS, sims: int = 2000, power: float = 0.8,
               level: float = 0.95, seed: int = 0) -> dict:  # fmt: skip
    """resolved_fractions(...) with the observed Newcombe interval and "seeds_needed" added."""
    result = resolved_fractions(x_scores, y_scores, seed_counts, sims, level, seed)
    ci = stats.probability_of_improvement_with_ci(x_scores, y_scores, level=level)
    return {
        **result,
        "observed_newcombe": [ci["newcombe_low"], ci["newcombe_high"]],
        "observed_seeds": [len(x_scores), len(y_scores)],
        "spans_half": bool(ci["newcombe_low"] <= 0.5 <= ci["newcombe_high"]),
        "seeds_needed": seeds_needed(result, power),
    }


# ---------------------------------------------------------------------------------------------
# Command line: every variant of a summary file against its reference


@dataclass
class Args:
    summary: str = "bbf_lunar/results/ablation_curves.json"  # export.py curves or compare.py summary
    out: str = "bbf_lunar/results/ablation_seed_power.json"  # the result file written
    sims: int = 2000  # simulated experiments per seed count
    power: float = 0.8  # the resolved fraction a seed count must reach
    level: float = 0.95  # confidence level of the Newcombe interval
    seed: int = 0  # seeds the simulation's generator
    label: str = ""  # what made the summary's scores (agent version), stored with the result


def check_args(a: Args) -> None:
    if a.sims < 1:
        raise ValueError(f"--sims must be >= 1 (got {a.sims})")
    for name in ("power", "level"):
        if not 0 < getattr(a, name) < 1:
            raise ValueError(f"--{name} must be in (0, 1) (got {getattr(a, name)})")


def source_commit(path: str) -> str | None:
    """The last commit that changed `path` (None outside a git checkout)."""
    try:
        proc = subprocess.run(["git", "log", "-1", "--format=%H", "--", path], capture_output=True, text=True)
    except OSError:
        return None
    return proc.stdout.strip() or None


def read_scores(path: str) -> tuple[str, dict[str, list[float]]]:
    """(reference, {name: scores}) from an export.py curves file ({"variants": {v: {"scores"}}}, the
    reference bbf) or a compare.py summary ({"reference", "items": {label: {"scores"}}})."""
    data = read_json(path)
    if isinstance(data, dict) and isinstance(data.get("variants"), dict):
        reference, items = "bbf", data["variants"]
    elif isinstance(data, dict) and isinstance(data.get("items"), dict):
        reference, items = data.get("reference"), data["items"]
    else:
        raise UserError(f"{path}: neither an export.py curves file nor a compare.py summary")
    if reference not in items:
        raise UserError(f"{path}: no reference {reference!r} among {', '.join(items) or 'no items'}")
    bad = [name for name, item in items.items() if not isinstance(item, dict) or "scores" not in item]
    if bad:
        raise UserError(f"{path}: no 'scores' for {', '.join(bad)}")
    return reference, {name: item["scores"] for name, item in items.items()}


def main() -> None:
    a = parse_args(Args, check=check_args, description=__doc__)
    reference, scores = read_scores(a.summary)
    command = f"python bbf_lunar/power.py --summary {a.summary} --out {a.out}"
    command += f" --sims {a.sims} --power {a.power} --level {a.level} --seed {a.seed}"
    command += f" --label {shlex.quote(a.label)}" if a.label else ""
    result = {
        "source": a.summary,
        "source_commit": source_commit(a.summary),
        "label": a.label,
        "command": command,
        "question": f"P({reference} > variant): seeds per variant for the Newcombe interval to exclude 0.5",
        "sims": a.sims,
        "power": a.power,
        "level": a.level,
        "comparisons": {},
    }
    print(f"{'variant':<18} {'P(ref > v)':>10} {'Newcombe (observed)':>20}  seeds needed (power {a.power})")
    for variant, x in scores.items():
        if variant == reference:
            continue
        r = seed_power(scores[reference], x, sims=a.sims, power=a.power, level=a.level, seed=a.seed)
        result["comparisons"][variant] = r
        low, high = r["observed_newcombe"]
        needed = r["seeds_needed"] or f"> {SEED_COUNTS[-1]}"
        print(f"{variant:<18} {r['observed_poi']:>10.2f} {f'[{low:.2f}, {high:.2f}]':>20}  {needed}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(a.out, result)
    print(f"-> {a.out}")


if __name__ == "__main__":
    run_main(main)
