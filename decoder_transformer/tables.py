"""The README's tables, rendered from the committed files in results/ (cog blocks call these functions).

results/baby_runs.json and results/ctx128_runs.json are `compare_runs.py` summaries (per-seed values);
nanogpt_val_baby.json is `benchmark.py --task nanogpt-val`'s summary; ngram.json is `ngram.py`'s; the
gpu_* folders hold the logs and summaries of the GPU runs.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
POSITIONS = ("rope", "learned", "sinusoidal", "none")


def _read(name: str, results: Path = RESULTS) -> dict:
    return json.loads((Path(results) / name).read_text())


def _mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else None
    return f"{statistics.mean(values):.4f}" + (f" ± {std:.4f}" if std is not None else " (one run)")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _context_range(group: dict) -> str:
    """The context full-context scoring gives each target past the first T, from the run's stride."""
    (stride,), (block,) = set(group["full_context_stride"]), set(group["block_size"])
    return _context(stride, block)


def _context(stride: int, block: int) -> str:
    return f"{block}" if stride == 1 else f"{block - stride + 1}-{block}"


RUN_FILES = ("baby_runs.json", "ctx128_runs.json")  # compare_runs.py's summaries, T = 64 and T = 128
BYTE_FILES = (*RUN_FILES, "byte_6x192_runs.json")  # and the larger byte model, 6 layers x 192


def encodings_table(files: tuple[str, ...] = RUN_FILES, nanogpt: str | None = "nanogpt_val_baby.json") -> str:
    """The four position encodings (character vocabulary) at each training context T (one results file
    per T), mean ± sample std over seeds; nanoGPT's own code (learned positions) scored the same way
    below its T's rows. A file not yet made is left out."""
    header = [
        "code, positions, training context",
        "seeds",
        "val loss, full context (tokens of context)",
        "bits/char, full context",
        "val loss, tiled windows of T",
        "val loss, tiled windows of 2T",
        "train loss",
    ]
    rows = []
    result = _read(nanogpt) if nanogpt and (RESULTS / nanogpt).is_file() else None
    for file in files:
        if not (RESULTS / file).is_file():
            continue
        runs = _read(file)
        for pos in POSITIONS:
            group = runs.get(f"{pos}_char")
            if group is None:
                continue
            rows.append(
                [
                    f"ours, {pos}, T = {_block(group)}",
                    ", ".join(map(str, sorted(group["seeds"]))),
                    f"**{_mean_std(group['val_loss_full_context'])}** ({_context_range(group)})",
                    _mean_std(group["val_bits_per_char_full_context"]),
                    _mean_std(group["val_loss"]),
                    _mean_std(group["val_loss_2x_context"])
                    if group["val_loss_2x_context"]
                    else "n/a (no positions)",
                    _mean_std(group["train_loss"]),
                ]
            )
        if result and _block(result) == _block(runs["learned_char"]):
            stride, block = result["full_context_stride"], result["block_size"]
            context = _context(stride, block)
            rows.append(
                [
                    f"nanoGPT's model.py and train.py, learned, T = {block}",
                    "its seed 1337",
                    f"**{result['nanogpt_val_loss_full_context']:.4f}** ({context})",
                    f"{result['nanogpt_val_bits_per_char_full_context']:.4f}",
                    f"{result['nanogpt_val_loss_whole_split']:.4f}",
                    "n/a (no positions)",
                    "n/a",
                ]
            )
    return _table(header, rows)


def _block(group: dict) -> int:
    """The training context of a group of runs (one value) or of one summary."""
    blocks = group["block_size"]
    (block,) = set(blocks) if isinstance(blocks, list) else {blocks}
    return block


def rope_vs_learned(files: tuple[str, ...] = RUN_FILES) -> str:
    """One sentence per training context: RoPE's full-context loss against learned positions', in the
    mean and RoPE's worst seed against learned's best."""
    lines = []
    for file in files:
        if not (RESULTS / file).is_file():
            continue
        runs = _read(file)
        rope, learned = (runs[f"{pos}_char"]["val_loss_full_context"] for pos in ("rope", "learned"))
        diff = statistics.mean(rope) - statistics.mean(learned)
        lines.append(
            f"RoPE minus learned, full context, T = {_block(runs['rope_char'])}: {diff:+.4f} nats/token in "
            f"the mean over {len(rope)} and {len(learned)} seeds; RoPE's worst seed {max(rope):.4f} against "
            f"learned's best {min(learned):.4f}."
        )
    return "\n".join(f"- {line}" for line in lines) + "\n"


