"""decoder_transformer's scripts end to end as subprocesses on a made-up text, tiny settings, CPU only."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

FOLDER = Path(__file__).resolve().parent.parent / "decoder_transformer"
TINY = [
    "--n-layer",
    "1",
    "--n-head",
    "2",
    "--n-embd",
    "16",
    "--block-size",
    "16",
    "--batch-size",
    "4",
    "--eval-batches",
    "2",
    "--eval-interval",
    "10",
    "--log-interval",
    "5",
    "--warmup-iters",
    "2",
    "--lr",
    "1e-2",
    "--clearml",
    "off",
    "--device",
    "cpu",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(script, *args, check=True, timeout=120):
    done = subprocess.run(
        [sys.executable, str(FOLDER / script), *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{script} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(0)
    words = ["to", "be", "or", "not", "the", "king", "queen", "sword", "night", "love", "death", "and", "my"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + "." for _ in range(700)]
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "train"
    run("train.py", "--text", text_file, "--max-iters", "40", "--out", out, *TINY)
    return out


def test_train_writes_a_run_and_lowers_the_loss(trained):
    summary = json.loads((trained / "summary.json").read_text())
    assert {"val_loss", "train_loss", "iters", "params", "tokens_per_second", "pos"} <= summary.keys()
    assert summary["iters"] == 40 and summary["pos"] == "rope" and summary["tokens_per_second"] > 0
    val = [r["val/loss"] for r in rows(trained) if "val/loss" in r]
    assert len(val) == 5  # steps 0, 10, 20, 30, 40
    assert val[-1] < val[0] - 0.5  # from ~ln(vocab) = 2.9 toward the text's entropy
    assert summary["val_loss_2x_context"] is not None  # rope runs at twice the training context
    assert (trained / "ckpt.pt").is_file() and (trained / "config.json").is_file()
    assert (trained / "loss_curves.png").stat().st_size > 10_000
    best = torch.load(trained / "best.pt", weights_only=False)
    best_step = min((r for r in rows(trained) if "val/loss" in r), key=lambda r: r["val/loss"])
    assert best["iter"] == best_step["step"]
    assert best["best_val_loss"] == pytest.approx(best_step["val/loss"])


def test_resume_continues_the_same_run_exactly(text_file, tmp_path):
    """40 steps at once against 20 steps, stop, --resume to 40: identical metrics (dropout on)."""
    flags = [*TINY, "--text", text_file, "--dropout", "0.1", "--lr-decay-iters", "40"]
    run("train.py", *flags, "--max-iters", "40", "--out", tmp_path / "whole")
    run("train.py", *flags, "--max-iters", "20", "--out", tmp_path / "split")
    run("train.py", *flags, "--max-iters", "40", "--resume", tmp_path / "split")
    whole, split = rows(tmp_path / "whole"), rows(tmp_path / "split")
    strip = [{k: v for k, v in r.items() if k not in ("time", "charts/tokens_per_second")} for r in whole]
    assert strip == [
        {k: v for k, v in r.items() if k not in ("time", "charts/tokens_per_second")} for r in split
    ]
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("whole", "split"))
    assert a["val_loss"] == b["val_loss"]


def test_ctrl_c_saves_a_checkpoint_that_resumes(text_file, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        str(FOLDER / "train.py"),
        *TINY,
        "--text",
        str(text_file),
        "--max-iters",
        "100000",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    assert "checkpoint saved" in stderr and "Traceback" not in stderr

    stopped_at = torch.load(out / "ckpt.pt", weights_only=False)["iter"]
    assert 0 < stopped_at < 100000
    run("train.py", *TINY, "--text", text_file, "--max-iters", stopped_at + 10, "--resume", out)
    steps = [r["step"] for r in rows(out)]
    assert steps == sorted(steps) and steps[-1] == stopped_at + 10  # one curve, no repeated steps


def test_ddp_with_two_cpu_processes(text_file, tmp_path):
    out = tmp_path / "ddp"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(29500 + os.getpid() % 1000),
            str(FOLDER / "train.py"),
            *TINY,
            "--text",
            str(text_file),
            "--max-iters",
            "10",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["iters"] == 10
    assert "2 process(es), 128 tokens/step" in done.stdout  # 2 x batch 4 x context 16


def test_sample_prints_text_and_speed_the_same_with_and_without_cache(trained, tmp_path):
    outs = [
        run(
            "sample.py",
            "--ckpt",
            trained / "ckpt.pt",
            "--prompt",
            "the king",
            "--max-new-tokens",
            "40",
            "--temperature",
            "0.8",
            "--top-p",
            "0.9",
            "--clearml",
            "off",
            "--device",
            "cpu",
            "--out",
            tmp_path / f"s{i}",
            *extra,
        ).stdout
        for i, extra in enumerate([[], ["--no-kv-cache"]])
    ]
    texts = [o.rsplit("generation:", 1)[0] for o in outs]
    assert texts[0] == texts[1] and texts[0].startswith("the king")
    last = outs[0].strip().splitlines()[-1]
    assert last.startswith("generation: 40 tokens in ") and last.endswith(" tokens/s)")
    assert json.loads((tmp_path / "s1" / "summary.json").read_text())["kv_cache"] is False


def test_evaluate_sampling_writes_json_and_plot(trained, text_file, tmp_path):
    out = tmp_path / "eval"
    run(
        "evaluate_sampling.py",
        "--ckpt",
        trained / "ckpt.pt",
        "--text",
        text_file,
        "--temperatures",
        "0.5",
        "1.0",
        "--top-ps",
        "0.5",
        "1.0",
        "--num-samples",
        "3",
        "--length",
        "30",
        "--clearml",
        "off",
        "--device",
        "cpu",
        "--out",
        out,
    )
    result = json.loads((out / "sampling_eval.json").read_text())
    assert len(result["settings"]) == 4
    for r in result["settings"] + [result["reference_heldout"]]:
        assert r["self_perplexity"] >= 1 and all(0 <= r[f"distinct_{n}"] <= 1 for n in range(1, 5))
        assert 0 <= r["repetition"] <= 1
    by = {(r["temperature"], r["top_p"]): r["self_perplexity"] for r in result["settings"]}
    assert by[(0.5, 0.5)] < by[(1.0, 1.0)]  # sharper sampling -> samples the model finds likelier
    assert (out / "quality_diversity.png").stat().st_size > 10_000


def test_compare_runs_tables_and_plots(trained, tmp_path):
    done = run("compare_runs.py", "--runs", trained, "--clearml", "off", "--out", tmp_path / "cmp")
    val = json.loads((trained / "summary.json").read_text())["val_loss"]
    assert f"| rope | 1337 | {val:.4f} ± 0.0000 |" in done.stdout
    assert (tmp_path / "cmp" / "val_loss_curves.png").is_file() and (tmp_path / "cmp" / "table.md").is_file()


def test_generation_benchmark_compares_cache_and_no_cache(trained, tmp_path):
    run(
        "benchmark.py",
        "--task",
        "generate",
        "--ckpt",
        trained / "ckpt.pt",
        "--new-tokens",
        "40",
        "--rounds",
        "1",
        "--device",
        "cpu",
        "--clearml",
        "off",
        "--out",
        tmp_path / "bench",
    )
    result = json.loads((tmp_path / "bench" / "summary.json").read_text())
    assert result["same_tokens"] is True and result["speedup"] > 0 and result["new_tokens"] == 40


def test_byte_vocabulary_trains_on_any_text(tmp_path):
    text = tmp_path / "mixed.txt"
    text.write_text("naïve café — ünïcödé ✓ text, " * 60)
    run("train.py", "--text", text, "--vocab", "byte", "--max-iters", "5", "--out", tmp_path / "run", *TINY)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["iters"] == 5


def assert_clean_failure(done, message, folder=None):
    assert done.returncode != 0
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    if folder is not None:
        assert not folder.exists()


def test_bad_training_input(tmp_path, text_file):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "never"
    assert_clean_failure(run("train.py", "--text", empty, "--out", out, *TINY, check=False), "is empty", out)
    assert_clean_failure(
        run("train.py", "--text", tmp_path / "nope.txt", "--out", out, *TINY, check=False),
        "no such file",
        out,
    )
    assert_clean_failure(
        run("train.py", "--data-dir", tmp_path / "nodata", "--out", out, "--clearml", "off", check=False),
        "tinyshakespeare",
        out,
    )
    assert_clean_failure(
        run("train.py", "--text", text_file, "--out", out, *TINY, "--n-embd", "15", check=False),
        "--n-embd (15) must split into --n-head (2)",
        out,
    )


def test_resume_with_another_config_is_refused(trained, text_file):
    before = (trained / "metrics.jsonl").read_text()
    done = run(
        "train.py",
        "--text",
        text_file,
        "--max-iters",
        "40",
        "--resume",
        trained,
        *TINY[:-6],
        "--n-embd",
        "32",
        "--clearml",
        "off",
        "--device",
        "cpu",
        check=False,
    )
    assert_clean_failure(done, "was trained with another config: --n-embd 16 (this command: 32)")
    assert (trained / "metrics.jsonl").read_text() == before


def test_bad_sampling_input(trained, tmp_path):
    out = tmp_path / "never"
    ckpt = trained / "ckpt.pt"
    cases = [
        (["--prompt", "Zebra"], "characters not in the model's vocabulary: 'Z'"),
        (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--prompt", "to be or not to be the king"], "longer than the model's context (block_size 16)"),
    ]
    for extra, message in cases:
        done = run("sample.py", "--ckpt", ckpt, "--clearml", "off", "--out", out, *extra, check=False)
        assert_clean_failure(done, message, out)
    done = run(
        "sample.py", "--ckpt", tmp_path / "metrics.jsonl", "--clearml", "off", "--out", out, check=False
    )
    assert_clean_failure(done, "not found", out)
