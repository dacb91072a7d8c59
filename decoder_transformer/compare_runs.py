"""Compare finished train.py runs by position encoding: val-loss table (mean +- std over seeds) and curves.

Losses are given in nats per token (the training loss) and in bits per character, which compares runs
with character and byte vocabularies (a byte model predicts ~1.0-1.1 tokens per character of English).

python decoder_transformer/compare_runs.py --runs runs/decoder_transformer/baby/*/ --clearml off
  # the GPU runs beside nanoGPT's own train.py log (its "step N: train loss .., val loss .." lines)
python decoder_transformer/compare_runs.py --runs decoder_transformer/results/gpu_h100/ours_s* \\
    --nanogpt-log decoder_transformer/results/gpu_h100/nanogpt.log --clearml off
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's common, not an installed one
from common import RunArgs, RunLogger, UserError, parse_args, read_json, run_main, run_name  # noqa: E402

COLUMNS = (  # summary.json key, table header
    ("best_val_loss", "best periodic val estimate, nats/token"),
    ("val_loss", "val loss, tiled windows of T, nats/token"),
    ("val_loss_full_context", "val loss, full context T, nats/token"),
    ("val_bits_per_char_full_context", "val bits/char, full context T"),
    ("val_bits_per_byte_full_context", "val bits/byte, full context T"),
    ("val_loss_2x_context", "val loss, tiled windows of 2T, nats/token"),
    ("train_loss", "train loss, nats/token"),
)


@dataclass
class Args(RunArgs):
    runs: list[str] = field(default_factory=list)  # run folders written by train.py (each with summary.json)
    nanogpt_log: str | None = None  # stdout of a nanoGPT train.py run, drawn and tabled beside ours


def check_args(args: Args) -> None:
    if not args.runs:
        raise ValueError("--runs needs at least one run folder")


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def read_run(folder: Path) -> dict:
    """summary.json, seed and periodic val-loss curve of one finished run; UserError naming a bad file."""
    if not (folder / "summary.json").is_file():
        raise UserError(f"{folder / 'summary.json'} not found: is {folder} a finished train.py run?")
    summary = read_json(folder / "summary.json")
    config = read_json(folder / "config.json")
    metrics = folder / "metrics.jsonl"
    try:
        rows = [json.loads(r) for r in metrics.read_text().splitlines() if r]
        curve = [(r["step"], r["eval/val_loss"]) for r in rows if "eval/val_loss" in r]
        args = config["args"]
        return {"summary": summary, "seed": args["seed"], "block_size": args["block_size"], "curve": curve,
                "pos": summary["pos"]}  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"{folder}: summary.json, config.json or metrics.jsonl is not a train.py run's ({e})"
        ) from None


NANOGPT_EVAL = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)$", re.MULTILINE)


def read_nanogpt_log(path: Path) -> list[tuple[int, float]]:
    """(step, val loss) of each periodic evaluation that nanoGPT's train.py printed."""
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise UserError(f"--nanogpt-log: cannot read {path} ({e.strerror})") from None
    curve = [(int(step), float(val)) for step, _, val in NANOGPT_EVAL.findall(text)]
    if not curve:
        raise UserError(f"--nanogpt-log: no 'step N: train loss .., val loss ..' lines in {path}")
    return curve


def table(runs: dict) -> tuple[list[str], dict]:
    lines = ["| positions | vocab | seeds | " + " | ".join(h for _, h in COLUMNS) + " | params |"]
    lines.append("|---" * (len(COLUMNS) + 4) + "|")
    result = {}
    for (pos, vocab), items in sorted(runs.items()):
        values = {
            k: [i["summary"].get(k) for i in items if i["summary"].get(k) is not None] for k, _ in COLUMNS
        }
        result[f"{pos}_{vocab}"] = {"seeds": [i["seed"] for i in items], **values}
        result[f"{pos}_{vocab}"]["full_context_stride"] = [
            i["summary"].get("full_context_stride") for i in items
        ]
        result[f"{pos}_{vocab}"]["block_size"] = [i["block_size"] for i in items]
        for key in ("train_seconds", "params", "iters"):
            result[f"{pos}_{vocab}"][key] = [i["summary"].get(key) for i in items]
        cells = [mean_std(values[k]) if values[k] else "n/a" for k, _ in COLUMNS]
        seeds = ", ".join(map(str, sorted(result[f"{pos}_{vocab}"]["seeds"])))
        lines.append(
            f"| {pos} | {vocab} | {seeds} | " + " | ".join(cells) + f" | {items[0]['summary']['params']:,} |"
        )
    return lines, result


def plot(runs: dict, nanogpt: list[tuple[int, float]] | None = None):
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if nanogpt:
        steps, losses = zip(*nanogpt)
        ax.plot(steps, losses, color="black", ls="--", label="nanoGPT train.py (its estimate)")
    for ((pos, vocab), items), color in zip(sorted(runs.items()), plt.cm.tab10.colors):
        for n, item in enumerate(items):
            if item["curve"]:
                steps, losses = zip(*item["curve"])
                ax.plot(steps, losses, color=color, alpha=0.8, label=f"{pos} ({vocab})" if n == 0 else None)
    if ax.get_lines():  # the first steps' losses would flatten the part that matters
        lowest = min(min(line.get_ydata()) for line in ax.get_lines())
        ax.set_ylim(lowest - 0.05, 1.4 * lowest)
    ax.set_xlabel("step")
    ax.set_ylabel("val loss, nats/token (periodic estimate; axis cut at 1.4x the lowest)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Validation loss by position encoding (one line per seed)")
    return fig


def main() -> None:
    args = parse_args(Args, check=check_args, description=__doc__)
    runs = defaultdict(list)
    for folder in map(Path, args.runs):
        run = read_run(folder)
        runs[(run["pos"], run["summary"].get("vocab", "char"))].append(run)
    with RunLogger("decoder_transformer", run_name("compare", args.seed), args) as log:
        lines, result = table(runs)
        nanogpt = read_nanogpt_log(Path(args.nanogpt_log)) if args.nanogpt_log else None
        if nanogpt:
            best_step, best = min(nanogpt, key=lambda point: point[1])
            result["nanogpt"] = {
                "best_val_loss": best,
                "best_step": best_step,
                "final_val_loss": nanogpt[-1][1],
            }
            lines.append(
                f"\nnanoGPT train.py (one run, its own {len(nanogpt)} periodic estimates): best val "
                f"{best:.4f} at step {best_step}, last {nanogpt[-1][1]:.4f} at step {nanogpt[-1][0]}"
            )
        log.save_figure("val_loss_curves", plot(runs, nanogpt))
        log.path("table.md").write_text("\n".join(lines) + "\n")
        log.write_summary(result)
    print("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
