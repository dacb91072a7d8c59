"""Train a decoder-only Transformer LM (RoPE / learned / sinusoidal / no positions) on next-token prediction.

Defaults are nanoGPT's CPU "baby GPT" (4 layers, 4 heads, 128 dims, context 64, batch 12, 2000 iterations,
lr 1e-3, no dropout) on character-level Tiny Shakespeare; `--preset gpu` is nanoGPT's shakespeare_char model
(6 layers, 6 heads, 384 dims, context 256, batch 64, 5000 iterations, dropout 0.2).

  python decoder_transformer/train.py --data-dir /work/shared/data --pos rope --seed 1
  python decoder_transformer/train.py --preset gpu --compile                      # one GPU, bf16 autocast
  torchrun --nproc_per_node 2 decoder_transformer/train.py                        # DDP (gloo CPU, nccl GPU)
  python decoder_transformer/train.py --text notes.txt --vocab byte --max-iters 50 --n-layer 1   # tiny
  python decoder_transformer/train.py <same flags> --resume runs/decoder_transformer/<run>      # continue

Ctrl-C saves ckpt.pt and stops; rerun the same command with --resume <run folder> to continue it.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from model import DecoderLM, ModelConfig  # noqa: E402
from textdata import Vocab, get_batch, load_checkpoint, load_text, pick_device, split_tokens, tiled_windows
from tqdm import tqdm  # noqa: E402

from common import RunLogger, UserError, default_data_dir, parse_args, run_main, run_name, write_json

PRESETS = {  # nanoGPT: the CPU "baby GPT" command in its README, and config/train_shakespeare_char.py
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, max_iters=2000, dropout=0.0),
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, max_iters=5000, dropout=0.2),
}


@dataclass
class Args:
    seed: int = 1337  # seeds initialisation, batches and dropout
    data_dir: str = default_data_dir()  # folder holding tinyshakespeare/input.txt (downloaded when absent)
    text: str | None = None  # train on this UTF-8 text file instead of Tiny Shakespeare
    vocab: Literal["char", "byte"] = "char"  # characters of the text, or the 256 UTF-8 byte values
    preset: Literal["cpu", "gpu"] = (
        "cpu"  # model and run sizes; the flags below set to None take it from here
    )
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
    log_interval: int = 10  # steps between train-loss log lines
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: cuda, then mps, then cpu
    compile: bool = False  # torch.compile the training step
    resume: str | None = None  # run folder (or its ckpt.pt) to continue; pass the same flags as the first run
    out: str | None = None  # run folder (default runs/decoder_transformer/<name>)
    clearml: Literal["auto", "offline", "online", "off"] = "auto"  # ClearML mirroring
    clearml_queue: str | None = None  # enqueue on this ClearML agent queue instead of running here


# flags that may differ between a run and its --resume (everything else must match the checkpoint)
RESUME_FREE = (
    "resume",
    "out",
    "data_dir",
    "text",
    "max_iters",
    "device",
    "compile",
    "clearml",
    "clearml_queue",
)


def check_args(args: Args) -> None:
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in (
        "n_layer",
        "n_head",
        "n_embd",
        "block_size",
        "batch_size",
        "eval_interval",
        "eval_batches",
        "log_interval",
    ):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if args.max_iters < 0 or args.warmup_iters < 0:
        raise ValueError(
            f"--max-iters and --warmup-iters must be >= 0 (got {args.max_iters}, {args.warmup_iters})"
        )
    if not (args.lr > 0 and 0 <= args.min_lr <= args.lr):
        raise ValueError(f"--lr must be > 0 and --min-lr in [0, lr] (got {args.lr}, {args.min_lr})")
    if not 0 <= args.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1) (got {args.dropout})")
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
    """Token-weighted mean cross-entropy over windows x, y (N, T)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(x), batch_size):
        with autocast:
            _, loss = model(x[i : i + batch_size], y[i : i + batch_size])
        total += loss.item() * len(x[i : i + batch_size])
    model.train(was_training)
    return total / len(x)


