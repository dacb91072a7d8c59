"""The shared run logger and command line: files, no overwrites, ClearML offline, bad flags."""

import json
import subprocess
import sys
import textwrap
import time
import zipfile
from dataclasses import dataclass, field
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from common import RunLogger, UserError, parse_args, run_name  # noqa: E402
from common.cli import REPO_ROOT  # noqa: E402


@pytest.fixture(autouse=True)
def no_clearml_server(tmp_path, monkeypatch):
    """Make `auto` deterministic (no server) and keep ClearML's offline cache inside tmp_path."""
    monkeypatch.setenv("CLEARML_CONFIG_FILE", str(tmp_path / "absent-clearml.conf"))
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(tmp_path / "clearml-cache"))
    for var in ("CLEARML_API_ACCESS_KEY", "CLEARML_API_SECRET_KEY", "CLEARML_AUTH_TOKEN", "CLEARML_API_HOST"):
        monkeypatch.delenv(var, raising=False)


def test_run_folder_files(tmp_path):
    out = tmp_path / "run"
    log = RunLogger("demo", "r", {"lr": 0.1, "depth": 4}, out=str(out), clearml="off")
    log.log(0, {"train/loss": 2.5, "test/accuracy": 0.1})
    log.log(10, {"train/loss": 1.25})
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    log.save_figure("curve", fig)
    log.write_summary({"test_accuracy": 0.97, "model": "revnet"})
    log.close()

    config = json.loads((out / "config.json").read_text())
    assert config["args"] == {"lr": 0.1, "depth": 4}
    assert config["experiment"] == "demo"
    assert "numpy" in config["versions"] and config["python"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 10]
    assert rows[0]["train/loss"] == 2.5 and rows[0]["test/accuracy"] == 0.1
    assert rows[1]["train/loss"] == 1.25 and "test/accuracy" not in rows[1]
    assert json.loads((out / "summary.json").read_text()) == {"test_accuracy": 0.97, "model": "revnet"}
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp"))


def test_existing_run_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    log = RunLogger("demo", "r", {"a": 1}, out=str(out), clearml="off")
    log.write_summary({"x": 1})
    log.close()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match="already holds a run"):
        RunLogger("demo", "r", {"a": 2}, out=str(out), clearml="off")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resume_appends_and_keeps_config(tmp_path):
    out = tmp_path / "run"
    with RunLogger("demo", "r", {"a": 1}, out=str(out), clearml="off") as log:
        log.log(0, {"train/loss": 1.0})
    with RunLogger("demo", "r", {"a": 999}, out=str(out), clearml="off", resume=True) as log:
        log.log(1, {"train/loss": 0.5})
    assert json.loads((out / "config.json").read_text())["args"] == {"a": 1}
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_default_run_folder_gets_a_fresh_name(tmp_path, monkeypatch):
    monkeypatch.setattr("common.runlog.REPO_ROOT", tmp_path)
    name = run_name("revnet", 3)
    assert name.startswith("revnet_seed3_")
    first = RunLogger("demo", name, {}, clearml="off")
    first.write_summary({"n": 1})
    first.close()
    second = RunLogger("demo", name, {}, clearml="off")
    second.close()
    assert first.run_dir.parent == tmp_path / "runs" / "demo"
    assert second.run_dir != first.run_dir
    assert json.loads((first.run_dir / "summary.json").read_text()) == {"n": 1}


def test_unwritable_output_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot write to the output folder"):
        RunLogger("demo", "r", {}, out=str(blocker / "run"), clearml="off")


def test_bad_clearml_modes(tmp_path):
    with pytest.raises(UserError, match="--clearml must be one of"):
        RunLogger("demo", "r", {}, out=str(tmp_path / "a"), clearml="sometimes")
    with pytest.raises(UserError, match="needs a ClearML server"):
        RunLogger("demo", "r", {}, out=str(tmp_path / "b"), clearml="online")
    with pytest.raises(UserError, match="needs a configured ClearML server"):
        RunLogger("demo", "r", {}, out=str(tmp_path / "c"), clearml="auto", clearml_queue="gpu")
    assert not any((tmp_path / d).exists() for d in "abc")


def test_clearml_offline_session_zip_without_server(tmp_path):
    """auto with no server -> offline; the zip holds the scalars; close() skips the ~11 s wait."""
    log = RunLogger("demo", "offline-run", {"lr": 0.5}, out=str(tmp_path / "run"), clearml="auto")
    assert log.task is not None and log.task.is_offline()
    folder = log.task.get_offline_mode_folder()
    for step, loss in enumerate([3.0, 2.0, 1.5]):
        log.log(step, {"train/loss": loss})
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    log.save_figure("curve", fig)
    start = time.perf_counter()
    log.close()
    close_seconds = time.perf_counter() - start
    assert close_seconds < 5, f"close waited {close_seconds:.1f} s (reporting subprocess not disabled?)"

    with zipfile.ZipFile(f"{folder}.zip") as zf:
        events = json.loads(zf.read("metrics.jsonl"))
        task = json.loads(zf.read("task.json"))
    scalars = [
        (e["iter"], e["metric"], e["variant"], e["value"])
        for e in events
        if e["type"] == "training_stats_scalar"
    ]
    assert scalars == [(0, "train", "loss", 3.0), (1, "train", "loss", 2.0), (2, "train", "loss", 1.5)]
    assert task["name"] == "run"
    assert str(folder).startswith(str(tmp_path))


@dataclass
class DemoArgs:
    lr: float = 0.01  # learning rate
    depth: int = 4  # number of blocks
    model: Literal["revnet", "resnet"] = "revnet"  # which network
    depths: list[int] = field(default_factory=lambda: [2, 4])  # depths to sweep
    compile: bool = False  # compile the model
    out: str | None = None  # run folder


def check_demo(args):
    if args.lr <= 0:
        raise ValueError(f"--lr must be > 0 (got {args.lr})")


def test_parse_args_types_and_defaults():
    argv = ["--lr", "0.5", "--depths", "1", "8", "--compile", "--model", "resnet"]
    args = parse_args(DemoArgs, argv, check_demo)
    assert args == DemoArgs(lr=0.5, depth=4, model="resnet", depths=[1, 8], compile=True, out=None)
    assert parse_args(DemoArgs, []) == DemoArgs()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "-1"], "--lr must be > 0 (got -1.0)"),
        (["--model", "vgg"], "invalid choice: 'vgg'"),
        (["--depth", "two"], "invalid int value: 'two'"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_flags_exit_2_with_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(DemoArgs, argv, check_demo)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_script_help_and_user_error_in_subprocess(tmp_path):
    """Field comments become --help text; a UserError is one line on stderr, exit 1, no traceback."""
    script = tmp_path / "demo.py"
    script.write_text(
        textwrap.dedent('''
        """Demo entry script."""
        from dataclasses import dataclass
        from common import UserError, parse_args, run_main

        @dataclass
        class Args:
            data_dir: str = "nowhere"  # where the data lives

        def main():
            args = parse_args(Args, description=__doc__)
            raise UserError(f"no data in {args.data_dir}")

        if __name__ == "__main__":
            run_main(main)
    ''')
    )
    helped = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert "where the data lives (default: nowhere)" in helped.stdout
    failed = subprocess.run(
        [sys.executable, str(script), "--data-dir", "/x"], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert failed.returncode == 1
    assert failed.stderr.strip() == "error: no data in /x"
