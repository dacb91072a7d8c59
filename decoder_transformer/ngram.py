"""Byte n-gram baselines for the byte model: interpolated Kneser-Ney (Chen & Goodman 1999, section 3)
of orders 1 to 5, fit on the training split's UTF-8 bytes, scored in bits per byte on the validation
split's bytes 1 .. (the targets train.py's full-context loss scores; each byte's history is what comes
before it in the split).

  python decoder_transformer/ngram.py --data-dir PATH --clearml off           # Tiny Shakespeare
  python decoder_transformer/ngram.py --text notes.txt --max-order 3 --clearml off
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's common, not an installed one
from textdata import TRAIN_FRACTION, load_text  # noqa: E402

from common import DataArgs, RunLogger, parse_args, run_main, run_name  # noqa: E402

ALPHABET = 256  # byte values


@dataclass
class Args(DataArgs):
    text: str | None = None  # score this UTF-8 text file instead of Tiny Shakespeare
    max_order: int = 5  # the longest n-gram: orders 1 .. max_order are fit and scored


def check_args(args: Args) -> None:
    if not 1 <= args.max_order <= 8:
        raise ValueError(f"--max-order must be in [1, 8] (got {args.max_order})")


class KneserNey:
    """Interpolated Kneser-Ney over bytes: the top order uses counts, each lower order continuation
    counts (how many distinct bytes precede the n-gram), each order one absolute discount
    D = n1 / (n1 + 2 n2) from its counts of counts (Ney et al. 1994), and order 0 is uniform."""

    def __init__(self, data: bytes, order: int):
        self.order = order
        raw = {k: Counter(data[i : i + k] for i in range(len(data) - k + 1)) for k in range(2, order + 1)}
        counts = {order: raw[order] if order > 1 else Counter(data[i : i + 1] for i in range(len(data)))}
        for k in range(order - 1, 0, -1):  # continuation counts: distinct bytes seen before each k-gram
            counts[k] = Counter(gram[1:] for gram in raw[k + 1])
        self.counts = counts  # k -> {k-gram: count used at order k}
        self.context_total, self.context_types, self.discount = {}, {}, {}
        for k, table in counts.items():
            totals, types = Counter(), Counter()
            for gram, c in table.items():
                totals[gram[:-1]] += c
                types[gram[:-1]] += 1
            self.context_total[k], self.context_types[k] = totals, types
            n1 = sum(1 for c in table.values() if c == 1)
            n2 = sum(1 for c in table.values() if c == 2)
            self.discount[k] = n1 / (n1 + 2 * n2) if n1 else 0.5

    def prob(self, history: bytes, byte: int) -> float:
        """P(byte | the last order - 1 bytes of history)."""
        history = history[len(history) - self.order + 1 :] if self.order > 1 else b""
        p = 1.0 / ALPHABET
        for k in range(1, self.order + 1):  # from the unigram up, each order interpolating the one below
            context = history[len(history) - (k - 1) :] if k > 1 else b""
            if len(context) < k - 1:
                break  # the history is shorter than this order's context: stop at the order below
            total = self.context_total[k].get(context, 0)
            if total == 0:
                continue  # unseen context: this order gives the order below unchanged
            d = self.discount[k]
            count = self.counts[k].get(context + bytes([byte]), 0)
            p = (max(count - d, 0.0) + d * self.context_types[k][context] * p) / total
        return p

    def bits(self, data: bytes) -> float:
        """Total bits of data[1:], each byte given the bytes before it in data."""
        return -sum(
            math.log2(self.prob(data[max(0, i - self.order + 1) : i], data[i])) for i in range(1, len(data))
        )


def main() -> None:
    args = parse_args(Args, check=check_args, description=__doc__)
    text, source = load_text(args.text, args.data_dir)
    data = text.encode("utf-8")
    n_train = int(TRAIN_FRACTION * len(data))
    train, val = data[:n_train], data[n_train:]
    with RunLogger("decoder_transformer", run_name("ngram", args.seed), args) as log:
        summary = {"text": source, "train_bytes": len(train), "val_bytes_scored": len(val) - 1}
        for order in range(1, args.max_order + 1):
            started = time.perf_counter()
            model = KneserNey(train, order)
            bits_per_byte = model.bits(val) / (len(val) - 1)
            summary[f"order_{order}_bits_per_byte"] = bits_per_byte
            summary[f"order_{order}_discounts"] = [model.discount[k] for k in range(1, order + 1)]
            print(f"order {order}: {bits_per_byte:.4f} bits/byte ({time.perf_counter() - started:.1f} s)")
        log.write_summary(summary)


if __name__ == "__main__":
    run_main(main)
