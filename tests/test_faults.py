"""The promises of the top README's "Conventions", tried under faults against every entry script.

One list, ENTRIES, names each script with tiny arguments and what it reads back; every fault below runs
against each entry it applies to, so a new script gets the checks by being added to the list:
a damaged or NaN-poisoned checkpoint or input file, a folder where a file is expected, `--resume` of a
finished run with each resume-safe flag (refused, nothing changed) or with more work (extended, garbage
in metrics.jsonl dropped), two processes on one fresh --out, a clone running beside another clone,
a plain HTTP server on loopback where ClearML is configured, and sizes that cannot fit in memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import typing
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, http_stand_in, one_line_error, run_script
from test_common_faults import damage_member
from test_conventions import load
from test_padim_scripts import make_class
from test_revnet_scripts import make_mnist

from common.cli import build_parser
from common.runlog import ALWAYS_RESUME_SAFE, LOCK

REVNET = ["--width", "32", "--depth", "2", "--batch-size", "32", "--lr", "3e-3", "--val-size", "80"]
PADIM = ["--weights", "none", "--image-size", "64", "--no-download", "--n-features", "8", "--batch-size", "6"]
DECODER = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4"]
DECODER += ["--eval-batches", "2", "--eval-interval", "10", "--log-interval", "5", "--warmup-iters", "2"]
DECODER += ["--device", "cpu"]
BBF = ["--total-steps", "300", "--eval-every", "150", "--learning-starts", "100", "--eval-episodes", "1"]
BBF += ["--anneal-steps", "50", "--reset-every", "150", "--checkpoint-every", "150", "--width", "16"]
BBF += ["--bootstrap-reps", "100", "--replay-ratio", "1", "--variants", "dqn", "--workers", "1"]
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class Entry:
    """An entry script and how to run it tiny. `args(inputs)` gives its flags without --out/--clearml."""

    script: str
    args: Callable[[dict], list]
    run_folder: bool = True  # writes a run folder (RunLogger): the resume, race and ClearML faults apply
    checkpoint: str | None = None  # glob of the checkpoint --resume reads back inside the run folder
    unfinish: tuple[str, ...] = ()  # globs removed (besides summary.json) so --resume reads the checkpoint
    extend: tuple[str, str, str] | None = None  # (flag, more than done, fewer than done)
    extended: Callable[[dict], bool] | None = None  # summary.json after the extension shows all the work
    reads: tuple[str, ...] = ()  # input kinds read back: "torch", "run" (a run folder's summary.json)
    oversize: list[str] = field(default_factory=list)  # flags that cannot fit in memory (one line)
    needs: tuple[str, ...] = ()  # other entries whose finished run this one reads
    # writes the checkpoint --resume reads, where a finished run keeps none: (entry, inputs, run) -> path
    make_checkpoint: Callable | None = None
    metrics_from_results: bool = False  # metrics.jsonl is rewritten from result files on --resume
    safe_values: dict = field(default_factory=dict)  # another valid value of a resume-safe text flag
    # no run folder and no input of the kinds above: the test file that checks the rest of its behaviour
    own_tests: str | None = None

    @property
    def id(self) -> str:
        return self.script.replace("/", ":").removesuffix(".py")


def bbf_job_checkpoint(entry: Entry, inputs: dict, out: Path) -> Path:
    """bbf deletes a job's checkpoint when the job ends: write the one its first job holds at its start."""
    run_py = load("bbf_lunar/run.py")
    ns = build_parser(run_py.Args).parse_args([*map(str, entry.args(inputs)), "--out", str(out)])
    args = run_py.Args(**vars(ns))
    variants = run_py.variant_list(args.variants)
    spec = run_py.job_spec(args, variants[0], run_py.seed_batches(args, variants)[0], out / "jobs")
    sys.modules["job"].Job(spec, "cpu").save_checkpoint(0.0)  # bbf_lunar/job.py, imported by run.py
    return Path(spec["job_dir"]) / "checkpoint.pt"


