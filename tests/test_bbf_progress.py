"""bbf_lunar/progress.py: the parent's progress lines, live metrics rows and log.txt (fast, no training)."""

import json
import sys
import time
from pathlib import Path

from conftest import REPO

sys.path.insert(0, str(REPO / "bbf_lunar"))
import progress as P  # noqa: E402


class Log:
    def __init__(self):
        self.rows = []

    def log(self, step, metrics):
        self.rows.append((step, metrics))


def spec(tmp_path, seeds=(0, 1), total=4000, name="bbf"):
    job_dir = tmp_path / f"{name}_seeds{seeds[0]}-{seeds[-1]}"
    job_dir.mkdir()
    run = {"total_steps": total, "checkpoint_every": 1000}
    return {"variant": name, "seeds": list(seeds), "job_dir": str(job_dir), "run": run}


def append(s, *rows, tail=""):
    with open(Path(s["job_dir"]) / "progress.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_clock():
    assert P.clock(0) == "0:00" and P.clock(61.4) == "1:01" and P.clock(3725) == "1:02:05"


def test_evaluations_and_losses_become_per_seed_rows_and_a_half_line_waits(tmp_path, capsys):
    s, log = spec(tmp_path), Log()
    monitor = P.Monitor([s], log, every_s=3600, bar=False)
    append(s, {"step": 0, "eval/return": [-100.0, -200.0]}, {"step": 40, "train/return": {"0": -50.0}})
    append(s, {"step": 1000, "train/loss": [0.5, 0.25], "train/n": 10}, tail='{"step": 2000, "eval/ret')
    monitor.poll()
    assert log.rows == [
        (0, {"eval/return_bbf_seed0": -100.0, "eval/return_bbf_seed1": -200.0}),
        (1000, {"train/loss_bbf_seed0": 0.5, "train/loss_bbf_seed1": 0.25}),
    ]
    assert monitor.jobs[0].step == 1000  # the half-written row is not read yet
    assert "bbf seeds 0-1: step 0/4,000, eval return per seed [-100, -200]" in capsys.readouterr().out
    with open(Path(s["job_dir"]) / "progress.jsonl", "a") as f:
        f.write('urn": [1.0, 2.0]}\n')
    monitor.poll()
    assert log.rows[-1] == (2000, {"eval/return_bbf_seed0": 1.0, "eval/return_bbf_seed1": 2.0})


def test_progress_line_has_elapsed_share_rate_and_eta(tmp_path):
    a, b = spec(tmp_path), spec(tmp_path, seeds=(2,), name="dqn")
    monitor = P.Monitor([a, b], Log(), every_s=3600, bar=False)
    assert "ETA unknown" in monitor.line(5.0)
    append(a, {"step": 1000, "train/loss": [1.0, 1.0]})  # 2 seeds x 1000 steps
    append(b, {"step": 2000, "train/loss": [1.0]})  # 1 seed x 2000 steps
    monitor.poll()
    line = monitor.line(100.0)  # 4,000 of 12,000 seed-steps in 100 s: 40 /s, 8,000 left: 200 s
    assert "1:40 elapsed" in line and "4,000 of 12,000 seed-steps (33%)" in line
    assert "40 seed-steps/s" in line and "ETA 3:20" in line and "bbf 0-1 at 1,000" in line


def test_a_resumed_job_counts_from_its_checkpoint_and_keeps_its_earlier_rows(tmp_path):
    s, log = spec(tmp_path, seeds=(3,)), Log()
    append(s, {"step": 0, "eval/return": [-1.0]}, {"step": 1000, "eval/return": [2.0]})
    append(s, {"step": 1000, "train/loss": [0.5]}, {"step": 1400, "train/return": {"3": 9.0}})
    (Path(s["job_dir"]) / "checkpoint.pt").write_bytes(b"")  # written at step 1000
    with P.Monitor([s], log, every_s=3600, bar=False) as monitor:
        job = monitor.jobs[0]
        assert (job.start, job.step) == (1000, 1000) and monitor.seed_steps() == (0, 3000)
        assert [step for step, _ in log.rows] == [0, 1000, 1000]  # not the row at 1400, past the checkpoint
        append(s, {"step": 2000, "eval/return": [5.0]})
    assert monitor.seed_steps() == (1000, 2000) and log.rows[-1] == (2000, {"eval/return_bbf_seed3": 5.0})


def test_lines_come_at_least_every_every_s_and_console_copies_them_to_log_txt(tmp_path, capsys):
    s = spec(tmp_path)
    with P.Console(tmp_path / "log.txt"):
        print("first line")
        with P.Monitor([s], Log(), every_s=0.05, bar=False):
            append(s, {"step": 1000, "train/loss": [1.0, 1.0]})
            time.sleep(0.5)
        print("error: x", file=sys.stderr)
    text = (tmp_path / "log.txt").read_text()
    assert "first line" in text and "error: x" in text
    lines = [line for line in text.splitlines() if line.startswith("progress: ")]
    assert len(lines) >= 3 and all("elapsed" in x and "seed-steps/s" in x and "ETA" in x for x in lines)
    assert capsys.readouterr().out.count("progress: ") == len(lines)


def test_a_terminal_gets_a_bar_and_log_txt_the_plain_lines(tmp_path):
    s = spec(tmp_path)
    with P.Console(tmp_path / "log.txt") as console:
        with P.Monitor([s], Log(), console, every_s=0.05, bar=True) as monitor:
            append(s, {"step": 2000, "train/loss": [1.0, 1.0]})
            time.sleep(0.3)
            assert monitor._tqdm.n == 4000 and monitor._tqdm.total == 8000
    text = (tmp_path / "log.txt").read_text()
    assert "progress: " in text and "seed-step/s" not in text  # no bar in the log
