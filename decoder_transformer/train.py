"""Train a decoder-only Transformer LM (RoPE / learned / sinusoidal / no positions) on next-token prediction.

Defaults are nanoGPT's CPU "baby GPT" (4 layers, 4 heads, 128 dims, context 64, batch 12, 2000 iterations,
lr 1e-3, no dropout) on character-level Tiny Shakespeare; `--preset gpu` is nanoGPT's shakespeare_char model
(6 layers, 6 heads, 384 dims, context 256, batch 64, 5000 iterations, dropout 0.2).

  python decoder_transformer/train.py --data-dir PATH --pos rope --seed 1
  python decoder_transformer/train.py --data-dir PATH --preset gpu --compile     # one GPU, bf16 autocast
  torchrun --nproc_per_node 2 decoder_transformer/train.py --data-dir PATH      # DDP (gloo CPU, nccl GPU)
  python decoder_transformer/train.py --text notes.txt --vocab byte --max-iters 50 --n-layer 1   # tiny
  python decoder_transformer/train.py <same flags> --out <run folder> --resume                  # continue

Ctrl-C saves checkpoint.pt and stops; the same command with --resume (and that run's --out) continues it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's common, not an installed one
from model import DecoderLM, ModelConfig  # noqa: E402
from textdata import (  # noqa: E402
    Vocab,
    get_batch,
    load_checkpoint,
    load_text,
    pick_device,
    sliding_loss,
    split_tokens,
    tiled_windows,
)
from tqdm import tqdm  # noqa: E402

from common import (
    CHECKPOINT_PT,
    DataArgs,
    RunLogger,
    UserError,
    check_fits,
    clock,
    parse_args,
    run_main,
    run_name,
    save_torch,
)

PRESETS = {  # nanoGPT: the CPU "baby GPT" command in its README, and config/train_shakespeare_char.py
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, max_iters=2000, dropout=0.0),
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, max_iters=5000, dropout=0.2),
}
BEST = "best.pt"  # the model at the lowest periodic val loss (small data overfits)


@dataclass
class Args(DataArgs):
    text: str | None = None  # train on this UTF-8 text file instead of Tiny Shakespeare
    vocab: Literal["char", "byte"] = "char"  # characters of the text, or the 256 UTF-8 byte values
    # model and run sizes; the flags below left at None take their value from the preset
    preset: Literal["cpu", "gpu"] = "cpu"
    n_layer: int | None = None  # decoder blocks (cpu 4, gpu 6)
    n_head: int | None = None  # attention heads (cpu 4, gpu 6)
    n_embd: int | None = None  # model width (cpu 128, gpu 384)
    block_size: int | None = None  # context length in tokens (cpu 64, gpu 256)
    batch_size: int | None = None  # sequences per step per process (cpu 12, gpu 64)
    max_iters: int | None = None  # optimizer steps (cpu 2000, gpu 5000)
    dropout: float | None = None  # dropout probability (cpu 0.0, gpu 0.2)
    pos: Literal["rope", "learned", "sinusoidal", "none"] = "rope"  # position encoding
    lr: float = 1e-3  # peak AdamW learning rate
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    lr_decay_iters: int | None = None  # length of warmup + cosine schedule in steps (None: max_iters)
    warmup_iters: int = 100  # linear warmup steps
    weight_decay: float = 0.1  # AdamW weight decay on matrices and embeddings
    beta2: float = 0.99  # AdamW beta2 (nanoGPT's choice for small batches)
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: off)
    eval_interval: int = 250  # steps between validation estimates and checkpoints
    eval_batches: int = 20  # batches in each periodic estimate (the final val loss uses the whole split)
    eval_stride: int = 1  # full-context val loss: window step in tokens (1: every token sees block_size)
    log_interval: int = 10  # steps between train-loss log lines
    progress_every: float = 30.0  # seconds between plain progress lines when stderr is no terminal
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: cuda, then mps, then cpu
    compile: bool = False  # torch.compile the training step
    threads: int | None = None  # torch CPU threads (None: torch's default)

    # more steps, another device, compile or thread count change nothing already trained
    RESUME_SAFE: ClassVar[frozenset[str]] = frozenset(
        {"max_iters", "device", "compile", "threads", "eval_stride", "progress_every"}
    )
    EXTENDS: ClassVar[frozenset[str]] = frozenset({"max_iters"})  # more steps continue a finished run


def check_args(args: Args) -> None:
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "eval_interval", "eval_batches"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if not 1 <= args.eval_stride <= args.block_size:
        raise ValueError(f"--eval-stride must be in [1, --block-size] (got {args.eval_stride})")
    if args.log_interval < 1 or (args.threads is not None and args.threads < 1):
        raise ValueError(
            f"--log-interval and --threads must be >= 1 (got {args.log_interval}, {args.threads})"
        )
    if not (args.lr > 0 and args.min_lr <= args.lr):
        raise ValueError(f"--lr must be > 0 and --min-lr in [0, lr] (got {args.lr}, {args.min_lr})")
    if not args.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1) (got {args.dropout})")
    if not args.beta2 < 1:
        raise ValueError(f"--beta2 must be in [0, 1) (got {args.beta2})")
    if args.n_embd % args.n_head or (args.pos == "rope" and (args.n_embd // args.n_head) % 2):
        raise ValueError(
            f"--n-embd ({args.n_embd}) must split into --n-head ({args.n_head}) heads"
            + (" of even size (RoPE rotates pairs)" if args.pos == "rope" else "")
        )
    if args.lr_decay_iters is not None and args.lr_decay_iters < args.warmup_iters:
        raise ValueError(
            f"--lr-decay-iters ({args.lr_decay_iters}) must be >= --warmup-iters ({args.warmup_iters})"
        )


def learning_rate(it: int, args: Args) -> float:
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters (nanoGPT's schedule)."""
    if it < args.warmup_iters:
        return args.lr * (it + 1) / (args.warmup_iters + 1)
    decay_iters = args.max_iters if args.lr_decay_iters is None else args.lr_decay_iters
    if it >= decay_iters:
        return args.min_lr
    progress = (it - args.warmup_iters) / max(1, decay_iters - args.warmup_iters)
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