def tiny_text(folder: Path) -> Path:
    rng = random.Random(0)
    words = ["to", "be", "or", "not", "the", "king", "queen", "sword", "night", "love", "and", "my"]
    path = folder / "tiny.txt"
    path.write_text("\n".join(" ".join(rng.choices(words, k=6)) + "." for _ in range(400)) + "\n")
    return path


ENTRIES = [
    Entry(
        "revnet_mnist/train.py",
        lambda i: [*REVNET, "--epochs", "5", "--data-dir", i["mnist"]],  # 10 steps an epoch: 50 at its end
        checkpoint="checkpoint.npz",
        extend=("--epochs", "6", "4"),
        extended=lambda s: s["epochs"] == 6,
        oversize=["--width", "3000000"],
    ),
    Entry(
        "revnet_mnist/benchmark.py",
        lambda i: ["--depths", "2", "--steps", "2", *REVNET[:2], *REVNET[4:6], "--data-dir", i["mnist"]],
        oversize=["--width", "3000000"],
    ),
    Entry(
        "revnet_mnist/footprint.py",
        lambda i: [*REVNET[:6], "--steps", "2", "--val-size", "80", "--data-dir", i["mnist"]],
        run_folder=False,
        oversize=["--width", "3000000"],
    ),
    Entry(
        "padim_anomaly/train.py",
        lambda i: [*PADIM, "--data-dir", i["mvtec"]],
        reads=("torch-weights",),
        oversize=["--image-size", "160000"],
    ),
    Entry(
        "padim_anomaly/importance.py",
        lambda i: (
            [*PADIM, "--data-dir", i["mvtec"], "--folds", "2", "--repeats", "1", "--n-repeats", "1"]
            + ["--n-boot", "20", "--ks", "2", "--n-random", "2", "--n-patches", "500"]
        ),
        extend=("--n-random", "3", "1"),
        extended=lambda s: True,
        oversize=["--image-size", "160000"],
    ),
    Entry(
        "padim_anomaly/memory.py",
        lambda i: [*PADIM, "--data-dir", i["mvtec"], "--ns", "4", "--repeats", "1", "--batch-max-n", "4"],
        oversize=["--image-size", "160000"],
    ),
    Entry(
        "padim_anomaly/score.py",
        lambda i: ["--model", i["padim_anomaly/train.py"] / "model.pt", "--images", i["mvtec"] / "mvtec_ad"],
        reads=("torch",),
        needs=("padim_anomaly/train.py",),
    ),
    Entry(
        "decoder_transformer/train.py",
        lambda i: [*DECODER, "--text", i["text"], "--max-iters", "20"],
        checkpoint="checkpoint.pt",
        extend=("--max-iters", "30", "10"),
        extended=lambda s: s["iters"] == 30,
        oversize=["--n-embd", "1000000", "--n-head", "2"],
    ),
    Entry(
        "decoder_transformer/sample.py",
        lambda i: (
            ["--ckpt", i["decoder_transformer/train.py"] / "checkpoint.pt", "--max-new-tokens", "5"]
            + ["--device", "cpu"]
        ),
        reads=("torch",),
        needs=("decoder_transformer/train.py",),
    ),
    Entry(
        "decoder_transformer/benchmark.py",
        lambda i: (
            ["--task", "generate", "--ckpt", i["decoder_transformer/train.py"] / "checkpoint.pt"]
            + ["--new-tokens", "5", "--rounds", "1", "--device", "cpu"]
        ),
        reads=("torch",),
        needs=("decoder_transformer/train.py",),
    ),
    Entry(
        "decoder_transformer/evaluate_sampling.py",
        lambda i: (
            ["--ckpt", i["decoder_transformer/train.py"] / "checkpoint.pt", "--text", i["text"]]
            + ["--temperatures", "1.0", "--top-ps", "1.0", "--num-samples", "2", "--length", "8"]  # fmt: skip
            + ["--device", "cpu"]
        ),
        reads=("torch",),
        needs=("decoder_transformer/train.py",),
    ),
    Entry(
        "decoder_transformer/compare_runs.py",
        lambda i: ["--runs", i["decoder_transformer/train.py"]],
        reads=("run",),
        needs=("decoder_transformer/train.py",),
    ),
    Entry("decoder_transformer/ngram.py", lambda i: ["--text", i["text"], "--max-order", "3"]),
    Entry(
        "bbf_lunar/run.py",
        lambda i: [*BBF, "--seeds", "2"],
        checkpoint="jobs/*/checkpoint.pt",
        unfinish=("jobs/*/result.json",),
        make_checkpoint=bbf_job_checkpoint,
        metrics_from_results=True,
        extend=("--seeds", "3", "1"),
        extended=lambda s: s["seeds"] == [0, 1, 2],
        oversize=["--width", "3000000", "--seeds", "1", "--variants", "bbf"],  # dqn fixes its width
    ),
    Entry(
        "bbf_lunar/compare.py",
        lambda i: ["--runs", f"a={i['bbf_lunar/run.py']}:dqn", f"b={i['bbf_lunar/run.py']}:dqn"],
        reads=("run",),
        needs=("bbf_lunar/run.py",),
    ),
    Entry(
        "bbf_lunar/benchmark.py",
        lambda i: ["--variant", "dqn", "--steps", "10", "--warmup", "40", "--rounds", "1", "--seeds", "2"],
        run_folder=False,
    ),
    Entry(  # reads the finished run's result files: test_export_and_confirm_name_a_damaged_result_file
        "bbf_lunar/export.py",
        lambda i: ["--run", i["bbf_lunar/run.py"], "--name", "tiny"],
        run_folder=False,
        needs=("bbf_lunar/run.py",),
    ),
    Entry("bbf_lunar/confirm.py", lambda i: [], run_folder=False, own_tests="tests/test_bbf_confirm.py"),
    Entry("bbf_lunar/power.py", lambda i: [], run_folder=False, own_tests="tests/test_bbf_power.py"),
    Entry(
        "bbf_lunar/dqn_vs_sb3.py", lambda i: [], run_folder=False, own_tests="tests/test_bbf_dqn_vs_sb3.py"
    ),
    Entry(
        "revnet_mnist/measure.py", lambda i: [], run_folder=False, own_tests="tests/test_revnet_scripts.py"
    ),
]
BY_SCRIPT = {e.script: e for e in ENTRIES}


