"""Keep a finished run's per-seed evaluation curves in a small committed file, so every table and figure
built on the run can be made again without the run folder (tables.py reads these files).

    python bbf_lunar/export.py --run runs/bbf_lunar/<run> --name confirmation
        # -> bbf_lunar/results/confirmation_curves.json

The file holds the run's settings and the commit that made it, and per variant: the seeds, the
evaluation steps, each seed's evaluation returns (the mean over the --eval-episodes episodes of each
evaluation point), its score (the mean of the last 3 points), the env steps of its resets, and the
time its processes took.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's common, not an installed one
from job import SCORE_POINTS  # noqa: E402

from common import UserError, parse_args, read_json, run_main, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Args:
    """Export a finished run.py run's per-seed evaluation curves to results/<name>_curves.json."""

    run: str = ""  # the run folder (holds config.json, summary.json and jobs/)
    name: str = ""  # the file's name: results/<name>_curves.json (letters, digits, _ and -)
    results: str = str(RESULTS)  # the folder to write into


def check_args(a: Args) -> None:
    if not a.run:
        raise ValueError("--run: give the folder of a finished run.py run")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", a.name):
        raise ValueError(f"--name must be letters, digits, _ or - (got {a.name!r})")


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def curves(run: Path) -> dict:
    """The compact record of a finished run (UserError naming what is missing)."""
    if not (run / "summary.json").is_file():
        raise UserError(f"{run / 'summary.json'} not found: is {run} a finished run.py run?")
    config, summary = read_json(run / "config.json"), read_json(run / "summary.json")
    out = {
        "run": run.name,
        "git_commit": config.get("git_commit"),
        "resumed_at_commits": [r.get("git_commit") for r in config.get("resumes", [])],
        "versions": config.get("versions", {}),
        "python": config.get("python"),
        "started": config.get("started"),
        "args": config.get("args", {}),
        "score": f"mean of the last {SCORE_POINTS} evaluation points",
        "variants": {},
    }
    for name, v in summary["variants"].items():
        results = [read_json(run / "jobs" / f"{name}_seed{k}" / "result.json") for k in v["seeds"]]
        steps = results[0]["eval_steps"]
        if any(r["eval_steps"] != steps for r in results):
            raise UserError(f"{run}: the runs of {name} were evaluated at different steps")
        out["variants"][name] = {
            "seeds": [r["seed"] for r in results],
            "eval_steps": steps,
            "returns": [[mean(point) for point in r["eval_returns"]] for r in results],  # (seeds, points)
            "scores": [r["score"] for r in results],
            "reset_steps": summary.get("reset_steps", {}).get(name, results[0].get("reset_steps")),
            "seeds_in_process": v.get("seeds_in_process"),
            "minutes_per_process": v.get("minutes_per_process"),
            "seed_steps_per_second": v.get("seed_steps_per_second"),
        }
    return out


def main() -> None:
    args = parse_args(Args, check=check_args, description=__doc__)
    record = curves(Path(args.run))
    path = Path(args.results) / f"{args.name}_curves.json"
    write_json(path, record)
    shape = ", ".join(f"{v}: {len(r['seeds'])} seeds" for v, r in record["variants"].items())
    print(f"{path}: {shape}, commit {record['git_commit']}")


if __name__ == "__main__":
    run_main(main)
