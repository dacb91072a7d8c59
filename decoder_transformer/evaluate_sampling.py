"""Quality against diversity: sweep temperature x top-p and measure what the samples look like.

For each setting, `--num-samples` samples of `--length` tokens are drawn and scored with
  self_perplexity  exp(mean NLL) of the sampled tokens under the model itself at temperature 1 (low: the
                   model finds them likely; far below real text's: bland or looping)
  distinct_n       unique word n-grams / all word n-grams over the pooled samples, n = 1..4 (Li et al. 2016)
  repetition       share of word 4-grams of a sample that already occurred earlier in that sample
and the same numbers for as many chunks of held-out validation text: the reference point (Holtzman et al.
2019 compare against human text the same way). Writes sampling_eval.json, samples.txt and the plots.

  python decoder_transformer/evaluate_sampling.py --ckpt <run folder>/best.pt --data-dir PATH
  python decoder_transformer/evaluate_sampling.py --ckpt <run>/checkpoint.pt --temperatures 1.0 \\
      --top-ps 0.9 1.0 --num-samples 2 --length 40 --clearml off                        # tiny
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's common, not an installed one
from textdata import encode_prompt, load_model, load_text, pick_device, split_tokens  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common import DataArgs, RunLogger, UserError, parse_args, run_main, run_name, write_json  # noqa: E402


@dataclass
class Args(DataArgs):
    ckpt: str = ""  # checkpoint written by train.py (<run folder>/checkpoint.pt or best.pt)
    temperatures: list[float] = field(default_factory=lambda: [0.5, 0.8, 1.0, 1.2])  # temperatures to sweep
    # top-p values to sweep, each in (0, 1]
    top_ps: list[float] = field(default_factory=lambda: [0.5, 0.8, 0.9, 0.95, 1.0])
    num_samples: int = 16  # samples per setting (and held-out chunks for the reference)
    length: int = 500  # tokens per sample
    prompt: str = "\n"  # text every sample continues
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: cuda, then mps, then cpu
    text: str | None = None  # reference text file (default: the checkpoint's training text)


def check_args(args: Args) -> None:
    if not args.ckpt:
        raise ValueError("--ckpt is required (a checkpoint.pt written by train.py)")
    if any(not 0 < p <= 1 for p in args.top_ps):
        raise ValueError(f"--top-ps must each be in (0, 1] (got {args.top_ps})")
    if args.num_samples < 1 or args.length < 8:
        raise ValueError(
            f"--num-samples must be >= 1 and --length >= 8 (got {args.num_samples}, {args.length})"
        )
    if not args.prompt:
        raise ValueError("--prompt must hold at least one character")


@torch.no_grad()
def token_nll(model, seqs: torch.Tensor, first: int) -> float:
    """Mean negative log-likelihood of seqs[:, first:] (B, L) at temperature 1, in windows of block_size."""
    block = model.config.block_size
    total, count = 0.0, 0
    for start in range(0, seqs.size(1) - 1, block):
        x = seqs[:, start : start + block]  # (B, <=block)
        y = seqs[:, start + 1 : start + block + 1]
        x = x[:, : y.size(1)]
        logits, _ = model(x)
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")
        positions = torch.arange(start + 1, start + 1 + y.size(1), device=seqs.device).repeat(len(seqs))
        keep = positions >= first
        total += nll[keep].sum().item()
        count += int(keep.sum())
    return total / max(count, 1)


def ngrams(words: list[str], n: int) -> list[tuple]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def text_stats(texts: list[str]) -> dict:
    """distinct-1..4 over the pooled texts (word level) and the mean within-text 4-gram repetition."""
    stats = {}
    tokenised = [t.split() for t in texts]
    for n in range(1, 5):
        pooled = [g for words in tokenised for g in ngrams(words, n)]
        stats[f"distinct_{n}"] = len(set(pooled)) / len(pooled) if pooled else 0.0
    repeats = []
    for words in tokenised:
        grams = ngrams(words, 4)
        if grams:
            repeats.append(1 - len(set(grams)) / len(grams))  # earlier occurrences don't count, later ones do
    stats["repetition"] = float(np.mean(repeats)) if repeats else 0.0
    return stats


def plot_tradeoff(results: list[dict], reference: dict):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    temperatures = sorted({r["temperature"] for r in results})
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(temperatures)))
    for ax, key, label in (
        (axes[0], "distinct_1", "distinct-1 (share of unique words)"),
        (axes[1], "distinct_2", "distinct-2 (share of unique word pairs)"),
        (axes[2], "repetition", "repetition (share of repeated word 4-grams)"),
    ):
        for t, color in zip(temperatures, colors):
            rows = sorted((r for r in results if r["temperature"] == t), key=lambda r: r["top_p"])
            ax.plot(
                [r["self_perplexity"] for r in rows],
                [r[key] for r in rows],
                "o-",
                color=color,
                label=f"T={t}",
            )
            for r in rows:
                ax.annotate(f"p={r['top_p']}", (r["self_perplexity"], r[key]), fontsize=6, alpha=0.7)
        ax.plot(reference["self_perplexity"], reference[key], "r*", markersize=14, label="held-out text")
        ax.set_xscale("log")
        ax.set_xlabel("self-perplexity (model's perplexity on its own samples)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Sampling: temperature x top-p against held-out text")
    fig.tight_layout()
    return fig


def held_out_reference(args: Args, model, vocab, ckpt, n_prompt: int, device: str) -> tuple[dict, str]:
    """The same statistics for chunks of the validation split of the checkpoint's training text."""
    text_path = args.text or ckpt["args"].get("text")
    text, source = load_text(text_path, args.data_dir)
    try:
        _, val = split_tokens(text, vocab)
    except ValueError as e:
        raise UserError(f"{source}: {e} (is this the checkpoint's training text?)") from None
    span = args.length + n_prompt
    if len(val) < args.num_samples * span:
        raise UserError(
            f"{source}: the validation split ({len(val)} tokens) is shorter than --num-samples x "
            f"--length ({args.num_samples} x {span}); lower them"
        )
    chunks = val[: args.num_samples * span].view(args.num_samples, span).to(device)  # (N, span)
    reference = {
        "self_perplexity": math.exp(token_nll(model, chunks, n_prompt)),
        **text_stats([vocab.decode(c[n_prompt:].tolist()) for c in chunks]),
    }
    return reference, source


