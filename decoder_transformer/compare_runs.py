"""Compare finished train.py runs by position encoding: val-loss table (mean +- std over seeds) and curves.

python decoder_transformer/compare_runs.py --runs runs/decoder_transformer/baby/*/ --clearml off
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common import RunLogger, UserError, default_data_dir, parse_args, run_main, run_name  # noqa: E402


@dataclass
class Args:
    runs: list[str] = field(default_factory=list)  # run folders written by train.py (each with summary.json)
    seed: int = 0  # unused (no randomness); present for the common command line
    data_dir: str = default_data_dir()  # unused; present for the common command line
    out: str | None = None  # run folder for the table and plot (default runs/decoder_transformer/<name>)
    clearml: Literal["auto", "offline", "online", "off"] = "auto"  # ClearML mirroring
    clearml_queue: str | None = None  # enqueue on this ClearML agent queue instead of running here


def check_args(args: Args) -> None:
    if not args.runs:
        raise ValueError("--runs needs at least one run folder")


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def main() -> None:
    args = parse_args(Args, check=check_args, description=__doc__)
    runs = defaultdict(list)
    for folder in map(Path, args.runs):
        summary_path = folder / "summary.json"
        if not summary_path.is_file():
            raise UserError(f"{summary_path} not found: is {folder} a finished train.py run?")
        summary = json.loads(summary_path.read_text())
        config = json.loads((folder / "config.json").read_text())["args"]
        metrics = [json.loads(r) for r in (folder / "metrics.jsonl").read_text().splitlines() if r]
        curve = [(r["step"], r["val/loss"]) for r in metrics if "val/loss" in r]
        runs[summary["pos"]].append({"summary": summary, "seed": config["seed"], "curve": curve})
    log = RunLogger(
        "decoder_transformer",
        run_name("compare", args.seed),
        asdict(args),
        out=args.out,
        clearml=args.clearml,
        clearml_queue=args.clearml_queue,
    )

    # table
    lines = [
        "| positions | seeds | val loss (context T) | val loss (context 2T) | train loss | params |",
        "|---|---|---|---|---|---|",
    ]
    table = {}
    for pos, items in sorted(runs.items()):
        val = [i["summary"]["val_loss"] for i in items]
        val_2x = [i["summary"]["val_loss_2x_context"] for i in items if i["summary"]["val_loss_2x_context"]]
        train = [i["summary"]["train_loss"] for i in items]
        table[pos] = {
            "seeds": sorted(i["seed"] for i in items),
            "val_loss": val,
            "val_loss_2x_context": val_2x,
            "train_loss": train,
        }
        lines.append(
            f"| {pos} | {', '.join(map(str, table[pos]['seeds']))} | {mean_std(val)} | "
            f"{mean_std(val_2x) if val_2x else 'n/a (no positions past T)'} | {mean_std(train)} | "
            f"{items[0]['summary']['params']:,} |"
        )
    print("\n".join(lines))

    # curves
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (pos, items), color in zip(sorted(runs.items()), plt.cm.tab10.colors):
        for n, item in enumerate(items):
            steps, losses = zip(*item["curve"])
            ax.plot(steps, losses, color=color, alpha=0.8, label=pos if n == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("val loss (periodic estimate, fixed windows)")
    ax.set_ylim(top=2.6)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Validation loss by position encoding (one line per seed)")
    log.save_figure("val_loss_curves", fig)
    log.path("table.md").write_text("\n".join(lines) + "\n")
    log.write_summary(table)
    log.close()


if __name__ == "__main__":
    run_main(main)
