"""Train a reversible residual MLP (RevNet; Gomez et al. 2017, arXiv 1707.04585) on MNIST, in numpy.

Holds out the last --val-size training images for validation (watched every epoch), tests once on
the 10,000 test images at the end, and reports the memory a user sees (the process's peak RSS) and
the memory of one training step. For revnet, every epoch also checks how faithfully the reversible
backward rebuilds the activations it did not store, and warns when it stops doing so.

    python revnet_mnist/train.py --data-dir PATH                  # default RevNet, 10 epochs, 1.5-3 min
    python revnet_mnist/train.py --data-dir PATH --model resnet   # same net, stored activations
    python revnet_mnist/train.py --data-dir PATH --model mlp      # plain MLP
    python revnet_mnist/train.py --epochs 1 --limit-train 2000 --clearml off   # tiny run, seconds

Writes runs/revnet_mnist/<model>_seed<seed>_<time>/ (or --out): config.json, metrics.jsonl,
summary.json, curves.png and checkpoint.npz (rewritten every epoch; `--resume --out DIR` continues).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
import tracemalloc
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's common, not an installed one
from mnist_data import load_mnist, normalise, shift_images, shifts
from revnet import (
    CHECK_BATCH,
    SGD,
    Adam,
    ModelConfig,
    Network,
    learning_rate,
    reversibility_check,
    train_step,
)
from threadpoolctl import threadpool_limits

from common import (
    CHECKPOINT_NPZ,
    DataArgs,
    RunLogger,
    UserError,
    check_fits,
    load_npz,
    parse_args,
    run_main,
    run_name,
)

MIB = 2**20
PRESETS = {
    # the default run: 98.5% test accuracy in 10 epochs; activations are a few MiB of the process
    "default": dict(
        depth=4, width=256, epochs=10, batch_size=128, lr=1e-3, warmup_epochs=0.5, augment_shift=0
    ),
    # the README's memory table: large batches and a deep stack, so that stored activations
    # (8 x batch x width x depth bytes in float32) dominate the process, at >= 98% test accuracy
    "memory": dict(
        depth=64, width=128, epochs=80, batch_size=8192, lr=1e-3, warmup_epochs=3.0, augment_shift=2
    ),
}


@dataclass
class Args(DataArgs):
    model: Literal["revnet", "resnet", "mlp"] = "revnet"  # reversible, stored-activation backprop, plain MLP
    # sizes and schedule; the flags below left unset take their value from the preset
    preset: Literal["default", "memory"] = "default"
    depth: int | None = None  # reversible blocks (revnet, resnet) or hidden layers (mlp) (default 4)
    width: int | None = None  # features after the input projection; even, split in two halves (default 256)
    epochs: int | None = None  # passes over the training set (default 10)
    batch_size: int | None = None  # images per training step (default 128)
    lr: float | None = None  # peak learning rate, after warmup; cosine decay to 0 (default 1e-3)
    optimizer: Literal["adam", "sgd"] = "adam"  # Adam, or SGD with momentum
    momentum: float = 0.9  # SGD momentum (ignored by Adam)
    weight_decay: float = 5e-5  # decoupled weight decay on weight matrices, per unit learning rate
    warmup_epochs: float | None = None  # linear learning-rate warmup, in epochs (default 0.5)
    # translate each training image by a random (dy, dx), |dy|, |dx| <= N pixels (default 0: none)
    augment_shift: int | None = None
    dtype: Literal["float32", "float64"] = "float32"  # precision of parameters and activations
    val_size: int = 5000  # the last N of the 60,000 training images, held out for validation
    limit_train: int | None = None  # train on the first N training images only (quick runs)
    memory_steps: int = 3  # first training steps whose peak memory is traced (tracemalloc); the first is cold
    # warn when the reversible rebuild's relative error exceeds this (default: 1e4 x the dtype's epsilon)
    rebuild_tolerance: float | None = None
    threads: int = 1  # BLAS threads (1: the README's timings; more: faster on an idle machine)

    RESUME_SAFE: ClassVar[frozenset[str]] = frozenset(
        {"epochs", "threads", "memory_steps", "rebuild_tolerance"}
    )
    EXTENDS: ClassVar[frozenset[str]] = frozenset({"epochs"})  # more epochs continue a finished run


def check_args(args: Args) -> None:
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.depth < 1:
        raise ValueError(f"--depth must be >= 1 (got {args.depth})")
    if args.width < 4 or args.width % 2:
        raise ValueError(f"--width must be an even number >= 4, split into two halves (got {args.width})")
    positive = {
        "--lr": args.lr,
        "--epochs": args.epochs,
        "--batch-size": args.batch_size,
        "--val-size": args.val_size,
    }
    for flag, value in positive.items():
        if value <= 0:
            raise ValueError(f"{flag} must be > 0 (got {value})")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1 (got {args.threads})")
    if not 0 <= args.augment_shift <= 13:
        raise ValueError(f"--augment-shift must be 0 to 13 pixels (got {args.augment_shift})")
    if args.limit_train is not None and args.limit_train < args.batch_size:
        raise ValueError(f"--limit-train must be >= --batch-size {args.batch_size} (got {args.limit_train})")
    if args.momentum >= 1:
        raise ValueError(f"--momentum must be in [0, 1) (got {args.momentum})")
    if args.rebuild_tolerance is not None and args.rebuild_tolerance <= 0:
        raise ValueError(f"--rebuild-tolerance must be > 0 (got {args.rebuild_tolerance})")


# ----------------------------------------------------------------------------- pieces


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def evaluate(network: Network, images: np.ndarray, labels: np.ndarray, dtype: str, batch: int = 1000):
    """(accuracy, mean cross-entropy) over uint8 `images`, normalised a batch at a time.

    The float batches live in the network's workspace: every evaluation reuses the same arrays."""
    correct, loss_sum = 0, 0.0
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        x = normalise(chunk, dtype, out=network.workspace.take((len(chunk), chunk[0].size), dtype))
        logits = network.forward(x, train=False)
        del x
        y = labels[i : i + batch]
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss_sum -= float(log_probs[np.arange(len(y)), y].sum())
        correct += int((logits.argmax(axis=1) == y).sum())
    return correct / len(images), loss_sum / len(images)


