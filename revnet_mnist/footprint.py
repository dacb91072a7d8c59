"""The memory of one training configuration as a user measures it: the peak RSS of this process.

Trains `--steps` steps the way train.py does (MNIST kept as uint8, each batch normalised to float32
as it is drawn, Adam), then runs one validation pass and, for revnet, the reversibility check that
train.py runs every epoch. Prints one JSON line: the process's peak RSS and the training footprint
from array sizes (dataset, weights, gradients, optimizer state, activations stored for backward).
`benchmark.py --rss` runs it in a fresh process per (model, depth); it also runs alone:

    python revnet_mnist/footprint.py --model resnet --depth 32 --data-dir PATH

The process imports numpy and the experiment's modules only (no plotting, no torch, no ClearML),
so what it holds beyond the footprint is the interpreter, numpy and OpenBLAS.
`--step-memory N` instead traces N steps with tracemalloc (the peak allocated by a step above what
was held before it); the tracing costs memory itself, so the benchmark runs it in its own process.
"""

from __future__ import annotations

import json
import resource
import sys
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's common, not an installed one
from mnist_data import load_mnist, normalise, split_present
from revnet import CHECK_BATCH, Adam, ModelConfig, Network, held_bytes, reversibility_check, train_step
from threadpoolctl import threadpool_limits

from common import check_fits, default_data_dir, parse_args, run_main

MIB = 2**20
LR = 1e-3  # the learning rate does not change the cost of a step


@dataclass
class Args:
    model: Literal["revnet", "resnet", "mlp"] = "revnet"  # network to train
    depth: int = 4  # reversible blocks (revnet, resnet) or hidden layers (mlp)
    width: int = 256  # features after the input projection
    batch_size: int = 128  # images per training step
    steps: int = 4  # training steps (the peak is reached in the first one)
    val_size: int = 5000  # held-out training images, as in train.py
    step_memory: int = 0  # if > 0: trace this many steps with tracemalloc instead of measuring RSS
    threads: int = 1  # BLAS threads
    seed: int = 0  # seeds weights and batch choice
    data_dir: str = default_data_dir()  # holds MNIST/raw/; without it, random uint8 data of MNIST's size


def check_args(args: Args) -> None:
    if args.depth < 1 or args.width < 4 or args.width % 2:
        raise ValueError(f"--depth must be >= 1 and --width even and >= 4 (got {args.depth}, {args.width})")
    if min(args.batch_size, args.steps, args.threads) < 1:
        raise ValueError("--batch-size, --steps and --threads must be >= 1")
    if args.step_memory < 0 or args.val_size < 0:
        raise ValueError("--step-memory and --val-size must be >= 0")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def load_data(args: Args) -> tuple[dict, str]:
    if split_present(args.data_dir, "train"):
        return load_mnist(args.data_dir, args.val_size, allow_download=False), "mnist"
    rng = np.random.default_rng(args.seed)  # a step's cost does not depend on the pixels
    images, labels = rng.integers(0, 256, (70000, 28, 28), dtype=np.uint8), rng.integers(0, 10, 70000)
    cut = 60000 - args.val_size
    return {
        "train_images": images[:cut],
        "train_labels": labels[:cut],
        "val_images": images[cut:60000],
        "val_labels": labels[cut:60000],
        "test_images": images[60000:],
        "test_labels": labels[60000:],
    }, "random"


def breakdown(data: dict, network: Network, optimizer: Adam, stored: int, batch_bytes: int) -> dict:
    """The training footprint in MiB, from the arrays' sizes."""
    params = network.parameters()
    optimizer_bytes = sum(a.nbytes for a in optimizer.state().values()) + optimizer.scratch.nbytes
    return {
        "dataset": sum(a.nbytes for a in data.values()) / MIB,
        "weights": sum(p.nbytes for _, p, _ in params) / MIB,
        "gradients": sum(g.nbytes for _, _, g in params) / MIB,
        "optimizer": optimizer_bytes / MIB,
        "batch": batch_bytes / MIB,
        "stored_activations": stored / MIB,
    }


def train(args: Args, data: dict, network: Network, optimizer: Adam) -> dict:
    """`--steps` training steps, one validation pass, the reversibility check; the footprint."""
    rng = np.random.default_rng([args.seed, 1])
    stored = []
    pixels = data["train_images"].reshape(len(data["train_images"]), -1)  # (N, 784) view
    batch_pixels = np.empty((args.batch_size, pixels.shape[1]), np.uint8)  # reused, as in train.py
    x = np.empty(batch_pixels.shape, np.float32)
    for _ in range(args.steps):
        index = rng.choice(len(pixels), args.batch_size, replace=False)
        np.take(pixels, index, axis=0, out=batch_pixels)
        normalise(batch_pixels, "float32", out=x)
        labels = data["train_labels"][index]
        train_step(
            network, optimizer, x, labels, LR, after_forward=lambda net: stored.append(held_bytes(net))
        )
    x_bytes, batch_bytes = x.nbytes, x.nbytes + labels.nbytes
    for i in range(0, len(data["val_images"]), 1000):
        chunk = data["val_images"][i : i + 1000]
        val_x = normalise(
            chunk, "float32", out=network.workspace.take((len(chunk), pixels.shape[1]), np.float32)
        )
        network.forward(val_x, train=False)
        del val_x
    if network.reversible:
        n = min(CHECK_BATCH, args.batch_size)
        reversibility_check(network, normalise(data["val_images"][:n], "float32"), data["val_labels"][:n])
    # the stem keeps the batch itself for its weight gradient: counted once, as the batch
    return breakdown(data, network, optimizer, max(stored) - x_bytes, batch_bytes)


def traced_steps(args: Args, data: dict, network: Network, optimizer: Adam) -> float:
    """Peak bytes allocated by one step above what was held before it, max over the traced steps (MiB).

    Each traced step starts from an empty workspace, so it allocates its whole working set."""
    x, labels = (
        normalise(data["train_images"][: args.batch_size], "float32"),
        data["train_labels"][: args.batch_size],
    )
    peak = 0
    tracemalloc.start()
    for _ in range(args.step_memory):
        network.workspace.clear()
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        train_step(network, optimizer, x, labels, LR)
        peak = max(peak, tracemalloc.get_traced_memory()[1] - held)
    tracemalloc.stop()
    return peak / MIB


def main() -> None:
    args = parse_args(Args, check=check_args, description=__doc__)
    w, d, b = args.width, args.depth, args.batch_size  # as train.py: weights, Adam, activations
    check_fits(
        4 * (4 * (794 * w + d * w * w) + 4 * b * w * (d + 2)), f"--width {w} --depth {d} --batch-size {b}"
    )
    threadpool_limits(args.threads, user_api="blas")
    data, source = load_data(args)
    config = ModelConfig(args.model, args.depth, args.width)
    network = Network(config, np.random.default_rng(args.seed))
    optimizer = Adam(network.parameters(), weight_decay=5e-5)
    result = {"model": args.model, "depth": args.depth, "width": args.width, "batch_size": args.batch_size}
    result["data"] = source
    if args.step_memory:
        result["step_memory_mib"] = traced_steps(args, data, network, optimizer)
    else:
        result["footprint_mib"] = train(args, data, network, optimizer)
        result["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    run_main(main)