@torch.no_grad()
def mean_loss(model, x: torch.Tensor, y: torch.Tensor, batch_size: int, autocast) -> float:
    """Token-weighted mean cross-entropy (nats per token) over windows x, y (N, T)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(x), batch_size):
        with autocast:
            _, loss = model(x[i : i + batch_size], y[i : i + batch_size])
        total += loss.item() * len(x[i : i + batch_size])
    model.train(was_training)
    return total / len(x)


# ---------------------------------------------------------------------------------------------
# set-up


@dataclass
class Setup:
    """What every stage reads: the process's place in a DDP group, its device and numeric mode."""

    ddp: bool
    rank: int
    world: int
    device: str
    use_bf16: bool
    autocast: object = field(repr=False)

    @property
    def master(self) -> bool:
        return self.rank == 0


def set_up(args: Args) -> Setup:
    """Distributed group (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK), device, seeds, precision."""
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = pick_device(args.device)
    if ddp:
        if device == "cuda":
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)  # same initial weights on every rank
    if device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
    use_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else torch.autocast("cpu", enabled=False)
    )
    return Setup(ddp, rank, world, device, use_bf16, autocast)


@dataclass
class Data:
    train: torch.Tensor
    val: torch.Tensor
    vocab: Vocab
    source: str
    eval_sets: dict


def load_data(args: Args, text: str, source: str, vocab_state: dict | None, device: str) -> Data:
    """The whole text on the device (batches are indexed there: no loader threads) and fixed eval windows."""
    vocab = Vocab(**vocab_state) if vocab_state else Vocab.from_text(args.vocab, text)
    try:
        train_data, val_data = split_tokens(text, vocab)
    except ValueError as e:
        raise UserError(f"{source}: {e}") from None
    if len(val_data) < args.block_size + 2:
        raise UserError(
            f"{source} is too short: its last 10% ({len(val_data)} tokens) must exceed "
            f"--block-size {args.block_size} + 1; use a longer text or a smaller --block-size"
        )
    train_data, val_data = train_data.to(device), val_data.to(device)
    fixed = torch.Generator().manual_seed(0)  # the same evaluation windows for every run and seed
    eval_sets = {
        split: get_batch(d, args.eval_batches * args.batch_size, args.block_size, fixed)
        for split, d in (("train", train_data), ("val", val_data))
    }
    return Data(train_data, val_data, vocab, source, eval_sets)


@dataclass
class State:
    """The training state a checkpoint holds besides weights and optimizer."""

    it: int = 0
    best_val: float = math.inf
    evaluated: bool = False  # the checkpoint's step was evaluated before it was saved
    loss_sum: float = 0.0  # train loss summed over the steps of the current log interval
    steps: int = 0


