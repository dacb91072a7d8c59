"""Memory and speed of the numpy RevNet, its stored-activation counterpart (resnet) and a plain MLP.

Two studies:

`--rss` (memory as a user measures it): for each depth and model, footprint.py trains a few steps
in a fresh process, and the peak RSS of that process (its ru_maxrss, from wait4) is recorded beside
the training footprint computed from array sizes (dataset, weights, gradients, optimizer state, the
batch, activations stored for backward) and the peak memory of one step (tracemalloc, in a second
fresh process). Then revnet and resnet steps are timed side by side at --time-depth, and with
--runs DIR the test accuracies of the train.py runs in DIR are compared. Prints the targets and
writes rss.json and rss.png (peak RSS vs depth):

    python revnet_mnist/benchmark.py --rss --data-dir PATH   # width 128, batch 8192, depths 4-48

With --rss, width, batch size, depths and timed steps default to the configuration where
activations dominate (128, 8192, 4 8 16 32 48, 10); --runs defaults to runs/revnet_mnist/rss_config,
where the README's train.py commands write.

Default (step study): in one process, per depth, the peak memory of one training step above what
was held before it (tracemalloc), the median step time of each model and of the same resnet in torch
(CPU, autograd, AdamW, same weights and threads), models taking turns so a busy machine slows them
alike; and the reversible backward's numerics (gradient error against stored activations, rebuild
error) in float64 and float32. Writes benchmark.json and benchmark.png:

    python revnet_mnist/benchmark.py --data-dir PATH                  # a few minutes
    python revnet_mnist/benchmark.py --depths 2 4 --steps 5 --clearml off        # tiny

Without MNIST files in --data-dir, random data of the same size and type is used (a step's cost does
not depend on the pixels). Timings use --threads BLAS threads (default 1).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's common, not an installed one
from mnist_data import load_split, normalise, split_present
from revnet import MODELS, Adam, ModelConfig, Network, softmax_cross_entropy, train_step
from threadpoolctl import threadpool_info, threadpool_limits

from common import (
    DataArgs,
    RunLogger,
    UserError,
    check_fits,
    parse_args,
    read_json,
    run_main,
    run_name,
    write_json,
)
from common.cli import REPO_ROOT

MIB = 2**20
LR, WEIGHT_DECAY = 1e-3, 5e-5  # train.py's defaults; the values don't change the cost of a step
FOOTPRINT = Path(__file__).resolve().parent / "footprint.py"
TARGETS = {"rss_ratio": 0.35, "flat": 1.10, "time_ratio": 1.5, "accuracy_points": 0.2}


@dataclass
class Args(DataArgs):
    # network depths to measure (default: 2 4 8 16 32; with --rss: 4 8 16 32 48)
    depths: list[int] | None = None
    batch_size: int | None = None  # images per step (default: 128; with --rss: 8192)
    width: int | None = None  # features after the input projection (default: 256; with --rss: 128)
    steps: int | None = None  # timed steps per model, median reported (default: 30; with --rss: 10)
    threads: int = 1  # BLAS and torch threads, the same for all models (1: steady timings on a busy machine)
    memory_steps: int = 2  # traced steps per model and depth (max reported), each from an empty workspace
    rss: bool = False  # the whole-process memory study (fresh process per model and depth) instead
    rss_steps: int = 3  # --rss: training steps per process
    val_size: int = 5000  # --rss: training images held out for validation, as in train.py
    time_depth: int = 16  # --rss: depth at which revnet and resnet steps are timed side by side
    # --rss: train.py runs whose test accuracies are compared (default runs/revnet_mnist/rss_config)
    runs: str | None = None

    RESUME_SAFE: ClassVar[frozenset[str]] = frozenset()


STUDY_DEFAULTS = {  # (depths, batch_size, width, steps)
    False: ([2, 4, 8, 16, 32], 128, 256, 30),  # step study: train.py's default size
    True: ([4, 8, 16, 32, 48], 8192, 128, 10),  # --rss: where activations dominate (see README)
}
DEFAULT_RUNS = REPO_ROOT / "runs" / "revnet_mnist" / "rss_config"


def check_args(args: Args) -> None:
    """Fills the flags left unset with the chosen study's defaults, then checks them."""
    for name, default in zip(("depths", "batch_size", "width", "steps"), STUDY_DEFAULTS[args.rss]):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.rss and args.runs is None and DEFAULT_RUNS.is_dir():
        args.runs = str(DEFAULT_RUNS)
    if not args.depths or min(args.depths) < 1:
        raise ValueError(f"--depths must all be >= 1 (got {args.depths})")
    if args.width < 4 or args.width % 2:
        raise ValueError(f"--width must be an even number >= 4 (got {args.width})")
    if min(args.batch_size, args.steps, args.memory_steps, args.threads, args.rss_steps, args.time_depth) < 1:
        raise ValueError(
            "--batch-size, --steps, --memory-steps, --threads, --rss-steps, --time-depth must be >= 1"
        )
    if args.resume:
        raise ValueError("--resume: a benchmark has nothing to continue; run it again")


