"""bbf_lunar/run.py: end to end, batching that does not change results, resume, damaged files,
the folder lock, workers that die with the parent, and bad input."""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, one_line_error, run_script

BBF_DIR = REPO / "bbf_lunar"
sys.path.insert(0, str(BBF_DIR))
import job as J  # noqa: E402
import run as R  # noqa: E402

RUN = "bbf_lunar/run.py"
TINY = [
    "--total-steps", "400", "--eval-every", "200", "--learning-starts", "100", "--eval-episodes", "2",
    "--anneal-steps", "50", "--reset-every", "150", "--checkpoint-every", "200", "--width", "16",
    "--bootstrap-reps", "200", "--clearml", "off", "--replay-ratio", "1",
]  # fmt: skip


def tiny_args(**kw) -> R.Args:
    base = dict(total_steps=1500, eval_every=750, learning_starts=100, eval_episodes=1, width=16)
    base |= dict(anneal_steps=100, reset_every=500, checkpoint_every=750, workers=1, replay_ratio=1.0)
    return R.Args(**(base | kw))


# ---------------------------------------------------------------------------------------------
# fast: arguments, batching, specs


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
        (["--summarize-only"], "add --resume"),
        (["--n-min", "5", "--n-max", "3"], "--n-min (5) must be <= --n-max (3)"),
        (["--compile", "--cuda-graph"], "--compile and --cuda-graph: choose one"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        R.parse_args(R.Args, flags, check=R.check_args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_missing_box2d_is_one_line_before_any_worker_starts(tmp_path):
    # a sitecustomize that makes `import Box2D` fail, as on a machine with gymnasium but not its box2d extra
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'Box2D':\n"
        "            raise ImportError('blocked by the test')\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "run"
    flags = ["--seeds", "1", "--total-steps", "200", "--eval-every", "200", "--learning-starts", "100"]
    done = run_script(
        "bbf_lunar/run.py", *flags, "--clearml", "off", "--out", out, rc=1, env=env, timeout=120
    )
    line = one_line_error(done)
    assert "LunarLander-v3 cannot be made (Box2D is not installed" in line
    assert "pip install 'gymnasium[box2d]'" in line
    assert not (out / "jobs").exists()  # no worker started


def test_compile_without_a_compiler_is_one_line_before_any_worker_starts(tmp_path, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(J.UserError, match="--compile needs a C/C[+][+] compiler"):
        J.require_compiler(which=lambda name: None)
    J.require_compiler(which=lambda name: "/usr/bin/clang" if name == "clang" else None)  # any one will do
    monkeypatch.setenv("CXX", "my-g++")
    J.require_compiler(which=lambda name: None)  # named by CXX
    # end to end: a PATH with python's folder only (no compiler there)
    env = {"PATH": str(Path(sys.executable).parent), "CXX": "", "CC": ""}
    flags = ["--seeds", "1", "--total-steps", "200", "--eval-every", "200", "--learning-starts", "100"]
    out = tmp_path / "run"
    done = run_script(RUN, *flags, "--compile", "--clearml", "off", "--out", out, rc=1, env=env, timeout=120)
    assert "--compile needs a C/C++ compiler" in one_line_error(done)
    assert not (out / "jobs").exists()  # no worker started


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_cuda_graph_without_a_gpu_is_one_line_before_any_worker_starts(tmp_path):
    flags = ["--seeds", "1", "--total-steps", "200", "--eval-every", "200", "--learning-starts", "100"]
    out = tmp_path / "run"
    done = run_script(RUN, *flags, "--cuda-graph", "--clearml", "off", "--out", out, rc=1, timeout=120)
    assert "--cuda-graph needs a CUDA GPU, and torch sees none here" in one_line_error(done)
    assert not (out / "jobs").exists()


def test_seed_batches_cover_every_seed_once_and_use_the_workers():
    assert R.seed_batches(R.Args(seeds=10, workers=2), ["bbf", "dqn"]) == [list(range(10))]
    assert R.seed_batches(R.Args(seeds=5, workers=2), ["bbf"]) == [[0, 1, 2], [3, 4]]
    batches = R.seed_batches(R.Args(seed=3, seeds=10, workers=16), ["bbf"])
    assert sum(batches, []) == list(range(3, 13)) and len(batches) == 10


def test_dqn_is_the_zoo_tuned_setting():
    spec = R.job_spec(R.Args(), "dqn", [0], Path("jobs"))
    m, a, r = spec["model"], spec["agent"], spec["run"]
    assert (m["width"], m["num_blocks"], m["residual"], m["dueling"], m["projection"]) == (
        256,
        1,
        False,
        False,
        False,
    )
    assert (a["lr"], a["batch_size"], a["weight_decay"], a["double"], a["n_max"], a["gamma_end"]) == (
        6.3e-4, 128, 0.0, False, 1, 0.99
    )  # fmt: skip
    assert (r["train_freq"], r["replay_ratio"], r["target_every"], r["buffer_size"]) == (4, 1.0, 250, 50_000)
    assert (r["learning_starts"], r["eps_end"], r["eps_decay_steps"], r["reset_every"]) == (0, 0.1, 12_000, 0)
    # SB3: the online network acts, evaluation is deterministic (greedy), gradients clipped at norm 10
    assert (r["act_with_target"], r["eval_epsilon"], a["max_grad_norm"]) == (False, 0.0, 10.0)
    size = R.Layout(R.ModelConfig(**spec["model"])).size
    assert size == 8 * 256 + 256 + 256 * 256 + 256 + 256 * 4 + 4  # the [256, 256] MLP


def test_compile_flag_reaches_every_variants_agent_and_is_off_by_default():
    for variant in R.VARIANTS:
        assert R.job_spec(R.Args(compile=True), variant, [0], Path("jobs"))["agent"]["compile"] is True
        assert R.job_spec(R.Args(), variant, [0], Path("jobs"))["agent"]["compile"] is False


def test_damaged_checkpoint_is_one_line_and_moved_aside(tmp_path):
    spec = R.job_spec(tiny_args(), "bbf", [0, 1], tmp_path / "jobs")
    Path(spec["job_dir"]).mkdir(parents=True)
    ckpt = Path(spec["job_dir"]) / "checkpoint.pt"
    ckpt.write_bytes(b"PK\x03\x04 not really a zip")
    outcome = R.run_one(spec)
    assert str(ckpt) in outcome["error"] and "restarts this job from scratch" in outcome["error"]
    assert not ckpt.exists() and (ckpt.parent / "checkpoint.pt.damaged").exists()


def test_unfinished_job_is_scored_from_its_progress_at_an_earlier_step(tmp_path):
    spec = R.job_spec(tiny_args(), "dqn", [4, 5], tmp_path / "jobs")
    Path(spec["job_dir"]).mkdir(parents=True)
    rows = [{"step": t, "eval/return": [t / 100, -t / 100]} for t in (0, 750, 1500, 2250, 1500)]  # resumed
    rows.insert(2, {"step": 800, "train/loss": [1.0, 2.0]})
    (Path(spec["job_dir"]) / "progress.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    four, five = J.progress_results(spec)
    assert four["eval_steps"] == [0, 750, 1500, 2250] and five["eval_returns"][-1] == [-22.5]
    cut = J.at_step(four, 1500)
    assert (
        cut["eval_steps"] == [0, 750, 1500]
        and cut["score"] == pytest.approx(7.5)
        and cut["env_steps"] == 1500
    )
    with pytest.raises(R.UserError, match="no 3 evaluations"):
        J.at_step(four, 700)


# ---------------------------------------------------------------------------------------------
# slow: whole jobs in this process


def run_job(tmp_path, seeds, **kw):
    job = J.Job(R.job_spec(tiny_args(**kw), "bbf", seeds, tmp_path / f"jobs{len(seeds)}"))
    rows = []
    with open(os.devnull, "w") as sink:

        class Progress:
            def write(self, line):
                rows.append(json.loads(line))
                sink.write(line)

            def flush(self):
                pass

        job.loop(Progress(), lambda *a: None)
    return job, rows


@pytest.mark.slow
def test_seed_in_a_batch_follows_the_same_trajectory_as_alone(tmp_path):
    """1500 env steps, 1400 gradient steps and two resets: same actions, losses, evaluations."""
    batch, batch_rows = run_job(tmp_path, [0, 1, 2])
    alone, alone_rows = run_job(tmp_path, [1])
    assert np.array_equal(batch.buffer.actions[1], alone.buffer.actions[0])
    assert np.array_equal(batch.buffer.obs[1], alone.buffer.obs[0])
    losses_batch = [r["train/loss"][1] for r in batch_rows if "train/loss" in r]
    losses_alone = [r["train/loss"][0] for r in alone_rows if "train/loss" in r]
    assert len(losses_alone) == 1 and losses_batch == pytest.approx(losses_alone, rel=1e-6)
    assert (
        np.array(batch.state["eval_returns"])[:, 1].tolist()
        == np.array(alone.state["eval_returns"])[:, 0].tolist()
    )
    assert batch.agent.num_resets.tolist() == [2, 2, 2]  # at 500 and 1000 (1000 + 500 <= 1500)


@pytest.mark.slow
def test_vector_env_autoreset_stores_the_true_last_state(tmp_path):
    job, _ = run_job(tmp_path, [4, 5], total_steps=1000, eval_every=1000, learning_starts=1000)
    b = job.buffer
    done = b.terminated | b.truncated  # (S, steps)
    assert done.sum() >= 4  # random play ends many episodes in 1000 steps
    continues = ~done[:, :-1]
    assert np.array_equal(b.next_obs[:, :-1][continues], b.obs[:, 1:][continues])  # within an episode
    ended = done[:, :-1]
    assert not np.isclose(b.next_obs[:, :-1][ended], b.obs[:, 1:][ended]).all(axis=1).any()  # a reset follows


@pytest.mark.slow
def test_interrupted_job_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    spec = R.job_spec(tiny_args(), "bbf", [3], tmp_path / "jobs")
    real_evaluate, calls = J.evaluate, []

    def interrupt_third_eval(agent, envs, *rest):
        calls.append(int(agent.grad_steps[0]))
        if len(calls) == 3:  # step 1500, after the checkpoint at step 750
            raise KeyboardInterrupt
        return real_evaluate(agent, envs, *rest)

    monkeypatch.setattr(J, "evaluate", interrupt_third_eval)
    with pytest.raises(KeyboardInterrupt):
        J.train_job(spec, report=lambda *a: None)
    assert (Path(spec["job_dir"]) / "checkpoint.pt").exists()
    (result,) = J.train_job(spec, report=lambda *a: None)
    assert result["resumed"] == 1 and result["env_steps"] == 1500 and result["eval_steps"] == [0, 750, 1500]
    assert result["grad_steps"] == 1400 and calls == [0, 650, 1400, 1400]  # 750-1500 redone from step 750
    assert result["reset_steps"] == [500, 1000]  # the one at 1000 redone once, from the checkpoint's [500]
    assert not (Path(spec["job_dir"]) / "checkpoint.pt").exists()
    assert json.loads((Path(spec["seed_dirs"][0]) / "result.json").read_text())["score"] == result["score"]


# ---------------------------------------------------------------------------------------------
# slow: run.py as a user runs it


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """2 seeds x bbf, dqn in a pool of 2 workers (one process per variant, both seeds in it)."""
    out = tmp_path_factory.mktemp("bbf") / "run"
    proc = run_script(RUN, "--seeds", "2", "--variants", "bbf,dqn", "--workers", "2", "--out", out, *TINY)
    return out, proc


@pytest.mark.slow
def test_run_writes_summary_plots_and_per_seed_results(finished):
    out, proc = finished
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["variants"]) == {"bbf", "dqn"} and summary["seeds"] == [0, 1]
    assert summary["replay_ratio"] == {"bbf": 1.0, "dqn": 1.0}
    assert summary["reset_steps"] == {"bbf": [150], "dqn": []}
    for v in summary["variants"].values():
        assert len(v["final_returns"]) == 2 and v["ci_low"] <= v["iqm"] <= v["ci_high"]
        assert v["iqm"] == pytest.approx(sum(v["final_returns"]) / 2)  # 2 runs: nothing trimmed
    assert summary["curves"]["bbf"]["steps"] == [0, 200, 400]
    poi = summary["probability_of_improvement"]["bbf_vs_dqn"]
    assert 0 <= poi["ci_low"] <= poi["poi"] <= poi["ci_high"] <= 1 and poi["pairs"] == 4
    for name in ("learning_curves", "final_iqm", "performance_profiles", "probability_of_improvement"):
        assert (out / f"{name}.png").stat().st_size > 5000
    bbf = json.loads((out / "jobs" / "bbf_seed0" / "result.json").read_text())
    dqn = json.loads((out / "jobs" / "dqn_seed1" / "result.json").read_text())
    assert bbf["grad_steps"] == 300 and bbf["resets"] == 1 and bbf["reset_steps"] == [150]  # 300 + 150 > 400
    assert bbf["score"] == pytest.approx(np.mean([np.mean(x) for x in bbf["eval_returns"]]))  # last 3 points
    assert dqn["grad_steps"] == 400 and dqn["resets"] == 0  # train_freq 4 x 4 gradient steps from step 0
    assert dqn["seeds_in_process"] == 2 and not (out / "jobs" / "bbf_seeds0-1" / "checkpoint.pt").exists()
    assert "P(bbf > dqn)" in proc.stdout and "pairs won" in proc.stdout and "caveat" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/iqm_bbf" in r] == [0, 200, 400]  # the statistics at the end
    live = {(r["step"], k): v for r in rows for k, v in r.items() if k.startswith("eval/return_")}
    assert live[(400, "eval/return_dqn_seed1")] == pytest.approx(np.mean(dqn["eval_returns"][-1]))
    assert len(live) == 2 * 2 * 3  # per variant, seed and evaluation, as the workers measured them
    log = (out / "log.txt").read_text()
    assert log.splitlines()[1].startswith("bbf_lunar: bbf, dqn x seeds 0-1, 400 steps per run; 2 job(s)")
    assert "P(bbf > dqn)" in log and "bbf seeds 0-1: step 200/400, eval return per seed" in log


@pytest.mark.slow
def test_a_seed_alone_gives_the_result_it_gave_in_a_batch(finished, tmp_path):
    out, _ = finished
    again = tmp_path / "again"
    run_script(
        RUN, "--seeds", "1", "--seed", "1", "--variants", "dqn", "--workers", "1", "--out", again, *TINY
    )
    first = json.loads((out / "jobs" / "dqn_seed1" / "result.json").read_text())
    second = json.loads((again / "jobs" / "dqn_seed1" / "result.json").read_text())
    assert first["seeds_in_process"] == 2 and second["seeds_in_process"] == 1
    assert first["eval_returns"] == second["eval_returns"]


@pytest.mark.slow
def test_resume_of_a_finished_run_is_refused_and_summarize_only_redoes_the_statistics(finished):
    out, _ = finished
    flags = ["--seeds", "2", "--variants", "bbf,dqn", "--workers", "2", "--out", out, *TINY]
    assert "finished" in one_line_error(run_script(RUN, *flags, "--resume", rc=1))
    before = json.loads((out / "summary.json").read_text())
    (out / "final_iqm.png").unlink()
    proc = run_script(RUN, *flags, "--resume", "--summarize-only")
    assert "to train: nothing" in proc.stdout and (out / "final_iqm.png").exists()
    assert json.loads((out / "summary.json").read_text())["variants"] == before["variants"]


@pytest.mark.slow
def test_more_seeds_on_resume_train_only_the_new_ones(finished, tmp_path):
    src, _ = finished
    out = tmp_path / "more"
    shutil.copytree(src, out)
    kept = {p: p.read_bytes() for p in (out / "jobs").glob("*_seed[01]/result.json")}
    flags = ["--variants", "bbf,dqn", "--workers", "2", "--out", out, "--resume", *TINY]
    proc = run_script(RUN, "--seeds", "3", *flags)
    assert "4 seed runs done; to train: " in proc.stdout
    assert "bbf 2-2" in proc.stdout and "dqn 2-2" in proc.stdout
    assert len(kept) == 4 and all(p.read_bytes() == b for p, b in kept.items())  # not retrained
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1, 2] and summary["probability_of_improvement"]["bbf_vs_dqn"]["pairs"] == 9
    third = json.loads((out / "jobs" / "bbf_seed2" / "result.json").read_text())
    assert third["seeds_in_process"] == 1 and third["env_steps"] == 400
    # one variant of the grown run, one more seed: only dqn seed 3 trains, the summary is dqn's alone
    proc = run_script(RUN, "--seeds", "4", "--variants", "dqn", *flags[2:])
    assert "3 seed runs done; to train: dqn 3-3" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["variants"]) == {"dqn"} and summary["seeds"] == [0, 1, 2, 3]


@pytest.mark.slow
def test_resume_with_a_changed_training_flag_names_it(finished):
    out, _ = finished
    proc = run_script(
        RUN, "--seeds", "2", "--variants", "bbf,dqn", "--out", out, "--resume", *TINY, "--lr", "0.01", rc=1
    )
    assert "--lr 0.0003 -> 0.01" in one_line_error(proc)


@pytest.mark.slow
def test_resume_of_a_missing_folder_is_an_error(tmp_path):
    proc = run_script(RUN, "--out", tmp_path / "nothing", "--resume", *TINY, rc=1)
    assert "holds no run" in one_line_error(proc) and not (tmp_path / "nothing").exists()


@pytest.mark.slow
def test_damaged_result_is_named_then_resume_trains_its_seed_again(finished, tmp_path):
    src, _ = finished
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    (out / "summary.json").unlink()  # an unfinished run
    expected = json.loads((out / "jobs" / "dqn_seed1" / "result.json").read_text())
    (out / "jobs" / "dqn_seed1" / "result.json").write_text('{"variant": "dqn", "se')
    flags = ["--seeds", "2", "--variants", "bbf,dqn", "--workers", "2", "--out", out, "--resume", *TINY]
    proc = run_script(RUN, *flags)
    assert f"{out / 'jobs' / 'dqn_seed1' / 'result.json'} is damaged" in proc.stdout
    assert "to train: dqn 1-1" in proc.stdout and (out / "summary.json").exists()  # seed 0 is kept
    again = json.loads((out / "jobs" / "dqn_seed1" / "result.json").read_text())
    assert again["eval_returns"] == expected["eval_returns"]  # from scratch, same seed, same result


@pytest.mark.slow
def test_damaged_result_of_a_finished_run_is_rebuilt_by_resume(finished, tmp_path):
    src, _ = finished
    out = tmp_path / "finished"
    shutil.copytree(src, out)
    before = json.loads((out / "summary.json").read_text())["variants"]
    damaged = out / "jobs" / "bbf_seed0" / "result.json"
    damaged.write_text('{"variant": "bbf", "se')
    flags = ["--seeds", "2", "--variants", "bbf,dqn", "--workers", "2", "--out", out, "--resume", *TINY]
    proc = run_script(RUN, *flags, "--summarize-only", rc=1)  # the statistics need every run
    assert f"{damaged} is damaged" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_script(RUN, *flags)  # no longer "finished": the missing seed trains again
    assert "reopened the finished run" in proc.stdout and "to train: bbf 0-0" in proc.stdout
    after = json.loads((out / "summary.json").read_text())["variants"]
    for v, key in ((v, k) for v in ("bbf", "dqn") for k in ("final_returns", "iqm", "ci_low", "ci_high")):
        assert after[v][key] == before[v][key]  # the same seed from scratch gives the same result
    assert not (out / "summary.json.incomplete").exists()
    assert "finished" in one_line_error(run_script(RUN, *flags, rc=1))  # and now it is finished again


def evaluated_steps(metrics: Path) -> set[int]:
    lines = metrics.read_text().splitlines(keepends=True) if metrics.exists() else []
    return {json.loads(x)["step"] for x in lines if "eval/return_dqn_seed1" in x and x.endswith("\n")}


@pytest.mark.slow
def test_first_line_at_once_progress_lines_and_a_killed_run_keeps_its_metrics(tmp_path):
    """Split into parts: killed mid-run, its rows stay; --resume finishes it."""
    out = tmp_path / "run"
    flags = ["--seeds", "2", "--variants", "dqn", "--workers", "1", "--out", out, *TINY]
    flags += ["--total-steps", "3000", "--eval-every", "500", "--checkpoint-every", "500"]
    started = time.time()
    parent = subprocess.Popen(
        [sys.executable, str(REPO / RUN), *map(str, flags), "--progress-every", "1"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        first = parent.stdout.readline()
        assert first.startswith("bbf_lunar: dqn x seeds 0-1") and time.time() - started < 60
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 300
        while 1000 not in evaluated_steps(metrics):  # the evaluation's row, not the loss row at 1000
            assert time.time() < deadline and parent.poll() is None, "no evaluation at step 1000"
            time.sleep(0.2)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
    finally:
        if parent.poll() is None:
            parent.kill()
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert {0, 500, 1000} <= {r["step"] for r in rows if "eval/return_dqn_seed1" in r}
    progress = [line for line in (out / "log.txt").read_text().splitlines() if line.startswith("progress: ")]
    assert progress and all("elapsed" in x and "seed-steps/s" in x and "ETA" in x for x in progress)
    run_script(RUN, *flags, "--resume")  # the second part
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r["step"] for r in rows if "eval/return_dqn_seed0" in r]
    assert sorted(set(steps)) == list(range(0, 3001, 500)) and len(steps) == len(set(steps))
    assert json.loads((out / "summary.json").read_text())["seeds"] == [0, 1]


@pytest.mark.slow
def test_a_run_folder_in_use_is_refused(finished):
    out, _ = finished
    with open(out / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = run_script(RUN, "--out", out, "--resume", "--summarize-only", *TINY, rc=1)
    assert "in use" in one_line_error(proc)


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_die_when_the_parent_is_killed(tmp_path):
    cmd = [sys.executable, str(REPO / RUN), "--seeds", "2", "--variants", "bbf,dqn", "--workers", "2"]
    parent = subprocess.Popen(
        [*cmd, "--out", str(tmp_path / "run"), *TINY, "--total-steps", "50000"], cwd=REPO
    )
    workers = []
    try:
        deadline = time.time() + 120
        jobs = tmp_path / "run" / "jobs"
        while len(workers) < 2 or len(list(jobs.glob("*seeds*/progress.jsonl"))) < 2:  # both training
            assert time.time() < deadline, "the workers did not start"
            time.sleep(0.5)
            workers = [
                c for c in children(parent.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()
            ]
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 15
        while any(alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(alive(w) for w in workers)
    finally:
        for pid in [parent.pid, *workers]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_export_keeps_the_per_seed_curves_behind_the_summary(finished, tmp_path):
    out, _ = finished
    proc = run_script("bbf_lunar/export.py", "--run", out, "--name", "tiny", "--results", tmp_path)
    assert "bbf: 2 seeds, dqn: 2 seeds" in proc.stdout
    curves = json.loads((tmp_path / "tiny_curves.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    sys.path.insert(0, str(BBF_DIR))
    import tables

    for name, scores in tables.rederived_scores(curves).items():
        assert scores == pytest.approx(summary["variants"][name]["final_returns"], rel=1e-12)
    dqn1 = json.loads((out / "jobs" / "dqn_seed1" / "result.json").read_text())
    per_point = [np.mean(x) for x in dqn1["eval_returns"]]
    assert curves["variants"]["dqn"]["returns"][1] == pytest.approx(per_point)
    assert curves["variants"]["bbf"]["eval_steps"] == [0, 200, 400] and curves["args"]["total_steps"] == 400
    assert len(curves["git_commit"] or "") in (0, 40)