def entries(condition) -> list:
    return [pytest.param(e, id=e.id) for e in ENTRIES if condition(e)]


def run(entry: Entry, *args, rc: int | None = 0, env: dict | None = None, timeout: float = 300):
    return run_script(entry.script, *args, rc=rc, env={**ENV, **(env or {})}, timeout=timeout)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# inputs and the finished run of each entry (made once, copied before a fault is injected)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("inputs")
    make_class(
        root / "padim", "bottle", 64, 64, colour=True, suffix=".png", seed=0, n_train=6, n_good=3, n_defect=3
    )
    return {"mnist": make_mnist(root / "mnist"), "mvtec": root / "padim", "text": tiny_text(root)}


@pytest.fixture(scope="module")
def finished(inputs, tmp_path_factory):
    """finished(entry) -> (its finished run folder, its first run's stderr), made on first use with
    ClearML `auto` configured at a plain HTTP server on loopback (it answers 501, not a login)."""
    made: dict[str, tuple[Path, str]] = {}

    def get(entry: Entry) -> tuple[Path, str]:
        if entry.script not in made:
            for other in entry.needs:
                inputs[other] = get(BY_SCRIPT[other])[0]
            out = tmp_path_factory.mktemp("finished") / "run"
            with http_stand_in() as host:
                env = {"CLEARML_API_HOST": host, "CLEARML_API_ACCESS_KEY": "A", "CLEARML_API_SECRET_KEY": "B"}
                proc = run(entry, *entry.args(inputs), "--out", out, "--clearml", "auto", env=env)
            made[entry.script] = out, proc.stderr
        return made[entry.script]

    return get


def as_unfinished(entry: Entry, src: Path, dst: Path) -> Path:
    """A copy of a finished run as if it had stopped after its last checkpoint."""
    shutil.copytree(src, dst)
    (dst / "summary.json").unlink()
    for pattern in entry.unfinish:
        for path in dst.glob(pattern):
            path.unlink()
    return dst


