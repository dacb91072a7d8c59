"""Text, vocabularies, batches and checkpoints shared by train.py, sample.py and evaluate_sampling.py."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

import torch
from model import DecoderLM, ModelConfig

from common import UserError, load_torch

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TRAIN_FRACTION = 0.9  # first 90% of the tokens train, the last 10% validate (as nanoGPT)


def download_shakespeare(path: Path) -> None:
    """Fetch Tiny Shakespeare (1.1 MB) to `path`, checking its SHA-256; UserError without a network."""
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
            payload = response.read()
    except (urllib.error.URLError, OSError) as e:
        raise UserError(
            f"Tiny Shakespeare is not at {path} and downloading it from {SHAKESPEARE_URL} failed "
            f"({getattr(e, 'reason', e)}); download that file to {path} or pass --text FILE"
        ) from None
    if hashlib.sha256(payload).hexdigest() != SHAKESPEARE_SHA256:
        raise UserError(f"the file downloaded from {SHAKESPEARE_URL} has an unexpected SHA-256; not saved")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{path}.tmp")
        tmp.write_bytes(payload)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None


def load_text(text_path: str | None, data_dir: str) -> tuple[str, str]:
    """The training text and where it came from: `text_path`, else <data_dir>/tinyshakespeare/input.txt."""
    if text_path is None:
        path = Path(data_dir) / "tinyshakespeare" / "input.txt"
        if not path.is_file():
            download_shakespeare(path)
    else:
        path = Path(text_path)
        if not path.is_file():
            raise UserError(f"--text {text_path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); convert it, e.g. with iconv") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if not text:
        raise UserError(f"{path} is empty; a text to train on is needed")
    return text, str(path)


class Vocab:
    """Characters of the training text (`char`) or the 256 byte values of UTF-8 (`byte`, any text)."""

    def __init__(self, kind: str, chars: str = ""):
        if kind not in ("char", "byte"):
            raise ValueError(f"vocabulary kind must be 'char' or 'byte' (got {kind!r})")
        self.kind, self.chars = kind, chars if kind == "char" else ""
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, kind: str, text: str) -> Vocab:
        return cls(kind, "".join(sorted(set(text))) if kind == "char" else "")

    @property
    def size(self) -> int:
        return len(self.chars) if self.kind == "char" else 256

    def encode(self, text: str) -> list[int]:
        if self.kind == "byte":
            return list(text.encode("utf-8"))
        unknown = sorted(set(text) - self.index.keys())
        if unknown:
            raise ValueError(f"characters not in the model's vocabulary: {''.join(unknown)!r}")
        return [self.index[c] for c in text]

    def decode(self, ids) -> str:
        if self.kind == "byte":
            return bytes(ids).decode("utf-8", errors="replace")
        return "".join(self.chars[i] for i in ids)

    def state(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}

    def unit_counts(self, ids: torch.Tensor) -> tuple[int, int]:
        """(characters, UTF-8 bytes) that the tokens `ids` stand for: a byte counts as a character when
        it starts one (it is not a continuation byte 10xxxxxx)."""
        ids = ids.flatten().cpu()
        if self.kind == "byte":
            return int(((ids & 0xC0) != 0x80).sum()), len(ids)
        byte_lengths = torch.tensor([len(c.encode("utf-8")) for c in self.chars])
        return len(ids), int(byte_lengths[ids].sum())

    def decode_generated(self, ids: list[int]) -> tuple[str, int]:
        """Text of generated tokens and how many U+FFFD replacement characters decoding had to insert
        (always 0 for characters; for bytes, one per invalid or incomplete UTF-8 sequence)."""
        if self.kind == "char":
            return self.decode(ids), 0
        raw = bytes(ids)
        text = raw.decode("utf-8", errors="replace")
        return text, len(text) - len(raw.decode("utf-8", errors="ignore"))


def split_tokens(text: str, vocab: Vocab) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode the whole text and cut it 90 / 10 into train and validation token tensors (int64)."""
    data = torch.tensor(vocab.encode(text), dtype=torch.long)
    n_train = int(TRAIN_FRACTION * len(data))
    return data[:n_train], data[n_train:]


def get_batch(data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator):
    """Random windows: inputs x (B, T) and next-token targets y (B, T), on data's device.

    Drawn on the generator's device: a CUDA generator keeps the training loop free of host-device syncs.
    """
    starts = torch.randint(
        len(data) - block_size, (batch_size,), generator=generator, device=generator.device
    )
    offsets = (starts[:, None] + torch.arange(block_size, device=starts.device)).to(data.device)  # (B, T)
    return data[offsets], data[offsets + 1]


