"""Memory and speed of the numpy RevNet, its stored-activation counterpart, a plain MLP, and torch.

Side by side in one process, on the same batches, for each depth: the peak memory allocated by
one training step above what was held before it (tracemalloc, which counts numpy's buffers), and
the median step time (forward, backward, Adam update), with the models taking turns in short runs
so a busy machine slows them alike. The torch reference is the `resnet` network written in torch
(CPU, autograd, AdamW) with the same weights and thread count. Also checks the reversible
backward's numerics per depth: gradient error against stored-activation backprop, and how far
rebuilding the stack's input from its output drifts, in float64 and float32.

    python revnet_mnist/benchmark.py --data-dir /work/shared/data                 # full, a few minutes
    python revnet_mnist/benchmark.py --depths 2 4 --steps 5 --clearml off         # tiny

Writes benchmark.json (memory_mib[model][depth], step_seconds[model][depth], torch_step_seconds[depth],
numerics) and benchmark.png (memory and step time vs depth) to the run folder (or --out).
"""

from __future__ import annotations

import time
import tracemalloc
from dataclasses import asdict, dataclass, field
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import LogLocator, NullFormatter, NullLocator, ScalarFormatter  # noqa: E402
from mnist_data import load_split, normalise, split_present  # noqa: E402
from revnet import MODELS, Adam, ModelConfig, Network, softmax_cross_entropy, train_step  # noqa: E402
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

from common import RunLogger, default_data_dir, parse_args, run_main, run_name, write_json  # noqa: E402

MIB = 2**20
LR, WEIGHT_DECAY = 1e-3, 5e-5  # train.py's defaults; the values don't change the cost of a step


@dataclass
class Args:
    depths: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 32])  # network depths to measure
    batch_size: int = 128  # images per step (train.py's default)
    width: int = 256  # features after the input projection (train.py's default)
    steps: int = 30  # timed steps per model and depth (median reported)
    threads: int = 1  # BLAS and torch threads, the same for both (1: steady timings on a busy machine)
    memory_steps: int = 2  # traced steps per model and depth (max reported), after a warm-up step
    seed: int = 0  # seeds weights and batch choice
    data_dir: str = default_data_dir()  # MNIST/raw/ here gives real batches; otherwise random ones
    out: str | None = None  # run folder (default runs/revnet_mnist/<run name>)
    clearml: Literal["auto", "offline", "online", "off"] = "auto"  # ClearML mirror of the run
    clearml_queue: str | None = None  # hand the run to this ClearML agent queue


def check_args(args: Args) -> None:
    if not args.depths or min(args.depths) < 1:
        raise ValueError(f"--depths must all be >= 1 (got {args.depths})")
    if args.width < 4 or args.width % 2:
        raise ValueError(f"--width must be an even number >= 4 (got {args.width})")
    if min(args.batch_size, args.steps, args.memory_steps, args.threads) < 1:
        raise ValueError("--batch-size, --steps, --memory-steps and --threads must be >= 1")


class TorchResNet(torch.nn.Module):
    """revnet.Network(model='resnet') in torch: stem, y1 = x1 + F(x2), y2 = x2 + G(y1), ReLU, head."""

    def __init__(self, network: Network):
        super().__init__()
        config = network.config

        def linear(layer):
            module = torch.nn.Linear(*layer.params["W"].shape)
            with torch.no_grad():
                module.weight.copy_(torch.from_numpy(layer.params["W"].T.copy()))
                module.bias.copy_(torch.from_numpy(layer.params["b"]))
            return module

        def branch(seq):
            return torch.nn.Sequential(linear(seq.layers[0]), torch.nn.ReLU(), linear(seq.layers[2]))

        self.half = config.width // 2
        self.stem, self.head = linear(network.stem), linear(network.head)
        self.F = torch.nn.ModuleList(branch(block.F) for block in network.blocks)
        self.G = torch.nn.ModuleList(branch(block.G) for block in network.blocks)

    def forward(self, x):
        x1, x2 = self.stem(x).split(self.half, dim=1)  # two (B, width/2)
        for F, G in zip(self.F, self.G):
            x1 = x1 + F(x2)
            x2 = x2 + G(x1)
        return self.head(torch.relu(torch.cat([x1, x2], dim=1)))


