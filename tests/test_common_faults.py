"""The shared file rule, run-folder race, ClearML fallback and memory errors, unit by unit (fast).

tests/test_faults.py runs the same faults against every entry script end to end."""

import json
import multiprocessing as mp
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import http_stand_in, socket_stand_in

from common import RunArgs, RunLogger, UserError, load_npz, load_torch, read_json, read_jsonl, save_torch
from common.cli import check_fits, run_main
from common.runlog import LOCK, _clearml_mode, server_problem


def damage_member(path: Path, nbytes: int = 4096) -> str:
    """Overwrite bytes inside the largest member's data, leaving the zip structure intact: the name."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    n = min(nbytes, info.compress_size)
    data[start : start + n] = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return info.filename


# ---------------------------------------------------------------- files


def test_a_torch_file_with_garbage_in_a_tensor_is_damaged_though_torch_loads_it(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_torch({"w": torch.ones(4096), "step": 3}, path)
    member = damage_member(path)
    assert not torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(4096))  # torch: no check
    with pytest.raises(UserError, match=rf"^{path} is damaged \(checksum mismatch in {member}\)$"):
        load_torch(path)


def test_nan_weights_are_named_and_plain_infinite_numbers_are_bookkeeping(tmp_path):
    path = tmp_path / "model.pt"
    inv = torch.eye(3).repeat(4, 1, 1)
    inv[2, 1, 1] = float("nan")
    save_torch({"mean": torch.zeros(4, 3), "stats": {"inv_covariance": inv}, "best": float("inf")}, path)
    with pytest.raises(UserError, match=rf"^{path} is damaged: stats/inv_covariance holds NaN"):
        load_torch(path)
    save_torch({"w": torch.ones(2), "best_val": float("inf"), "rng": torch.zeros(4, dtype=torch.uint8)}, path)
    assert load_torch(path)["best_val"] == float("inf")


def test_a_folder_where_a_file_is_expected_says_so(tmp_path):
    for load in (load_torch, read_json, load_npz):
        with pytest.raises(UserError, match=rf"^{tmp_path} is a folder; a file is expected here$"):
            load(tmp_path)
    with pytest.raises(UserError, match=r"^--weights .* is a folder"):
        load_torch(tmp_path, what="--weights")
    with pytest.raises(UserError, match=r"nothing\.pt: no such file$"):
        load_torch(tmp_path / "nothing.pt")


class Payload:
    pass


def test_pickled_objects_are_refused_with_torchs_reason_and_garbage_is_damaged(tmp_path):
    pickled = tmp_path / "pickled.pt"
    torch.save({"obj": Payload()}, pickled)
    with pytest.raises(UserError) as refused:
        load_torch(pickled)
    assert f"{pickled} holds pickled Python objects, refused by weights-only loading" in str(refused.value)
    assert "Payload" in str(refused.value) and "\n" not in str(refused.value)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x02garbage" * 50)
    with pytest.raises(UserError, match=f"^{garbage} is damaged or not a torch checkpoint"):
        load_torch(garbage)


def test_npz_damage_and_nan_are_one_line(tmp_path):
    path = tmp_path / "checkpoint.npz"
    np.savez(path, w=np.ones(5000), meta=np.array("{}"))
    assert load_npz(path)["w"].sum() == 5000
    damage_member(path)
    with pytest.raises(UserError, match=rf"^{path} is damaged \(checksum mismatch in w.npy\)$"):
        load_npz(path)
    np.savez(path, w=np.array([1.0, np.inf]))
    with pytest.raises(UserError, match="w holds NaN or infinite values"):
        load_npz(path)


@pytest.mark.parametrize(
    "tail",
    [b"\xff\xfe\x00 garbage \x9c", b'{"step": 3, "train/lo', b"[1, 2]", b"\xc3\x28 not utf-8"],
    ids=["garbage", "truncated-json", "not-a-row", "invalid-utf8"],
)
def test_a_damaged_metrics_line_is_dropped_with_one_note(tmp_path, capsys, tail):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "x": 1.0}\n{"step": 2, "x": 2.0}\n' + tail)
    rows, lines = read_jsonl(path)
    assert [r["step"] for r in rows] == [1, 2] and json.loads(lines[1]) == rows[1]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"note: {path}: dropped 1 damaged line(s)"]


# ---------------------------------------------------------------- ClearML


@dataclass
class Args(RunArgs):
    epochs: int = 1  # passes


def login_token(token) -> bytes:
    return json.dumps({"meta": {"result_code": 200}, "data": {"token": token}}).encode()


@pytest.mark.parametrize(
    "server, expected",
    [
        (lambda: http_stand_in(), "answered HTTP 501"),  # a plain web server (python -m http.server)
        (lambda: http_stand_in(502), "answered HTTP 502"),  # a proxy in front of a down server
        (lambda: http_stand_in(503), "answered HTTP 503"),
        (lambda: http_stand_in(404), "answered HTTP 404"),
        (lambda: http_stand_in(200, b"<html>welcome</html>"), "not as a ClearML server (not JSON)"),
        (lambda: http_stand_in(200, login_token(None), "application/json"), "no login token"),
        (lambda: socket_stand_in("reset"), "no ClearML server answers"),
        (lambda: socket_stand_in("silent"), "within 0.5 s"),
    ],
    ids=["plain-501", "proxy-502", "503", "404", "html-200", "json-no-token", "reset", "timeout"],
)
def test_anything_but_a_confirmed_login_is_offline_in_one_note(server, expected, monkeypatch, capsys):
    with server() as host:
        assert expected in server_problem(host, "A", "B", timeout=0.5)
        monkeypatch.setenv("CLEARML_API_HOST", host)
        monkeypatch.setenv("CLEARML_API_ACCESS_KEY", "A")
        monkeypatch.setenv("CLEARML_API_SECRET_KEY", "B")
        monkeypatch.setattr("common.runlog.SERVER_TIMEOUT_S", 0.5)
        monkeypatch.setattr(server_problem, "__defaults__", (0.5,))
        assert _clearml_mode("auto", None) == "offline"
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("note: ") and err[0].endswith("ClearML offline instead")
        with pytest.raises(UserError, match=f"{re.escape(expected)}.*; use --clearml offline or off"):
            _clearml_mode("online", None)


def test_tls_failure_and_a_confirmed_login():
    with http_stand_in() as host:
        problem = server_problem(host.replace("http://", "https://"), "A", "B", timeout=2)
        assert problem.startswith("no ClearML server answers at https://")
    with http_stand_in(200, login_token("t0k3n"), "application/json") as host:
        assert server_problem(host, "A", "B") is None


# ---------------------------------------------------------------- the run folder


def _start(out: str, barrier, fail: bool, queue) -> None:
    """One contender: open the run folder, then finish a run in it (or fail before keeping anything)."""
    barrier.wait()
    try:
        with RunLogger("demo", "r", Args(out=out, clearml="off")) as log:
            if fail:
                raise RuntimeError("stopped before its first checkpoint")
            log.log(0, {"train/loss": 1.0})
            log.write_summary({"pid": str(Path(out).name)})
        queue.put(("ok", ""))
    except UserError as e:
        queue.put(("refused", str(e)))
    except RuntimeError:
        queue.put(("failed", ""))


@pytest.mark.parametrize("fail_first", [False, True], ids=["two-runs", "one-gives-up"])
def test_simultaneous_starts_on_fresh_folders(tmp_path, fail_first):
    """Contenders start together on one fresh --out: one run finishes, each other gets one accurate
    line; a folder is removed only by its creator while it holds it, never under a running winner."""
    ctx = mp.get_context("fork")
    tally: dict[str, int] = {}
    for trial in range(int(os.environ.get("RACE_TRIALS", "4"))):
        out, queue = tmp_path / f"t{trial}" / "run", ctx.Queue()
        barrier = ctx.Barrier(3)
        procs = [
            ctx.Process(target=_start, args=(str(out), barrier, fail_first and i == 0, queue))
            for i in range(3)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        outcomes = [queue.get(timeout=5) for _ in procs]
        assert all(p.exitcode == 0 for p in procs), outcomes  # no crash
        ok = [o for o in outcomes if o[0] == "ok"]
        refused = [msg for kind, msg in outcomes if kind == "refused"]
        assert len(ok) <= 1, outcomes
        for msg in refused:
            assert "is in use by another process" in msg or "already holds a run" in msg, msg
            kind = "in use" if "in use" in msg else "already holds a run"
            tally[kind] = tally.get(kind, 0) + 1
        tally["finished"] = tally.get("finished", 0) + len(ok)
        if ok:
            assert (out / "summary.json").is_file() and not (out / LOCK).exists()  # not lost, no lock left
        else:  # the only runner gave up: it removed what it made, or left an empty folder for the next
            assert fail_first and (not out.exists() or not any(out.iterdir()))
    print(f"{trial + 1} trials of 3 contenders: {tally}, no crash, no folder lost")


def test_a_finished_folder_keeps_no_lock_and_an_emptied_one_is_reused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()  # made by the user: used, never removed
    with pytest.raises(RuntimeError), RunLogger("demo", "r", Args(out=str(out), clearml="off")):
        raise RuntimeError("failed before anything worth keeping")
    assert out.is_dir() and not any(out.iterdir())
    with RunLogger("demo", "r", Args(out=str(out), clearml="off")) as log:
        log.write_summary({"done": True})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.jsonl", "summary.json"]


def test_resume_drops_damaged_metrics_lines_with_a_note(tmp_path, capsys):
    out = tmp_path / "run"
    with RunLogger("demo", "r", Args(out=str(out), clearml="off")) as log:
        log.log(1, {"train/loss": 1.0})
        log.keep()
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b"\xff\xfe garbage\n" + b'{"step": 2, "tr')
    with RunLogger("demo", "r", Args(out=str(out), clearml="off", resume=True)) as log:
        log.log(2, {"train/loss": 0.5})
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert "dropped 2 damaged line(s)" in capsys.readouterr().err


# ---------------------------------------------------------------- memory


def test_out_of_memory_is_one_line(capsys):
    def allocate():
        raise MemoryError()

    def torch_allocate():
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory")

    for main in (allocate, torch_allocate):
        with pytest.raises(SystemExit) as stop:
            run_main(main)
        assert stop.value.code == 1
        assert capsys.readouterr().err.strip().splitlines() == [
            "error: out of memory; choose smaller sizes (width, batch, model or buffer)"
        ]
    with pytest.raises(RuntimeError, match="a bug"):  # any other error keeps its traceback
        run_main(lambda: (_ for _ in ()).throw(RuntimeError("a bug")))


def test_a_size_that_cannot_fit_is_refused_before_allocating():
    check_fits(1024, "a kibibyte")
    with pytest.raises(
        UserError, match=r"^--width 3000000 needs about [\d,.]+ GiB; [\d,.]+ GiB is available$"
    ):
        check_fits(2.0**60, "--width 3000000")
