"""Shared test helpers: run an entry script as a user would, and the `slow` marker.

`pytest tests/ -m "not slow"` is the quick inner loop; `pytest tests/` runs everything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_script(script: str, *args, rc: int | None = 0, env: dict | None = None, timeout: float = 600):
    """Run `python <repo>/<script> <args>`; assert its exit status is `rc` (None: any) and return it.

    ClearML is kept offline and inside a temporary cache unless `env` says otherwise.
    """
    full_env = {**os.environ, "MPLBACKEND": "Agg"}
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=REPO,
    )
    if rc is not None:
        assert proc.returncode == rc, (
            f"{script} exited {proc.returncode}, expected {rc}\n--- stdout\n{proc.stdout[-3000:]}"
            f"\n--- stderr\n{proc.stderr[-3000:]}"
        )
    return proc


def one_line_error(proc) -> str:
    """The stderr of a failed run, asserted to be a single line with no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture(autouse=True, scope="session")
def _clearml_stays_local(tmp_path_factory):
    """No user ClearML configuration or server reaches the tests; offline sessions go to a temp dir."""
    saved = {k: os.environ.get(k) for k in ("CLEARML_CONFIG_FILE", "CLEARML_CACHE_DIR")}
    os.environ["CLEARML_CONFIG_FILE"] = str(tmp_path_factory.mktemp("clearml") / "absent.conf")
    os.environ["CLEARML_CACHE_DIR"] = str(tmp_path_factory.mktemp("clearml-cache"))
    hidden = {
        k: os.environ.pop(k) for k in list(os.environ) if k.startswith(("CLEARML_API_", "CLEARML_AUTH"))
    }
    yield
    os.environ.update(hidden)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