class Contestants:
    """`step(model, i)`: one training step of numpy model `model` (or 'torch') on batch i."""

    def __init__(self, nets: dict[str, Network], batches: list):
        self.nets, self.batches = nets, batches
        self.optimizers = {m: Adam(net.parameters(), weight_decay=WEIGHT_DECAY) for m, net in nets.items()}
        self.reference = TorchResNet(nets["resnet"])  # copies the numpy resnet's starting weights
        self.torch_optimizer = torch.optim.AdamW(
            self.reference.parameters(), lr=LR, weight_decay=WEIGHT_DECAY
        )
        self.torch_batches = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in batches]

    def __call__(self, model: str, i: int) -> None:
        if model == "torch":
            x, labels = self.torch_batches[i % len(self.batches)]
            self.torch_optimizer.zero_grad()
            torch.nn.functional.cross_entropy(self.reference(x), labels).backward()
            self.torch_optimizer.step()
        else:
            train_step(self.nets[model], self.optimizers[model], *self.batches[i % len(self.batches)], LR)


def traced_peak(step) -> int:
    """Peak bytes allocated while `step()` runs, above what was held before it."""
    tracemalloc.start()
    held_before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    step()
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
    rebuild_error = float(np.abs(rebuilt - h).max() / np.abs(h).max())
    return {
        "grad_rel_error": grad_error,
        "grad_rel_error_all": (squared_diff / squared_norm) ** 0.5,
        "reconstruction_rel_error": rebuild_error,
    }


