"""One run folder per run, mirrored to ClearML.

    with RunLogger("revnet_mnist", run_name("revnet", args.seed), args) as log:
        if log.resumed:
            step = restore(log.path(CHECKPOINT_NPZ)); log.rewind(step)   # no metrics row twice
        log.log(step, {"train/loss": 0.3})   # -> metrics.jsonl + ClearML scalar "train"/"loss"
        save_checkpoint(...); log.keep()     # the folder now holds work worth keeping
        log.save_figure("curves", fig)       # -> curves.png + ClearML plot
        log.write_summary({"test_accuracy": 0.98})

The folder is created exclusively and locked (`.lock`, removed at the end), then checked (not in use
by another process, resumable with these flags) before ClearML starts. A run that fails before `keep()`
or `write_summary()` removes the folder it created, only while it still holds the lock, so the same
`--out` works again. A finished run reopens only to grow (`EXTENDS`). ClearML modes: `off`; `offline`
(a session zip, importable later with `Task.import_offline_session`); `online` (a configured server
that confirms a login, else an error); `auto` (online when a configured server confirms a login
within a few seconds, else offline with a one-line note).
`--clearml-queue NAME` hands the run to a ClearML agent queue.
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import http.client
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime
from importlib import metadata
from pathlib import Path

from common.cli import REPO_ROOT, UserError
from common.files import read_json, read_jsonl, write_json

CLEARML_MODES = ("auto", "offline", "online", "off")
LOCK = ".lock"  # held (flock) by the process working in a run folder; removed when it ends
ALWAYS_RESUME_SAFE = frozenset({"out", "resume", "clearml", "clearml_queue", "data_dir"})
SERVER_TIMEOUT_S = 3.0  # how long `auto` waits for a ClearML server before going offline
_PACKAGES = ("numpy", "scipy", "torch", "torchvision", "scikit-learn", "gymnasium", "clearml", "matplotlib")


def run_name(tag: str, seed: int) -> str:
    return f"{tag}_seed{seed}_{datetime.now():%Y%m%d-%H%M%S}"


def _git_commit() -> str | None:
    """The commit of this checkout (the one holding this `common`); None when it is not a git
    checkout of its own (a copy inside another repository reports no commit, not that one's)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.splitlines()
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != REPO_ROOT:
        return None
    return lines[1]


def _versions() -> dict:
    found = {}
    for pkg in _PACKAGES:
        try:
            found[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return found


def _plain(config: dict) -> dict:
    return json.loads(json.dumps(config, default=str))  # tuples -> lists, as config.json stores them


def _holds_run(folder: Path) -> bool:
    """Anything in the folder other than a lock file (a fresh or abandoned folder holds nothing)."""
    return any(entry.name != LOCK for entry in folder.iterdir())


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


# ClearML ---------------------------------------------------------------------------------------


def clearml_server() -> tuple[str, str, str] | None:
    """(api host, access key, secret key) from CLEARML_API_* or clearml.conf; None when none is set."""
    from clearml.backend_api.config import load

    conf = load()
    key = os.environ.get("CLEARML_API_ACCESS_KEY") or conf.get("api.credentials.access_key", None)
    if not key:
        return None
    secret = os.environ.get("CLEARML_API_SECRET_KEY") or conf.get("api.credentials.secret_key", "")
    host = os.environ.get("CLEARML_API_HOST") or conf.get("api.api_server", None) or "http://localhost:8008"
    return host, key, secret


def server_problem(host: str, key: str, secret: str, timeout: float = SERVER_TIMEOUT_S) -> str | None:
    """None only for a confirmed login (HTTP 200 with a ClearML token); else what is wrong (one phrase).

    Any other answer (another status, a proxy's 502, a plain web server's 501, a page that is not
    ClearML's JSON), a timeout, a reset or a TLS failure is a problem, never an exception."""
    token = base64.b64encode(f"{key}:{secret}".encode()).decode()
    try:
        request = urllib.request.Request(
            host.rstrip("/") + "/auth.login",
            data=b"{}",
            headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            body = answer.read(1 << 20)
        found = json.loads(body.decode("utf-8"))
        if isinstance(found, dict) and isinstance(found.get("data"), dict) and found["data"].get("token"):
            return None
        return f"{host} answered, but not as a ClearML server (no login token)"
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            return f"the ClearML server at {host} refused the credentials (HTTP {e.code})"
        return f"{host} answered HTTP {e.code} to a ClearML login, not a login"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return f"{host} answered, but not as a ClearML server (not JSON)"
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        reason = str(getattr(e, "reason", e) or type(e).__name__).splitlines()[0][:200]
        return f"no ClearML server answers at {host} within {timeout:g} s ({reason})"


def _clearml_mode(mode: str, queue: str | None) -> str:
    """Resolve `auto` and check the server: 'off', 'offline' or 'online' (or UserError)."""
    if mode == "off":
        if queue:
            raise UserError("--clearml-queue needs a ClearML server; it cannot be used with --clearml off")
        return "off"
    server = clearml_server() if mode in ("auto", "online") else None
    if mode == "online" and server is None:
        raise UserError(
            "--clearml online needs a ClearML server: run `clearml-init` or set CLEARML_API_HOST, "
            "CLEARML_API_ACCESS_KEY and CLEARML_API_SECRET_KEY (or use --clearml offline)"
        )
    if server is not None:
        problem = server_problem(*server)
        if problem is None:
            return "online"
        if mode == "online" or queue:
            raise UserError(f"{problem}; use --clearml offline or off")
        print(f"note: {problem}; logging to ClearML offline instead", file=sys.stderr)
    if queue:
        raise UserError("--clearml-queue needs a configured ClearML server (see `clearml-init`)")
    return "offline"


def start_clearml(mode: str, queue: str | None, project: str, task_name: str, config: dict):
    """A ClearML Task, or None for `off`. Never imports packages the script did not import."""
    mode = _clearml_mode(mode, queue)
    if mode == "off":
        return None
    # ClearML's repository-scan thread imports IPython (about 24 MiB) to ask whether it runs in a
    # notebook, and a half-imported IPython breaks matplotlib's figures in the main thread. A script
    # started with `python` is in no notebook: mark IPython absent (None in sys.modules is "not
    # installed" to every import; matplotlib and tqdm read it so). Inside IPython it is already there.
    sys.modules.setdefault("IPython", None)
    from clearml import Task

    # Requirements come from requirements.txt, not from ClearML scanning (and importing) every
    # package the repository mentions: a numpy-only run must not pull torch into its memory.
    Task.force_requirements_env_freeze(requirements_file=str(REPO_ROOT / "requirements.txt"))
    if mode == "offline":
        Task.set_offline(True)
        Task._report_subprocess_enabled = False  # else close() waits ~11 s for the reporter process
    task = Task.init(
        project_name=project,
        task_name=task_name,
        reuse_last_task_id=False,
        auto_connect_frameworks=False,
        auto_connect_arg_parser=False,
        auto_resource_monitoring=mode == "online",
    )
    # Let the repository scan finish now, not inside a measured training step.
    wait = getattr(task, "_wait_for_repo_detection", None)
    if wait is not None:
        wait(timeout=30)
    task.connect(config, name="Args")
    if queue:
        # Enqueue this task for a clearml-agent and exit here; on the agent the call is a no-op.
        task.execute_remotely(queue_name=queue, exit_process=True)
    return task


# The run folder --------------------------------------------------------------------------------


class RunLogger:
    """The run folder (config.json, metrics.jsonl, summary.json, plots) and its ClearML mirror.

    `config` is the script's Args dataclass (preferred: --out, --resume, --clearml, --clearml-queue
    and RESUME_SAFE are read from it) or a plain dict with those given as keywords.
    """

    def __init__(
        self,
        experiment: str,
        name: str,
        config,
        out: str | None = None,
        clearml: str = "auto",
        clearml_queue: str | None = None,
        resume: bool = False,
        resume_safe=(),
        extends=(),
    ):
        if dataclasses.is_dataclass(config):
            args = config
            out, clearml, clearml_queue, resume = args.out, args.clearml, args.clearml_queue, args.resume
            resume_safe = set(resume_safe) | set(getattr(args, "RESUME_SAFE", ()))
            extends = set(getattr(args, "EXTENDS", ()))
            report_only = set(getattr(args, "REPORT_ONLY", ()))
            self.reporting = any(getattr(args, k) for k in report_only)
            config = {k: v for k, v in dataclasses.asdict(args).items() if k not in report_only}
            defaults = {
                f.name: f.default for f in dataclasses.fields(args) if f.default is not dataclasses.MISSING
            }
        else:
            self.reporting, report_only, defaults = False, set(), {}
            extends = set(extends)
        self._extends = extends
        # a flag added after a run was made is no change on --resume while it keeps its default
        self._defaults = _plain(defaults)
        self._report_only = report_only  # not compared on --resume, even where an older config.json has them
        if clearml not in CLEARML_MODES:
            raise UserError(f"--clearml must be one of {', '.join(CLEARML_MODES)} (got {clearml!r})")
        self.resumed = bool(resume)
        self.task = None
        self._kept = self.resumed
        self._metrics = None
        self._lock_file = self._lock_path = None
        self.run_dir, self._created = self._open_folder(experiment, name, out, resume)
        try:
            self.finished = (self.run_dir / "summary.json").exists()
            if resume:
                self._check_resume(_plain(config), ALWAYS_RESUME_SAFE | set(resume_safe))
            self._write_config(experiment, config)
            self._t0 = time.time()
            self._metrics = open(self.run_dir / "metrics.jsonl", "a")
            if resume:
                self.rewind(math.inf)  # damaged lines (a crash mid-write, garbage) are dropped with a note
            self.task = start_clearml(clearml, clearml_queue, experiment, self.run_dir.name, config)
        except BaseException:
            self._abandon()
            raise

    # set-up

    def _open_folder(self, experiment: str, name: str, out: str | None, resume: bool) -> tuple[Path, bool]:
        """Create the folder (exclusively) or find it, then hold its lock: (folder, created here).

        Two processes starting on one fresh folder: one creates it, whichever locks it first runs, the
        other gets one line. A folder removed by its creator while we waited is created again."""
        for _ in range(5):
            run_dir, created = self._make_folder(experiment, name, out, resume)
            if self._lock(run_dir):
                if not resume and _holds_run(run_dir):  # another process finished a run here meanwhile
                    self._release()
                    raise UserError(f"{run_dir} already holds a run; choose another --out or add --resume")
                return run_dir, created
        raise UserError(f"{run_dir} keeps disappearing (removed by another process); try again")

    @staticmethod
    def _make_folder(experiment: str, name: str, out: str | None, resume: bool) -> tuple[Path, bool]:
        run_dir = Path(out) if out else REPO_ROOT / "runs" / experiment / name
        if resume:
            if not out:
                raise UserError("--resume needs --out, the folder of the run to continue")
            if not (run_dir / "config.json").is_file():
                raise UserError(f"--resume: {run_dir} holds no run (no config.json); nothing to continue")
            return run_dir, False
        try:
            run_dir.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write to the output folder {run_dir}: {e.strerror}") from None
        while True:
            try:
                run_dir.mkdir()  # exclusive: exactly one process creates it
                return run_dir, True
            except FileExistsError:
                if not run_dir.is_dir():
                    raise UserError(f"--out {run_dir} exists and is not a folder") from None
                if not _holds_run(run_dir):
                    return run_dir, False  # an empty folder: used, not created (never removed by us)
                if out:
                    raise UserError(
                        f"{run_dir} already holds a run; choose another --out or add --resume"
                    ) from None
                run_dir = run_dir.with_name(f"{name}-{os.getpid()}")  # same second, same name
            except OSError as e:
                raise UserError(f"cannot write to the output folder {run_dir}: {e.strerror}") from None

    def _lock(self, run_dir: Path) -> bool:
        """Hold an exclusive lock on the folder for the life of the run (children inherit it).

        False when the folder (or its lock file) vanished before the lock was held: try again."""
        path = run_dir / LOCK
        try:
            handle = open(path, "a+")
        except FileNotFoundError:
            return False
        except OSError as e:
            raise UserError(f"cannot write to the output folder {run_dir}: {e.strerror}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            by = f" (pid {holder})" if holder.isdigit() else ""
            raise UserError(
                f"{run_dir} is in use by another process{by}; wait for it or choose another --out"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its holder removed it as we opened it: the lock guards nothing
            handle.close()
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_file, self._lock_path = handle, path
        return True

    def _check_resume(self, config: dict, safe: set) -> None:
        stored = read_json(self.run_dir / "config.json").get("args", {})
        stored = {k: v for k, v in stored.items() if k not in self._report_only}
        keys = list(config) + [k for k in stored if k not in config]  # in the order of the Args fields
        stored = {k: stored.get(k, self._defaults.get(k)) for k in keys}
        changed = [k for k in keys if stored[k] != config.get(k)]
        refused = [k for k in changed if k not in safe]
        if refused:
            flags = ", ".join(f"--{k.replace('_', '-')} {stored[k]} -> {config.get(k)}" for k in refused)
            raise UserError(
                f"--resume: {self.run_dir} was run with other training flags ({flags}); "
                "restore them or start a new --out"
            )
        if self.finished and not self.reporting:
            self._check_extension(stored, config)

    def _check_extension(self, stored: dict, config: dict) -> None:
        """A finished run reopens only to grow (more epochs, steps, seeds); flags that change speed
        alone, or fewer than were done, are refused: the finished run is left as it is."""
        grown = []
        for k in sorted(self._extends):
            old, new = stored.get(k), config.get(k)
            if old == new:
                continue
            if isinstance(old, (list, str)) and isinstance(new, (list, str)):  # str: --variants a,b
                was, now = ({*v.split(",")} if isinstance(v, str) else {*v} for v in (old, new))
                smaller, bigger = not was <= now, now > was
            elif isinstance(old, (int, float)) and isinstance(new, (int, float)):
                smaller, bigger = new < old, new > old
            else:
                smaller, bigger = True, False
            if smaller:
                raise UserError(
                    f"--resume: {self.run_dir} holds a finished run with --{k.replace('_', '-')} {old}; "
                    f"{new} would drop work already done (a finished run is only extended)"
                )
            grown += [k] if bigger else []
        if not grown:
            more = ", ".join("--" + k.replace("_", "-") for k in sorted(self._extends))
            raise UserError(
                f"--resume: {self.run_dir} holds a finished run (summary.json); nothing to resume"
                + (f" (to extend it, raise {more})" if more else "")
            )

    def _write_config(self, experiment: str, config: dict) -> None:
        path = self.run_dir / "config.json"
        if self.resumed:
            stored = read_json(path)
            stored.setdefault("resumes", []).append(
                {"time": datetime.now().isoformat(timespec="seconds"), "git_commit": _git_commit()}
            )
            stored["args"] = config
            write_json(path, stored)
            return
        write_json(
            path,
            {
                "experiment": experiment,
                "run_name": self.run_dir.name,
                "args": config,
                "started": datetime.now().isoformat(timespec="seconds"),
                "git_commit": _git_commit(),
                "python": platform.python_version(),
                "host": platform.node(),
                "versions": _versions(),
            },
        )

    # during the run

    def path(self, name: str) -> Path:
        return self.run_dir / name

    def keep(self) -> None:
        """The folder now holds work worth keeping (a checkpoint, results): never removed on failure."""
        self._kept = True

    def rewind(self, step: int) -> None:
        """Drop metrics rows logged after `step` (the checkpoint's), and any damaged line (a note)."""
        self._metrics.close()
        path = self.run_dir / "metrics.jsonl"
        kept, last_time = [], 0.0
        for row, line in zip(*read_jsonl(path)):
            if _number(row.get("step", 0)) <= step:
                kept.append(line)
                last_time = max(last_time, _number(row.get("time", 0.0)))
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
        self._metrics = open(path, "a")
        self._t0 = time.time() - last_time  # the time column continues where the kept rows stop

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, "time": round(time.time() - self._t0, 3)}
        row.update({k: float(v) for k, v in metrics.items()})
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        if self.task is not None:
            for key, value in metrics.items():
                title, _, series = key.partition("/")
                self.task.get_logger().report_scalar(title, series or title, float(value), iteration=step)

    def save_figure(self, name: str, fig) -> Path:
        import matplotlib.pyplot as plt

        path = self.run_dir / f"{name}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        if self.task is not None:
            self.task.get_logger().report_matplotlib_figure(
                name, name, figure=fig, iteration=0, report_image=True
            )
        plt.close(fig)
        return path

    def write_summary(self, summary: dict) -> None:
        write_json(self.run_dir / "summary.json", summary)
        self.keep()
        self.finished = True
        if self.task is not None:
            for key, value in summary.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.task.get_logger().report_single_value(key, float(value))

    # the end

    def _close_clearml(self) -> None:
        if self.task is None:
            return
        offline_folder = self.task.get_offline_mode_folder() if self.task.is_offline() else None
        self.task.close()
        self.task = None
        if offline_folder:
            print(
                f"ClearML offline session: {offline_folder}.zip "
                "(upload later with Task.import_offline_session)",
                file=sys.stderr,
            )

    def _release(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._lock_file is not None:
            # removed while still held: a process that opened the old file finds it gone and retries
            self._lock_path.unlink(missing_ok=True)
            self._lock_file.close()  # releases the flock
            self._lock_file = None

    def _abandon(self, say: bool = False) -> None:
        """Failed before anything worth keeping: remove what this logger made, only while it holds the
        lock; a folder it created goes, one it found empty is emptied again (so the same --out works)."""
        if not self._kept and self._lock_file is not None and not self.resumed:
            if self._metrics is not None:
                self._metrics.close()
                self._metrics = None
            if self._created:
                shutil.rmtree(self.run_dir, ignore_errors=True)  # under the lock: no one else is in it
                self._lock_file.close()
                self._lock_file = None
            else:
                for entry in self.run_dir.iterdir():  # it held nothing but the lock when we took it
                    if entry.name != LOCK:
                        shutil.rmtree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)
            if say:
                what = self.run_dir if self._created else f"what it wrote in {self.run_dir}"
                print(f"removed {what}: the run stopped before it saved anything", file=sys.stderr)
        self._release()

    def close(self, announce: bool = True) -> None:
        self._close_clearml()
        self._release()
        if announce:
            print(f"run folder: {self.run_dir}", file=sys.stderr)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and not self._kept and not self.resumed:
            self._close_clearml()
            self._abandon(say=not issubclass(exc_type, (UserError, MemoryError)))  # an error stays one line
        else:
            self.close(announce=exc_type is None)  # a failed run's error stays the one line it prints