def sweep(args: Args, model, vocab, prompt_ids: list[int], device: str, log) -> tuple[list[dict], list[str]]:
    results, shown = [], []
    idx = torch.tensor([prompt_ids] * args.num_samples, dtype=torch.long, device=device)  # (N, prompt)
    settings = [(t, p) for t in args.temperatures for p in args.top_ps]
    for step, (temperature, top_p) in enumerate(tqdm(settings, desc="settings")):
        generator = torch.Generator(device=device).manual_seed(args.seed)
        seqs = model.generate(idx, args.length, temperature, None, top_p, generator=generator)  # (N, span)
        texts = [vocab.decode(s[len(prompt_ids) :].tolist()) for s in seqs]
        row = {
            "temperature": temperature,
            "top_p": top_p,
            "self_perplexity": math.exp(token_nll(model, seqs, len(prompt_ids))),
            **text_stats(texts),
        }
        results.append(row)
        log.log(step, {f"eval/{k}": v for k, v in row.items()})
        shown.append(f"=== temperature {temperature}, top-p {top_p} ===\n{texts[0][:400]}\n")
    return results, shown


def print_table(results: list[dict], reference: dict) -> None:
    distinct_header = " ".join(f"{f'dist-{n}':>7}" for n in range(1, 5))
    print(f"{'T':>5} {'top-p':>6} {'self-ppl':>9} {distinct_header} {'rep':>6}")
    for r in results + [dict(reference, temperature="real", top_p="-")]:
        print(
            f"{r['temperature']:>5} {r['top_p']:>6} {r['self_perplexity']:9.3f} {r['distinct_1']:7.3f} "
            f"{r['distinct_2']:7.3f} {r['distinct_3']:7.3f} {r['distinct_4']:7.3f} {r['repetition']:6.3f}"
        )


def main() -> None:
    args = parse_args(Args, check=check_args, description=__doc__)
    device = pick_device(args.device)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    model, vocab, ckpt = load_model(args.ckpt, device)
    prompt_ids = encode_prompt(vocab, args.prompt, model.config.block_size)
    with RunLogger("decoder_transformer", run_name("sampling_eval", args.seed), args) as log:
        reference, source = held_out_reference(args, model, vocab, ckpt, len(prompt_ids), device)
        results, shown = sweep(args, model, vocab, prompt_ids, device, log)
        log.path("samples.txt").write_text("".join(shown))
        summary = {
            "settings": results,
            "reference_heldout": reference,
            "num_samples": args.num_samples,
            "length": args.length,
            "ckpt": args.ckpt,
            "reference_text": source,
        }
        log.write_summary(summary)
        write_json(log.path("sampling_eval.json"), summary)
        log.save_figure("quality_diversity", plot_tradeoff(results, reference))
    print_table(results, reference)


if __name__ == "__main__":
    run_main(main)
