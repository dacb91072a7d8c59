"""Command line from an `Args` dataclass, and one-line errors for problems the user can fix.

Each field becomes `--field-name`; its trailing `# comment` in the source is the help text.
Types: int, float, str, bool (`--flag/--no-flag`), Literal[...] (choices), `X | None`,
list[int|float|str] (one or more values).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys
import types
import typing
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class UserError(Exception):
    """Missing data, an unreadable file, a folder that can't be written: printed without a traceback."""


def default_data_dir() -> str:
    return os.environ.get("DATA_DIR") or str(REPO_ROOT / "data")


def _field_comments(cls) -> dict[str, str]:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    pattern = re.compile(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", re.MULTILINE)
    return {name: text.strip() for name, text in pattern.findall(source)}


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


def build_parser(cls, description: str | None = None) -> argparse.ArgumentParser:
    doc = (cls.__doc__ or "").strip()
    if doc.startswith(cls.__name__ + "("):  # the signature dataclass writes when there is no docstring
        doc = ""
    parser = argparse.ArgumentParser(
        description=description or doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        tp, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw: dict = {"default": default, "help": f"{comments.get(f.name, '')} (default: {default})".strip()}
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


def parse_args(cls, argv=None, check=None, description: str | None = None):
    """Parse into `cls`; `check(args)` raises ValueError naming the flag and its allowed range."""
    parser = build_parser(cls, description)
    ns = parser.parse_args(argv)
    args = cls(**vars(ns))
    if check is not None:
        try:
            check(args)
        except ValueError as e:
            parser.error(str(e))  # exits 2 with usage and the message
    return args


def run_main(main) -> None:
    """Call `main()`; a UserError becomes one line on stderr and exit status 1, Ctrl-C status 130."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
