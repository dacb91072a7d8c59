"""Speed, measured side by side in one run: training tokens/s against nanoGPT, and generation with and
without the KV cache. Timings on a shared machine are noisy, so the systems alternate in rounds and the
medians are compared.

  # training throughput at the baby-GPT settings; nanoGPT checked out outside this repository with
  # data/shakespeare_char/prepare.py run once (it reads data/shakespeare_char/input.txt if present)
  python decoder_transformer/benchmark.py --task train --nanogpt-dir /tmp/nanogpt --data-dir /work/shared/data
  # 500-token generation, cached vs uncached, for a checkpoint (or a fresh model of --preset's size)
  python decoder_transformer/benchmark.py --task generate --ckpt runs/decoder_transformer/<run>/ckpt.pt
  python decoder_transformer/benchmark.py --task generate --preset gpu --rounds 1 --clearml off  # tiny
  # a finished nanoGPT run scored on the whole validation split, as train.py scores its own runs
  python decoder_transformer/benchmark.py --task nanogpt-val --nanogpt-dir /tmp/nanogpt \
      --nanogpt-ckpt /tmp/nanogpt_baby/ckpt.pt --data-dir /work/shared/data
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from model import DecoderLM, ModelConfig
from sample import load_model
from textdata import Vocab, get_batch, load_text, pick_device, split_tokens, tiled_windows

from common import RunLogger, UserError, default_data_dir, parse_args, run_main, run_name

HERE = Path(__file__).resolve().parent
BABY = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12)  # nanoGPT's CPU command
SIZES = {
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64),
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
}


@dataclass
class Args:
    task: Literal["train", "generate", "nanogpt-val"] = "generate"  # what to measure (nanogpt-val: see below)
    nanogpt_dir: str | None = None  # train: a nanoGPT checkout with data/shakespeare_char prepared
    nanogpt_ckpt: str | None = None  # nanogpt-val: a nanoGPT ckpt.pt to score on our whole validation split
    iters: int = 150  # train: steps per round and system (the first 10 are dropped as warm-up)
    ckpt: str | None = None  # generate: checkpoint to time (default: a fresh model of --preset's size)
    preset: Literal["cpu", "gpu"] = "cpu"  # generate: model size when no --ckpt is given
    new_tokens: int = 500  # generate: tokens per generation
    rounds: int = 3  # alternating rounds per system
    seed: int = 1337  # seeds models and sampling
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # generate: where to run
    data_dir: str = default_data_dir()  # train: folder holding tinyshakespeare/input.txt
    out: str | None = None  # run folder (default runs/decoder_transformer/<name>)
    clearml: Literal["auto", "offline", "online", "off"] = "auto"  # ClearML mirroring
    clearml_queue: str | None = None  # enqueue on this ClearML agent queue instead of running here


def check_args(args: Args) -> None:
    if args.task in ("train", "nanogpt-val") and not args.nanogpt_dir:
        raise ValueError(
            f"{args.task} needs --nanogpt-dir (a nanoGPT checkout, kept outside this repository)"
        )
    if args.task == "nanogpt-val" and not args.nanogpt_ckpt:
        raise ValueError("nanogpt-val needs --nanogpt-ckpt (the ckpt.pt of a finished nanoGPT run)")
    if args.iters < 20 or args.rounds < 1 or args.new_tokens < 1:
        raise ValueError(
            f"--iters must be >= 20, --rounds and --new-tokens >= 1 "
            f"(got {args.iters}, {args.rounds}, {args.new_tokens})"
        )


def run_ours(args: Args, pos: str, folder: Path) -> list[float]:
    """Seconds per step of our train.py, from the gaps between its per-step metric rows."""
    cmd = [
        sys.executable,
        str(HERE / "train.py"),
        "--pos",
        pos,
        "--max-iters",
        str(args.iters),
        "--lr-decay-iters",
        "2000",
        "--eval-interval",
        "1000000",
        "--eval-batches",
        "1",
        "--log-interval",
        "1",
        "--data-dir",
        args.data_dir,
        "--clearml",
        "off",
        "--out",
        str(folder),
        "--seed",
        str(args.seed),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise UserError(f"our train.py failed: {done.stderr.strip().splitlines()[-1:]}")
    times = [
        json.loads(r)["time"]
        for r in (folder / "metrics.jsonl").read_text().splitlines()
        if "charts/tokens_per_second" in r
    ]
    return [b - a for a, b in zip(times, times[1:])][10:]


def run_nanogpt(args: Args, folder: Path) -> list[float]:
    """Seconds per step of nanoGPT's train.py with the baby-GPT flags from its README."""
    flags = {
        "device": "cpu",
        "compile": "False",
        "dtype": "float32",
        "eval_iters": 1,
        "log_interval": 1,
        "max_iters": args.iters,
        "lr_decay_iters": 2000,
        "dropout": 0.0,
        "eval_interval": 1000000,
        "out_dir": str(folder),
        **BABY,
    }
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py"] + [
        f"--{k}={v}" for k, v in flags.items()
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=args.nanogpt_dir)
    if done.returncode:
        raise UserError(f"nanoGPT's train.py failed in {args.nanogpt_dir}: {done.stderr.strip()[-300:]}")
    ms = [
        float(line.split("time ")[1].split("ms")[0])
        for line in done.stdout.splitlines()
        if line.startswith("iter ")
    ]
    return [m / 1000 for m in ms[10:]]