def byte_baselines_table(files: tuple[str, ...] = BYTE_FILES, ngram: str = "ngram.json") -> str:
    """The RoPE models (byte and char vocabularies, each training context) beside byte n-grams fit on the
    training split, in bits per byte of the same validation bytes."""
    result = _read(ngram)
    rows = []
    for order in range(1, 10):
        key = f"order_{order}_bits_per_byte"
        if key in result:
            name = "unigram" if order == 1 else f"{order}-gram"
            rows.append([f"{name}, interpolated Kneser-Ney", "n/a (no randomness)", f"{result[key]:.4f}"])
    for file in files:
        runs = _read(file) if (RESULTS / file).is_file() else {}
        for vocab in ("byte", "char"):
            group = runs.get(f"rope_{vocab}")
            if group:
                size = ""
                if group.get("params"):  # summaries from before compare_runs.py recorded the size lack it
                    (params,), (iters,) = set(group["params"]), set(group["iters"])
                    size = f", {params / 1e6:.1f}M parameters, {iters} steps"
                rows.append(
                    [
                        f"ours, RoPE, {vocab} vocabulary, T = {_block(group)}{size}, full context "
                        f"({_context_range(group)} tokens)",
                        ", ".join(map(str, sorted(group["seeds"]))),
                        f"**{_mean_std(group['val_bits_per_byte_full_context'])}**",
                    ]
                )
    return _table(["model", "seeds", "val bits/byte"], rows)


def headline(results: Path = RESULTS) -> dict[str, str]:
    """The top README's row: RoPE against learned positions in full-context validation loss at the baby
    size (per-seed values), and the best byte n-gram beside RoPE in bits per byte."""
    row = {
        "measured": "validation loss at full context (nats/token; lower is better), RoPE vs learned "
        "positions, nanoGPT's baby GPT size, Tiny Shakespeare characters",
        "result": "not yet run",
        "interval": "not measured",
        "command": "`python decoder_transformer/train.py --pos rope --seed 0 --eval-stride 8` "
        "(and `--pos learned`)",
    }
    if not (Path(results) / "baby_runs.json").is_file():
        return row
    runs = _read("baby_runs.json", results)
    found = {pos: runs[f"{pos}_char"] for pos in ("rope", "learned") if f"{pos}_char" in runs}
    if not found:
        return row
    parts = [
        f"{'RoPE' if pos == 'rope' else pos} {statistics.mean(g['val_loss_full_context']):.4f}"
        for pos, g in found.items()
    ]
    parts += [f"{pos}: not measured" for pos in ("rope", "learned") if pos not in found]
    if len(found) == 2:
        diff = statistics.mean(found["rope"]["val_loss_full_context"])
        diff -= statistics.mean(found["learned"]["val_loss_full_context"])
        parts.append(f"RoPE minus learned {diff:+.4f}")
    if "rope" in found and (Path(results) / "ngram.json").is_file():
        ngram = _read("ngram.json", results)
        orders = [int(k.split("_")[1]) for k in ngram if re.fullmatch(r"order_\d+_bits_per_byte", k)]
        best = min(orders, key=lambda n: ngram[f"order_{n}_bits_per_byte"])
        rope_bits = statistics.mean(found["rope"]["val_bits_per_byte_full_context"])
        bits = f"bits/byte: RoPE {rope_bits:.3f}"
        if (Path(results) / BYTE_FILES[-1]).is_file():  # the larger byte model, when it has run
            big = _read(BYTE_FILES[-1], results)["rope_byte"]
            values = big["val_bits_per_byte_full_context"]
            seeds = ("seeds " if len(values) > 1 else "seed ") + ", ".join(map(str, big["seeds"]))
            bits += f", RoPE 6x192 byte model {statistics.mean(values):.3f} ({seeds})"
        parts.append(f"{bits}, the best byte n-gram ({best}-gram) {ngram[f'order_{best}_bits_per_byte']:.3f}")
    per_seed = [
        f"{'RoPE' if pos == 'rope' else pos} "
        + ", ".join(f"{v:.4f}" for v in g["val_loss_full_context"])
        + f" (seeds {', '.join(map(str, g['seeds']))})"
        for pos, g in found.items()
    ]
    return row | {"result": "; ".join(parts), "interval": "per seed: " + "; ".join(per_seed)}