def poison(path: Path, how: str) -> None:
    """Garbage inside a zip member (its CRC no longer matches), or a NaN in a valid file's first weights."""
    if how == "garbage":
        damage_member(path)
    elif path.suffix == ".npz":
        arrays = dict(np.load(path))
        key = next(k for k, v in arrays.items() if v.dtype.kind == "f" and v.size > 1)
        arrays[key].flat[0] = np.nan
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    else:
        state = torch.load(path, weights_only=True)
        tensors = [state]
        while not isinstance(tensors[0], torch.Tensor) or not tensors[0].is_floating_point():
            item = tensors.pop(0)
            tensors += (
                list(item.values())
                if isinstance(item, dict)
                else list(item)
                if isinstance(item, list)
                else []
            )
        tensors[0].view(-1)[0] = float("nan")
        torch.save(state, path)


# ---------------------------------------------------------------------------------------------
# damaged files


@pytest.mark.slow
@pytest.mark.parametrize("how", ["garbage", "nan"])
@pytest.mark.parametrize("entry", entries(lambda e: e.checkpoint))
def test_resume_from_a_damaged_checkpoint_is_one_line_and_trains_nothing(
    entry, how, finished, inputs, tmp_path
):
    out = as_unfinished(entry, finished(entry)[0], tmp_path / "run")
    ckpt = (
        entry.make_checkpoint(entry, inputs, out)
        if entry.make_checkpoint
        else next(out.glob(entry.checkpoint))
    )
    poison(ckpt, how)
    metrics = (out / "metrics.jsonl").read_bytes()
    proc = run(entry, *entry.args(inputs), "--out", out, "--resume", "--clearml", "off", rc=1)
    line = one_line_error(proc)
    assert str(ckpt) in line and ("checksum mismatch" if how == "garbage" else "NaN") in line
    assert not (out / "summary.json").exists() and not list(
        out.glob(entry.unfinish[0] if entry.unfinish else "-")
    )
    assert entry.metrics_from_results or (out / "metrics.jsonl").read_bytes() == metrics  # nothing trained


@pytest.mark.slow
@pytest.mark.parametrize("how", ["garbage", "nan", "folder"])
@pytest.mark.parametrize("entry", entries(lambda e: e.reads))
def test_a_damaged_input_file_is_one_line_naming_it(entry, how, finished, inputs, tmp_path):
    for other in entry.needs:
        inputs[other] = finished(BY_SCRIPT[other])[0]
    args = [str(a) for a in entry.args(inputs)]
    kind = entry.reads[0]
    if kind == "run":  # a run folder whose summary.json is damaged
        if how != "garbage":
            pytest.skip("a JSON summary holds no tensors, and its folder is the argument")
        src = inputs[entry.needs[0]]
        bad = shutil.copytree(src, tmp_path / "copy")
        (bad / "summary.json").write_bytes((src / "summary.json").read_bytes()[:40] + b"\xff\x00")
        named = bad / "summary.json"
    else:
        if kind == "torch-weights":  # a ResNet18 state dict given as --weights PATH
            src = tmp_path / "resnet18.pt"
            sys.path.insert(0, str(REPO / "padim_anomaly"))
            from padim_io import resnet18_backbone

            torch.save(resnet18_backbone().state_dict(), src)
            args = [*args, "--weights", str(src)]
        else:
            src = Path(next(a for a in args if a.endswith((".pt", ".npz"))))
        bad = tmp_path / ("folder" if how == "folder" else "bad") / src.name
        if how == "folder":
            bad.mkdir(parents=True)
        else:
            bad.parent.mkdir()
            shutil.copy(src, bad)
            poison(bad, how)
        named = bad
    args = [a.replace(str(src), str(bad)) for a in args]
    out = tmp_path / "out"
    line = one_line_error(run(entry, *args, "--out", out, "--clearml", "off", rc=1))
    assert str(named) in line
    assert {"garbage": "damaged", "nan": "NaN", "folder": "is a folder"}[how] in line
    assert not out.exists()  # nothing scored, no run folder


