"""The shared run logger and command line: files, no overwrites, ClearML offline, bad flags."""

import http.server
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar, Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from common import (  # noqa: E402
    RunArgs,
    RunLogger,
    UserError,
    load_torch,
    parse_args,
    read_json,
    run_name,
    save_torch,
)
from common.cli import REPO_ROOT, field_help  # noqa: E402
from common.runlog import server_problem  # noqa: E402


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
        (["--lr", "0"], "--lr must be > 0 (got 0.0)"),
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
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}  # a script outside the checkout finds its common
    helped = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=REPO_ROOT, env=env
    )
    assert "where the data lives (default: nowhere)" in helped.stdout
    failed = subprocess.run(
        [sys.executable, str(script), "--data-dir", "/x"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
    )
    assert failed.returncode == 1
    assert failed.stderr.strip() == "error: no data in /x"


# --- the house convention: shared flags, validation, resume, cleanup, lock, ClearML fallback ---


@dataclass
class TrainArgs(RunArgs):
    lr: float = 1e-3  # learning rate
    epochs: int = 2  # passes over the data
    # the batch size, with its comment on the line above (ruff format moves long ones there)
    batch_size: int = 8
    preset: Literal["baby", "gpu"] = "baby"  # a comment the formatter wrapped inside parentheses
    shift: float = 0.0  # may be negative
    ratio: float | None = None  # optional; nan allowed
    threads: int = 1  # speed only

    RESUME_SAFE: ClassVar[frozenset[str]] = frozenset({"epochs", "threads"})
    EXTENDS: ClassVar[frozenset[str]] = frozenset({"epochs"})
    ALLOW_NEGATIVE: ClassVar[frozenset[str]] = frozenset({"shift"})
    ALLOW_NONFINITE: ClassVar[frozenset[str]] = frozenset({"ratio"})


def test_help_text_for_every_flag_including_moved_comments():
    helps = field_help(TrainArgs)
    for f in fields(TrainArgs):
        assert helps.get(f.name), f"--{f.name} has no help text"
    assert helps["batch_size"].startswith("the batch size, with its comment on the line above")
    assert helps["preset"] == "a comment the formatter wrapped inside parentheses"
    assert helps["seed"].startswith("seeds everything")  # from the base class


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "nan"], "--lr must be a finite number (got nan)"),
        (["--lr", "inf"], "--lr must be a finite number (got inf)"),
        (["--lr", "-0.1"], "--lr must be >= 0 (got -0.1)"),
        (["--seed", "-1"], "--seed must be >= 0 (got -1)"),
        (["--epochs", "-3"], "--epochs must be >= 0 (got -3)"),
    ],
)
def test_numbers_are_checked_up_front_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(TrainArgs, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_declared_exceptions_to_the_number_checks():
    args = parse_args(TrainArgs, ["--shift", "-2.5", "--ratio", "nan"])
    assert args.shift == -2.5 and math.isnan(args.ratio)


def train_args(tmp_path, **kw) -> TrainArgs:
    return TrainArgs(**{"out": str(tmp_path / "run"), "clearml": "off", **kw})


def finish_epoch(log, step):
    log.log(step, {"train/loss": 1.0 / (step + 1)})
    log.keep()


def test_resume_refuses_changed_training_flags_naming_them(tmp_path):
    with RunLogger("demo", "r", train_args(tmp_path)) as log:
        finish_epoch(log, 0)
    with pytest.raises(UserError, match=r"--lr 0.001 -> 0.01, --batch-size 8 -> 16"):
        RunLogger("demo", "r", train_args(tmp_path, lr=0.01, batch_size=16, resume=True))
    assert (tmp_path / "run" / "metrics.jsonl").exists()  # a refused resume leaves the run as it was


def test_resume_takes_a_flag_added_since_the_run_at_its_default_only(tmp_path):
    """A run made before a flag existed: resuming it at the flag's default is no change, another value is."""
    with RunLogger("demo", "r", train_args(tmp_path)) as log:
        finish_epoch(log, 0)
    path = tmp_path / "run" / "config.json"
    config = json.loads(path.read_text())
    del config["args"]["batch_size"]  # as an older version of the script wrote it
    path.write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"--batch-size 8 -> 16"):
        RunLogger("demo", "r", train_args(tmp_path, batch_size=16, resume=True))
    with RunLogger("demo", "r", train_args(tmp_path, epochs=5, resume=True)) as log:
        assert log.resumed