def build(args: Args, vocab: Vocab, device: str):
    config = ModelConfig(
        vocab_size=vocab.size,
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        dropout=args.dropout,
        pos=args.pos,
    )
    model = DecoderLM(config).to(device)
    optimizer = model.make_optimizer(args.lr, args.weight_decay, (0.9, args.beta2), torch.device(device).type)
    return model, optimizer


def restore(ckpt: dict, path, model, optimizer, device: str) -> State:
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state = State(**ckpt["state"])
        torch.set_rng_state(ckpt["rng"].cpu())
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: checkpoint does not fit this model ({str(e)[:200]})") from None
    if ckpt.get("cuda_rng") is not None and device.startswith("cuda"):
        torch.cuda.set_rng_state(ckpt["cuda_rng"].cpu())
    return state


def save_checkpoint(path: Path, model, optimizer, vocab: Vocab, args: Args, state: State) -> None:
    """Plain types only (weights_only loading): everything a resumed run needs to draw the same batches
    and dropout masks; written atomically."""
    save_torch(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "model_config": asdict(model.config),
            "vocab": vocab.state(),
            "args": asdict(args),
            "iter": state.it,
            "state": asdict(state),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        },
        path,
    )


# ---------------------------------------------------------------------------------------------
# training


class Trainer:
    """The loop: batches, steps, periodic evaluation and checkpoints, Ctrl-C."""

    def __init__(self, args: Args, setup: Setup, data: Data, model, optimizer, state: State, log):
        self.args, self.setup, self.data, self.log = args, setup, data, log
        self.model, self.optimizer, self.state = model, optimizer, state
        self.step_model = torch.compile(model) if args.compile else model
        if setup.ddp:
            self.step_model = torch.nn.parallel.DistributedDataParallel(self.step_model)
        self.tokens_per_step = args.batch_size * args.block_size * setup.world
        self.train_seconds, self.steps_timed = 0.0, 0
        self.stop = False

    def request_stop(self, signum, frame):
        self.stop = True  # finish this step, save, stop; a second Ctrl-C aborts at once
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def checkpoint(self, name: str = CHECKPOINT_PT) -> None:
        save_checkpoint(
            self.log.path(name), self.model, self.optimizer, self.data.vocab, self.args, self.state
        )
        self.log.keep()

    def evaluate_and_save(self) -> None:
        eval_sets, s = self.data.eval_sets, self.state
        losses = {
            f"eval/{split}_loss": mean_loss(
                self.model, *eval_sets[split], self.args.batch_size, self.setup.autocast
            )
            for split in eval_sets
        }
        improved = losses["eval/val_loss"] < s.best_val
        s.best_val, s.evaluated = min(s.best_val, losses["eval/val_loss"]), True
        self.log.log(s.it, losses)
        tqdm.write(
            f"step {s.it}: train loss {losses['eval/train_loss']:.4f}, val loss {losses['eval/val_loss']:.4f}"
        )
        self.checkpoint()
        if improved:  # small data overfits (nanoGPT keeps only its best checkpoint for the same reason)
            self.checkpoint(BEST)

    def step(self, batch_gen: torch.Generator) -> None:
        args, s = self.args, self.state
        # batches depend only on (seed, rank, step), so a resumed run draws the ones it would have drawn
        batch_gen.manual_seed((args.seed * 1_000_003 + self.setup.rank) * 1_000_033 + s.it)
        x, y = get_batch(self.data.train, args.batch_size, args.block_size, batch_gen)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(s.it, args)
        with self.setup.autocast:
            _, loss = self.step_model(x, y)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        s.loss_sum += loss.detach()
        s.steps += 1
        s.it += 1
        s.evaluated = False
        self.steps_timed += 1

    def log_interval(self, started: float) -> float:
        s = self.state
        mean_train = (s.loss_sum / s.steps).item()  # syncs the device
        elapsed = time.perf_counter() - started
        self.train_seconds += elapsed
        metrics = {
            "train/batch_loss": mean_train,
            "charts/lr": learning_rate(s.it - 1, self.args),
            "charts/tokens_per_second": self.tokens_per_step * s.steps / elapsed,
        }
        self.log.log(s.it, metrics)
        s.loss_sum, s.steps = 0.0, 0
        return time.perf_counter()

    def run(self) -> None:
        """Train to max_iters (or Ctrl-C); only the master process logs, evaluates and saves."""
        args, s, master = self.args, self.state, self.setup.master
        signal.signal(signal.SIGINT, self.request_stop)
        batch_gen = torch.Generator(device=self.data.train.device)
        bar = master and sys.stderr.isatty()  # a log file gets plain lines instead (progress_line)
        progress = tqdm(initial=s.it, total=args.max_iters, disable=not bar, dynamic_ncols=True)
        started = began = last_line = time.perf_counter()
        first = s.it
        while s.it < args.max_iters and not self.stop:
            if master and s.it % args.eval_interval == 0 and not s.evaluated:
                self.train_seconds += time.perf_counter() - started
                self.evaluate_and_save()
                started = time.perf_counter()
            self.step(batch_gen)
            progress.update()
            if master and s.it % args.log_interval == 0:
                started = self.log_interval(started)
            if master and not bar and time.perf_counter() - last_line >= args.progress_every:
                last_line = time.perf_counter()
                print(progress_line(s.it, first, args.max_iters, last_line - began), flush=True)
        progress.close()
        self.train_seconds += time.perf_counter() - started
        if torch.is_tensor(s.loss_sum):
            s.loss_sum = s.loss_sum.item()
        if self.stop:
            if master:
                self.checkpoint()
                where = f"--out {self.log.run_dir} --resume"
                tqdm.write(
                    f"stopped at step {s.it}; checkpoint saved: continue with {where}", file=sys.stderr
                )
            raise KeyboardInterrupt
        if master and not s.evaluated:
            self.evaluate_and_save()