def measured_step(network, optimizer, x, labels, lr):
    """train_step under tracemalloc: (loss, correct, peak bytes allocated above what was held before).

    The first step of a process fills the network's workspace: its peak is the step's working set
    (activations, their gradients, temporaries). Later steps reuse it and allocate next to nothing."""
    tracemalloc.start()
    held_before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    loss, correct = train_step(network, optimizer, x, labels, lr)
    peak = tracemalloc.get_traced_memory()[1] - held_before
    tracemalloc.stop()
    return loss, correct, peak


def rebuild_warning(check: dict, tolerance: float, epoch: int) -> str | None:
    """One line of advice when the reversible backward no longer rebuilds its activations faithfully."""
    if check["rebuild_error"] <= tolerance:
        return None
    return (
        f"warning: epoch {epoch}: the reversible blocks rebuild their input with relative error "
        f"{check['rebuild_error']:.1e} (> {tolerance:.0e}) and their gradients are off by "
        f"{check['grad_error']:.1e}: the branches have become too expansive to invert in this precision; "
        "lower --lr, raise --weight-decay, train in --dtype float64, or use --model resnet"
    )


def save_checkpoint(path, network, optimizer, meta: dict) -> None:
    arrays = {f"param/{k}": v for k, v in network.state_dict().items()}
    arrays.update({f"opt/{k}": v for k, v in optimizer.state().items()})
    arrays["opt/steps"] = np.array(optimizer.steps)
    arrays["meta"] = np.array(json.dumps(meta))
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:  # a file object: np.savez would otherwise append ".npz" to the name
        np.savez(f, **arrays)
    os.replace(tmp, path)


def load_checkpoint(path, network, optimizer) -> dict:
    ckpt = load_npz(path)  # checksums and finite weights checked: a damaged file is one line
    try:
        meta = json.loads(str(ckpt["meta"]))
        network.load_state_dict({k[6:]: ckpt[k] for k in ckpt if k.startswith("param/")})
        optimizer.load_state({k[4:]: ckpt[k] for k in ckpt if k.startswith("opt/")})
        return meta
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot resume from {path}: {e}; it is corrupt, start a new --out") from None