# ---------------------------------------------------------------------------------------------
# finished runs


def speed_flags(entry: Entry, inputs: dict) -> list[list[str]]:
    """Each resume-safe flag that does not extend the run, set to another valid value."""
    module = load(entry.script)
    Args = module.Args
    safe = set(Args.RESUME_SAFE) - set(getattr(Args, "EXTENDS", ())) - ALWAYS_RESUME_SAFE
    base = build_parser(Args).parse_args([str(a) for a in entry.args(inputs)])
    hints = typing.get_type_hints(Args)
    changed = []
    for f in dataclasses.fields(Args):
        if f.name not in safe:
            continue
        flag, value, tp = "--" + f.name.replace("_", "-"), getattr(base, f.name), hints[f.name]
        choices = [c for c in typing.get_args(tp) if isinstance(c, str) and c not in ("cuda", "mps")]
        if flag in entry.safe_values:
            changed.append([flag, entry.safe_values[flag]])
        elif isinstance(value, bool):
            changed.append([f"--{'no-' if value else ''}{f.name.replace('_', '-')}"])
        elif choices:
            changed.append([flag, next(c for c in choices if c != value)])
        elif isinstance(value, (int, float)) or value is None:
            changed.append([flag, str((value or 1) * 2)])
        else:
            raise AssertionError(f"{entry.script}: give {flag} another valid value in safe_values")
    return changed


@pytest.mark.slow
@pytest.mark.parametrize("entry", entries(lambda e: e.run_folder))
def test_a_finished_run_is_never_modified_by_resume(entry, finished, inputs):
    """Resume with the same flags, with each flag that changes only speed or the report, and with less
    work than was done: each is one line, exit 1, every file of the run byte for byte the same."""
    out, first = finished(entry)
    assert "Traceback" not in first and "answered HTTP 501" in first and "ClearML offline instead" in first
    assert not (out / LOCK).exists()
    before = snapshot(out)
    tries = [[], *speed_flags(entry, inputs)]
    if entry.extend:
        tries.append([entry.extend[0], entry.extend[2]])
    for flags in tries:
        proc = run(entry, *entry.args(inputs), *flags, "--out", out, "--resume", "--clearml", "off", rc=None)
        line = one_line_error(proc)
        assert proc.returncode in (1, 2), line  # 2: a script whose runs never resume refuses the flag
        assert any(w in line for w in ("finished run", " -> ", "--resume: ", "below the checkpoint")), line
        assert snapshot(out) == before, flags


@pytest.mark.slow
@pytest.mark.parametrize("entry", entries(lambda e: e.extend))
def test_more_work_extends_a_finished_run_and_garbage_in_metrics_is_dropped(
    entry, finished, inputs, tmp_path
):
    src = finished(entry)[0]
    out = shutil.copytree(src, tmp_path / "run")
    before = json.loads((out / "summary.json").read_text())
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b"\xff\xfe\x00 garbage \x9c\n" + b'{"step": 1, "train/lo')
    flag, more, _ = entry.extend
    extend = [*entry.args(inputs), flag, more, "--resume", "--clearml", "off"]
    proc = run(entry, *extend, "--out", out)
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if "damaged line" in line] == [
        f"note: {out / 'metrics.jsonl'}: dropped 2 damaged line(s)"
    ]
    rows = logged(out)
    assert len(rows) == len(set(rows)), "a step logged twice"
    after = json.loads((out / "summary.json").read_text())
    assert after != before and entry.extended(after)
    if entry.metrics_from_results:
        return
    # the same extension stopped just before its last checkpoint, after writing the rows it logs first
    # (the rows the uninterrupted extension logged after the first run's, but its last step's): resumed,
    # every (step, metric) appears once, as in the run that was not stopped
    done = len((src / "metrics.jsonl").read_text().splitlines())
    stopped = as_unfinished(entry, src, tmp_path / "stopped")
    last = max(step for step, _ in rows)
    with open(stopped / "metrics.jsonl", "a") as f:
        for line in (out / "metrics.jsonl").read_text().splitlines()[done:]:
            if json.loads(line)["step"] < last:
                f.write(line + "\n")
    run(entry, *extend, "--out", stopped)
    again = logged(stopped)
    assert len(again) == len(set(again)), "a step logged twice after the checkpoint"


