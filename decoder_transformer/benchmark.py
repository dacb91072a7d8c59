"""Speed, measured side by side in one run: training tokens/s against nanoGPT, and generation with and
without the KV cache and against nanoGPT's own sampler. Timings on a shared machine are noisy, so the
systems alternate in rounds and the medians (and their ratios) are compared.

nanoGPT is read from a checkout outside this repository (`--nanogpt-dir PATH`; for --task train run its
`data/shakespeare_char/prepare.py` there once). Nothing of it is copied here.

  # training throughput at the baby-GPT settings
  python decoder_transformer/benchmark.py --task train --nanogpt-dir PATH --data-dir PATH --threads 1
  # 500-token generation: cached, uncached, and nanoGPT's sampler on a model of the same size
  python decoder_transformer/benchmark.py --task generate --ckpt <run folder>/checkpoint.pt --nanogpt-dir PATH
  python decoder_transformer/benchmark.py --task generate --preset gpu --rounds 1 --clearml off  # no nanoGPT
  # a checkpoint's full-context val loss at another --eval-stride than its run used
  python decoder_transformer/benchmark.py --task val --ckpt <run folder>/checkpoint.pt --eval-stride 8
  # a finished nanoGPT run scored on the whole validation split, as train.py scores its own runs
  python decoder_transformer/benchmark.py --task nanogpt-val --nanogpt-dir PATH --nanogpt-ckpt FILE \\
      --data-dir PATH
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's common, not an installed one
from model import DecoderLM, ModelConfig
from textdata import (
    Vocab,
    get_batch,
    load_model,
    load_text,
    pick_device,
    sliding_loss,
    split_tokens,
    tiled_windows,
)

from common import DataArgs, RunLogger, UserError, load_torch, parse_args, run_main, run_name

HERE = Path(__file__).resolve().parent
BABY = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12)  # nanoGPT's CPU command
SIZES = {
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64),
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
}


@dataclass
class Args(DataArgs):
    task: Literal["train", "generate", "nanogpt-val", "val"] = "generate"  # what to measure (see above)
    nanogpt_dir: str | None = (
        None  # a nanoGPT checkout (needed by train and nanogpt-val, optional for generate)
    )
    nanogpt_ckpt: str | None = None  # nanogpt-val: a nanoGPT ckpt.pt to score on our whole validation split
    eval_stride: int = 1  # val, nanogpt-val: full-context windows step this many tokens (as train.py's flag)
    iters: int = 150  # train: steps per round and system (the first 10 are dropped as warm-up)
    ckpt: str | None = (
        None  # generate: checkpoint to time (default: a fresh model of --preset's size); val: to score
    )
    preset: Literal["cpu", "gpu"] = "cpu"  # generate: model size when no --ckpt is given
    new_tokens: int = 500  # generate: tokens per generation
    top_p: float = 1.0  # generate: our nucleus (1.0: plain sampling, as nanoGPT's sampler)
    rounds: int = 3  # alternating rounds per system
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # generate: where to run
    threads: int | None = None  # torch CPU threads here and in the train subprocesses (None: default)


def check_args(args: Args) -> None:
    if args.task in ("train", "nanogpt-val") and not args.nanogpt_dir:
        raise ValueError(
            f"--task {args.task} needs --nanogpt-dir (a nanoGPT checkout, kept outside this repository)"
        )
    if args.task == "val" and not args.ckpt:
        raise ValueError("--task val needs --ckpt (a checkpoint written by train.py)")
    if args.task == "nanogpt-val" and not args.nanogpt_ckpt:
        raise ValueError("nanogpt-val needs --nanogpt-ckpt (the ckpt.pt of a finished nanoGPT run)")
    if args.iters < 20 or args.rounds < 1 or args.new_tokens < 1:
        raise ValueError(
            f"--iters must be >= 20, --rounds and --new-tokens >= 1 "
            f"(got {args.iters}, {args.rounds}, {args.new_tokens})"
        )
    if args.eval_stride < 1:
        raise ValueError(f"--eval-stride must be >= 1 (got {args.eval_stride})")
    if not 0 < args.top_p <= 1 or (args.threads is not None and args.threads < 1):
        raise ValueError(f"--top-p must be in (0, 1] and --threads >= 1 (got {args.top_p}, {args.threads})")


def subprocess_env(args: Args) -> dict:
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def run_ours(args: Args, pos: str, folder: Path) -> list[float]:
    """Seconds per step of our train.py, from the gaps between its per-step metric rows."""
    flags = {"pos": pos, "max_iters": args.iters, "lr_decay_iters": 2000, "eval_interval": 1_000_000}
    flags.update(
        eval_batches=1, log_interval=1, data_dir=args.data_dir, clearml="off", out=folder, seed=args.seed
    )
    cmd = [sys.executable, str(HERE / "train.py")]
    cmd += [x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(args))
    if done.returncode:
        raise UserError(f"our train.py failed: {done.stderr.strip().splitlines()[-1:]}")
    rows = [json.loads(r) for r in (folder / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in rows if "charts/tokens_per_second" in r]
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
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=args.nanogpt_dir, env=subprocess_env(args))
    if done.returncode:
        raise UserError(f"nanoGPT's train.py failed in {args.nanogpt_dir}: {done.stderr.strip()[-300:]}")
    ms = [
        float(line.split("time ")[1].split("ms")[0])
        for line in done.stdout.splitlines()
        if line.startswith("iter ")
    ]
    return [m / 1000 for m in ms[10:]]


def bench_train(args: Args, log: RunLogger) -> dict:
    """Whole scripts, one after the other in alternating rounds; then the bare step, interleaved."""
    tokens = BABY["batch_size"] * BABY["block_size"]
    seconds = {"nanogpt": [], "ours_learned": [], "ours_rope": []}
    ratios = {"learned": [], "rope": []}  # per round: ours / nanoGPT tokens per second
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            nano = run_nanogpt(args, Path(tmp) / f"nano{r}")
            seconds["nanogpt"] += nano
            for pos in ("learned", "rope"):
                ours = run_ours(args, pos, Path(tmp) / f"{pos}{r}")
                seconds[f"ours_{pos}"] += ours
                ratios[pos].append(statistics.median(nano) / statistics.median(ours))
            log.log(r, {f"charts/round_ratio_{p}_vs_nanogpt": v[-1] for p, v in ratios.items()})
            print(
                f"round {r + 1}/{args.rounds}: "
                + ", ".join(f"{p} / nanoGPT {v[-1]:.3f}" for p, v in ratios.items())
            )
    result = {f"{k}_tokens_per_second": tokens / statistics.median(v) for k, v in seconds.items()}
    for pos in ("learned", "rope"):
        result[f"ratio_{pos}_vs_nanogpt"] = (
            result[f"ours_{pos}_tokens_per_second"] / result["nanogpt_tokens_per_second"]
        )
        result[f"round_ratios_{pos}_vs_nanogpt"] = ratios[pos]
    result["steps_timed_per_system"] = len(seconds["nanogpt"])
    result.update(bench_steps_interleaved(args))
    return result


def load_nanogpt(folder: str):
    """nanoGPT's model.py, imported from its checkout (never copied here)."""
    path = Path(folder) / "model.py"
    if not path.is_file():
        raise UserError(f"--nanogpt-dir {folder}: no model.py there (a nanoGPT checkout is needed)")
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_steps_interleaved(args: Args) -> dict:
    """The training step alone (forward, backward, clip, AdamW), the three models taking turns step by
    step in this one process, so load slows them alike; nanoGPT's model.py is read from --nanogpt-dir."""
    nanogpt = load_nanogpt(args.nanogpt_dir)
    torch.manual_seed(args.seed)
    size = dict(n_layer=4, n_head=4, n_embd=128, block_size=64)
    models = {"nanogpt": nanogpt.GPT(nanogpt.GPTConfig(vocab_size=65, dropout=0.0, bias=False, **size))}
    optimizers = {"nanogpt": models["nanogpt"].configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")}
    for pos in ("learned", "rope"):
        models[f"ours_{pos}"] = DecoderLM(ModelConfig(vocab_size=65, pos=pos, **size))
        optimizers[f"ours_{pos}"] = models[f"ours_{pos}"].make_optimizer(1e-3, 0.1, (0.9, 0.99), "cpu")
    generator = torch.Generator().manual_seed(args.seed)
    data = torch.randint(65, (100_000,), generator=generator)
    seconds, cpu_seconds = {name: [] for name in models}, {name: [] for name in models}
    for step in range(args.iters * args.rounds):
        x, y = get_batch(data, BABY["batch_size"], BABY["block_size"], generator)
        names = list(models)
        for name in names[step % len(names) :] + names[: step % len(names)]:  # turns rotate: no order bias
            model = models[name]
            start, cpu_start = time.perf_counter(), time.process_time()
            _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if step >= 10:  # warm-up
                seconds[name].append(time.perf_counter() - start)
                cpu_seconds[name].append(time.process_time() - cpu_start)
    tokens = BABY["batch_size"] * BABY["block_size"]
    result = {}
    for label, times in (("step_", seconds), ("step_cpu_time_", cpu_seconds)):  # wall clock, process CPU time
        rates = {k: tokens / statistics.median(v) for k, v in times.items()}
        result.update({f"{label}{k}_tokens_per_second": v for k, v in rates.items()})
        for pos in ("learned", "rope"):
            result[f"{label}ratio_{pos}_vs_nanogpt"] = rates[f"ours_{pos}"] / rates["nanogpt"]
    print("interleaved steps: " + ", ".join(f"{k} {v:,.3f}" for k, v in result.items()))
    return result


def nanogpt_val_loss(args: Args) -> dict:
    """nanoGPT's checkpoint scored with this experiment's metrics: the whole validation split in tiled
    windows, and every target with its full context (train.py's `val_loss_full_context`)."""
    nanogpt = load_nanogpt(args.nanogpt_dir)
    ckpt = load_torch(args.nanogpt_ckpt)
    try:
        model = nanogpt.GPT(nanogpt.GPTConfig(**ckpt["model_args"]))
        model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    except (KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{args.nanogpt_ckpt} is not a nanoGPT checkpoint ({str(e)[:200]})") from None
    model.eval()
    text, _ = load_text(None, args.data_dir)
    _, val = split_tokens(text, Vocab.from_text("char", text))  # nanoGPT's shakespeare_char vocabulary too
    block_size = ckpt["model_args"]["block_size"]
    if args.eval_stride > block_size:
        raise UserError(f"--eval-stride {args.eval_stride} exceeds the checkpoint's block_size {block_size}")
    x, y = tiled_windows(val, block_size)
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x), 64):
            _, loss = model(x[i : i + 64], y[i : i + 64])
            total += loss.item() * len(x[i : i + 64])
    # nanoGPT's forward returns every position's logits only when given targets (here a stand-in)
    full = sliding_loss(lambda x: model(x, x)[0], val, block_size, args.eval_stride, batch_size=64)
    return {
        "nanogpt_val_loss_whole_split": total / len(x),
        "nanogpt_val_loss_full_context": full,
        "nanogpt_val_bits_per_char_full_context": full / math.log(2),  # one token per character
        "full_context_stride": args.eval_stride,
        "block_size": block_size,
        "nanogpt_iter": ckpt["iter_num"],
        "nanogpt_own_estimate": float(ckpt["best_val_loss"]),
    }