def progress_line(step: int, first: int, total: int, seconds: float) -> str:
    """'step 800/2,000 (40%), 1:23 elapsed, 4.8 steps/s, ETA 4:10': the steps since `first` (this
    process's start) set the rate."""
    rate = (step - first) / seconds if seconds > 0 else 0.0
    eta = clock((total - step) / rate) if rate > 0 else "unknown"
    return (
        f"step {step:,}/{total:,} ({100 * step / total:.0f}%), {clock(seconds)} elapsed, "
        f"{rate:.1f} steps/s, ETA {eta}"
    )


# ---------------------------------------------------------------------------------------------
# evaluation and report


def in_units(nats: float, targets: torch.Tensor, vocab: Vocab) -> dict:
    """Mean nats per token over `targets`, and the same total in bits per character and per UTF-8 byte,
    so char and byte vocabularies compare."""
    chars, n_bytes = vocab.unit_counts(targets)
    total_bits = nats * targets.numel() / math.log(2)
    return {
        "nats_per_token": nats,
        "bits_per_char": total_bits / chars,
        "bits_per_byte": total_bits / n_bytes,
    }


def whole_split_loss(model, data: Data, context: int, batch_size: int, autocast) -> dict:
    """The whole validation split in non-overlapping windows of `context` tokens (mean context
    about context / 2)."""
    x, y = tiled_windows(data.val, context)
    return in_units(mean_loss(model, x, y, batch_size, autocast), y, data.vocab)


def full_context_loss(model, data: Data, context: int, stride: int, autocast) -> dict:
    """Every validation target scored with `context` tokens before it (stride 1), as generation sees
    them; the split's first targets with the tokens of the split before them (`sliding_windows`)."""
    was_training = model.training
    model.eval()

    def logits(x):
        with autocast:
            return model(x)[0]

    nats = sliding_loss(logits, data.val, context, stride, batch_size=64)
    model.train(was_training)
    return in_units(nats, data.val[1:], data.vocab)