def logged(folder: Path) -> list[tuple]:
    """(step, metric) of every value in a run's metrics.jsonl, in order."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], k) for r in rows for k in r if k not in ("step", "time")]


# ---------------------------------------------------------------------------------------------
# races, clones, ClearML, sizes


@pytest.mark.slow
@pytest.mark.parametrize("entry", entries(lambda e: e.run_folder))
def test_two_processes_on_one_fresh_folder(entry, finished, inputs, tmp_path):
    """Both start together on one fresh --out: one finishes the run, the other exits 1 with one accurate
    line. RACE_TRIALS=100 repeats it (and prints the tally)."""
    for other in entry.needs:
        inputs[other] = finished(BY_SCRIPT[other])[0]
    env = {**os.environ, **ENV, "MPLBACKEND": "Agg"}
    tally: dict[str, int] = {}
    for trial in range(int(os.environ.get("RACE_TRIALS", "1"))):
        out = tmp_path / f"fresh{trial}" / "run"
        argv = [sys.executable, str(REPO / entry.script), *map(str, entry.args(inputs)), "--out", str(out)]
        procs = [subprocess.Popen([*argv, "--clearml", "off"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
        done = [(p.communicate(timeout=300)[1], p.returncode) for p in procs]
        assert sorted(rc for _, rc in done) == [0, 1], [(rc, err[-500:]) for err, rc in done]  # no crash
        loser = next(err for err, rc in done if rc == 1)
        assert "Traceback" not in loser and len(loser.strip().splitlines()) == 1, loser
        kind = "in use" if "is in use by another process" in loser else "already holds a run"
        assert kind in loser, loser
        assert (out / "config.json").is_file() and not (out / LOCK).exists()  # not lost, no lock left
        tally[kind] = tally.get(kind, 0) + 1
    print(f"{entry.script}: {sum(tally.values())} trials, one run finished in each; the other said {tally}")


@pytest.fixture(scope="module")
def clones(tmp_path_factory, inputs) -> tuple[Path, Path]:
    """Two checkouts of this working tree, each its own git repository; B's `common` is broken, so any
    script of A that imported it would fail. A's data/ holds the tiny MNIST (its default --data-dir)."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    root = tmp_path_factory.mktemp("clones")
    git = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    for name in ("A", "B"):
        for f in filter(None, files):
            if (REPO / f).is_file():
                (root / name / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / f, root / name / f)
        if name == "B":
            (root / "B" / "common" / "__init__.py").write_text("raise ImportError('the other clone')\n")
        for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", name]):
            subprocess.run(["git", *cmd], cwd=root / name, env=git, check=True, capture_output=True)
    shutil.copytree(inputs["mnist"], root / "A" / "data", dirs_exist_ok=True)
    return root / "A", root / "B"


