"""bbf_lunar/run.py end to end as a subprocess, resuming, seeding, and bad input."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "bbf_lunar" / "run.py"
TINY = [
    "--total-steps",
    "400",
    "--eval-every",
    "200",
    "--learning-starts",
    "100",
    "--eval-episodes",
    "2",
    "--anneal-steps",
    "50",
    "--reset-every",
    "150",
    "--checkpoint-every",
    "200",
    "--bootstrap-reps",
    "200",
    "--clearml",
    "off",
]


def run(*flags, timeout=300):
    return subprocess.run(
        [sys.executable, str(RUN), *flags], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """2 seeds x 2 variants in a pool of 2 workers."""
    out = tmp_path_factory.mktemp("bbf") / "run"
    proc = run("--seeds", "2", "--variants", "bbf,dqn", "--workers", "2", "--out", str(out), *TINY)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_run_writes_summary_plots_and_job_results(finished):
    out, proc = finished
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["variants"]) == {"bbf", "dqn"} and summary["seeds"] == [0, 1]
    assert summary["env_steps"] == 400 and summary["env_steps_per_second"] > 0
    for v in summary["variants"].values():
        assert len(v["final_returns"]) == 2
        assert v["ci_low"] <= v["iqm"] <= v["ci_high"]
        assert v["iqm"] == pytest.approx(sum(v["final_returns"]) / 2)  # 2 runs: nothing trimmed
    assert summary["curves"]["bbf"]["steps"] == [0, 200, 400]
    poi = summary["probability_of_improvement"]["bbf_vs_dqn"]
    assert 0 <= poi["ci_low"] <= poi["poi"] <= poi["ci_high"] <= 1
    for name in ("learning_curves", "final_iqm", "performance_profiles", "probability_of_improvement"):
        assert (out / f"{name}.png").stat().st_size > 5000
    bbf = json.loads((out / "jobs" / "bbf_seed0" / "result.json").read_text())
    dqn = json.loads((out / "jobs" / "dqn_seed1" / "result.json").read_text())
    assert bbf["grad_steps"] == 300 and bbf["resets"] == 2  # replay ratio 1 after 100 random steps
    assert dqn["grad_steps"] == 75 and dqn["resets"] == 0  # replay ratio 0.25, no resets
    assert [len(r) for r in bbf["eval_returns"]] == [2, 2, 2]
    assert not (out / "jobs" / "bbf_seed0" / "checkpoint.pt").exists()
    assert "bbf_vs_dqn" not in proc.stdout and "P(bbf > dqn)" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 200, 400] and "eval/iqm_bbf" in rows[0]


def test_same_seed_same_returns_in_process_or_pool(finished, tmp_path):
    out, _ = finished
    again = tmp_path / "again"
    proc = run(
        "--seeds", "1", "--seed", "1", "--variants", "dqn", "--workers", "1", "--out", str(again), *TINY
    )
    assert proc.returncode == 0, proc.stderr
    first = json.loads((out / "jobs" / "dqn_seed1" / "result.json").read_text())
    second = json.loads((again / "jobs" / "dqn_seed1" / "result.json").read_text())
    assert first["eval_returns"] == second["eval_returns"]


def test_resume_of_a_finished_run_only_resummarises(finished):
    out, _ = finished
    (out / "final_iqm.png").unlink()
    before = json.loads((out / "summary.json").read_text())
    proc = run(
        "--seeds", "2", "--variants", "bbf,dqn", "--workers", "2", "--out", str(out), "--resume", *TINY
    )
    assert proc.returncode == 0, proc.stderr
    assert "4 jobs (4 already done)" in proc.stdout and "done bbf" not in proc.stdout
    assert (out / "final_iqm.png").exists()
    assert json.loads((out / "summary.json").read_text())["variants"] == before["variants"]
    proc = run("--out", str(out), "--summarize-only", "--clearml", "off")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "summary.json").read_text())["variants"] == before["variants"]


def test_resume_with_other_settings_is_refused(finished):
    out, _ = finished
    proc = run("--seeds", "2", "--variants", "bbf,dqn", "--out", str(out), "--resume", *TINY, "--lr", "0.01")
    assert proc.returncode == 1 and "other settings" in proc.stderr and "Traceback" not in proc.stderr


def test_interrupted_job_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    spec_ = importlib.util.spec_from_file_location("bbf_lunar_run", RUN)
    R = importlib.util.module_from_spec(spec_)
    sys.modules["bbf_lunar_run"] = R
    spec_.loader.exec_module(R)
    args = R.Args(
        total_steps=600,
        eval_every=200,
        checkpoint_every=200,
        learning_starts=100,
        eval_episodes=1,
        width=16,
        blocks=1,
        workers=1,
    )
    spec = R.job_spec(args, "bbf", 3, tmp_path / "job")
    real_evaluate, calls = R.evaluate, []

    def interrupt_third_eval(agent, envs):
        calls.append(agent.grad_steps)
        if len(calls) == 3:  # step 400, after the checkpoint at step 200
            raise KeyboardInterrupt
        return real_evaluate(agent, envs)

    monkeypatch.setattr(R, "evaluate", interrupt_third_eval)
    with pytest.raises(KeyboardInterrupt):
        R.train_job(spec)
    assert (tmp_path / "job" / "checkpoint.pt").exists() and not (tmp_path / "job" / "result.json").exists()
    result = R.train_job(spec)
    assert result["resumed"] == 1 and result["env_steps"] == 600
    assert result["eval_steps"] == [0, 200, 400, 600]
    assert result["grad_steps"] == 500 and calls == [0, 100, 300, 300, 500]  # step 400 redone from step 200
    saved = json.loads((tmp_path / "job" / "result.json").read_text())
    assert saved["final_return"] == result["final_return"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--variants", "bbf,rainbow"], "--variants: unknown rainbow"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--replay-ratio", "0"], "--replay-ratio must be > 0"),
        (
            ["--eval-every", "500", "--total-steps", "400"],
            "--eval-every (500) must be <= --total-steps (400)",
        ),
        (["--summarize-only"], "need --out"),
    ],
)
def test_bad_arguments_exit_2_with_a_message_and_write_nothing(tmp_path, flags, message):
    out = tmp_path / "run"
    if "--summarize-only" in flags:
        proc = run(*flags)
    else:
        proc = run(*flags, "--out", str(out), "--clearml", "off")
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_unwritable_output_folder_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = run("--seeds", "1", "--out", str(blocker / "run"), *TINY)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "cannot write" in proc.stderr
