"""The house convention, checked for every entry script of every experiment (see the top README):
help text on every flag, non-finite numbers refused up front in one line, short functions, and no
path of a development machine anywhere in the repository."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import re
import subprocess
import sys
import typing

import pytest
from conftest import REPO, run_script

from common.cli import _unwrap_optional, build_parser, parse_args

EXPERIMENTS = ("revnet_mnist", "padim_anomaly", "decoder_transformer", "bbf_lunar")
MAX_FUNCTION_LINES = 80


def entry_scripts() -> list[str]:
    """Every experiment file with an `Args` dataclass and a `main()`: the scripts a user runs."""
    found = []
    for folder in EXPERIMENTS:
        for path in sorted((REPO / folder).glob("*.py")):
            tree = ast.parse(path.read_text())
            names = {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
            if {"Args", "main"} <= names:
                found.append(f"{folder}/{path.name}")
    return found


SCRIPTS = entry_scripts()


def load(script: str):
    """Import an entry script by path, with its folder importable as when it runs."""
    path = REPO / script
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"entry_{path.parent.name}_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def float_fields(cls) -> list[str]:
    hints = typing.get_type_hints(cls)
    names = []
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(hints[f.name])
        if typing.get_origin(tp) in (list, tuple):
            tp = typing.get_args(tp)[0]
        if tp is float and f.name not in getattr(cls, "ALLOW_NONFINITE", ()):
            names.append(f.name)
    return names


def test_every_experiment_has_entry_scripts():
    for folder in EXPERIMENTS:
        assert any(s.startswith(folder + "/") for s in SCRIPTS), folder


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_help_text(script):
    parser = build_parser(load(script).Args)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            text = re.sub(r"\(default: .*\)$", "", action.help or "").strip()
            assert text, f"{script}: {action.option_strings[0]} has no help text"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_float_flag_refuses_nan_in_one_line(script, capsys):
    module = load(script)
    for name in float_fields(module.Args):
        flag = "--" + name.replace("_", "-")
        with pytest.raises(SystemExit) as exc:
            parse_args(module.Args, [flag, "nan"], check=getattr(module, "check_args", None))
        assert exc.value.code == 2, f"{script} {flag} nan"
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag in err[0] and "finite" in err[0], (script, flag, err)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_runs_as_a_user_would(script):
    """--help in a fresh process (the script's imports and sys.path as a user has them) lists every flag."""
    proc = run_script(script, "--help", timeout=120)
    flags = [a.option_strings[-1] for a in build_parser(load(script).Args)._actions if a.option_strings]
    missing = [f for f in flags if f not in proc.stdout]
    assert proc.stdout.startswith("usage: ") and not missing, (script, missing)


def python_files() -> list:
    return [p for p in REPO.rglob("*.py") if not ({".git", "runs", "data", "tests"} & set(p.parts))]


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.name} ({length} lines)")
    assert not long, "functions over 80 lines: " + ", ".join(long)


def test_no_path_of_a_development_machine_in_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    pattern = re.compile("(" + "|".join(["/" + "work/", "/" + "tmp/", "/" + "root/"]) + ")")
    hits = []
    for name in tracked:
        path = REPO / name
        if path.suffix in (".png", ".jpg", ".gz", ".npz", ".pt") or not path.is_file():
            continue
        for i, line in enumerate(path.read_text(errors="ignore").splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{name}:{i}")
    assert not hits, "machine paths in: " + ", ".join(hits[:20])