def checkpoint_val_loss(args: Args) -> dict:
    """Our checkpoint's full-context validation loss at --eval-stride (train.py's `val_loss_full_context`
    for a run made with another stride), in nats per token, bits per character and bits per byte."""
    model, vocab, ckpt = load_model(args.ckpt, "cpu")
    text, _ = load_text(ckpt["args"].get("text"), args.data_dir)
    _, val = split_tokens(text, vocab)
    block_size = model.config.block_size
    if args.eval_stride > block_size:
        raise UserError(f"--eval-stride {args.eval_stride} exceeds the checkpoint's block_size {block_size}")
    nats = sliding_loss(lambda x: model(x)[0], val, block_size, args.eval_stride, batch_size=64)
    chars, n_bytes = vocab.unit_counts(val[1:])
    bits = nats * (len(val) - 1) / math.log(2)
    return {
        "val_loss_full_context": nats,
        "val_bits_per_char_full_context": bits / chars,
        "val_bits_per_byte_full_context": bits / n_bytes,
        "full_context_stride": args.eval_stride,
        "ckpt_iter": ckpt["iter"],
    }


def nanogpt_sampler(args: Args, config: ModelConfig, device: str):
    """nanoGPT's GPT of our model's size (its learned positions, random weights) and its generate()."""
    nanogpt = load_nanogpt(args.nanogpt_dir)
    size = {k: getattr(config, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")}
    model = nanogpt.GPT(nanogpt.GPTConfig(dropout=0.0, bias=False, **size)).to(device).eval()
    return lambda prompt: model.generate(prompt, args.new_tokens, temperature=1.0)


def bench_generate(args: Args, log: RunLogger, model: DecoderLM, device: str) -> dict:
    """Ours with and without the cache (on CUDA also cached without the CUDA graph), and nanoGPT's sampler,
    taking turns; same prompt and length. same_tokens: all of ours drew the same tokens."""
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)

    def ours(use_cache: bool, cuda_graph: bool | None = None):  # a fresh generator, same seed, each call
        return lambda p: model.generate(
            p, args.new_tokens, 1.0, None, args.top_p, use_cache,
            torch.Generator(device).manual_seed(args.seed), cuda_graph,
        )  # fmt: skip

    systems = {"cached": ours(True), "uncached": ours(False)}
    if device.startswith("cuda"):  # cached decoding replays a CUDA graph there; also time it without
        systems["cached_no_graph"] = ours(True, cuda_graph=False)
    if args.nanogpt_dir:
        systems["nanogpt"] = nanogpt_sampler(args, model.config, device)
    seconds, cpu_seconds, outputs = {k: [] for k in systems}, {k: [] for k in systems}, {}
    with torch.no_grad():
        for r in range(args.rounds):
            for name, generate in systems.items():
                start, cpu_start = time.perf_counter(), time.process_time()
                outputs[name] = generate(prompt)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds[name].append(time.perf_counter() - start)
                cpu_seconds[name].append(time.process_time() - cpu_start)
            log.log(r, {f"charts/{k}_tokens_per_second": args.new_tokens / v[-1] for k, v in seconds.items()})
    result = {
        "device": device,
        "config": asdict(model.config),
        "new_tokens": args.new_tokens,
        "top_p": args.top_p,
    }
    # wall-clock rates, and rates per second of this process's CPU time (robust to a loaded machine)
    for label, times in (("", seconds), ("cpu_time_", cpu_seconds)):
        rates = {k: args.new_tokens / statistics.median(v) for k, v in times.items()}
        result.update({f"{label}{k}_tokens_per_second": v for k, v in rates.items()})
        result[f"{label}speedup_cached_vs_uncached"] = rates["cached"] / rates["uncached"]
        if "nanogpt" in rates:
            result[f"{label}speedup_cached_vs_nanogpt_sampler"] = rates["cached"] / rates["nanogpt"]
        if "cached_no_graph" in rates:
            result[f"{label}speedup_cuda_graph"] = rates["cached"] / rates["cached_no_graph"]
    ours = [out for name, out in outputs.items() if name != "nanogpt"]
    result["same_tokens"] = all(torch.equal(ours[0], out) for out in ours[1:])
    return result


def main() -> None:
    args = parse_args(Args, check=check_args, description=__doc__)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, device = None, pick_device(args.device)
    if args.task == "train":
        prepared = Path(args.nanogpt_dir) / "data" / "shakespeare_char" / "train.bin"
        if not prepared.is_file():
            raise UserError(f"{prepared} not found: run `python data/shakespeare_char/prepare.py` there")
    elif args.task == "generate" and args.ckpt:
        model, _, _ = load_model(args.ckpt, device)
    elif args.task == "generate":
        torch.manual_seed(args.seed)
        model = DecoderLM(ModelConfig(vocab_size=65, **SIZES[args.preset])).to(device).eval()
    with RunLogger("decoder_transformer", run_name(f"benchmark_{args.task}", args.seed), args) as log:
        if args.task == "train":
            result = bench_train(args, log)
        elif args.task == "nanogpt-val":
            result = nanogpt_val_loss(args)
        elif args.task == "val":
            result = checkpoint_val_loss(args)
        else:
            result = bench_generate(args, log, model, device)
        result["torch_threads"] = torch.get_num_threads()
        log.write_summary(result)
    for key, value in result.items():
        print(f"{key}: {value:,.3f}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    run_main(main)
