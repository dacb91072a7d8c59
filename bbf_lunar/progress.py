"""What a run.py run is doing while it trains: a console log in its folder, progress lines, live metrics.

The workers append to their job's `progress.jsonl` (evaluations, losses every 1000 steps, episode
ends); a thread of the parent follows those files and
- prints each evaluation as it lands and, at least every `every_s` seconds, one progress line (elapsed
  time, share of the seed-steps done, seed-steps/s, ETA): a tqdm bar on a terminal, plain lines
  otherwise (a log file);
- appends per-seed rows to `metrics.jsonl` (`eval/return_<variant>_seed<k>`, `train/loss_...`), so a
  killed run keeps what it had measured.
`Console` copies everything the parent prints into `log.txt` in the run folder.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from common import clock


class _Tee:
    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.file.write(text)
        self.file.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding: the console's
        return getattr(self.stream, name)


class Console:
    """Within `with Console(path):` stdout and stderr also go to `path` (appended; a header per start)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Console:
        self.file = open(self.path, "a")
        self.file.write(f"--- {datetime.now().isoformat(timespec='seconds')}: {' '.join(sys.argv)}\n")
        self.stdout, self.stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(self.stdout, self.file), _Tee(self.stderr, self.file)
        return self

    def __exit__(self, *exc) -> None:
        sys.stdout, sys.stderr = self.stdout, self.stderr
        self.file.close()


class _Job:
    """One pending job's progress.jsonl, read from where this session started."""

    def __init__(self, spec: dict):
        self.spec, self.seeds = spec, spec["seeds"]
        self.variant, self.total = spec["variant"], spec["run"]["total_steps"]
        self.label = f"{self.variant} seeds {self.seeds[0]}-{self.seeds[-1]}"
        self.path = Path(spec["job_dir"]) / "progress.jsonl"
        self.offset, self.start, self.step = 0, 0, 0
        if (Path(spec["job_dir"]) / "checkpoint.pt").exists():  # a resumed job restarts at its checkpoint
            rows = self.read_new()  # written before: the checkpoint is the last multiple of checkpoint_every
            last = max((r["step"] for r in rows), default=0)
            self.start = last - last % spec["run"]["checkpoint_every"]
            self.old = [r for r in rows if r["step"] <= self.start]
        else:
            self.offset = self.path.stat().st_size if self.path.exists() else 0
            self.old = []
        self.step = self.start

    def read_new(self) -> list[dict]:
        """Complete new lines since the last call (a line a worker is still writing waits)."""
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        rows = []
        for line in data[:end].decode(errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill before a resume
                continue
        return rows

    def seed_steps(self) -> tuple[int, int]:
        """(done in this session, still to do), in seed-steps."""
        return (self.step - self.start) * len(self.seeds), (self.total - self.step) * len(self.seeds)


def metric_rows(variant: str, seeds: list[int], row: dict) -> dict:
    """Per-seed metrics of one progress.jsonl row (evaluation or loss); {} for other rows."""
    out = {}
    for key in ("eval/return", "train/loss"):
        if key in row:
            out |= {f"{key}_{variant}_seed{k}": x for k, x in zip(seeds, row[key])}
    return out


class Monitor:
    """A thread following the pending jobs' progress files; `say` prints a line and keeps the bar whole."""

    def __init__(self, specs: list[dict], log, console: Console | None = None, every_s=30.0, bar=None):
        self.jobs = [_Job(s) for s in specs]
        self.log, self.console, self.every_s, self.poll_s = log, console, every_s, min(1.0, every_s)
        self.bar = sys.stdout.isatty() if bar is None else bar
        self.t0 = time.monotonic()
        self.last_line = self.t0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._tqdm = None

    def seed_steps(self) -> tuple[int, int]:
        """(done in this session, still to do) over the pending jobs, in seed-steps."""
        done, left = zip(*(j.seed_steps() for j in self.jobs)) if self.jobs else ((0,), (0,))
        return sum(done), sum(left)

    def __enter__(self) -> Monitor:
        for job in self.jobs:  # the rows a resumed job keeps, so metrics.jsonl holds them again
            for row in job.old:
                self._metrics(job, row)
        if self.bar and self.jobs:
            from tqdm import tqdm

            out = self.console.stderr if self.console else sys.stderr  # the bar stays out of log.txt
            total = sum(self.seed_steps())
            self._tqdm = tqdm(total=total, unit="seed-step", unit_scale=True, dynamic_ncols=True, file=out)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()  # the last rows
        if self._tqdm is not None:
            self._tqdm.close()

    def say(self, text: str) -> None:
        if self._tqdm is not None:
            self._tqdm.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def _metrics(self, job: _Job, row: dict) -> None:
        values = metric_rows(job.variant, job.seeds, row)
        if values:
            self.log.log(row["step"], values)

    def poll(self) -> None:
        for job in self.jobs:
            for row in job.read_new():
                job.step = max(job.step, row.get("step", 0))
                self._metrics(job, row)
                if "eval/return" in row:
                    returns = ", ".join(f"{x:.0f}" for x in row["eval/return"])
                    at = f"step {row['step']:,}/{job.total:,}"
                    self.say(f"{job.label}: {at}, eval return per seed [{returns}]")
        now = time.monotonic()
        if self._tqdm is not None:
            self._tqdm.update(self.seed_steps()[0] - self._tqdm.n)
        if now - self.last_line >= self.every_s:
            self.last_line = now
            line = self.line(now - self.t0)
            if self._tqdm is None:
                print(line, flush=True)
            elif self.console is not None:  # the bar is the terminal's; log.txt gets the plain line
                self.console.file.write(line + "\n")
                self.console.file.flush()

    def line(self, elapsed: float) -> str:
        done, left = self.seed_steps()
        rate = done / max(elapsed, 1e-9)
        eta = clock(left / rate) if rate > 0 else "unknown"
        share = 100 * done / max(done + left, 1)
        where = ", ".join(f"{j.variant} {j.seeds[0]}-{j.seeds[-1]} at {j.step:,}" for j in self.jobs)
        return (
            f"progress: {clock(elapsed)} elapsed, {done:,} of {done + left:,} seed-steps ({share:.0f}%), "
            f"{rate:.0f} seed-steps/s, ETA {eta} ({where})"
        )
