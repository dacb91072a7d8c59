"""The peak memory of a whole train.py run as a user measures it: `/usr/bin/time -f %M` around the command.

Runs one train.py command in a child process under GNU time, then writes one small JSON file to
--results: the command, the whole-process peak RSS from time (ru_maxrss of the child: the
interpreter, numpy, ClearML, the data, training, testing and the plot), the run's own figures
beside it (test accuracy, the in-process peak RSS after every epoch, the step's working set), the
machine and its load. The README's memory table is rendered from these files (tables.py).

    python revnet_mnist/measure.py --data-dir PATH --model revnet --seed 0     # -> results/memory/
    for s in 0 1 2; do for m in revnet resnet; do
      python revnet_mnist/measure.py --data-dir PATH --model $m --seed $s; done; done
    python revnet_mnist/measure.py --data-dir PATH --clearml off --results runs/memory_off   # ClearML's cost
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's common, not an installed one
from common import UserError, default_data_dir, parse_args, read_json, run_main, write_json
from common.cli import REPO_ROOT

HERE = Path(__file__).resolve().parent
TIME = "/usr/bin/time"  # GNU time: %M is the child's peak resident set size in KiB


@dataclass
class Args:
    model: Literal["revnet", "resnet", "mlp"] = "revnet"  # train.py --model
    seed: int = 0  # train.py --seed
    preset: Literal["default", "memory"] = "memory"  # train.py --preset
    clearml: Literal["auto", "offline", "online", "off"] = "auto"  # train.py --clearml (auto: its default)
    epochs: int | None = None  # train.py --epochs (None: the preset's)
    threads: int = 1  # train.py --threads
    train_flags: str = (
        ""  # more train.py flags, as one string (e.g. "--val-size 80"); recorded in the command
    )
    data_dir: str = default_data_dir()  # train.py --data-dir
    results: str = str(HERE / "results" / "memory")  # folder for <model>_seed<seed>.json
    runs: str = str(REPO_ROOT / "runs" / "revnet_mnist" / "memory")  # train.py's --out parent folder


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_teeing_stderr(command: list[str]) -> tuple[int, str]:
    """Run `command`, passing its stderr (progress bars, warnings) through as it comes: (exit code, the
    last 4 KiB of that stderr)."""
    proc, tail = subprocess.Popen(command, stderr=subprocess.PIPE), b""
    while chunk := os.read(proc.stderr.fileno(), 4096):
        sys.stderr.buffer.write(chunk)
        sys.stderr.flush()
        tail = (tail + chunk)[-4096:]
    return proc.wait(), tail.decode(errors="replace")


def main() -> None:
    args = parse_args(Args, description=__doc__)
    if not Path(TIME).is_file():
        raise UserError(f"{TIME} (GNU time) not found; install it (Debian/Ubuntu: apt-get install time)")
    name = f"{args.model}_seed{args.seed}" + (f"_{args.preset}" if args.preset != "memory" else "")
    name += f"_clearml-{args.clearml}" if args.clearml != "auto" else ""  # one folder per measured command
    out = Path(args.runs) / name
    if out.exists():
        shutil.rmtree(out)  # a fresh run every time: the measurement is of a whole run
    flags = ["--preset", args.preset, "--model", args.model, "--seed", str(args.seed)]
    flags += ["--threads", str(args.threads)] + (["--epochs", str(args.epochs)] if args.epochs else [])
    flags += [] if args.clearml == "auto" else ["--clearml", args.clearml]
    flags += args.train_flags.split()
    command = [sys.executable, str(HERE / "train.py"), *flags, "--data-dir", args.data_dir, "--out", str(out)]
    with tempfile.NamedTemporaryFile("r", suffix=".time") as kib:
        load_before = os.getloadavg()
        started = time.time()
        returncode, stderr = run_teeing_stderr([TIME, "-f", "%M", "-o", kib.name, *command])
        wall = time.time() - started
        load_after = os.getloadavg()
        if returncode != 0:
            if "error:" in stderr:  # train.py has said why in its own line
                sys.exit(returncode)
            raise UserError(f"train.py exited with {returncode}; nothing written")
        peak_kib = int(kib.read().strip().splitlines()[-1])
    summary = read_json(out / "summary.json")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_epoch = [row["charts/peak_rss_mib"] for row in rows if "charts/peak_rss_mib" in row]
    result = {
        "command": "python revnet_mnist/train.py " + " ".join(flags) + " --data-dir PATH",
        "model": args.model,
        "seed": args.seed,
        "preset": args.preset,
        "clearml": args.clearml,
        "whole_process_peak_rss_mib": peak_kib / 1024,  # /usr/bin/time -f %M
        "test_accuracy": summary["test_accuracy"],
        "best_val_accuracy": summary["best_val_accuracy"],
        "peak_rss_per_epoch_mib": per_epoch,  # in-process ru_maxrss after each epoch
        "in_process_peak_rss_mib": summary["peak_rss_mib"],  # after the test evaluation, before the plot
        "peak_step_memory_mib": summary["peak_step_memory_mib"],  # the first step's working set
        "warm_step_memory_mib": summary["warm_step_memory_mib"],
        "workspace_mib": summary["workspace_mib"],
        "max_rebuild_error": summary["max_rebuild_error"],
        "params": summary["params"],
        "config": {
            k: summary[k] for k in ("depth", "width", "batch_size", "epochs", "lr", "augment_shift", "dtype")
        },
        "threads": args.threads,
        "train_seconds": summary["train_seconds"],
        "wall_seconds": wall,
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs, Linux, Python {platform.python_version()}",
    }
    Path(args.results).mkdir(parents=True, exist_ok=True)
    write_json(Path(args.results) / f"{name}.json", result)
    print(
        f"{name}: test accuracy {100 * result['test_accuracy']:.2f}%, whole-process peak RSS "
        f"{result['whole_process_peak_rss_mib']:.1f} MiB (in-process {result['in_process_peak_rss_mib']:.1f})"
    )


if __name__ == "__main__":
    run_main(main)
