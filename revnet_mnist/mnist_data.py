"""MNIST from `<data-dir>/MNIST/raw/` (torchvision's layout), downloaded there with MD5 checks when absent.

Accepts the official idx files gzipped (`*-ubyte.gz`) or uncompressed (`*-ubyte`); the folder may be
read-only. Every problem the user can fix (missing, truncated or corrupt file, no network, an
unwritable folder) is a UserError that names the file and what to do.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from common import UserError

MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
FILES = {  # name -> MD5 of the .gz file, as torchvision lists them
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049  # idx headers: 0x00000803 (uint8, 3 dims), 0x00000801 (1 dim)
MEAN, STD = 0.1307, 0.3081  # MNIST training-set pixel mean and std (after scaling to [0, 1])
TIMEOUT_S = 30
CHUNK = 2**20  # bytes decompressed at a time
MAX_BYTES = 2**30  # an idx header asking for more than this is corrupt (MNIST: 47 MB)


def _find(raw: Path, name: str) -> Path | None:
    for candidate in (raw / f"{name}.gz", raw / name):
        if candidate.is_file():
            return candidate
    return None


def split_present(data_dir: str | Path, split: str) -> bool:
    """Whether both files of `split` ('train' or 't10k') are in `<data_dir>/MNIST/raw/`."""
    raw = Path(data_dir) / "MNIST" / "raw"
    return all(_find(raw, f"{split}-{kind}-ubyte") for kind in ("images-idx3", "labels-idx1"))


def download(raw: Path, name: str) -> Path:
    """Fetch `name`.gz into `raw`, check its MD5, then rename it into place (never a half file)."""
    try:
        raw.mkdir(parents=True, exist_ok=True)
        probe = raw / ".write_test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"MNIST file {name}(.gz) is missing from {raw} and that folder is not writable "
            f"({e.strerror}); put the four MNIST idx files there or pass --data-dir"
        ) from None
    target = raw / f"{name}.gz"
    errors = []
    for mirror in MIRRORS:
        try:
            with urllib.request.urlopen(mirror + f"{name}.gz", timeout=TIMEOUT_S) as response:
                payload = response.read()
        except (urllib.error.URLError, OSError) as e:
            errors.append(f"{mirror}: {getattr(e, 'reason', e)}")
            continue
        if hashlib.md5(payload).hexdigest() != FILES[name]:
            errors.append(f"{mirror}: checksum mismatch")
            continue
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(payload)
        os.replace(tmp, target)
        return target
    raise UserError(
        f"MNIST file {name}.gz is not in {raw} and could not be downloaded "
        f"({'; '.join(errors)}); with no network, copy the four MNIST idx files there "
        "or pass --data-dir"
    )


def read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    """An idx file's uint8 array, shape (n,) or (n, rows, cols); UserError if it is not one.

    Decompresses straight into the array, so reading needs no more memory than the array itself."""
    header = 4 + 4 * dims
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            head = f.read(header)
            if len(head) < header or struct.unpack(">I", head[:4])[0] != magic:
                raise UserError(
                    f"{path} is not an MNIST idx file (expected magic number {magic}); "
                    "delete it to download it again"
                )
            shape = struct.unpack(f">{dims}I", head[4:])
            expected = int(np.prod(shape))
            if expected > MAX_BYTES:
                raise UserError(f"{path} is corrupt (header says {shape}); delete it to download it again")
            array = np.empty(expected, dtype=np.uint8)
            view, got = memoryview(array), 0
            while got < expected and (n := f.readinto(view[got : got + CHUNK])):  # chunks: no big copy
                got += n
            extra = len(f.read(1))  # also makes gzip check the stream's CRC and length
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise UserError(f"cannot read {path}: {e}; delete it to download it again") from None
    if got != expected or extra:
        raise UserError(
            f"{path} is truncated or corrupt ({header + got}{'+' if extra else ''} bytes, "
            f"header says {header + expected}); delete it to download it again"
        )
    return array.reshape(shape)


def load_split(data_dir: str | Path, split: str, allow_download: bool = True) -> tuple[np.ndarray, ...]:
    """(images (n, 28, 28) uint8, labels (n,) int64) for split 'train' or 't10k'."""
    raw = Path(data_dir) / "MNIST" / "raw"
    arrays = []
    for kind, magic, dims in (("images-idx3", IMAGE_MAGIC, 3), ("labels-idx1", LABEL_MAGIC, 1)):
        name = f"{split}-{kind}-ubyte"
        path = _find(raw, name)
        if path is None:
            if not allow_download:
                raise UserError(f"MNIST file {name}(.gz) not found in {raw}")
            path = download(raw, name)
        arrays.append(read_idx(path, magic, dims))
    images, labels = arrays
    if len(images) != len(labels):
        raise UserError(f"MNIST {split} files in {raw} disagree: {len(images)} images, {len(labels)} labels")
    if labels.max(initial=0) > 9:
        raise UserError(f"MNIST {split} labels in {raw} hold a value above 9; the file is corrupt")
    return images, labels.astype(np.int64)


def load_mnist(data_dir: str | Path, val_size: int, allow_download: bool = True) -> dict[str, np.ndarray]:
    """MNIST as uint8 images (n, 28, 28) and int64 labels: train, val, test.

    The validation split is the last `val_size` images of the 60,000 training images, as views
    (no copy): the dataset stays 52 MiB of uint8 in memory; batches are normalised as they are drawn."""
    train_images, train_labels = load_split(data_dir, "train", allow_download)
    test_images, test_labels = load_split(data_dir, "t10k", allow_download)
    if not 0 <= val_size < len(train_images):
        raise UserError(f"--val-size must be below the {len(train_images)} training images in {data_dir}")
    cut = len(train_images) - val_size
    return {
        "train_images": train_images[:cut],
        "train_labels": train_labels[:cut],
        "val_images": train_images[cut:],
        "val_labels": train_labels[cut:],
        "test_images": test_images,
        "test_labels": test_labels,
    }


def normalise(images: np.ndarray, dtype, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 (n, 28, 28) -> (n, 784) in `dtype`, zero mean and unit variance over the training set.

    Called per batch, so only the batch being used exists in floating point; `out` (n, 784) reuses
    one array for every batch."""
    flat = images.reshape(len(images), -1)  # (n, 784)
    if out is None:
        x = flat.astype(dtype)
    else:
        x = out
        np.copyto(x, flat)
    x *= 1 / (255 * STD)
    x -= MEAN / STD
    return x


def shifts(max_shift: int) -> list[tuple[int, int]]:
    """Every (dy, dx) translation with |dy|, |dx| <= max_shift, (0, 0) included."""
    r = range(-max_shift, max_shift + 1)
    return [(dy, dx) for dy in r for dx in r]


def shift_images(src: np.ndarray, out: np.ndarray, counts) -> None:
    """Translate images (n, 28, 28) into `out` (same shape): the first counts[0] by shifts(k)[0], the
    next counts[1] by shifts(k)[1], ...; pixels moved in from outside are 0. Every copy is between
    views, so nothing is allocated per call (random augmentation: `src` is a batch in random order)."""
    table = shifts((math.isqrt(len(counts)) - 1) // 2)
    if len(table) != len(counts) or sum(counts) != len(src):
        raise ValueError(f"counts: one per shift, summing to the batch (got {len(counts)}, {sum(counts)})")
    h, w = src.shape[1:]
    start = 0
    for (dy, dx), n in zip(table, counts):
        chunk, part = slice(start, start + n), out[start : start + n]
        part.fill(0)
        part[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = src[
            chunk, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
        ]
        start += n