def bench_train(args: Args, log: RunLogger) -> dict:
    tokens = BABY["batch_size"] * BABY["block_size"]
    seconds = {"nanogpt": [], "ours_learned": [], "ours_rope": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            seconds["nanogpt"] += run_nanogpt(args, Path(tmp) / f"nano{r}")
            for pos in ("learned", "rope"):
                seconds[f"ours_{pos}"] += run_ours(args, pos, Path(tmp) / f"{pos}{r}")
            medians = {k: statistics.median(v) for k, v in seconds.items()}
            log.log(r, {f"train_speed/{k}_tokens_per_second": tokens / m for k, m in medians.items()})
            print(
                f"round {r + 1}/{args.rounds}: "
                + ", ".join(f"{k} {tokens / m:,.0f} tok/s" for k, m in medians.items())
            )
    result = {f"{k}_tokens_per_second": tokens / statistics.median(v) for k, v in seconds.items()}
    for pos in ("learned", "rope"):
        result[f"ratio_{pos}_vs_nanogpt"] = (
            result[f"ours_{pos}_tokens_per_second"] / result["nanogpt_tokens_per_second"]
        )
    result["steps_timed_per_system"] = len(seconds["nanogpt"])
    result.update(bench_steps_interleaved(args))
    return result


def load_nanogpt(folder: str):
    """nanoGPT's model.py, imported from its checkout (never copied here)."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", Path(folder) / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_steps_interleaved(args: Args) -> dict:
    """The training step alone (forward, backward, clip, AdamW), the three models taking turns
    step by step in this one process, so load slows them alike; nanoGPT's model.py is read from --nanogpt-dir.
    """
    nanogpt = load_nanogpt(args.nanogpt_dir)
    torch.manual_seed(args.seed)
    size = dict(n_layer=4, n_head=4, n_embd=128, block_size=64)
    models = {"nanogpt": nanogpt.GPT(nanogpt.GPTConfig(vocab_size=65, dropout=0.0, bias=False, **size))}
    optimizers = {"nanogpt": models["nanogpt"].configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")}
    for pos in ("learned", "rope"):
        models[f"ours_{pos}"] = DecoderLM(ModelConfig(vocab_size=65, pos=pos, **size))
        optimizers[f"ours_{pos}"] = torch.optim.AdamW(
            models[f"ours_{pos}"].optimizer_groups(0.1), lr=1e-3, betas=(0.9, 0.99)
        )
    generator = torch.Generator().manual_seed(args.seed)
    data = torch.randint(65, (100_000,), generator=generator)
    seconds = {name: [] for name in models}
    for step in range(args.iters * args.rounds):
        x, y = get_batch(data, BABY["batch_size"], BABY["block_size"], generator)
        for name, model in models.items():
            start = time.perf_counter()
            _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if step >= 10:  # warm-up
                seconds[name].append(time.perf_counter() - start)
    tokens = BABY["batch_size"] * BABY["block_size"]
    result = {f"step_{k}_tokens_per_second": tokens / statistics.median(v) for k, v in seconds.items()}
    for pos in ("learned", "rope"):
        result[f"step_ratio_{pos}_vs_nanogpt"] = (
            result[f"step_ours_{pos}_tokens_per_second"] / result["step_nanogpt_tokens_per_second"]
        )
    print("interleaved steps: " + ", ".join(f"{k} {v:,.3f}" for k, v in result.items()))
    return result


def nanogpt_val_loss(args: Args) -> dict:
    """nanoGPT's checkpoint scored with this experiment's metric: the whole validation split in windows."""
    nanogpt = load_nanogpt(args.nanogpt_dir)
    ckpt = torch.load(args.nanogpt_ckpt, map_location="cpu", weights_only=False)
    model = nanogpt.GPT(nanogpt.GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    model.eval()
    text, _ = load_text(None, args.data_dir)
    _, val = split_tokens(text, Vocab.from_text("char", text))  # nanoGPT's shakespeare_char vocabulary too
    x, y = tiled_windows(val, ckpt["model_args"]["block_size"])
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x), 64):
            _, loss = model(x[i : i + 64], y[i : i + 64])
            total += loss.item() * len(x[i : i + 64])
    return {
        "nanogpt_val_loss_whole_split": total / len(x),
        "nanogpt_iter": ckpt["iter_num"],
        "nanogpt_own_estimate": float(ckpt["best_val_loss"]),
    }


def bench_generate(args: Args, log: RunLogger, model: DecoderLM, device: str) -> dict:
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    seconds = {True: [], False: []}
    outputs = {}
    for r in range(args.rounds):
        for use_cache in (True, False):
            generator = torch.Generator(device=device).manual_seed(args.seed)
            start = time.perf_counter()
            outputs[use_cache] = model.generate(
                prompt, args.new_tokens, 1.0, None, 0.95, use_cache, generator
            )
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds[use_cache].append(time.perf_counter() - start)
        log.log(
            r, {"generate/cached_seconds": seconds[True][-1], "generate/uncached_seconds": seconds[False][-1]}
        )
    cached, uncached = statistics.median(seconds[True]), statistics.median(seconds[False])
    return {
        "device": device,
        "config": asdict(model.config),
        "new_tokens": args.new_tokens,
        "cached_tokens_per_second": args.new_tokens / cached,
        "uncached_tokens_per_second": args.new_tokens / uncached,
        "speedup": uncached / cached,
        "same_tokens": bool(torch.equal(outputs[True], outputs[False])),
    }


def main() -> None:
    args = parse_args(Args, check=check_args, description=__doc__)
    model, device = None, pick_device(args.device)
    if args.task == "train":
        prepared = Path(args.nanogpt_dir) / "data" / "shakespeare_char" / "train.bin"
        if not prepared.is_file():
            raise UserError(f"{prepared} not found: run `python data/shakespeare_char/prepare.py` there")
    elif args.task == "nanogpt-val":
        if not Path(args.nanogpt_ckpt).is_file():
            raise UserError(f"--nanogpt-ckpt {args.nanogpt_ckpt}: no such file")
    elif args.ckpt:
        model, _, _ = load_model(args.ckpt, device)
    else:
        torch.manual_seed(args.seed)
        model = DecoderLM(ModelConfig(vocab_size=65, **SIZES[args.preset])).to(device).eval()
    log = RunLogger(
        "decoder_transformer",
        run_name(f"benchmark_{args.task}", args.seed),
        asdict(args),
        out=args.out,
        clearml=args.clearml,
        clearml_queue=args.clearml_queue,
    )
    if args.task == "train":
        result = bench_train(args, log)
    elif args.task == "nanogpt-val":
        result = nanogpt_val_loss(args)
    else:
        result = bench_generate(args, log, model, device)
    result["torch_threads"] = torch.get_num_threads()
    log.write_summary(result)
    log.close()
    for key, value in result.items():
        print(f"{key}: {value:,.3f}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    run_main(main)
