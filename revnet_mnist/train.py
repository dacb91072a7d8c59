"""Train a reversible residual MLP (RevNet; Gomez et al. 2017, arXiv 1707.04585) on MNIST, in numpy.

Reports test accuracy and the measured peak memory of one training step (forward, backward,
update), so the reversible network can be compared with its classic counterpart:

    python revnet_mnist/train.py --data-dir /work/shared/data                  # default RevNet
    python revnet_mnist/train.py --data-dir /work/shared/data --model resnet   # same net, stored activations
    python revnet_mnist/train.py --data-dir /work/shared/data --model mlp      # plain MLP
    python revnet_mnist/train.py --epochs 1 --limit-train 2000 --clearml off   # tiny run, seconds

Writes runs/revnet_mnist/<model>_seed<seed>_<time>/ (or --out): config.json, metrics.jsonl,
summary.json, curves.png and checkpoint.npz (rewritten every epoch; `--resume --out DIR` continues).
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
import tracemalloc
from dataclasses import asdict, dataclass
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from mnist_data import load_split, normalise  # noqa: E402
from revnet import SGD, Adam, ModelConfig, Network, learning_rate, train_step  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common import RunLogger, UserError, default_data_dir, parse_args, run_main, run_name  # noqa: E402

MIB = 2**20


@dataclass
class Args:
    model: Literal["revnet", "resnet", "mlp"] = "revnet"  # reversible, stored-activation backprop, plain MLP
    depth: int = 4  # reversible blocks (revnet, resnet) or hidden layers (mlp)
    width: int = 256  # features after the input projection; even, split in two halves per block
    epochs: int = 10  # passes over the training set
    batch_size: int = 128  # images per training step
    lr: float = 1e-3  # peak learning rate (after warmup; cosine decay to 0)
    optimizer: Literal["adam", "sgd"] = "adam"  # Adam, or SGD with momentum
    momentum: float = 0.9  # SGD momentum (ignored by Adam)
    weight_decay: float = 5e-5  # decoupled weight decay on weight matrices, per unit learning rate
    warmup_epochs: float = 0.5  # linear learning-rate warmup, in epochs
    dtype: Literal["float32", "float64"] = "float32"  # precision of parameters and activations
    limit_train: int | None = None  # train on the first N training images only (quick runs)
    memory_steps: int = 3  # training steps whose peak memory is traced (tracemalloc), after a warm-up step
    threads: int | None = None  # BLAS threads (default: all cores; 1 is steadier on a busy machine)
    seed: int = 0  # seeds initialisation and data order
    data_dir: str = default_data_dir()  # holds MNIST/raw/*-ubyte(.gz); downloaded there when absent
    out: str | None = None  # run folder (default runs/revnet_mnist/<run name>)
    resume: bool = False  # continue the run in --out from its checkpoint.npz
    clearml: Literal["auto", "offline", "online", "off"] = "auto"  # ClearML mirror of the run
    clearml_queue: str | None = None  # hand the run to this ClearML agent queue


def check_args(args: Args) -> None:
    if args.depth < 1:
        raise ValueError(f"--depth must be >= 1 (got {args.depth})")
    if args.width < 4 or args.width % 2:
        raise ValueError(f"--width must be an even number >= 4, split into two halves (got {args.width})")
    if args.lr <= 0:
        raise ValueError(f"--lr must be > 0 (got {args.lr})")
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1 (got {args.epochs})")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1 (got {args.batch_size})")
    if args.limit_train is not None and args.limit_train < args.batch_size:
        raise ValueError(f"--limit-train must be >= --batch-size {args.batch_size} (got {args.limit_train})")
    if not 0 <= args.momentum < 1:
        raise ValueError(f"--momentum must be in [0, 1) (got {args.momentum})")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1 (got {args.threads})")
    if args.weight_decay < 0 or args.warmup_epochs < 0 or args.memory_steps < 0:
        raise ValueError("--weight-decay, --warmup-epochs and --memory-steps must be >= 0")
    if args.resume and not args.out:
        raise ValueError("--resume needs --out, the run folder to continue")


def measured_step(network, optimizer, x, labels, lr):
    """train_step under tracemalloc: (loss, correct, peak bytes allocated above what was held before)."""
    held_before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    loss, correct = train_step(network, optimizer, x, labels, lr)
    return loss, correct, tracemalloc.get_traced_memory()[1] - held_before


def evaluate(network: Network, x: np.ndarray, labels: np.ndarray, batch: int = 1000) -> float:
    correct = 0
    for i in range(0, len(x), batch):
        predicted = network.forward(x[i : i + batch], train=False).argmax(axis=1)
        correct += int((predicted == labels[i : i + batch]).sum())
    return correct / len(x)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


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
    try:
        with np.load(path) as ckpt:
            meta = json.loads(str(ckpt["meta"]))
            if meta["model_config"] != asdict(network.config):
                raise UserError(
                    f"--resume: {path} holds {meta['model_config']}, "
                    f"not {asdict(network.config)}; pass the same flags as the run it continues"
                )
            network.load_state_dict({k[6:]: ckpt[k] for k in ckpt.files if k.startswith("param/")})
            optimizer.load_state({k[4:]: ckpt[k] for k in ckpt.files if k.startswith("opt/")})
            return meta
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"cannot resume from {path}: {e}") from None


def plot_curves(history: list[dict]):
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    epochs = [h["epoch"] for h in history]
    ax_loss.plot(epochs[1:], [h["train_loss"] for h in history[1:]], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="train loss", yscale="log", title="training loss")
    ax_acc.plot(epochs[1:], [100 * h["train_accuracy"] for h in history[1:]], marker="o", label="train")
    ax_acc.plot(epochs, [100 * h["test_accuracy"] for h in history], marker="o", label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", ylim=(90, 100), title="accuracy")
    ax_acc.legend()
    fig.tight_layout()
    return fig


def main() -> None:
    args = parse_args(Args, check=check_args, description=__doc__)
    config = ModelConfig(model=args.model, depth=args.depth, width=args.width, dtype=args.dtype)
    if args.threads is not None:
        threadpool_limits(args.threads, user_api="blas")

    # data: every check before the run folder exists, so bad input writes nothing
    train_images, train_labels = load_split(args.data_dir, "train")
    test_images, test_labels = load_split(args.data_dir, "t10k")
    if args.limit_train is not None:
        train_images, train_labels = train_images[: args.limit_train], train_labels[: args.limit_train]
    if len(train_images) < args.batch_size:
        raise UserError(f"only {len(train_images)} training images in {args.data_dir}; need >= --batch-size")
    x_train, x_test = normalise(train_images, args.dtype), normalise(test_images, args.dtype)
    steps_per_epoch = len(x_train) // args.batch_size  # the last partial batch is dropped
    total_steps = steps_per_epoch * args.epochs
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    checkpoint = os.path.join(args.out, "checkpoint.npz") if args.out else None
    if args.resume and not os.path.isfile(checkpoint):
        raise UserError(f"--resume: no checkpoint.npz in {args.out}")

    # model and optimizer
    network = Network(config, np.random.default_rng(args.seed))
    params = network.parameters()
    if args.optimizer == "adam":
        optimizer = Adam(params, weight_decay=args.weight_decay)
    else:
        optimizer = SGD(params, momentum=args.momentum, weight_decay=args.weight_decay)
    order_rng = np.random.default_rng([args.seed, 1])  # data order, apart from the init stream
    start_epoch, history = 0, []
    if args.resume:
        meta = load_checkpoint(checkpoint, network, optimizer)
        start_epoch, history = meta["epoch"], meta["history"]
        order_rng.bit_generator.state = meta["order_rng"]
    print(
        f"{args.model}: depth {args.depth}, width {args.width}, {network.num_params():,} parameters, "
        f"{args.dtype}; {len(x_train):,} train / {len(x_test):,} test images, "
        f"{steps_per_epoch} steps per epoch, {total_steps} steps, warmup {warmup_steps}"
    )

    log = RunLogger(
        "revnet_mnist",
        run_name(args.model, args.seed),
        asdict(args),
        out=args.out,
        clearml=args.clearml,
        clearml_queue=args.clearml_queue,
        resume=args.resume,
    )
    if not history:  # evaluation at step 0
        history.append({"epoch": 0, "test_accuracy": evaluate(network, x_test, test_labels)})
        log.log(0, {"test/accuracy": history[0]["test_accuracy"]})

    peak_step_bytes, epoch_seconds, step_seconds = 0, [], []
    for epoch in range(start_epoch, args.epochs):
        # train
        order = order_rng.permutation(len(x_train))
        loss_sum, correct_sum, seen = 0.0, 0, 0
        started = time.perf_counter()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False)
        for i in bar:
            step = epoch * steps_per_epoch + i
            batch = order[i * args.batch_size : (i + 1) * args.batch_size]
            x, labels = x_train[batch], train_labels[batch]
            lr = learning_rate(step, total_steps, args.lr, warmup_steps)
            # memory: trace a few steps after the first, so one-time allocations don't count
            traced = epoch == start_epoch and 1 <= i <= args.memory_steps
            if traced:
                tracemalloc.start()
                loss, correct, peak = measured_step(network, optimizer, x, labels, lr)
                tracemalloc.stop()
                peak_step_bytes = max(peak_step_bytes, peak)
            else:
                t0 = time.perf_counter()
                loss, correct = train_step(network, optimizer, x, labels, lr)
                step_seconds.append(time.perf_counter() - t0)
            if not math.isfinite(loss):
                raise UserError(f"training diverged (loss {loss}) at step {step}; try a smaller --lr")
            loss_sum, correct_sum, seen = loss_sum + loss * len(x), correct_sum + correct, seen + len(x)
            if step % 50 == 0:
                log.log(step, {"train/loss": loss, "train/lr": lr})
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct_sum / seen:.4f}")
        epoch_seconds.append(time.perf_counter() - started)

        # evaluate and log
        test_accuracy = evaluate(network, x_test, test_labels)
        train_loss, train_accuracy = loss_sum / seen, correct_sum / seen
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "train_accuracy": train_accuracy,
                "test_accuracy": test_accuracy,
            }
        )
        log.log(
            (epoch + 1) * steps_per_epoch,
            {
                "train/epoch_loss": train_loss,
                "train/accuracy": train_accuracy,
                "test/accuracy": test_accuracy,
                "memory/peak_step_mib": peak_step_bytes / MIB,
                "memory/peak_rss_mib": peak_rss_mib(),
                "time/epoch_seconds": epoch_seconds[-1],
            },
        )
        print(
            f"epoch {epoch + 1}/{args.epochs}: train loss {train_loss:.4f}, "
            f"train acc {100 * train_accuracy:.2f}%, test acc {100 * test_accuracy:.2f}%, "
            f"{epoch_seconds[-1]:.1f} s"
        )

        # checkpoint
        save_checkpoint(
            log.path("checkpoint.npz"),
            network,
            optimizer,
            {
                "epoch": epoch + 1,
                "history": history,
                "order_rng": order_rng.bit_generator.state,
                "model_config": asdict(config),
                "args": asdict(args),
            },
        )

    # save
    log.save_figure("curves", plot_curves(history))
    summary = {
        "test_accuracy": history[-1]["test_accuracy"],
        "best_test_accuracy": max(h["test_accuracy"] for h in history),
        "final_train_loss": history[-1].get("train_loss"),
        "peak_step_memory_mib": peak_step_bytes / MIB if peak_step_bytes else None,
        "peak_rss_mib": peak_rss_mib(),
        "seconds_per_epoch": float(np.mean(epoch_seconds)) if epoch_seconds else None,
        "step_seconds_median": float(np.median(step_seconds)) if step_seconds else None,
        "params": network.num_params(),
        "model": args.model,
        "depth": args.depth,
        "width": args.width,
        "dtype": args.dtype,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "train_images": len(x_train),
        "seed": args.seed,
    }
    log.write_summary(summary)
    print(
        f"test accuracy {100 * summary['test_accuracy']:.2f}%, peak step memory "
        f"{summary['peak_step_memory_mib'] or float('nan'):.2f} MiB, peak RSS "
        f"{summary['peak_rss_mib']:.0f} MiB, {summary['seconds_per_epoch'] or float('nan'):.1f} s/epoch"
    )
    log.close()


if __name__ == "__main__":
    run_main(main)
