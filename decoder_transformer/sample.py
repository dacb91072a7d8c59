"""Generate text from a train.py checkpoint with temperature, top-k and nucleus (top-p) sampling.

Prints the samples, then `generation: <N> tokens in <S> s (<T> tokens/s)`. `--no-kv-cache` recomputes the
whole context window for every token (same tokens for the same seed, for comparing speed).

  python decoder_transformer/sample.py --ckpt runs/decoder_transformer/<run>/ckpt.pt --prompt "ROMEO:" \
      --temperature 0.8 --top-p 0.95 --max-new-tokens 500
  python decoder_transformer/sample.py --ckpt <run>/ckpt.pt --max-new-tokens 20 --clearml off    # tiny
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from model import DecoderLM, ModelConfig
from textdata import Vocab, encode_prompt, load_checkpoint, pick_device

from common import RunLogger, UserError, default_data_dir, parse_args, run_main, run_name


@dataclass
class Args:
    ckpt: str = ""  # checkpoint written by train.py (<run folder>/ckpt.pt)
    prompt: str = "\n"  # text the samples continue; every character must be in the model's vocabulary
    max_new_tokens: int = 500  # tokens to generate per sample
    num_samples: int = 1  # samples drawn in parallel (one batch)
    temperature: float = 0.8  # divides the logits; 0 is greedy decoding
    top_k: int | None = None  # keep only the k most likely tokens (None: all)
    top_p: float = 0.95  # nucleus: smallest set of most likely tokens with probability >= p, in (0, 1]
    kv_cache: bool = True  # reuse keys and values of earlier tokens (--no-kv-cache recomputes them)
    seed: int = 1337  # seeds the sampling
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: cuda, then mps, then cpu
    data_dir: str = default_data_dir()  # unused by sampling; present for the common command line
    out: str | None = (
        None  # run folder for samples.txt and summary.json (default runs/decoder_transformer/...)
    )
    clearml: Literal["auto", "offline", "online", "off"] = "auto"  # ClearML mirroring
    clearml_queue: str | None = None  # enqueue on this ClearML agent queue instead of running here


def check_args(args: Args) -> None:
    if not args.ckpt:
        raise ValueError("--ckpt is required (a ckpt.pt written by train.py)")
    if not args.prompt:
        raise ValueError("--prompt must hold at least one character")
    if not (args.temperature >= 0 and np.isfinite(args.temperature)):
        raise ValueError(f"--temperature must be a finite number >= 0 (got {args.temperature})")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1] (got {args.top_p})")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1 (got {args.top_k})")
    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise ValueError(
            f"--max-new-tokens and --num-samples must be >= 1 (got {args.max_new_tokens}, {args.num_samples})"
        )


def load_model(path: str, device: str) -> tuple[DecoderLM, Vocab, dict]:
    """Rebuild the model a checkpoint describes; UserError if its weights don't fit its config."""
    ckpt = load_checkpoint(path, device)
    model = DecoderLM(ModelConfig(**ckpt["model_config"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(
            f"{path}: weights do not match the checkpoint's model config ({str(e)[:200]})"
        ) from None
    return model.to(device).eval(), Vocab(**ckpt["vocab"]), ckpt


def main() -> None:
    args = parse_args(Args, check=check_args, description=__doc__)

    # setup
    device = pick_device(args.device)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    model, vocab, ckpt = load_model(args.ckpt, device)
    prompt_ids = encode_prompt(vocab, args.prompt, model.config.block_size)
    log = RunLogger(
        "decoder_transformer",
        run_name("sample", args.seed),
        asdict(args),
        out=args.out,
        clearml=args.clearml,
        clearml_queue=args.clearml_queue,
    )

    # generate
    idx = torch.tensor([prompt_ids] * args.num_samples, dtype=torch.long, device=device)  # (B, T)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    out = model.generate(
        idx,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        use_cache=args.kv_cache,
        generator=generator,
    )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    # save and print
    texts = [vocab.decode(row.tolist()) for row in out]
    log.path("samples.txt").write_text("\n\n---------------\n\n".join(texts) + "\n")
    n_tokens = args.num_samples * args.max_new_tokens
    log.write_summary(
        {
            "tokens": n_tokens,
            "seconds": seconds,
            "tokens_per_second": n_tokens / seconds,
            "kv_cache": args.kv_cache,
            "device": device,
            "ckpt": args.ckpt,
            "ckpt_iter": ckpt["iter"],
        }
    )
    log.close()
    for text in texts:
        print(text)
        print("---------------")
    print(f"generation: {n_tokens} tokens in {seconds:.2f} s ({n_tokens / seconds:.1f} tokens/s)")


if __name__ == "__main__":
    run_main(main)
