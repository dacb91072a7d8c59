"""Files a run writes and reads back: atomic writes, and one rule for a damaged file.

Every file a script reads back goes through a loader here. Damaged (unreadable, truncated, failing
its checksum, holding NaN where a NaN would poison the output) means one line naming the file and
exit status 1, before anything is trained or scored from it.

Checkpoints hold plain types only (tensors, arrays, numbers, strings, lists, dicts) and are read with
`torch.load(weights_only=True)`, so opening a checkpoint someone sent you cannot run code. Both torch
and numpy checkpoints are zip archives whose members carry a CRC-32; torch's reader does not check
it, so `load_torch` verifies every member first (TensorFlow's checkpoint reader does the same with
its per-tensor CRC-32C). The checksum is already in every file torch or numpy wrote, so files made
elsewhere (downloaded weights) and old checkpoints are covered without a side file.
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path

from common.cli import UserError

CHECKPOINT_PT = "checkpoint.pt"  # the training checkpoint of the torch experiments
CHECKPOINT_NPZ = "checkpoint.npz"  # the training checkpoint of the numpy experiment


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def existing_file(path, what: str = "") -> Path:
    """`path` as a Path when it is a file; else a UserError saying it is missing or a folder."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    if path.is_dir():
        raise UserError(f"{label} is a folder; a file is expected here")
    if not path.is_file():
        raise UserError(f"{label}: no such file")
    return path


def write_json(path, obj) -> None:
    """Atomic: a reader (or a crash) never sees half a file."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path):
    """The parsed file; a missing or damaged one is a UserError naming it."""
    path = existing_file(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is damaged or not JSON ({_first_line(e)})") from None


def read_jsonl(path) -> tuple[list[dict], list[str]]:
    """(rows, lines) of a JSON-lines file, dropping damaged lines (garbage, bad UTF-8, half a row)
    with a one-line note on stderr; `lines` are the kept rows' text."""
    rows, lines, dropped = [], [], 0
    for raw in Path(path).read_bytes().split(b"\n"):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
            row = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        if not isinstance(row, dict):
            dropped += 1
            continue
        rows.append(row)
        lines.append(line)
    if dropped:
        print(f"note: {path}: dropped {dropped} damaged line(s)", file=sys.stderr)
    return rows, lines


def save_torch(obj, path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves half a checkpoint."""
    import torch

    tmp = Path(f"{path}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def verify_zip(path: Path) -> None:
    """Check the CRC-32 of every member of a zip archive (torch and numpy files); UserError if one fails."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
        raise UserError(f"{path} is damaged ({_first_line(e)})") from None
    if bad is not None:
        raise UserError(f"{path} is damaged (checksum mismatch in {bad})")


def nonfinite_entry(obj, key: str = "") -> str | None:
    """The key path of the first floating tensor or array holding NaN or infinity, else None (plain
    numbers are bookkeeping, e.g. a best loss that starts at infinity, and are not checked)."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        items = None
    if items is not None:
        for k, v in items:
            found = nonfinite_entry(v, f"{key}/{k}" if key else str(k))
            if found is not None:
                return found
        return None
    if type(obj).__module__ == "torch" and type(obj).__name__ in ("Tensor", "Parameter"):
        import torch

        if obj.is_floating_point() or obj.is_complex():
            return None if bool(torch.isfinite(obj).all()) else key or "tensor"
        return None
    if type(obj).__module__ == "numpy" and hasattr(obj, "dtype"):
        import numpy as np

        if np.issubdtype(obj.dtype, np.inexact):
            return None if bool(np.isfinite(obj).all()) else key or "array"
    return None


def check_finite(obj, path, skip: tuple[str, ...] = ()) -> None:
    """UserError naming `path` and the entry when a loaded tensor or array holds NaN or infinity.

    `skip`: top-level keys whose values may legitimately be non-finite."""
    if isinstance(obj, dict) and skip:
        obj = {k: v for k, v in obj.items() if k not in skip}
    found = nonfinite_entry(obj)
    if found is not None:
        raise UserError(f"{path} is damaged: {found} holds NaN or infinite values")


def _weights_only_reason(text: str) -> str:
    """torch's own reason for refusing a pickled object, without its advice paragraphs."""
    for line in text.splitlines():
        low = line.lower()
        if "global" in low:
            return line.strip().rstrip(".")[:200]
    return "a class or function to import"


def load_torch(path, map_location="cpu", finite: bool = True, what: str = "", skip: tuple[str, ...] = ()):
    """torch.load(weights_only=True) of a checksum-verified file; UserError naming a missing, damaged or
    code-carrying file, or (`finite`) one whose floats hold NaN or infinity outside the keys in `skip`."""
    import pickle

    import torch

    path = existing_file(path, what)
    if zipfile.is_zipfile(path):  # every torch.save since torch 1.6; older files are loaded as they are
        verify_zip(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch >= 2.4: "Weights only load failed ... unsupported GLOBAL x.y" for a class or function
        # to import (code, refused); other weights-only failures are bytes that are not a pickle
        if "weights only load failed" in str(e).lower() and "global" in str(e).lower():
            raise UserError(
                f"{path} holds pickled Python objects, refused by weights-only loading "
                f"({_weights_only_reason(str(e))}); only plain tensors and values are loaded"
            ) from None
        raise UserError(f"{path} is damaged or not a torch checkpoint ({_first_line(e)})") from None
    except Exception as e:  # truncated zip, bad magic, wrong format: torch raises many types
        raise UserError(f"{path} is damaged or not a torch checkpoint ({_first_line(e)})") from None
    if finite:
        check_finite(obj, path, skip)
    return obj


def load_npz(path, finite: bool = True) -> dict:
    """The arrays of an .npz file (no pickles), checksum-verified; UserError naming a damaged file."""
    import numpy as np

    path = existing_file(path)
    verify_zip(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is damaged or not an .npz file ({_first_line(e)})") from None
    if finite:
        check_finite(arrays, path)
    return arrays
