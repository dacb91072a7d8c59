"""Shared test helpers: run an entry script as a user would, and the `slow` marker.

`pytest tests/ -m "not slow"` is the quick inner loop; `pytest tests/` runs everything.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import socket
import struct
import subprocess
import sys
import threading
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


@contextlib.contextmanager
def http_stand_in(status: int | None = None, body: bytes = b"", content_type: str = "text/html"):
    """A real HTTP server on 127.0.0.1 for the duration of the block: the URL. `status` None is a plain
    file server (Python's http.server: a POST gets 501), else every request gets `status` and `body`."""

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST

        def log_message(self, *args):
            pass

    class Plain(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Plain if status is None else Answer)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def socket_stand_in(mode: str):
    """A TCP listener on 127.0.0.1 that resets every connection (`reset`) or never answers (`silent`),
    stopped when the block ends: the URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop, held = threading.Event(), []

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if mode == "reset":  # SO_LINGER 0: close sends RST, the client sees "connection reset"
                conn.recv(65536)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
            else:
                held.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        listener.close()


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