def plot_curves(history: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # imported here: the training process stays lean (see README)

    fig, (ax_loss, ax_acc, ax_rss) = plt.subplots(1, 3, figsize=(15, 3.5))
    epochs = [h["epoch"] for h in history]
    ax_loss.plot(epochs[1:], [h["train_loss"] for h in history[1:]], marker="o", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs[1:], [100 * h["train_accuracy"] for h in history[1:]], marker="o", label="train")
    ax_acc.plot(epochs, [100 * h["val_accuracy"] for h in history], marker="o", label="validation")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", ylim=(80, 100), title="accuracy")
    ax_acc.legend()
    rss = [(h["epoch"], h["peak_rss_mib"]) for h in history if "peak_rss_mib" in h]
    ax_rss.plot(*zip(*rss), marker="o", color="C2")
    ax_rss.set(xlabel="epoch", ylabel="MiB", title="process peak RSS so far (ru_maxrss)")
    ax_rss.set_ylim(0, 1.1 * max(v for _, v in rss))
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- stages


class Run:
    """Everything one training run holds: data (uint8), network, optimizer, schedule, history."""

    def __init__(self, args: Args):
        self.args = args
        data = load_mnist(args.data_dir, args.val_size)  # every data check before the run folder exists
        if args.limit_train is not None:
            data["train_images"] = data["train_images"][: args.limit_train]
            data["train_labels"] = data["train_labels"][: args.limit_train]
        if len(data["train_images"]) < args.batch_size:
            raise UserError(f"only {len(data['train_images'])} training images; need >= --batch-size")
        self.data = data
        self.steps_per_epoch = len(data["train_images"]) // args.batch_size  # last partial batch dropped
        self.total_steps = self.steps_per_epoch * args.epochs
        self.warmup_steps = round(args.warmup_epochs * self.steps_per_epoch)
        config = ModelConfig(model=args.model, depth=args.depth, width=args.width, dtype=args.dtype)
        self.network = Network(config, np.random.default_rng(args.seed))
        params = self.network.parameters()
        if args.optimizer == "adam":
            self.optimizer = Adam(params, weight_decay=args.weight_decay)
        else:
            self.optimizer = SGD(params, momentum=args.momentum, weight_decay=args.weight_decay)
        self.order_rng = np.random.default_rng([args.seed, 1])  # data order, apart from the init stream
        # one array each for the data order and the batch, uint8 and float, reused every step
        self.positions = np.arange(len(data["train_images"]))
        self.order = np.empty_like(self.positions)
        self.batch_pixels = np.empty((args.batch_size, config.in_features), dtype=np.uint8)
        self.batch_x = np.empty((args.batch_size, config.in_features), dtype=args.dtype)
        self.shift_rng = np.random.default_rng([args.seed, 2])  # translations (--augment-shift)
        n_shifts = len(shifts(args.augment_shift))
        self.shift_probs = np.full(n_shifts, 1 / n_shifts)
        self.batch_shifted = np.empty_like(self.batch_pixels) if args.augment_shift else None
        self.batch_labels = np.empty(args.batch_size, dtype=np.int64)
        self.tolerance = args.rebuild_tolerance or 1e4 * float(np.finfo(args.dtype).eps)
        self.start_epoch, self.history = 0, []
        self.peak_step_bytes, self.warm_step_bytes, self.step_seconds, self.train_seconds = 0, 0, [], 0.0

    def describe(self) -> str:
        a, d = self.args, self.data
        return (
            f"{a.model}: depth {a.depth}, width {a.width}, {self.network.num_params():,} parameters, "
            f"{a.dtype}; {len(d['train_images']):,} train / {len(d['val_images']):,} validation images, "
            f"batch {a.batch_size}, {self.steps_per_epoch} steps per epoch, {self.total_steps} steps, "
            f"{a.threads} BLAS thread(s)"
        )

    def restore(self, path) -> int:
        meta = load_checkpoint(path, self.network, self.optimizer)
        self.start_epoch, self.history = meta["epoch"], meta["history"]
        self.order_rng.bit_generator.state = meta["order_rng"]
        if "shift_rng" in meta:
            self.shift_rng.bit_generator.state = meta["shift_rng"]
        self.train_seconds = meta.get("train_seconds", 0.0)
        if self.start_epoch > self.args.epochs:
            raise UserError(
                f"--epochs {self.args.epochs} is below the checkpoint's {self.start_epoch} epochs"
            )
        return self.start_epoch * self.steps_per_epoch

    def save(self, path) -> None:
        meta = {
            "epoch": len(self.history) - 1,
            "history": self.history,
            "order_rng": self.order_rng.bit_generator.state,
            "shift_rng": self.shift_rng.bit_generator.state,
            "train_seconds": self.train_seconds,
        }
        save_checkpoint(path, self.network, self.optimizer, meta)

    def train_epoch(self, epoch: int, log: RunLogger) -> dict:
        """One pass over the training images in a fresh order; returns the epoch's training metrics."""
        a, images, labels = self.args, self.data["train_images"], self.data["train_labels"]
        order = self.order
        np.copyto(order, self.positions)
        self.order_rng.shuffle(order)  # what permutation(n) does, into the array kept for it
        pixels = images.reshape(len(images), -1)  # (N, 784) view
        loss_sum, correct_sum, seen = 0.0, 0, 0
        started = time.perf_counter()
        for i in range(self.steps_per_epoch):
            step = epoch * self.steps_per_epoch + i
            batch = order[i * a.batch_size : (i + 1) * a.batch_size]
            np.take(pixels, batch, axis=0, out=self.batch_pixels)
            np.take(labels, batch, out=self.batch_labels)
            source = self.batch_pixels
            if a.augment_shift:  # the batch is in random order: consecutive chunks take each shift
                counts = self.shift_rng.multinomial(a.batch_size, self.shift_probs)
                side = images.shape[1:]
                shift_images(source.reshape(-1, *side), self.batch_shifted.reshape(-1, *side), counts)
                source = self.batch_shifted
            x = normalise(source, a.dtype, out=self.batch_x)  # only this batch is ever float
            y = self.batch_labels
            lr = learning_rate(step, self.total_steps, a.lr, self.warmup_steps)
            if epoch == self.start_epoch and i < a.memory_steps:  # the first (cold) step and a few warm ones
                loss, correct, peak = measured_step(self.network, self.optimizer, x, y, lr)
                self.peak_step_bytes = max(self.peak_step_bytes, peak)
                if i > 0:
                    self.warm_step_bytes = max(self.warm_step_bytes, peak)
            else:
                t0 = time.perf_counter()
                loss, correct = train_step(self.network, self.optimizer, x, y, lr)
                self.step_seconds.append(time.perf_counter() - t0)
            if not math.isfinite(loss):
                raise UserError(f"training diverged (loss {loss}) at step {step}; try a smaller --lr")
            loss_sum, correct_sum, seen = loss_sum + loss * len(y), correct_sum + correct, seen + len(y)
            if step % 50 == 0:  # logged at the steps done, as the checkpoint counts them (resume rewinds)
                log.log(step + 1, {"train/loss": loss, "charts/lr": lr})
        seconds = time.perf_counter() - started
        self.train_seconds += seconds
        return {"train_loss": loss_sum / seen, "train_accuracy": correct_sum / seen, "seconds": seconds}

    def validate(self, epoch: int) -> dict:
        """Validation accuracy and loss; for revnet, the reversibility check on one batch (may warn)."""
        accuracy, loss = evaluate(
            self.network, self.data["val_images"], self.data["val_labels"], self.args.dtype
        )
        result = {"epoch": epoch, "val_accuracy": accuracy, "val_loss": loss}
        if self.network.reversible:
            n = min(CHECK_BATCH, len(self.data["train_images"]))
            x = normalise(self.data["train_images"][:n], self.args.dtype)  # small: a plain array
            result.update(reversibility_check(self.network, x, self.data["train_labels"][:n]))
            warning = rebuild_warning(result, self.tolerance, epoch)
            if warning:
                print(warning, file=sys.stderr, flush=True)
        return result


def train_loop(run: Run, log: RunLogger) -> None:
    args = run.args
    if not run.history:  # validation at step 0
        run.history.append(run.validate(0))
        log.log(
            0,
            {
                "eval/val_accuracy": run.history[0]["val_accuracy"],
                "eval/val_loss": run.history[0]["val_loss"],
            },
        )
    for epoch in range(run.start_epoch, args.epochs):
        record = run.train_epoch(epoch, log) | run.validate(epoch + 1)
        record["peak_rss_mib"] = peak_rss_mib()  # the process's peak so far, checkpoint not yet written
        run.history.append(record)
        metrics = {
            "train/epoch_loss": record["train_loss"],
            "train/accuracy": record["train_accuracy"],
            "eval/val_accuracy": record["val_accuracy"],
            "eval/val_loss": record["val_loss"],
            "charts/epoch_seconds": record["seconds"],
            "charts/peak_rss_mib": record["peak_rss_mib"],
        }
        if run.peak_step_bytes:
            metrics["charts/peak_step_mib"] = run.peak_step_bytes / MIB
            metrics["charts/warm_step_mib"] = run.warm_step_bytes / MIB
        for key in ("rebuild_error", "grad_error"):
            if key in record:
                metrics[f"train/{key}"] = record[key]
        log.log((epoch + 1) * run.steps_per_epoch, metrics)
        print(
            f"epoch {epoch + 1}/{args.epochs}: train loss {record['train_loss']:.4f}, train acc "
            f"{100 * record['train_accuracy']:.2f}%, val acc {100 * record['val_accuracy']:.2f}%"
            + (f", rebuild error {record['rebuild_error']:.1e}" if "rebuild_error" in record else "")
            + f", {record['seconds']:.1f} s",
            flush=True,
        )
        run.save(log.path(CHECKPOINT_NPZ))
        log.keep()


def report(run: Run, log: RunLogger) -> dict:
    """Test accuracy, computed once, on the final weights; the summary; the curves."""
    args, history = run.args, run.history
    test_accuracy, test_loss = evaluate(
        run.network, run.data["test_images"], run.data["test_labels"], args.dtype
    )
    peak_rss = peak_rss_mib()  # training and testing; the plot below comes after
    log.log(run.total_steps, {"eval/test_accuracy": test_accuracy, "eval/test_loss": test_loss})
    best = max(history, key=lambda h: h["val_accuracy"])
    checks = [h for h in history if "rebuild_error" in h]
    summary = {
        "test_accuracy": test_accuracy,
        "val_accuracy": history[-1]["val_accuracy"],
        "best_val_accuracy": best["val_accuracy"],
        "best_val_epoch": best["epoch"],
        "final_train_loss": history[-1]["train_loss"],
        "max_rebuild_error": max((h["rebuild_error"] for h in checks), default=None),
        "max_grad_error": max((h["grad_error"] for h in checks), default=None),
        "peak_step_memory_mib": run.peak_step_bytes / MIB if run.peak_step_bytes else None,
        "warm_step_memory_mib": run.warm_step_bytes / MIB if run.peak_step_bytes else None,
        "workspace_mib": run.network.workspace.nbytes() / MIB,
        "peak_rss_mib": peak_rss,
        "peak_rss_epoch1_mib": history[1].get("peak_rss_mib") if len(history) > 1 else None,
        "train_seconds": run.train_seconds,
        "seconds_per_epoch": run.train_seconds / max(1, len(history) - 1),
        "step_seconds_median": float(np.median(run.step_seconds)) if run.step_seconds else None,
        "threads": args.threads,
        "params": run.network.num_params(),
        "train_images": len(run.data["train_images"]),
        "val_images": len(run.data["val_images"]),
    } | {
        k: v
        for k, v in asdict(args).items()
        if k
        in (
            "model",
            "preset",
            "depth",
            "width",
            "dtype",
            "epochs",
            "batch_size",
            "lr",
            "augment_shift",
            "seed",
        )
    }
    log.write_summary(summary)
    # The plot needs neither the dataset nor the workspace: give their memory back first, so that
    # matplotlib (about 40 MiB with a figure) does not stack on top of what training held.
    run.network.workspace.clear()
    run.data = None
    log.save_figure("curves", plot_curves(history))
    return summary


def main() -> None:
    args = parse_args(Args, check=check_args, description=__doc__)
    # float32 weights, gradients and Adam's two moments, and a batch's activations per layer
    w, d, b = args.width, args.depth, args.batch_size
    check_fits(
        4 * (4 * (794 * w + d * w * w) + 4 * b * w * (d + 2)), f"--width {w} --depth {d} --batch-size {b}"
    )
    threadpool_limits(args.threads, user_api="blas")
    run = Run(args)
    print(run.describe())
    with RunLogger("revnet_mnist", run_name(args.model, args.seed), args) as log:
        if log.resumed:
            if not log.path(CHECKPOINT_NPZ).is_file():
                raise UserError(f"--resume: no {CHECKPOINT_NPZ} in {log.run_dir}")
            log.rewind(run.restore(log.path(CHECKPOINT_NPZ)))
        train_loop(run, log)
        s = report(run, log)
    print(
        f"test accuracy {100 * s['test_accuracy']:.2f}% (validation {100 * s['val_accuracy']:.2f}%), "
        f"peak RSS {s['peak_rss_mib']:.0f} MiB, peak step memory "
        f"{s['peak_step_memory_mib'] or math.nan:.2f} MiB, {s['train_seconds']:.0f} s training "
        f"({s['seconds_per_epoch']:.1f} s/epoch, {args.threads} thread(s))"
    )


if __name__ == "__main__":
    run_main(main)