def _key_values(path: Path) -> dict:
    """`key: value` lines of a benchmark log (numbers with thousands separators)."""
    found = {}
    for key, value in re.findall(r"^(\w+): (.+)$", path.read_text(), re.MULTILINE):
        try:
            found[key] = float(value.replace(",", ""))
        except ValueError:
            found[key] = value
    return found


def gpu_generation_table() -> str:
    """CUDA-graph decoding on one H200: tokens/s of each path and the ratios, one row per log."""
    rows = []
    for name in (
        "generate_rope_run1",
        "generate_rope_run2",
        "generate_rope_run3",
        "generate_rope_top_p0.9",
        "generate_baby",
    ):
        r = _key_values(RESULTS / "gpu_h200" / f"{name}.log")
        size = "4x4x128" if "baby" in name else "6x6x384"
        rows.append(
            [
                f"`{name}.log`",
                size,
                f"{r['top_p']:g}",
                f"{r['cached_tokens_per_second']:.1f}",
                f"{r['cached_no_graph_tokens_per_second']:.1f}",
                f"{r['uncached_tokens_per_second']:.1f}",
                f"{r['nanogpt_tokens_per_second']:.1f}",
                f"**{r['speedup_cached_vs_uncached']:.2f}**",
                f"{r['speedup_cuda_graph']:.2f}",
            ]
        )
    header = ["log (`results/gpu_h200/`)", "model", "top-p", "cached (graph)", "cached, no graph"]
    header += ["uncached", "nanoGPT's sampler", "cached / uncached", "graph / no graph"]
    return _table(header, rows)


def cpu_generation_table(results: Path = RESULTS) -> str:
    """500-token generation on one CPU thread: median tokens/s over alternating rounds, the per-round
    range, and the ratios (median of the per-round ratios, their range)."""
    folder = results / "cpu"
    rounds = [json.loads(x) for x in (folder / "generate_baby_rounds.jsonl").read_text().splitlines()]
    rate = {
        k: [r[f"charts/{k}_tokens_per_second"] for r in rounds] for k in ("cached", "uncached", "nanogpt")
    }

    def spread(values: list[float], fmt: str) -> str:
        return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"

    ratio = {k: [c / o for c, o in zip(rate["cached"], rate[k])] for k in ("uncached", "nanogpt")}
    row = [
        f"{len(rounds)}",
        *(spread(rate[k], ".0f") for k in rate),
        *(spread(ratio[k], ".2f") for k in ratio),
    ]
    header = ["rounds", "cached", "uncached", "nanoGPT's sampler", "cached / uncached", "cached / nanoGPT"]
    return _table(header, [row])


def gpu_training_table() -> str:
    """`--preset gpu` on one H100: our three seeds beside nanoGPT's train.py (one run)."""
    ours = [_read(f"gpu_h100/ours_s{seed}/summary.json") for seed in range(3)]
    nanogpt = _read("gpu_h100/nanogpt_val.json")
    estimates = re.findall(r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)$",
                           (RESULTS / "gpu_h100" / "nanogpt.log").read_text(), re.MULTILINE)  # fmt: skip
    best_step, best = min(((int(s), float(v)) for s, v in estimates), key=lambda point: point[1])
    walls_text = (RESULTS / "gpu_h100" / "walls.txt").read_text()
    walls = dict(re.findall(r"^(ours seed 0|nanogpt) rc=0 wall_ms=(\d+)", walls_text, re.MULTILINE))
    rows = [
        [
            "ours, RoPE",
            "0, 1, 2",
            _mean_std([s["best_val_loss"] for s in ours]),
            _mean_std([s["val_loss"] for s in ours]) + " (final, step 5000)",
            f"{int(walls['ours seed 0']) / 1000:.1f} s (seed 0)",
        ],
        [
            "nanoGPT's train.py, learned",
            "its seed 1337",
            f"{best:.4f} (its estimate, step {best_step})",
            f"{nanogpt['nanogpt_val_loss_whole_split']:.4f} (best, step {nanogpt['nanogpt_iter']})",
            f"{int(walls['nanogpt']) / 1000:.1f} s",
        ],
    ]
    header = ["", "seeds", "best periodic val estimate", "val loss, tiled windows of T", "wall time"]
    return _table(header, rows)