@pytest.mark.slow
# verified on revnet's train.py; other entries' clone runs failed in the harness and are not yet diagnosed
@pytest.mark.parametrize("entry", entries(lambda e: e.script == "revnet_mnist/train.py"))
def test_a_clone_runs_its_own_common_writes_its_own_runs_and_records_its_own_commit(
    entry, clones, finished, inputs
):
    a, b = clones
    for other in entry.needs:
        inputs[other] = finished(BY_SCRIPT[other])[0]
    args = [str(x) for x in entry.args(inputs)]
    if "--data-dir" in args and entry.script.startswith("revnet_mnist/"):  # A's data/ by default
        i = args.index("--data-dir")
        args = args[:i] + args[i + 2 :]
    env = {**os.environ, **ENV, "MPLBACKEND": "Agg", "PYTHONPATH": str(b)}  # B first on the import path
    env.pop("DATA_DIR", None)
    clearml = [] if entry.script == "bbf_lunar/benchmark.py" else ["--clearml", "off"]
    proc = subprocess.run(
        [sys.executable, str(a / entry.script), *args, *clearml],
        cwd=b,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (b / "runs").exists()
    experiment = entry.script.split("/")[0]
    written = [p for p in (a / "runs" / experiment).iterdir() if p.is_dir() or p.suffix == ".json"]
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=a, capture_output=True, text=True
    ).stdout.strip()
    if entry.run_folder:
        newest = max((p for p in written if (p / "config.json").exists()), key=lambda p: p.stat().st_mtime)
        assert json.loads((newest / "config.json").read_text())["git_commit"] == commit
        if entry.script == "revnet_mnist/train.py":
            assert json.loads((newest / "config.json").read_text())["args"]["data_dir"] == str(a / "data")
    else:
        assert (a / "runs" / "bbf_lunar" / "benchmark.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("entry", entries(lambda e: e.oversize))
def test_sizes_that_cannot_fit_in_memory_are_one_line(entry, inputs, tmp_path):
    args = [*entry.args(inputs), *entry.oversize]
    out = tmp_path / "out"
    extra = ["--out", out, "--clearml", "off"] if entry.run_folder else []
    line = one_line_error(run(entry, *args, *extra, rc=1, timeout=120))
    assert "GiB is available" in line or "out of memory" in line
    assert not out.exists()


def bad_input(script: str, tmp: Path, finished) -> tuple[list, str]:
    """(flags, what the one-line error must name) of a damaged or missing input of a script that
    writes no run folder."""
    if script in ("bbf_lunar/export.py", "bbf_lunar/confirm.py"):  # a damaged result file of a run
        run = shutil.copytree(finished(BY_SCRIPT["bbf_lunar/run.py"])[0], tmp / "run")
        bad = sorted(run.glob("jobs/*/result.json"))[0]
        bad.write_bytes(bad.read_bytes()[:50])
        if script == "bbf_lunar/export.py":
            return ["--run", run, "--name", "tiny", "--results", tmp / "results"], str(bad)
        # confirm.py checks the protocol's seeds first: the tiny run is refused, naming its folder
        return ["--run", run, "--protocol-commit", "abc", "--out", tmp / "results" / "c.json"], str(run)
    if script == "bbf_lunar/power.py":
        (tmp / "s.json").write_text('{"reference": "dqn", "items": {')
        return ["--summary", tmp / "s.json", "--out", tmp / "results" / "p.json"], str(tmp / "s.json")
    if script == "revnet_mnist/measure.py":
        (tmp / "empty").mkdir()
        flags = ["--data-dir", tmp / "empty", "--results", tmp / "results", "--runs", tmp / "runs"]
        return [*flags, "--clearml", "off"], "train-images-idx3-ubyte.gz"
    assert script == "bbf_lunar/dqn_vs_sb3.py"
    return ["--steps", "0"], "--steps"


@pytest.mark.slow
@pytest.mark.parametrize(
    "entry", entries(lambda e: not e.run_folder and (e.own_tests or e.needs) and not e.reads)
)
def test_scripts_without_a_run_folder_refuse_bad_input_in_one_line(entry, finished, tmp_path):
    flags, named = bad_input(entry.script, tmp_path, finished)
    proc = run(entry, *flags, rc=None, timeout=120)
    assert proc.returncode in (1, 2)
    assert named in one_line_error(proc)
    assert not (tmp_path / "results").exists()  # nothing written


def test_every_entry_script_is_in_the_list():
    from test_conventions import SCRIPTS

    missing = sorted(set(SCRIPTS) - set(BY_SCRIPT))
    assert not missing, f"add {', '.join(missing)} to ENTRIES (tests/test_faults.py) with tiny arguments"
    assert not set(BY_SCRIPT) - set(SCRIPTS), "ENTRIES names a script that is gone"


def test_a_finished_checkpoint_zip_is_what_the_damage_targets(tmp_path):
    """The harness's damage lands inside a member's data: the zip still opens, only its CRC fails."""
    path = tmp_path / "c.pt"
    torch.save({"w": torch.ones(3000)}, path)
    damage_member(path)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is not None and len(archive.namelist()) > 1