def test_resume_allows_safe_flags_and_rewinds_metrics(tmp_path):
    with RunLogger("demo", "r", train_args(tmp_path)) as log:
        for step in range(3):
            finish_epoch(log, step)
    (tmp_path / "run" / "metrics.jsonl").open("a").write('{"step": 3, "ti')  # killed mid-write
    with RunLogger("demo", "r", train_args(tmp_path, epochs=5, resume=True, clearml="offline")) as log:
        assert log.resumed and not log.finished
        log.rewind(1)  # the checkpoint holds step 1: steps 2 and the half row are dropped
        finish_epoch(log, 2)
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["args"]["epochs"] == 5 and len(config["resumes"]) == 1


def test_a_finished_run_is_not_rewritten(tmp_path):
    with RunLogger("demo", "r", train_args(tmp_path)) as log:
        log.write_summary({"accuracy": 0.9})
    before = (tmp_path / "run" / "summary.json").read_bytes()
    with pytest.raises(UserError, match="finished run .* raise --epochs"):
        RunLogger("demo", "r", train_args(tmp_path, resume=True))
    with pytest.raises(UserError, match="finished run .* raise --epochs"):  # speed alone: no reopening
        RunLogger("demo", "r", train_args(tmp_path, resume=True, threads=2))
    with pytest.raises(UserError, match="--epochs 2; 1 would drop work already done"):
        RunLogger("demo", "r", train_args(tmp_path, resume=True, epochs=1, threads=2))
    assert (tmp_path / "run" / "summary.json").read_bytes() == before
    with RunLogger("demo", "r", train_args(tmp_path, resume=True, epochs=3, threads=2)) as log:
        assert log.resumed and log.finished  # more epochs: the run is extended


@dataclass
class ListArgs(RunArgs):
    variants: str = "a,b"  # comma-separated

    RESUME_SAFE: ClassVar[frozenset[str]] = frozenset({"variants"})
    EXTENDS: ClassVar[frozenset[str]] = frozenset({"variants"})


def test_a_comma_separated_list_extends_a_finished_run_only_when_it_grows(tmp_path):
    def args(**kw):
        return ListArgs(**{"out": str(tmp_path / "run"), "clearml": "off", "resume": True, **kw})

    with RunLogger("demo", "r", args(resume=False)) as log:
        log.write_summary({"accuracy": 0.9})
    for same in ("a,b", "b,a"):
        with pytest.raises(UserError, match="nothing to resume"):
            RunLogger("demo", "r", args(variants=same))
    with pytest.raises(UserError, match="--variants a,b; a,c would drop work already done"):
        RunLogger("demo", "r", args(variants="a,c"))
    with RunLogger("demo", "r", args(variants="a,b,c")) as log:
        assert log.resumed and log.finished


def test_resume_needs_an_existing_run(tmp_path):
    with pytest.raises(UserError, match="holds no run"):
        RunLogger("demo", "r", train_args(tmp_path, resume=True))
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="--resume needs --out"):
        RunLogger("demo", "r", TrainArgs(resume=True, clearml="off"))


def test_a_run_that_fails_before_keeping_anything_removes_its_folder(tmp_path):
    with pytest.raises(RuntimeError), RunLogger("demo", "r", train_args(tmp_path)) as log:
        log.log(0, {"train/loss": 1.0})
        raise RuntimeError("diverged")
    assert not (tmp_path / "run").exists()
    with RunLogger("demo", "r", train_args(tmp_path)) as log:  # the same --out works again
        finish_epoch(log, 0)
    with pytest.raises(KeyboardInterrupt), RunLogger("demo", "r", train_args(tmp_path, resume=True)) as log:
        raise KeyboardInterrupt  # after a checkpoint the folder stays
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_folder_in_use_is_locked(tmp_path):
    with RunLogger("demo", "r", train_args(tmp_path)) as log:
        finish_epoch(log, 0)
        with pytest.raises(UserError, match=f"in use by another process \\(pid {os.getpid()}\\)"):
            RunLogger("demo", "r", train_args(tmp_path, resume=True, epochs=4))
    with RunLogger("demo", "r", train_args(tmp_path, resume=True, epochs=4)) as log:  # released
        finish_epoch(log, 1)


@pytest.fixture
def fake_server():
    """A local stand-in for a ClearML API server that refuses every credential (HTTP 401)."""

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("down", [True, False], ids=["server-down", "credentials-refused"])
def test_clearml_auto_falls_back_offline_and_online_fails(tmp_path, monkeypatch, capsys, fake_server, down):
    host = f"http://127.0.0.1:{free_port()}" if down else fake_server
    monkeypatch.setenv("CLEARML_API_HOST", host)
    monkeypatch.setenv("CLEARML_API_ACCESS_KEY", "A")
    monkeypatch.setenv("CLEARML_API_SECRET_KEY", "B")
    expected = (
        f"no ClearML server answers at {host} within 3 s"
        if down
        else f"the ClearML server at {host} refused the credentials (HTTP 401)"
    )
    assert server_problem(host, "A", "B").startswith(expected)
    start = time.perf_counter()
    with RunLogger("demo", "r", TrainArgs(out=str(tmp_path / "a"), clearml="auto")) as log:
        assert log.task is not None and log.task.is_offline()
        finish_epoch(log, 0)
    assert time.perf_counter() - start < 15
    assert ("no ClearML server answers" if down else "refused the credentials") in capsys.readouterr().err
    with pytest.raises(UserError, match="no ClearML server answers" if down else "refused the credentials"):
        RunLogger("demo", "r", TrainArgs(out=str(tmp_path / "b"), clearml="online"))
    assert not (tmp_path / "b").exists()


