"""Command line from an `Args` dataclass, and one-line errors for problems the user can fix.

Each field becomes `--field-name`; its `# comment` (on the field's line, or the comment lines just
above it) is the help text. Types: int, float, str, bool (`--flag/--no-flag`), Literal[...] (choices),
`X | None`, list[int|float|str] (one or more values).

Every script's `Args` extends `RunArgs` (or `DataArgs`, which adds `--data-dir`), so the flags every
experiment shares are declared once. Before a script's own checks, `parse_args` rejects non-finite
floats and negative numbers, unless a field is named in `ALLOW_NONFINITE` / `ALLOW_NEGATIVE`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import math
import os
import sys
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

REPO_ROOT = Path(__file__).resolve().parent.parent


def clock(seconds: float) -> str:
    """h:mm:ss (or m:ss under an hour), for elapsed times and ETAs in progress lines."""
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


class UserError(Exception):
    """Missing data, an unreadable file, a folder that can't be written: printed without a traceback."""


def default_data_dir() -> str:
    return os.environ.get("DATA_DIR") or str(REPO_ROOT / "data")


@dataclass
class RunArgs:
    """The flags every experiment shares (see "Conventions" in the top README)."""

    seed: int = 0  # seeds everything random in the run; part of the run name
    out: str | None = None  # run folder (default runs/<experiment>/<run name>)
    resume: bool = False  # continue the run in --out from its checkpoint (training flags must match)
    clearml: Literal["auto", "offline", "online", "off"] = "auto"  # ClearML mirror of the run
    clearml_queue: str | None = None  # hand the run to this ClearML agent queue and exit

    RESUME_SAFE: ClassVar[frozenset[str]] = frozenset()  # flags that may change on --resume
    # RESUME_SAFE flags that grow a run (epochs, steps, seeds): raised, they reopen a finished run;
    # lowered, they are refused. Any other change leaves a finished run as it is (refused).
    EXTENDS: ClassVar[frozenset[str]] = frozenset()
    # flags that only re-read a run's results (e.g. --summarize-only): never stored in config.json,
    # and set, they may open a finished run again
    REPORT_ONLY: ClassVar[frozenset[str]] = frozenset()
    ALLOW_NEGATIVE: ClassVar[frozenset[str]] = frozenset()  # numeric flags that may be < 0
    ALLOW_NONFINITE: ClassVar[frozenset[str]] = frozenset()  # float flags that may be nan / inf


@dataclass
class DataArgs(RunArgs):
    data_dir: str = default_data_dir()  # dataset root (or DATA_DIR); downloads go there when absent


def _class_comments(cls) -> dict[str, str]:
    """Field name -> help text: the comment on the field's lines, else the comment lines just above."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {}  # line number -> comment text
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    found = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        inline = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        above, n = [], node.lineno - 1
        while n in comments and lines[n - 1].lstrip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        text = " ".join(inline or above)
        if text:
            found[node.target.id] = text
    return found


def field_help(cls) -> dict[str, str]:
    """Help text of every field, the subclass's comment winning over a base class's."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            found.update(_class_comments(klass))
    return found


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1:
            return inner[0], True
    return tp, False


def _none_or(convert):
    def parse(text):
        return None if text.lower() == "none" else convert(text)

    parse.__name__ = convert.__name__
    return parse


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(cls, description: str | None = None) -> argparse.ArgumentParser:
    doc = (cls.__doc__ or "").strip()
    if doc.startswith(cls.__name__ + "("):  # the signature dataclass writes when there is no docstring
        doc = ""
    parser = _OneLineParser(
        description=description or doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        tp, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw: dict = {"default": default, "help": f"{helps.get(f.name, '')} (default: {default})".strip()}
        flag = "--" + f.name.replace("_", "-")
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is typing.Literal:
            kw["choices"] = list(typing.get_args(tp))
        elif typing.get_origin(tp) in (list, tuple):
            kw["nargs"] = "+"
            kw["type"] = typing.get_args(tp)[0]
        else:
            kw["type"] = _none_or(tp) if optional else tp
        parser.add_argument(flag, **kw)
    return parser


def check_numbers(args) -> None:
    """Raise ValueError for a non-finite float or a negative number, field by field."""
    hints = typing.get_type_hints(type(args))
    nonfinite_ok = getattr(args, "ALLOW_NONFINITE", frozenset())
    negative_ok = getattr(args, "ALLOW_NEGATIVE", frozenset())
    for f in dataclasses.fields(args):
        tp, _ = _unwrap_optional(hints[f.name])
        if typing.get_origin(tp) in (list, tuple):
            tp = typing.get_args(tp)[0]
        if tp not in (int, float):
            continue
        value = getattr(args, f.name)
        flag = "--" + f.name.replace("_", "-")
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is None:
                continue
            if tp is float and not math.isfinite(v) and f.name not in nonfinite_ok:
                raise ValueError(f"{flag} must be a finite number (got {v})")
            if v < 0 and f.name not in negative_ok:
                raise ValueError(f"{flag} must be >= 0 (got {v})")


def parse_args(cls, argv=None, check=None, description: str | None = None):
    """Parse into `cls`; `check(args)` raises ValueError naming the flag and its allowed range.

    Any error is one line on stderr and exit status 2.
    """
    parser = build_parser(cls, description)
    ns = parser.parse_args(argv)
    args = cls(**vars(ns))
    try:
        check_numbers(args)
        if check is not None:
            check(args)
    except ValueError as e:
        parser.error(str(e))
    return args


def available_memory() -> int | None:
    """Bytes of memory the kernel can give without swapping (MemAvailable), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(nbytes: float, what: str) -> None:
    """UserError before a size that cannot fit is allocated: `nbytes` is an estimate from the flags."""
    free = available_memory()
    if free is not None and nbytes > free:
        raise UserError(f"{what} needs about {nbytes / 2**30:,.1f} GiB; {free / 2**30:,.1f} GiB is available")


def _out_of_memory(e: BaseException) -> bool:
    """A MemoryError, or torch's allocator failing (a RuntimeError subclass on CPU and CUDA)."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def run_main(main) -> None:
    """Call `main()`; a UserError becomes one line on stderr and exit status 1, running out of memory
    likewise, Ctrl-C status 130."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        print("error: out of memory; choose smaller sizes (width, batch, model or buffer)", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
