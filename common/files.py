"""Files a run writes and reads back: atomic writes, and one-line errors naming a damaged file.

Checkpoints hold plain types only (tensors, arrays, numbers, strings, lists, dicts) and are read with
`torch.load(weights_only=True)`, so opening a checkpoint someone sent you cannot run code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from common.cli import UserError

CHECKPOINT_PT = "checkpoint.pt"  # the training checkpoint of the torch experiments
CHECKPOINT_NPZ = "checkpoint.npz"  # the training checkpoint of the numpy experiment


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def write_json(path, obj) -> None:
    """Atomic: a reader (or a crash) never sees half a file."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path):
    """The parsed file; a missing or damaged one is a UserError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is damaged or not JSON ({_first_line(e)})") from None


def save_torch(obj, path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves half a checkpoint."""
    import torch

    tmp = Path(f"{path}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_torch(path, map_location="cpu"):
    """torch.load(weights_only=True); a missing, damaged or code-carrying file is a UserError naming it."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # a class or function to import: code, refused
            raise UserError(
                f"{path} holds pickled Python objects, which are refused (weights_only=True): "
                "only plain tensors and values are loaded"
            ) from None
        raise UserError(f"{path} is damaged or not a torch checkpoint ({_first_line(e)})") from None
    except Exception as e:  # truncated zip, bad magic, wrong format: torch raises many types
        raise UserError(f"{path} is damaged or not a torch checkpoint ({_first_line(e)})") from None