def test_clearml_starts_only_after_the_folder_is_checked(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match="cannot write"):
        RunLogger("demo", "r", TrainArgs(out=str(tmp_path / "file" / "run"), clearml="offline"))
    assert not list((tmp_path / "clearml-cache").rglob("offline-*"))  # no orphan offline session


def test_load_torch_refuses_pickled_objects_and_names_damaged_files(tmp_path):
    import torch

    good = tmp_path / "good.pt"
    save_torch({"w": torch.ones(2), "config": {"n": 3}, "names": ["a"]}, good)
    assert load_torch(good)["config"] == {"n": 3}
    evil = tmp_path / "evil.pt"
    torch.save({"obj": Path("x")}, evil)  # any non-plain object would be unpickled as code
    with pytest.raises(UserError, match=f"{evil} holds pickled Python objects"):
        load_torch(evil)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(good.read_bytes()[:40])
    with pytest.raises(UserError, match=f"{damaged} is damaged"):
        load_torch(damaged)
    with pytest.raises(UserError, match="no such file"):
        load_torch(tmp_path / "absent.pt")
    (tmp_path / "bad.json").write_text('{"a": ')
    with pytest.raises(UserError, match="bad.json is damaged"):
        read_json(tmp_path / "bad.json")


def test_load_torch_calls_garbage_damaged_not_pickled(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"garbage bytes here" * 10)
    with pytest.raises(UserError, match=f"{garbage} is damaged or not a torch checkpoint"):
        load_torch(garbage)


@dataclass
class ReportArgs(TrainArgs):
    summarize_only: bool = False  # re-read the results only

    REPORT_ONLY: ClassVar[frozenset[str]] = frozenset({"summarize_only"})


def test_report_only_flags_reopen_a_finished_run_any_number_of_times(tmp_path):
    def args(**kw):
        return ReportArgs(**{"out": str(tmp_path / "run"), "clearml": "off", **kw})

    with RunLogger("demo", "r", args()) as log:
        log.write_summary({"accuracy": 0.9})
    for _ in range(2):
        with RunLogger("demo", "r", args(resume=True, summarize_only=True)) as log:
            log.write_summary({"accuracy": 0.9, "again": True})
    assert "summarize_only" not in json.loads((tmp_path / "run" / "config.json").read_text())["args"]
    with pytest.raises(UserError, match="finished run"):
        RunLogger("demo", "r", args(resume=True))


def test_report_only_flags_stored_by_an_older_version_are_not_a_change(tmp_path):
    with RunLogger("demo", "r", ReportArgs(out=str(tmp_path / "run"), clearml="off")) as log:
        log.keep()
    path = tmp_path / "run" / "config.json"
    config = json.loads(path.read_text())
    config["args"]["summarize_only"] = False  # as config.json files written before REPORT_ONLY existed
    path.write_text(json.dumps(config))
    with RunLogger("demo", "r", ReportArgs(out=str(tmp_path / "run"), clearml="off", resume=True)) as log:
        assert log.resumed


def test_clearml_loads_no_ipython_and_figures_still_draw(tmp_path):
    """ClearML's repository scan would import IPython (about 24 MiB of every process) to look for a
    notebook; a script is in none. With ClearML offline, IPython stays unloaded and matplotlib draws."""
    script = tmp_path / "demo.py"
    script.write_text(
        textwrap.dedent("""
        import sys
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from common import RunLogger

        with RunLogger("demo", "r", {"lr": 0.5}, out=sys.argv[1], clearml="offline") as log:
            assert log.task is not None and log.task.is_offline()
            fig, ax = plt.subplots()
            ax.plot([0, 1], [1, 0])
            log.save_figure("curve", fig)
            loaded = sorted(m for m in sys.modules if m == "IPython" or m.startswith("IPython."))
            print("IPython modules:", [m for m in loaded if sys.modules[m] is not None])
    """)
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "IPython modules: []" in done.stdout
    assert (tmp_path / "run" / "curve.png").stat().st_size > 1000