def tiled_windows(data: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token once: non-overlapping windows x, y (N, T) covering data (the remainder is dropped)."""
    n = (len(data) - 1) // block_size
    x = data[: n * block_size].view(n, block_size)  # (N, T)
    y = data[1 : n * block_size + 1].view(n, block_size)  # (N, T)
    return x, y


def sliding_windows(n_tokens: int, block_size: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows that score every target of an n_tokens sequence (tokens 1 .. n_tokens - 1) exactly once:
    their starts (N,) and the first position each one scores (N,).

    The first window scores all its block_size targets, with 1 .. block_size tokens of context (the first
    tokens of a split have only what comes before them in the split). Each later window starts `stride`
    tokens further and scores the targets the one before did not reach, its last `stride` or fewer, with
    block_size - stride + 1 .. block_size tokens of context: stride 1 gives every target after the first
    block_size the full block_size. The last window ends at the last token.
    """
    if not 1 <= stride <= block_size or n_tokens < block_size + 1:
        raise ValueError(
            f"need 1 <= stride <= block_size and more than block_size tokens "
            f"(stride {stride}, block_size {block_size}, {n_tokens} tokens)"
        )
    last = n_tokens - 1 - block_size  # the start of the window that ends at the last token
    starts = torch.arange(0, last + 1, stride)
    if starts[-1] != last:
        starts = torch.cat([starts, torch.tensor([last])])
    # position p of a window at a scores target a + p + 1; the previous window reached a_prev + block_size
    first = torch.cat([torch.zeros(1, dtype=torch.long), starts[:-1] + block_size - starts[1:]])
    return starts, first


@torch.no_grad()
def sliding_loss(logits_fn, data: torch.Tensor, block_size: int, stride: int, batch_size: int) -> float:
    """Mean cross-entropy in nats over every target of data (tokens 1 ..), scored by the windows of
    `sliding_windows`; `logits_fn` maps inputs (B, block_size) to logits (B, block_size, vocab)."""
    starts, first = sliding_windows(len(data), block_size, stride)
    positions = torch.arange(block_size)
    total = 0.0
    for i in range(0, len(starts), batch_size):
        offsets = (starts[i : i + batch_size, None] + positions).to(data.device)  # (B, T)
        scored = (positions >= first[i : i + batch_size, None]).to(data.device)  # (B, T)
        logits = logits_fn(data[offsets]).float()  # (B, T, vocab)
        losses = torch.nn.functional.cross_entropy(logits[scored], data[offsets + 1][scored], reduction="sum")
        total += losses.item()
    return total / (len(data) - 1)


def encode_prompt(vocab: Vocab, prompt: str, block_size: int) -> list[int]:
    """The prompt's token ids, or a UserError naming what is wrong with it."""
    try:
        ids = vocab.encode(prompt)
    except ValueError as e:
        raise UserError(f"--prompt: {e}; the vocabulary is {vocab.chars!r}") from None
    if len(ids) > block_size:
        raise UserError(
            f"--prompt is {len(ids)} tokens, longer than the model's context "
            f"(block_size {block_size}); shorten it"
        )
    return ids


def pick_device(choice: str) -> str:
    """`--device auto` -> cuda, then mps, then cpu; UserError when cuda is asked for but absent."""
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to torch")
    return choice


def load_checkpoint(path, device="cpu") -> dict:
    """A checkpoint written by train.py (weights_only load); UserError naming the file if it is missing,
    damaged, carries pickled objects, or holds a model config or vocabulary this code does not know."""
    if Path(path).is_dir():  # a run folder: name the checkpoints in it
        inside = [
            str(Path(path) / name) for name in ("best.pt", "checkpoint.pt") if (Path(path) / name).is_file()
        ]
        raise UserError(
            f"{path} is a folder, not a checkpoint file"
            + (
                f"; its checkpoints: {', '.join(inside)}"
                if inside
                else " (no best.pt or checkpoint.pt in it)"
            )
        )
    ckpt = load_torch(path, map_location=device)
    needed = {"model", "model_config", "vocab", "iter", "args"}
    if not isinstance(ckpt, dict) or not needed <= ckpt.keys():
        raise UserError(f"{path} is not a decoder_transformer checkpoint (no model_config / vocab inside)")
    try:
        ModelConfig(**ckpt["model_config"])
        Vocab(**ckpt["vocab"])
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: unusable model config or vocabulary ({e})") from None
    return ckpt


def load_model(path, device: str) -> tuple[DecoderLM, Vocab, dict]:
    """Rebuild the model a checkpoint describes, in eval mode; UserError if its weights don't fit it."""
    ckpt = load_checkpoint(path, device)
    model = DecoderLM(ModelConfig(**ckpt["model_config"]))
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise UserError(
            f"{path}: weights do not match the checkpoint's model config ({str(e)[:200]})"
        ) from None
    return model.to(device).eval(), Vocab(**ckpt["vocab"]), ckpt
