"""One run folder per run, mirrored to ClearML.

    log = RunLogger("revnet_mnist", run_name("revnet", seed), asdict(args), out=args.out,
                    clearml=args.clearml, clearml_queue=args.clearml_queue)
    log.log(step, {"train/loss": 0.3})      # -> metrics.jsonl + ClearML scalar "train"/"loss"
    log.save_figure("curves", fig)          # -> curves.png + ClearML plot
    log.write_summary({"test_accuracy": 0.98})
    log.close()

ClearML modes: `off`; `offline` (writes ClearML's offline session zip, importable later with
`Task.import_offline_session`); `online` (needs a configured server); `auto` (online when a server
is configured, else offline). `--clearml-queue NAME` hands the run to a ClearML agent queue.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime
from importlib import metadata
from pathlib import Path

from common.cli import REPO_ROOT, UserError

CLEARML_MODES = ("auto", "offline", "online", "off")
_PACKAGES = ("numpy", "scipy", "torch", "torchvision", "scikit-learn", "gymnasium", "clearml", "matplotlib")


def run_name(tag: str, seed: int) -> str:
    return f"{tag}_seed{seed}_{datetime.now():%Y%m%d-%H%M%S}"


def write_json(path: Path, obj) -> None:
    """Atomic: a reader (or a crash) never sees half a file."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def clearml_server_configured() -> bool:
    """True when clearml.conf or CLEARML_API_* environment variables hold API credentials."""
    from clearml.backend_api.config import load
    from clearml.backend_api.session.defs import ENV_ACCESS_KEY, ENV_AUTH_TOKEN

    if ENV_ACCESS_KEY.get() or ENV_AUTH_TOKEN.get():
        return True
    return bool(load().get("api.credentials.access_key", None))


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class RunLogger:
    def __init__(
        self,
        experiment: str,
        name: str,
        config: dict,
        out: str | None = None,
        clearml: str = "auto",
        clearml_queue: str | None = None,
        resume: bool = False,
    ):
        if clearml not in CLEARML_MODES:
            raise UserError(f"--clearml must be one of {', '.join(CLEARML_MODES)} (got {clearml!r})")
        self.run_dir = Path(out) if out else REPO_ROOT / "runs" / experiment / name
        existing = self.run_dir.is_dir() and any(self.run_dir.iterdir())
        if existing and not resume:
            if out:
                raise UserError(
                    f"{self.run_dir} already holds a run; choose another --out (nothing was written)"
                )
            self.run_dir = self.run_dir.with_name(f"{name}-{os.getpid()}")  # same second, same name
        self.task = self._start_clearml(clearml, clearml_queue, experiment, self.run_dir.name, config)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / ".write_test"
            probe.touch()
            probe.unlink()
        except OSError as e:
            raise UserError(f"cannot write to the output folder {self.run_dir}: {e.strerror}") from None
        self._t0 = time.time()
        self._metrics = open(self.run_dir / "metrics.jsonl", "a")
        if not (self.run_dir / "config.json").exists():
            write_json(
                self.run_dir / "config.json",
                {
                    "experiment": experiment,
                    "run_name": self.run_dir.name,
                    "args": config,
                    "started": datetime.now().isoformat(timespec="seconds"),
                    "git_commit": _git_commit(),
                    "python": platform.python_version(),
                    "host": platform.node(),
                    "versions": self._versions(),
                },
            )

    @staticmethod
    def _versions() -> dict:
        found = {}
        for pkg in _PACKAGES:
            try:
                found[pkg] = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                pass
        return found

    @staticmethod
    def _start_clearml(mode, queue, project, task_name, config):
        if mode == "off":
            if queue:
                raise UserError(
                    "--clearml-queue needs a ClearML server; it cannot be used with --clearml off"
                )
            return None
        configured = clearml_server_configured()
        if mode == "online" and not configured:
            raise UserError(
                "--clearml online needs a ClearML server: run `clearml-init` or set "
                "CLEARML_API_HOST, CLEARML_API_ACCESS_KEY and CLEARML_API_SECRET_KEY "
                "(or use --clearml offline)"
            )
        offline = mode == "offline" or (mode == "auto" and not configured)
        if queue and offline:
            raise UserError("--clearml-queue needs a configured ClearML server (see `clearml-init`)")
        try:
            import IPython  # noqa: F401  clearml's repo-scan thread imports it lazily; a half-imported
        except ImportError:  # IPython then breaks matplotlib's figure creation in the main thread
            pass
        from clearml import Task

        if offline:
            Task.set_offline(True)
            Task._report_subprocess_enabled = False  # else close() waits ~11 s for the reporter process
        task = Task.init(
            project_name=project,
            task_name=task_name,
            reuse_last_task_id=False,
            auto_connect_frameworks=False,
            auto_connect_arg_parser=False,
            auto_resource_monitoring=not offline,
        )
        task.connect(config, name="Args")
        if queue:
            # Enqueue this task for a clearml-agent and exit here; on the agent the call is a no-op.
            task.execute_remotely(queue_name=queue, exit_process=True)
        return task

    def path(self, name: str) -> Path:
        return self.run_dir / name

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
        if self.task is not None:
            for key, value in summary.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.task.get_logger().report_single_value(key, float(value))

    def close(self) -> None:
        self._metrics.close()
        if self.task is not None:
            offline_folder = self.task.get_offline_mode_folder() if self.task.is_offline() else None
            self.task.close()
            self.task = None
            if offline_folder:
                print(
                    f"ClearML offline session: {offline_folder}.zip "
                    "(upload later with Task.import_offline_session)",
                    file=sys.stderr,
                )
        print(f"run folder: {self.run_dir}", file=sys.stderr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