def batches_for(args: Args) -> tuple[list, str]:
    """Four (x float32, labels) batches of real MNIST, or random ones when the files are absent."""
    rng = np.random.default_rng(args.seed)
    if split_present(args.data_dir, "train"):
        images, labels = load_split(args.data_dir, "train", allow_download=False)
        source = "mnist"
    else:
        images, labels = rng.integers(0, 256, (4 * args.batch_size, 28, 28), dtype=np.uint8), None
        labels, source = rng.integers(0, 10, len(images)), "random"
        print(
            f"no MNIST training files in {args.data_dir}: random batches "
            "(a step's cost does not depend on them)"
        )
    picks = [rng.choice(len(images), args.batch_size, replace=False) for _ in range(4)]
    return [(normalise(images[p], "float32"), labels[p]) for p in picks], source


def time_steps(steps: dict, batches: list, n: int) -> dict[str, float]:
    """Median seconds of `steps[name](x, labels)`, names taking turns in short runs (a busy machine slows
    them alike), after one warm-up step each."""
    for step in steps.values():
        step(*batches[0])
    times = {name: [] for name in steps}
    run_length = max(1, n // 5)
    for start in range(0, n, run_length):
        for name, step in steps.items():
            for i in range(start, min(start + run_length, n)):
                started = time.perf_counter()
                step(*batches[i % len(batches)])
                times[name].append(time.perf_counter() - started)
    return {name: float(np.median(t)) for name, t in times.items()}


def numpy_steps(nets: dict[str, Network]) -> dict:
    optimizers = {m: Adam(net.parameters(), weight_decay=WEIGHT_DECAY) for m, net in nets.items()}
    return {m: (lambda x, y, m=m: train_step(nets[m], optimizers[m], x, y, LR)) for m in nets}


# ----------------------------------------------------------------------------- step study (default)


def traced_peak(step, x, labels) -> int:
    """Peak bytes allocated while `step(x, labels)` runs, above what was held before it."""
    tracemalloc.start()
    held_before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    step(x, labels)
    peak = tracemalloc.get_traced_memory()[1] - held_before
    tracemalloc.stop()
    return peak


def numerics(depth: int, width: int, x: np.ndarray, labels: np.ndarray, dtype: str, seed: int) -> dict:
    """Reversible vs stored-activation gradients: max over parameters of ||g_rev - g|| / ||g||, and the
    same over all parameters as one vector; and the stack's input rebuilt from its output,
    max |x' - x| / max |x|. In float32 one rebuilt pre-activation landing across a ReLU's kink is
    enough to move the worst parameter's error far above the rebuild error."""
    nets = {
        m: Network(ModelConfig(m, depth, width, dtype=dtype), np.random.default_rng(seed))
        for m in ("revnet", "resnet")
    }
    nets["revnet"].load_state_dict(nets["resnet"].state_dict())
    grads = {}
    for m, net in nets.items():
        _, dlogits = softmax_cross_entropy(net.forward(x.astype(dtype)), labels)
        net.backward(dlogits)
        grads[m] = {name: g.copy() for name, _, g in net.parameters()}
    grad_error = max(
        float(np.linalg.norm(grads["revnet"][k] - g) / np.linalg.norm(g)) for k, g in grads["resnet"].items()
    )
    squared_diff = sum(float(np.sum((grads["revnet"][k] - g) ** 2)) for k, g in grads["resnet"].items())
    squared_norm = sum(float(np.sum(g**2)) for g in grads["resnet"].values())
    net = nets["revnet"]
    h = net.stem.forward(x.astype(dtype), store=False)
    x1, x2 = h[:, : net.half], h[:, net.half :]
    r1, r2 = net.body_inverse(*net.body_forward(x1, x2))
    rebuilt = np.concatenate([r1, r2], axis=1)
    return {
        "grad_rel_error": grad_error,
        "grad_rel_error_all": (squared_diff / squared_norm) ** 0.5,
        "reconstruction_rel_error": float(np.abs(rebuilt - h).max() / np.abs(h).max()),
    }


def step_study_depth(args: Args, depth: int, batches: list) -> dict:
    """Step memory, step times (numpy models and torch) and numerics at one depth."""
    from torch_reference import TorchStep  # torch only here: the --rss study never imports it

    nets = {m: Network(ModelConfig(m, depth, args.width), np.random.default_rng(args.seed)) for m in MODELS}
    steps = numpy_steps(nets)
    steps["torch"] = TorchStep(
        nets["resnet"], LR, WEIGHT_DECAY, args.threads
    )  # the resnet's starting weights
    memory = {}
    for model in MODELS:
        memory[model] = 0
        for i in range(args.memory_steps):
            nets[model].workspace.clear()  # the step allocates its whole working set again
            memory[model] = max(memory[model], traced_peak(steps[model], *batches[i % 4]))
    seconds = time_steps(steps, batches, args.steps)
    return {
        "memory_mib": {m: memory[m] / MIB for m in MODELS},
        "step_seconds": seconds,
        "params": {m: nets[m].num_params() for m in MODELS},
        "numerics": {
            dt: numerics(depth, args.width, *batches[0], dt, args.seed) for dt in ("float64", "float32")
        },
    }


def step_study(args: Args, log: RunLogger) -> None:
    batches, source = batches_for(args)
    result = {"batch_size": args.batch_size, "width": args.width, "threads": args.threads, "data": source}
    per_depth = {}
    for depth in args.depths:
        r = per_depth[str(depth)] = step_study_depth(args, depth, batches)
        mem, sec, num = r["memory_mib"], r["step_seconds"], r["numerics"]
        print(
            f"depth {depth:3d}: step memory MiB revnet {mem['revnet']:7.2f}  resnet {mem['resnet']:7.2f}  "
            f"mlp {mem['mlp']:7.2f} | step ms revnet {1e3 * sec['revnet']:7.2f}  "
            f"resnet {1e3 * sec['resnet']:7.2f}  "
            f"mlp {1e3 * sec['mlp']:7.2f}  torch {1e3 * sec['torch']:7.2f} "
            f"(revnet/resnet {sec['revnet'] / sec['resnet']:.2f}) | grad err f64 "
            f"{num['float64']['grad_rel_error']:.1e} f32 {num['float32']['grad_rel_error']:.1e}, rebuild err "
            f"f64 {num['float64']['reconstruction_rel_error']:.1e} "
            f"f32 {num['float32']['reconstruction_rel_error']:.1e}",
            flush=True,
        )
    for key in ("memory_mib", "step_seconds", "params"):
        names = per_depth[str(args.depths[0])][key]
        result[key] = {m: {d: r[key][m] for d, r in per_depth.items()} for m in names}
    result["numerics"] = {
        dt: {d: r["numerics"][dt] for d, r in per_depth.items()} for dt in ("float64", "float32")
    }
    mem, sec = result["memory_mib"], result["step_seconds"]
    result["ratios"] = {
        "revnet_over_resnet_memory": {d: mem["revnet"][d] / mem["resnet"][d] for d in per_depth},
        "revnet_over_resnet_time": {d: sec["revnet"][d] / sec["resnet"][d] for d in per_depth},
        "numpy_resnet_over_torch_time": {d: sec["resnet"][d] / sec["torch"][d] for d in per_depth},
    }
    for key, value in result["ratios"].items():
        print(f"{key}: { ({k: round(v, 3) for k, v in value.items()}) }")
    write_json(log.path("benchmark.json"), result)
    log.save_figure("benchmark", plot_steps(result, args.depths))


# ----------------------------------------------------------------------------- rss study


def child(args: Args, model: str, depth: int, step_memory: int = 0) -> dict:
    """Run footprint.py in a fresh process; its JSON line, with the process's peak RSS from wait4."""
    argv = [
        sys.executable,
        str(FOOTPRINT),
        "--model",
        model,
        "--depth",
        str(depth),
        "--width",
        str(args.width),
    ]
    argv += [
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(args.rss_steps),
        "--threads",
        str(args.threads),
    ]
    argv += ["--seed", str(args.seed), "--data-dir", args.data_dir, "--step-memory", str(step_memory)]
    argv += ["--val-size", str(args.val_size)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OPENBLAS_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        last = (err.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"footprint.py --model {model} --depth {depth} failed ({proc.returncode}): {last}")
    result = json.loads(out.strip().splitlines()[-1])
    result["process_peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux reports KiB
    return result


def accuracy_table(folder: str, args: Args) -> dict:
    """Test accuracy (and the training process's peak RSS) of the train.py runs in `folder`, per model."""
    runs = {}
    for path in sorted(Path(folder).glob("*/summary.json")):
        s = read_json(path)
        if (s.get("width"), s.get("batch_size")) == (args.width, args.batch_size):
            runs.setdefault(f"{s['model']} d{s['depth']}", []).append(s)
    if not runs:
        print(f"no train.py runs with --width {args.width} --batch-size {args.batch_size} there")
    table = {}
    for name, group in runs.items():
        acc = [100 * s["test_accuracy"] for s in group]
        table[name] = {
            "seeds": [s["seed"] for s in group],
            "test_accuracy": acc,
            "mean": statistics.mean(acc),
            "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "peak_rss_mib": [s["peak_rss_mib"] for s in group],
            "train_seconds": [s["train_seconds"] for s in group],
            "epochs": group[0]["epochs"],
            "threads": group[0].get("threads"),
        }
        print(
            f"{name}: test accuracy {table[name]['mean']:.2f} ± {table[name]['std']:.2f} % over seeds "
            f"{table[name]['seeds']} ({', '.join(f'{a:.2f}' for a in acc)}), train.py peak RSS "
            f"{', '.join(f'{r:.0f}' for r in table[name]['peak_rss_mib'])} MiB, "
            f"{statistics.mean(table[name]['train_seconds']):.0f} s training each "
            f"({group[0]['epochs']} epochs, {group[0].get('threads')} thread(s))"
        )
    return table


def rss_measure(args: Args) -> dict:
    """Peak RSS, footprint and step memory per model and depth, each from fresh processes."""
    rss, footprint, step = ({m: {} for m in MODELS} for _ in range(3))
    for depth in args.depths:
        for model in MODELS:
            r = child(args, model, depth)
            rss[model][str(depth)] = r["process_peak_rss_mib"]
            footprint[model][str(depth)] = r["footprint_mib"]
            step[model][str(depth)] = child(args, model, depth, step_memory=args.memory_steps)[
                "step_memory_mib"
            ]
            f, peak = r["footprint_mib"], rss[model][str(depth)]
            print(
                f"depth {depth:3d} {model:6s}: peak RSS {peak:6.1f} MiB = dataset {f['dataset']:.1f}"
                f" + weights {f['weights']:.1f} + gradients {f['gradients']:.1f}"
                f" + optimizer {f['optimizer']:.1f} + batch {f['batch']:.1f}"
                f" + stored activations {f['stored_activations']:.1f} + rest {peak - sum(f.values()):.1f}"
                f"; step memory (tracemalloc) {step[model][str(depth)]:.1f}",
                flush=True,
            )
    return {"peak_rss_mib": rss, "footprint_mib": footprint, "step_memory_mib": step, "data": r["data"]}


def rss_targets(args: Args, result: dict) -> dict:
    rss, deepest = result["peak_rss_mib"], str(max(args.depths))
    targets = {
        f"revnet/resnet peak RSS at depth {deepest}": (
            rss["revnet"][deepest] / rss["resnet"][deepest],
            "<=",
            TARGETS["rss_ratio"],
        )
    }
    if {4, 32} <= set(args.depths):
        targets["revnet peak RSS depth 32 / depth 4"] = (
            rss["revnet"]["32"] / rss["revnet"]["4"],
            "<=",
            TARGETS["flat"],
        )
    sec = result["step_seconds"]
    targets[f"revnet/resnet step time at depth {args.time_depth}"] = (
        sec["revnet"] / sec["resnet"],
        "<=",
        TARGETS["time_ratio"],
    )
    if result.get("accuracy"):
        acc = result["accuracy"]
        for name in sorted(acc):
            twin = name.replace("revnet", "resnet")
            if name.startswith("revnet") and twin in acc:
                rev, res = acc[name], acc[twin]
                label = f"|revnet - resnet| test accuracy at {name[7:]}, mean of {len(rev['seeds'])} seeds"
                targets[label] = (abs(rev["mean"] - res["mean"]), "<=", TARGETS["accuracy_points"])
    for name, (value, op, limit) in targets.items():
        print(f"target {name}: {value:.3f} {op} {limit}: {'met' if value <= limit else 'MISSED'}")
    return {name: {"value": v, "limit": limit, "met": v <= limit} for name, (v, _, limit) in targets.items()}


def rss_study(args: Args, log: RunLogger) -> None:
    started = time.perf_counter()
    result = {
        "config": {
            "width": args.width,
            "batch_size": args.batch_size,
            "depths": args.depths,
            "dtype": "float32",
            "threads": args.threads,
            "steps_per_process": args.rss_steps,
        }
    }
    result.update(rss_measure(args))
    batches, _ = batches_for(args)
    nets = {
        m: Network(ModelConfig(m, args.time_depth, args.width), np.random.default_rng(args.seed))
        for m in ("revnet", "resnet")
    }
    result["step_seconds"] = time_steps(numpy_steps(nets), batches, args.steps)
    del nets, batches
    print(
        f"step time at depth {args.time_depth}: "
        + ", ".join(f"{m} {1e3 * s:.1f} ms" for m, s in result["step_seconds"].items())
        + f" (median of {args.steps}, {args.threads} thread(s))"
    )
    if args.runs:
        print(f"train.py runs in {args.runs}:")
        result["accuracy"] = accuracy_table(args.runs, args)
    else:
        print("no train.py runs to compare accuracy with (--runs DIR; see README for the commands)")
    result["targets"] = rss_targets(args, result)
    result["seconds"] = time.perf_counter() - started
    print(f"benchmark --rss took {result['seconds']:.0f} s")
    write_json(log.path("rss.json"), result)
    log.save_figure("rss", plot_rss(result, args.depths))


# ----------------------------------------------------------------------------- plots and main


def plot_steps(result: dict, depths: list[int]):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, NullLocator, ScalarFormatter

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 3.8))
    for m in MODELS:
        ax_mem.plot(depths, [result["memory_mib"][m][str(d)] for d in depths], marker="o", label=m)
        ax_time.plot(depths, [1e3 * result["step_seconds"][m][str(d)] for d in depths], marker="o", label=m)
    ax_time.plot(
        depths,
        [1e3 * result["step_seconds"]["torch"][str(d)] for d in depths],
        marker="s",
        ls="--",
        label="resnet (torch)",
    )
    ax_mem.set(
        xscale="log",
        ylim=(0, None),
        xlabel="depth (blocks)",
        ylabel="peak step memory (MiB)",
        title=f"memory per training step (batch {result['batch_size']})",
    )
    ax_time.set(
        xscale="log",
        yscale="log",
        xlabel="depth (blocks)",
        ylabel="median step time (ms)",
        title="time per training step",
    )
    for ax in (ax_mem, ax_time):
        ax.xaxis.set_minor_locator(NullLocator())  # only the measured depths are labelled
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.legend()
    ax_time.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # 1, 2, 5, 10, 20, 50 ms ...
    ax_time.yaxis.set_major_formatter(ScalarFormatter())
    ax_time.yaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    return fig


def plot_rss(result: dict, depths: list[int]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m in MODELS:
        ax.plot(
            depths, [result["peak_rss_mib"][m][str(d)] for d in depths], marker="o", label=f"{m}: peak RSS"
        )
    floor = [
        sum(v for k, v in result["footprint_mib"]["revnet"][str(d)].items() if k != "stored_activations")
        for d in depths
    ]
    ax.plot(depths, floor, ls=":", color="gray", label="dataset + weights + grads + Adam + batch")
    c = result["config"]
    ax.set(
        ylim=(0, None),
        xlabel="depth (blocks)",
        ylabel="MiB",
        title=f"training process peak RSS (width {c['width']}, batch {c['batch_size']}, float32)",
    )
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main() -> None:
    args = parse_args(Args, check=check_args, description=__doc__)
    w, d, b = args.width, max(args.depths), args.batch_size  # as train.py: weights, Adam, activations
    check_fits(
        4 * (4 * (794 * w + d * w * w) + 4 * b * w * (d + 2)), f"--width {w} --depths {d} --batch-size {b}"
    )
    threadpool_limits(args.threads, user_api="blas")
    blas = max((p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"), default=1)
    print(f"batch {args.batch_size}, width {args.width}, float32, {blas} BLAS thread(s)")
    with RunLogger("revnet_mnist", run_name("rss" if args.rss else "benchmark", args.seed), args) as log:
        (rss_study if args.rss else step_study)(args, log)


if __name__ == "__main__":
    run_main(main)