def save_checkpoint(path: Path, model, optimizer, vocab, args, it, evaluated, best_val, interval) -> None:
    """Everything a resumed run needs to draw the same batches and dropout masks; written atomically."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "model_config": asdict(model.config),
        "vocab": vocab.state(),
        "args": asdict(args),
        "iter": it,
        "evaluated": evaluated,
        "best_val_loss": best_val,
        "interval": interval,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }
    tmp = Path(f"{path}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def main() -> None:
    args = parse_args(Args, check=check_args, description=__doc__)

    # setup: distributed (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK), device, seeds
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = pick_device(args.device)
    if ddp:
        if device == "cuda":
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    master = rank == 0
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)  # same initial weights on every rank
    if device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
    use_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else torch.autocast("cpu", enabled=False)
    )

    # resume: the checkpoint's arguments must match this command's
    ckpt, run_dir = None, None
    if args.resume:
        ckpt_path = Path(args.resume) if args.resume.endswith(".pt") else Path(args.resume) / "ckpt.pt"
        ckpt = load_checkpoint(str(ckpt_path), device)
        run_dir = ckpt_path.parent
        saved = ckpt["args"]
        different = [k for k, v in asdict(args).items() if k not in RESUME_FREE and saved.get(k) != v]
        if different:
            raise UserError(
                f"{ckpt_path} was trained with another config: "
                + ", ".join(
                    f"--{k.replace('_', '-')} {saved.get(k)} (this command: {getattr(args, k)})"
                    for k in different
                )
                + "; rerun with the checkpoint's flags"
            )
        if args.max_iters < ckpt["iter"]:
            raise UserError(f"--max-iters {args.max_iters} is below the checkpoint's {ckpt['iter']} steps")

    # data: the whole text on the device; batches are indexed there, so no loader threads are needed
    text, source = load_text(args.text, args.data_dir)
    vocab = Vocab(**ckpt["vocab"]) if ckpt else Vocab.from_text(args.vocab, text)
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

    # model and optimizer
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
    optimizer = torch.optim.AdamW(
        model.optimizer_groups(args.weight_decay),
        lr=args.lr,
        betas=(0.9, args.beta2),
        fused=device.startswith("cuda"),
    )
    start_iter, best_val, interval = 0, math.inf, {"loss_sum": 0.0, "steps": 0}
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_iter, best_val, interval = ckpt["iter"], ckpt["best_val_loss"], ckpt["interval"]
        torch.set_rng_state(ckpt["rng"].cpu())
        if ckpt["cuda_rng"] is not None and device.startswith("cuda"):
            torch.cuda.set_rng_state(ckpt["cuda_rng"].cpu())
    step_model = torch.compile(model) if args.compile else model
    if ddp:
        step_model = torch.nn.parallel.DistributedDataParallel(step_model)
    tokens_per_step = args.batch_size * args.block_size * world

    log = None
    if master:
        if ckpt:  # drop metric rows logged after the checkpoint, so the resumed curve has no duplicates
            metrics = run_dir / "metrics.jsonl"
            if metrics.exists():
                rows = [
                    r for r in metrics.read_text().splitlines() if r and json.loads(r)["step"] <= start_iter
                ]
                metrics.write_text("".join(r + "\n" for r in rows))
        log = RunLogger(
            "decoder_transformer",
            run_name(f"{args.pos}", args.seed),
            asdict(args),
            out=str(run_dir) if run_dir else args.out,
            clearml=args.clearml,
            clearml_queue=args.clearml_queue,
            resume=bool(ckpt),
        )
        print(
            f"{source}: {len(train_data):,} train / {len(val_data):,} val tokens, "
            f"vocab {vocab.size} ({vocab.kind})"
        )
        print(f"model: {model.num_params():,} parameters, {asdict(config)}")
        print(
            f"device {device}{' bf16' if use_bf16 else ''}, {world} process(es), "
            f"{tokens_per_step:,} tokens/step, "
            f"steps {start_iter} -> {args.max_iters}"
        )

    # Ctrl-C: finish the current step, save, stop (a second Ctrl-C aborts at once)
    stop = {"now": False}

    def request_stop(signum, frame):
        stop["now"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, request_stop)

    def evaluate_and_save(it: int) -> None:
        nonlocal best_val
        losses = {f"{s}/loss": mean_loss(model, *eval_sets[s], args.batch_size, autocast) for s in eval_sets}
        improved = losses["val/loss"] < best_val
        best_val = min(best_val, losses["val/loss"])
        log.log(it, losses)
        tqdm.write(f"step {it}: train loss {losses['train/loss']:.4f}, val loss {losses['val/loss']:.4f}")
        save_checkpoint(log.path("ckpt.pt"), model, optimizer, vocab, args, it, True, best_val, interval)
        if improved:  # small data overfits (nanoGPT keeps only its best checkpoint for the same reason)
            save_checkpoint(log.path("best.pt"), model, optimizer, vocab, args, it, True, best_val, interval)

    # training loop
    train_seconds, steps_timed = 0.0, 0
    t_interval = time.perf_counter()
    batch_gen = torch.Generator(device=train_data.device)
    progress = tqdm(
        range(start_iter, args.max_iters),
        initial=start_iter,
        total=args.max_iters,
        disable=not master,
        dynamic_ncols=True,
    )
    it = start_iter
    for it in progress:
        if master and it % args.eval_interval == 0 and not (ckpt and ckpt["evaluated"] and it == start_iter):
            train_seconds += time.perf_counter() - t_interval
            evaluate_and_save(it)
            t_interval = time.perf_counter()
        # batches depend only on (seed, rank, step), so a resumed run draws the ones it would have drawn
        batch_gen.manual_seed((args.seed * 1_000_003 + rank) * 1_000_033 + it)
        x, y = get_batch(train_data, args.batch_size, args.block_size, batch_gen)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(it, args)
        # learn
        with autocast:
            _, loss = step_model(x, y)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        interval["loss_sum"] += loss.detach()
        interval["steps"] += 1
        steps_timed += 1
        # log
        if master and (it + 1) % args.log_interval == 0:
            mean_train = (interval["loss_sum"] / interval["steps"]).item()  # syncs the device
            elapsed = time.perf_counter() - t_interval
            train_seconds += elapsed
            log.log(
                it + 1,
                {
                    "train/batch_loss": mean_train,
                    "train/lr": learning_rate(it, args),
                    "charts/tokens_per_second": tokens_per_step * interval["steps"] / elapsed,
                },
            )
            progress.set_postfix(loss=f"{mean_train:.4f}")
            interval = {"loss_sum": 0.0, "steps": 0}
            t_interval = time.perf_counter()
        if stop["now"]:
            it += 1
            break
    else:
        it = args.max_iters
    progress.close()
    if torch.is_tensor(interval["loss_sum"]):
        interval["loss_sum"] = interval["loss_sum"].item()
    train_seconds += time.perf_counter() - t_interval

    if stop["now"]:
        if master:
            save_checkpoint(log.path("ckpt.pt"), model, optimizer, vocab, args, it, False, best_val, interval)
            tqdm.write(
                f"stopped at step {it}; checkpoint saved: continue with --resume {log.run_dir}",
                file=sys.stderr,
            )
            log.close()
        raise KeyboardInterrupt

    # evaluate: the whole validation split in non-overlapping windows, at 1x and (where positions allow) 2x
    if master:
        evaluate_and_save(args.max_iters)
        val_loss = mean_loss(model, *tiled_windows(val_data, args.block_size), args.batch_size, autocast)
        val_loss_2x = None
        if args.pos != "learned":
            val_loss_2x = mean_loss(
                model, *tiled_windows(val_data, 2 * args.block_size), max(1, args.batch_size // 2), autocast
            )
        summary = {
            "val_loss": val_loss,
            "val_loss_2x_context": val_loss_2x,
            "train_loss": log_last(log.path("metrics.jsonl"), "train/loss"),
            "val_loss_estimate": log_last(log.path("metrics.jsonl"), "val/loss"),
            "best_val_loss": best_val,
            "iters": args.max_iters,
            "params": model.num_params(),
            "pos": args.pos,
            "tokens_per_second": tokens_per_step * steps_timed / train_seconds if steps_timed else None,
            "train_seconds": train_seconds,
            "device": device,
            "world_size": world,
            "text": source,
        }
        log.write_summary(summary)
        write_json(log.path("vocab.json"), vocab.state())
        log.save_figure("loss_curves", plot_curves(log.path("metrics.jsonl"), args.pos))
        print(
            f"val loss {val_loss:.4f} (whole split, context {args.block_size})"
            + (f", {val_loss_2x:.4f} at context {2 * args.block_size}" if val_loss_2x is not None else "")
            + f"; {summary['tokens_per_second'] or 0:,.0f} train tokens/s"
        )
        log.close()
    if ddp:
        dist.destroy_process_group()


def plot_curves(path: Path, pos: str):
    """Per-step batch loss and the periodic train / val estimates."""
    rows = [json.loads(r) for r in path.read_text().splitlines() if r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("train/batch_loss", "-"), ("train/loss", "o-"), ("val/loss", "s-")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), style, label=key, alpha=0.6 if key == "train/batch_loss" else 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"decoder_transformer, positions: {pos}")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def log_last(path: Path, key: str):
    """The last value of `key` in a metrics.jsonl file."""
    rows = [json.loads(r) for r in path.read_text().splitlines() if r]
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else None


if __name__ == "__main__":
    run_main(main)