def report(trainer: Trainer) -> dict:
    args, setup, data, log, model = trainer.args, trainer.setup, trainer.data, trainer.log, trainer.model
    val = whole_split_loss(model, data, args.block_size, args.batch_size, setup.autocast)
    full = full_context_loss(model, data, args.block_size, args.eval_stride, setup.autocast)
    val_2x = None
    if args.pos != "learned":  # learned positions have no embedding past block_size
        val_2x = whole_split_loss(
            model, data, 2 * args.block_size, max(1, args.batch_size // 2), setup.autocast
        )
    rows = [json.loads(r) for r in log.path("metrics.jsonl").read_text().splitlines() if r]
    last = {k: [r[k] for r in rows if k in r][-1:] or [None] for k in ("eval/train_loss", "eval/val_loss")}
    summary = {
        "val_loss": val["nats_per_token"],
        "val_bits_per_char": val["bits_per_char"],
        "val_bits_per_byte": val["bits_per_byte"],
        "val_loss_full_context": full["nats_per_token"],
        "val_bits_per_char_full_context": full["bits_per_char"],
        "val_bits_per_byte_full_context": full["bits_per_byte"],
        "full_context_stride": args.eval_stride,
        "val_loss_2x_context": val_2x and val_2x["nats_per_token"],
        "val_bits_per_char_2x_context": val_2x and val_2x["bits_per_char"],
        "train_loss": last["eval/train_loss"][0],
        "val_loss_estimate": last["eval/val_loss"][0],
        "best_val_loss": trainer.state.best_val,
        "iters": args.max_iters,
        "params": model.num_params(),
        "pos": args.pos,
        "vocab": data.vocab.kind,
        "tokens_per_second": (
            trainer.tokens_per_step * trainer.steps_timed / trainer.train_seconds
            if trainer.steps_timed
            else None
        ),
        "train_seconds": trainer.train_seconds,
        "torch_threads": torch.get_num_threads(),
        "device": setup.device,
        "world_size": setup.world,
        "text": data.source,
    }
    log.write_summary(summary)
    log.save_figure("loss_curves", plot_curves(rows, args.pos))
    print(
        f"val loss {val['nats_per_token']:.4f} nats/token = {val['bits_per_char']:.4f} bits/char "
        f"(whole split, context {args.block_size}); full context {full['nats_per_token']:.4f} "
        f"= {full['bits_per_char']:.4f} bits/char"
        + (f"; {val_2x['nats_per_token']:.4f} at context {2 * args.block_size}" if val_2x else "")
        + f"; {summary['tokens_per_second'] or 0:,.0f} train tokens/s"
    )
    return summary


def plot_curves(rows: list[dict], pos: str):
    """Per-interval batch loss and the periodic train / val estimates."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("train/batch_loss", "-"), ("eval/train_loss", "o-"), ("eval/val_loss", "s-")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), style, label=key, alpha=0.6 if key == "train/batch_loss" else 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"decoder_transformer, positions: {pos}")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


# ---------------------------------------------------------------------------------------------


def describe(args: Args, setup: Setup, data: Data, model, state: State) -> None:
    vocab = data.vocab
    print(f"{data.source}: {len(data.train):,} train / {len(data.val):,} val tokens, ", end="")
    print(f"vocab {vocab.size} ({vocab.kind})")
    print(f"model: {model.num_params():,} parameters, {asdict(model.config)}")
    tokens = args.batch_size * args.block_size * setup.world
    print(
        f"device {setup.device}{' bf16' if setup.use_bf16 else ''}, {setup.world} process(es), "
        f"{tokens:,} tokens/step, steps {state.it} -> {args.max_iters}"
    )


def main() -> None:
    args = parse_args(Args, check=check_args, description=__doc__)
    # float32 weights, gradients and AdamW's moments; a step's activations and attention scores
    L, d, T, B = args.n_layer, args.n_embd, args.block_size, args.batch_size
    need = 16 * (12 * L * d * d + (256 + T) * d) + 4 * B * T * L * (16 * d + 2 * args.n_head * T)
    check_fits(need, f"--n-layer {L} --n-embd {d} --block-size {T} --batch-size {B}")
    setup = set_up(args)
    # inputs first: a bad text or checkpoint fails in one line, before a run folder is touched
    text, source = load_text(args.text, args.data_dir)
    ckpt_path = Path(args.out or "") / CHECKPOINT_PT
    ckpt = load_checkpoint(ckpt_path, setup.device) if args.resume and args.out else None
    if ckpt and args.max_iters < ckpt["iter"]:
        raise UserError(f"--max-iters {args.max_iters} is below the checkpoint's {ckpt['iter']} steps")
    logger = RunLogger("decoder_transformer", run_name(args.pos, args.seed), args) if setup.master else None
    with logger or contextlib.nullcontext() as log:
        data = load_data(args, text, source, ckpt and ckpt["vocab"], setup.device)
        model, optimizer = build(args, data.vocab, setup.device)
        state = restore(ckpt, ckpt_path, model, optimizer, setup.device) if ckpt else State()
        if log:
            if ckpt:
                log.rewind(state.it)  # metric rows after the checkpoint would appear twice
            describe(args, setup, data, model, state)
        trainer = Trainer(args, setup, data, model, optimizer, state, log)
        trainer.run()
        if setup.master:
            report(trainer)
    if setup.ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