def plot(result: dict, depths: list[int]):
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 3.8))
    for m in MODELS:
        ax_mem.plot(depths, [result["memory_mib"][m][str(d)] for d in depths], marker="o", label=m)
        ax_time.plot(depths, [1e3 * result["step_seconds"][m][str(d)] for d in depths], marker="o", label=m)
    ax_time.plot(
        depths,
        [1e3 * result["torch_step_seconds"][str(d)] for d in depths],
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


def main() -> None:
    args = parse_args(Args, check=check_args, description=__doc__)
    real = split_present(args.data_dir, "train")
    if real:
        images, all_labels = load_split(args.data_dir, "train", allow_download=False)
        x_all = normalise(images, "float64")
    else:
        print(
            f"no MNIST training files in {args.data_dir}: random batches "
            "(a step's cost does not depend on the pixels)"
        )
        rng, n = np.random.default_rng(args.seed), 4 * args.batch_size
        x_all, all_labels = rng.standard_normal((n, 784)), rng.integers(0, 10, n)
    threadpool_limits(args.threads, user_api="blas")  # numpy's BLAS and torch get the same threads
    torch.set_num_threads(args.threads)
    blas_threads = max((p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"), default=1)
    torch.manual_seed(args.seed)
    print(
        f"batch {args.batch_size}, width {args.width}, float32, {blas_threads} BLAS and torch threads, "
        f"{'MNIST' if real else 'random'} batches"
    )
    log = RunLogger(
        "revnet_mnist",
        run_name("benchmark", args.seed),
        asdict(args),
        out=args.out,
        clearml=args.clearml,
        clearml_queue=args.clearml_queue,
    )

    rng = np.random.default_rng(args.seed)
    batches = [rng.choice(len(x_all), args.batch_size, replace=False) for _ in range(4)]
    batches = [(x_all[b].astype(np.float32), all_labels[b]) for b in batches]
    result = {
        "batch_size": args.batch_size,
        "width": args.width,
        "threads": blas_threads,
        "data": "mnist" if real else "random",
        "memory_mib": {m: {} for m in MODELS},
        "step_seconds": {m: {} for m in MODELS},
        "torch_step_seconds": {},
        "params": {m: {} for m in MODELS},
        "numerics": {"float64": {}, "float32": {}},
    }
    for depth in args.depths:
        # build: every model starts from the same seed; torch copies the numpy resnet's weights
        nets = {
            m: Network(ModelConfig(m, depth, args.width), np.random.default_rng(args.seed)) for m in MODELS
        }
        step = Contestants(nets, batches)

        # memory: a warm-up step, then the max over traced steps
        for model in MODELS:
            step(model, 0)
            peak = max(traced_peak(lambda: step(model, i)) for i in range(1, args.memory_steps + 1))  # noqa: B023
            result["memory_mib"][model][str(depth)] = peak / MIB
            result["params"][model][str(depth)] = nets[model].num_params()
        # time: models take turns in short runs of steps (a busy machine slows them alike), medians
        times = {m: [] for m in (*MODELS, "torch")}
        step("torch", 0)
        run_length = max(1, args.steps // 5)
        for start in range(0, args.steps, run_length):
            for model in times:
                for i in range(start, min(start + run_length, args.steps)):
                    started = time.perf_counter()
                    step(model, i)
                    times[model].append(time.perf_counter() - started)
        for model in MODELS:
            result["step_seconds"][model][str(depth)] = float(np.median(times[model]))
        result["torch_step_seconds"][str(depth)] = float(np.median(times["torch"]))
        # numerics on one batch, float64 and float32
        for dtype in ("float64", "float32"):
            result["numerics"][dtype][str(depth)] = numerics(depth, args.width, *batches[0], dtype, args.seed)

        mem, sec = result["memory_mib"], result["step_seconds"]
        d = str(depth)
        print(
            f"depth {depth:3d}: memory MiB revnet {mem['revnet'][d]:7.2f}  resnet {mem['resnet'][d]:7.2f}  "
            f"mlp {mem['mlp'][d]:7.2f} (revnet/resnet {mem['revnet'][d] / mem['resnet'][d]:.3f}) | step ms "
            f"revnet {1e3 * sec['revnet'][d]:6.2f}  resnet {1e3 * sec['resnet'][d]:6.2f}  "
            f"mlp {1e3 * sec['mlp'][d]:6.2f}  torch {1e3 * result['torch_step_seconds'][d]:6.2f} "
            f"(revnet/resnet {sec['revnet'][d] / sec['resnet'][d]:.2f}, "
            f"resnet/torch {sec['resnet'][d] / result['torch_step_seconds'][d]:.2f}) | grad err "
            f"f64 {result['numerics']['float64'][d]['grad_rel_error']:.1e} "
            f"f32 {result['numerics']['float32'][d]['grad_rel_error']:.1e}, rebuild err "
            f"f64 {result['numerics']['float64'][d]['reconstruction_rel_error']:.1e} "
            f"f32 {result['numerics']['float32'][d]['reconstruction_rel_error']:.1e}",
            flush=True,
        )

    # ratios the targets are stated in
    mem, sec = result["memory_mib"], result["step_seconds"]
    d0 = str(4 if 4 in args.depths else args.depths[0])  # the targets compare with depth 4
    d1 = str(args.depths[-1])
    result["ratios"] = {
        f"revnet_memory_depth{d1}_over_depth{d0}": mem["revnet"][d1] / mem["revnet"][d0],
        f"resnet_memory_depth{d1}_over_depth{d0}": mem["resnet"][d1] / mem["resnet"][d0],
        "revnet_over_resnet_memory": {d: mem["revnet"][d] / mem["resnet"][d] for d in mem["revnet"]},
        "revnet_over_resnet_time": {d: sec["revnet"][d] / sec["resnet"][d] for d in sec["revnet"]},
        "numpy_resnet_over_torch_time": {
            d: sec["resnet"][d] / result["torch_step_seconds"][d] for d in sec["revnet"]
        },
    }
    for key, value in result["ratios"].items():
        shown = {k: round(v, 3) for k, v in value.items()} if isinstance(value, dict) else round(value, 3)
        print(f"{key}: {shown}")
    write_json(log.path("benchmark.json"), result)
    log.save_figure("benchmark", plot(result, args.depths))
    log.close()


if __name__ == "__main__":
    run_main(main)
