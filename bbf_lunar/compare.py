"""Compare variants of finished run.py runs across run folders: a tuning sweep, a replay-ratio study,
or bbf from one run against dqn from another.

Each --runs item is LABEL=FOLDER[:VARIANT] (VARIANT defaults to bbf). The script prints, and writes
into its own run folder, one row per item (replay ratio, learning rate, seeds, IQM with its 95%
bootstrap CI, mean +- std, per-seed scores), P(item > reference) for every other item with the
count of pairs won and the Newcombe interval, the IQM learning curves of all items in one plot,
the final IQMs with every seed's score, and which item has the highest IQM (the pick of a tuning
sweep). Scores and intervals are those of run.py (mean of the last 3 evaluation points; exact
bootstrap where the resamples can be listed).

    python bbf_lunar/compare.py --runs rr1=runs/bbf_lunar/rr1 rr2=runs/bbf_lunar/rr2 \\
        dqn=runs/bbf_lunar/rr1:dqn --reference dqn --clearml off
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's common, not an installed one
import plots  # noqa: E402
import stats  # noqa: E402

from common import RunArgs, RunLogger, UserError, parse_args, read_json, run_main, run_name  # noqa: E402


@dataclass
class Args(RunArgs):
    runs: list[str] = field(default_factory=list)  # LABEL=FOLDER[:VARIANT] items (VARIANT: bbf)
    reference: str = ""  # the label every other item is compared with (default: the last item)
    bootstrap_reps: int = 50_000  # bootstrap replicates when the resamples are too many to enumerate


def parse_item(text: str) -> tuple[str, Path, str]:
    label, sep, where = text.partition("=")
    if not sep or not label or not where:
        raise ValueError(f"--runs: {text!r} is not LABEL=FOLDER[:VARIANT]")
    folder, _, variant = where.partition(":")
    return label, Path(folder), variant or "bbf"


def check_args(args: Args) -> None:
    if len(args.runs) < 2:
        raise ValueError("--runs needs at least two LABEL=FOLDER[:VARIANT] items")
    labels = [parse_item(item)[0] for item in args.runs]
    if len(set(labels)) < len(labels):
        raise ValueError(f"--runs: labels must differ (got {', '.join(labels)})")
    if args.reference and args.reference not in labels:
        raise ValueError(f"--reference {args.reference!r} is none of the labels {', '.join(labels)}")


def read_item(text: str) -> dict:
    """One variant of one finished run: its scores, curve and settings; UserError naming what is wrong."""
    label, folder, variant = parse_item(text)
    if not (folder / "summary.json").is_file():
        raise UserError(f"{folder / 'summary.json'} not found: is {folder} a finished run.py run?")
    summary, config = read_json(folder / "summary.json"), read_json(folder / "config.json")
    if variant not in summary.get("variants", {}):
        found = ", ".join(summary.get("variants", {})) or "none"
        raise UserError(f"{folder} has no variant {variant!r} (it has: {found})")
    v, a = summary["variants"][variant], config.get("args", {})
    lr = a.get("dqn_lr") if variant == "dqn" else a.get("lr")
    ratio = summary.get("replay_ratio", {}).get(variant, a.get("replay_ratio"))
    item = {"label": label, "folder": str(folder), "variant": variant, "lr": lr, "replay_ratio": ratio}
    item["reset_steps"] = summary.get("reset_steps", {}).get(variant)
    return item | {"scores": v["final_returns"], "seeds": v["seeds"], "curve": summary["curves"][variant]}


def compare(items: list[dict], reference: str, reps: int, seed: int) -> dict:
    ref = next(i for i in items if i["label"] == reference)
    out = {"reference": reference, "items": {}}
    for item in items:
        row = {k: item[k] for k in ("folder", "variant", "lr", "replay_ratio", "seeds", "scores")}
        row |= stats.iqm_with_ci(item["scores"], reps, seed)
        if item is not ref:
            poi = stats.probability_of_improvement_with_ci(item["scores"], ref["scores"], reps, seed)
            row["vs_reference"] = poi
        out["items"][item["label"]] = row
    out["best"] = max(out["items"], key=lambda k: out["items"][k]["iqm"])
    out["caveat"] = stats.COVERAGE_CAVEAT
    return out


def table(result: dict) -> list[str]:
    ref = result["reference"]
    lines = [f"| item | variant | replay ratio | lr | seeds | IQM [95% CI] | mean +- std | P(item > {ref}) |"]
    lines.append("|---" * 8 + "|")
    for label, r in result["items"].items():
        seeds = f"{len(r['seeds'])} ({r['seeds'][0]}-{r['seeds'][-1]})"
        mean, std = np.mean(r["scores"]), np.std(r["scores"], ddof=1) if len(r["scores"]) > 1 else 0
        p = r.get("vs_reference")
        poi = (
            f"{p['poi']:.2f} ({p['pairs_won']}/{p['pairs']} won; CI [{p['ci_low']:.2f}, {p['ci_high']:.2f}], "
            f"Newcombe [{p['newcombe_low']:.2f}, {p['newcombe_high']:.2f}])"
            if p
            else "reference"
        )
        lines.append(
            f"| {label} | {r['variant']} | {r['replay_ratio']:g} | {r['lr']:g} | {seeds} | "
            f"{r['iqm']:.1f} [{r['ci_low']:.1f}, {r['ci_high']:.1f}] | {mean:.1f} +- {std:.1f} | {poi} |"
        )
    lines.append("")
    for label, r in result["items"].items():
        lines.append(f"{label}: per-seed scores " + ", ".join(f"{x:.1f}" for x in r["scores"]))
    lines.append(f"highest IQM: {result['best']}")
    lines.append(f"caveat: {result['caveat']}; the Newcombe interval does not collapse at 0 or 1.")
    return lines


def plot(items: list[dict]):
    curves = {i["label"]: i["curve"] | {"label": f"{i['label']} ({len(i['scores'])} seeds)"} for i in items}
    return plots.learning_curves(curves, {i["label"]: i.get("reset_steps") for i in items})


def plot_final(result: dict):
    return plots.final_scores(result["items"], "score")


def main() -> None:
    args = parse_args(Args, check=check_args, description=__doc__)
    items = [read_item(text) for text in args.runs]
    reference = args.reference or items[-1]["label"]
    with RunLogger("bbf_lunar", run_name("compare", args.seed), args) as log:
        result = compare(items, reference, args.bootstrap_reps, args.seed)
        lines = table(result)
        log.save_figure("learning_curves", plot(items))
        log.save_figure("final_iqm", plot_final(result))
        log.path("table.md").write_text("\n".join(lines) + "\n")
        log.write_summary(result)
    print("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
