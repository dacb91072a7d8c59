"""decoder_transformer's scripts end to end as subprocesses on a made-up text, tiny settings, CPU only;
and the byte / character bookkeeping they rely on."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, one_line_error, run_script

sys.path.insert(0, str(REPO / "decoder_transformer"))
from sample import char_boundary  # noqa: E402
from textdata import Vocab  # noqa: E402
from train import progress_line  # noqa: E402

TRAIN, SAMPLE = "decoder_transformer/train.py", "decoder_transformer/sample.py"
TINY = {
    "--n-layer": 1,
    "--n-head": 2,
    "--n-embd": 16,
    "--block-size": 16,
    "--batch-size": 4,
    "--eval-batches": 2,
    "--eval-interval": 10,
    "--log-interval": 5,
    "--warmup-iters": 2,
    "--lr": 1e-2,
    "--clearml": "off",
    "--device": "cpu",
}
ENV = {"OMP_NUM_THREADS": "1"}


def tiny(**changes) -> list[str]:
    flags = {**TINY, **{f"--{k.replace('_', '-')}": v for k, v in changes.items()}}
    return [str(x) for kv in flags.items() for x in kv]


def run(script, *args, rc=0, timeout=180):
    return run_script(script, *args, rc=rc, env=ENV, timeout=timeout)


def rows(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# fast: characters and bytes


def test_unit_counts_give_characters_and_bytes():
    text = "naïve ✓ x"
    byte_vocab, char_vocab = Vocab("byte"), Vocab.from_text("char", text)
    assert byte_vocab.unit_counts(torch.tensor(byte_vocab.encode(text))) == (9, 12)
    assert char_vocab.unit_counts(torch.tensor(char_vocab.encode(text))) == (9, 12)


def test_byte_sampling_stops_on_a_character_boundary_and_counts_replacements():
    data = list("a✓b".encode())  # a, 3 bytes of ✓, b
    assert [char_boundary(data, n) for n in range(6)] == [0, 1, 4, 4, 4, 5]
    assert char_boundary(data[:3], 2) == 1  # ✓ never completes: back to the last whole character
    vocab = Vocab("byte")
    assert vocab.decode_generated(data) == ("a✓b", 0)
    assert vocab.decode_generated([0x61, 0xFF, 0xE2, 0x9C, 0x62]) == ("a\ufffd\ufffdb", 2)  # stray, cut short
    assert char_boundary([0x61, 0xFF, 0x62], 2) == 2  # an invalid byte is replaced at once: a boundary


def test_progress_line_counts_the_rate_from_this_process_start():
    assert progress_line(800, 0, 2000, 160.0) == "step 800/2,000 (40%), 2:40 elapsed, 5.0 steps/s, ETA 4:00"
    resumed = progress_line(1500, 1000, 2000, 4000.0)  # 500 steps here in 4000 s: 500 more take 4000 s
    assert resumed == "step 1,500/2,000 (75%), 1:06:40 elapsed, 0.1 steps/s, ETA 1:06:40"
    assert progress_line(10, 10, 20, 5.0).endswith("0.0 steps/s, ETA unknown")


# ---------------------------------------------------------------------------------------------
# end to end


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
    run(TRAIN, "--text", text_file, "--max-iters", "40", "--out", out, *tiny())
    return out


@pytest.mark.slow
def test_train_writes_a_run_and_lowers_the_loss(trained):
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["iters"] == 40 and summary["pos"] == "rope" and summary["vocab"] == "char"
    # one token per character (all ASCII: one byte each): bits = nats / ln 2
    assert summary["val_bits_per_char"] == pytest.approx(summary["val_loss"] / math.log(2))
    assert summary["val_bits_per_byte"] == pytest.approx(summary["val_bits_per_char"])
    val = [r["eval/val_loss"] for r in rows(trained) if "eval/val_loss" in r]
    assert len(val) == 5  # steps 0, 10, 20, 30, 40
    assert val[-1] < val[0] - 0.5  # from ~ln(vocab) = 2.9 toward the text's entropy
    assert summary["val_loss_2x_context"] is not None  # rope runs at twice the training context
    assert (trained / "loss_curves.png").stat().st_size > 10_000
    best = torch.load(trained / "best.pt", weights_only=True)  # plain types only
    best_step = min((r for r in rows(trained) if "eval/val_loss" in r), key=lambda r: r["eval/val_loss"])
    assert best["iter"] == best_step["step"]
    assert best["state"]["best_val"] == pytest.approx(best_step["eval/val_loss"])
    assert torch.load(trained / "checkpoint.pt", weights_only=True)["iter"] == 40


@pytest.mark.slow
def test_a_log_file_gets_plain_progress_lines_and_no_bar(text_file, tmp_path):
    proc = run(
        TRAIN, "--text", text_file, "--max-iters", "12", "--out", tmp_path / "r", *tiny(progress_every=0)
    )
    lines = [line for line in proc.stdout.splitlines() if " elapsed, " in line]
    assert lines[0].startswith("step 1/12 (8%), 0:0") and lines[-1].startswith("step 12/12 (100%)")
    assert all("steps/s, ETA " in line for line in lines) and "\r" not in proc.stderr + proc.stdout


@pytest.mark.slow
def test_full_context_loss_in_the_summary_and_rescored_at_another_stride(trained, tmp_path):
    """train.py's summary holds the full-context loss (stride 1); `benchmark.py --task val` gives the same
    number from the checkpoint, and at stride block_size about the tiled loss."""
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["full_context_stride"] == 1
    assert summary["val_bits_per_char_full_context"] == pytest.approx(
        summary["val_loss_full_context"] / math.log(2)
    )
    rescored = {}
    for stride in (1, 16):
        out = tmp_path / f"s{stride}"
        flags = ["--ckpt", trained / "checkpoint.pt", "--eval-stride", stride, "--clearml", "off"]
        run("decoder_transformer/benchmark.py", "--task", "val", *flags, "--out", out)
        rescored[stride] = json.loads((out / "summary.json").read_text())["val_loss_full_context"]
    assert rescored[1] == pytest.approx(summary["val_loss_full_context"], rel=1e-5)
    assert rescored[16] == pytest.approx(summary["val_loss"], abs=0.05)  # stride T: tiled, plus the rest


@pytest.mark.slow
def test_resume_continues_the_same_run_exactly(text_file, tmp_path):
    """40 steps at once against 20 steps, then --resume to 40: identical metrics (dropout on)."""
    flags = [*tiny(dropout=0.1, lr_decay_iters=40), "--text", text_file]
    run(TRAIN, *flags, "--max-iters", "40", "--out", tmp_path / "whole")
    run(TRAIN, *flags, "--max-iters", "20", "--out", tmp_path / "split")
    run(TRAIN, *flags, "--max-iters", "40", "--out", tmp_path / "split", "--resume")
    strip = ("time", "charts/tokens_per_second")
    whole, split = (
        [{k: v for k, v in r.items() if k not in strip} for r in rows(tmp_path / d)]
        for d in ("whole", "split")
    )
    assert whole == split
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("whole", "split"))
    assert a["val_loss"] == b["val_loss"]


@pytest.mark.slow
def test_resume_with_a_changed_training_flag_exits_1_naming_it(trained, text_file):
    before = (trained / "metrics.jsonl").read_text()
    done = run(
        TRAIN, "--text", text_file, "--max-iters", "60", "--out", trained, "--resume", *tiny(lr=0.02), rc=1
    )
    assert "--lr 0.01 -> 0.02" in one_line_error(done)
    assert (trained / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_that_resumes(text_file, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        str(REPO / TRAIN),
        *tiny(),
        "--text",
        str(text_file),
        "--max-iters",
        "100000",
        "--out",
        str(out),
    ]
    env = {**os.environ, **ENV}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "checkpoint.pt").exists():  # training has started
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    assert "checkpoint saved" in stderr and "Traceback" not in stderr
    stopped_at = torch.load(out / "checkpoint.pt", weights_only=True)["iter"]
    assert 0 < stopped_at < 100000
    run(TRAIN, *tiny(), "--text", text_file, "--max-iters", stopped_at + 10, "--out", out, "--resume")
    steps = [r["step"] for r in rows(out)]
    assert steps == sorted(steps) and steps[-1] == stopped_at + 10  # one curve, no repeated steps


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(text_file, tmp_path):
    out = tmp_path / "ddp"
    port = str(29500 + os.getpid() % 1000)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
        + [str(REPO / TRAIN), *tiny(), "--text", str(text_file), "--max-iters", "10", "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["iters"] == 10
    assert "2 process(es), 128 tokens/step" in done.stdout  # 2 x batch 4 x context 16


@pytest.mark.slow
def test_sample_prints_the_same_text_with_and_without_cache(trained, tmp_path):
    flags = ["--ckpt", trained / "checkpoint.pt", "--prompt", "the king", "--max-new-tokens", "40"]
    flags += ["--temperature", "0.8", "--top-p", "0.9", "--clearml", "off", "--device", "cpu"]
    outs = [
        run(SAMPLE, *flags, "--out", tmp_path / f"s{i}", *extra).stdout
        for i, extra in enumerate([[], ["--no-kv-cache"]])
    ]
    texts = [o.rsplit("generation:", 1)[0] for o in outs]
    assert texts[0] == texts[1] and texts[0].startswith("the king")
    last = outs[0].strip().splitlines()[-1]
    assert last.startswith("generation: 40 tokens in ") and last.endswith(" tokens/s)")
    assert json.loads((tmp_path / "s1" / "summary.json").read_text())["kv_cache"] is False


@pytest.mark.slow
def test_evaluate_sampling_writes_json_and_plot(trained, text_file, tmp_path):
    out = tmp_path / "eval"
    run(
        "decoder_transformer/evaluate_sampling.py",
        *["--ckpt", trained / "checkpoint.pt", "--text", text_file, "--temperatures", "0.5", "1.0"],
        *[
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
        ],
        *["--out", out],
    )
    result = json.loads((out / "sampling_eval.json").read_text())
    assert len(result["settings"]) == 4
    by = {(r["temperature"], r["top_p"]): r["self_perplexity"] for r in result["settings"]}
    assert by[(0.5, 0.5)] < by[(1.0, 1.0)]  # sharper sampling -> samples the model finds likelier
    assert (out / "quality_diversity.png").stat().st_size > 10_000


@pytest.mark.slow
def test_compare_runs_tables_and_plots(trained, tmp_path):
    def compare(out, *flags, rc=0):
        return run("decoder_transformer/compare_runs.py", "--runs", trained, *flags, "--clearml", "off",
                   "--out", tmp_path / out, rc=rc)  # fmt: skip

    done = compare("cmp")
    summary = json.loads((trained / "summary.json").read_text())
    cells = " | ".join(
        f"{summary[k]:.4f} ± 0.0000" for k in ("best_val_loss", "val_loss", "val_loss_full_context")
    )
    assert f"| rope | char | 0 | {cells} |" in done.stdout
    assert (tmp_path / "cmp" / "val_loss_curves.png").is_file() and (tmp_path / "cmp" / "table.md").is_file()
    compared = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert "nanogpt" not in compared
    assert compared["rope_char"]["params"] == [summary["params"]] and compared["rope_char"]["iters"] == [
        summary["iters"]
    ]

    log = tmp_path / "nanogpt.log"  # nanoGPT's stdout: eval lines among per-iteration lines
    log.write_text(
        "step 0: train loss 4.2874, val loss 4.2823\niter 0: loss 4.2, time 9.0ms, mfu -100.00%\n"
        "step 250: train loss 1.9797, val loss 2.0747\nstep 500: train loss 1.5, val loss 1.4\n"
        "step 750: train loss 1.3593, val loss 1.5869\n"
    )
    done = compare("cmp2", "--nanogpt-log", log)
    assert "best val 1.4000 at step 500, last 1.5869 at step 750" in done.stdout
    result = json.loads((tmp_path / "cmp2" / "summary.json").read_text())["nanogpt"]
    assert result == {"best_val_loss": 1.4, "best_step": 500, "final_val_loss": 1.5869}
    log.write_text("iter 0: loss 4.2, time 9.0ms\n")
    error = one_line_error(compare("cmp3", "--nanogpt-log", log, rc=1))
    assert "no 'step N: train loss" in error and str(log) in error


@pytest.mark.slow
def test_generation_benchmark_compares_cache_and_no_cache(trained, tmp_path):
    flags = ["--task", "generate", "--ckpt", trained / "checkpoint.pt", "--new-tokens", "40", "--rounds", "1"]
    run(
        "decoder_transformer/benchmark.py",
        *flags,
        "--device",
        "cpu",
        "--clearml",
        "off",
        "--out",
        tmp_path / "b",
    )
    result = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert result["same_tokens"] is True and result["new_tokens"] == 40
    assert result["speedup_cached_vs_uncached"] == pytest.approx(
        result["cached_tokens_per_second"] / result["uncached_tokens_per_second"]
    )


@pytest.mark.slow
def test_byte_vocabulary_reports_bits_per_character_and_samples_whole_characters(tmp_path):
    text = tmp_path / "mixed.txt"
    text.write_text("naïve café — ünïcödé ✓ text, " * 60)
    run(TRAIN, "--text", text, "--vocab", "byte", "--max-iters", "30", "--out", tmp_path / "run", *tiny())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["vocab"] == "byte" and summary["val_bits_per_byte"] == pytest.approx(
        summary["val_loss"] / math.log(2)
    )
    assert summary["val_bits_per_char"] > 1.1 * summary["val_bits_per_byte"]  # ~1.3 bytes per character here
    out = tmp_path / "sample"
    flags = [
        "--ckpt",
        tmp_path / "run" / "checkpoint.pt",
        "--prompt",
        "naïve",
        "--max-new-tokens",
        "60",
        "--num-samples",
        "4",
    ]
    done = run(SAMPLE, *flags, "--temperature", "1.5", "--top-p", "1.0", "--clearml", "off", "--out", out)
    result = json.loads((out / "summary.json").read_text())
    assert 4 * 60 <= result["tokens_kept"] <= 4 * 63 and isinstance(result["replacement_characters"], int)
    assert f"{result['replacement_characters']} replacement characters" in done.stdout
    for sample in (out / "samples.txt").read_text().split("---------------"):
        sample.strip().encode("utf-8")  # whole characters only (a cut sequence would have become U+FFFD)


# ---------------------------------------------------------------------------------------------
# bad input: one line, exit 1, naming the file


@pytest.mark.slow
def test_bad_training_input(tmp_path, text_file):
    out = tmp_path / "never"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    for flags, message in [
        (["--text", empty], f"{empty} is empty"),
        (["--text", latin1], f"{latin1} is not UTF-8"),
        (["--text", tmp_path / "nope.txt"], "no such file"),
        (["--data-dir", tmp_path / "nodata"], "tinyshakespeare"),
    ]:
        done = run(TRAIN, *flags, "--out", out, *tiny(), rc=1)
        assert message in one_line_error(done) and not out.exists()
    done = run(TRAIN, "--text", text_file, "--out", out, *tiny(n_embd=15), rc=2)
    assert "--n-embd (15) must split into --n-head (2)" in one_line_error(done)


def damaged_checkpoints(trained, tmp_path) -> list:
    """(file, what the error must say) for checkpoints that must be refused."""
    good = torch.load(trained / "checkpoint.pt", weights_only=True)
    cases = []
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((trained / "checkpoint.pt").read_bytes()[:5000])
    cases.append((truncated, "damaged or not a torch checkpoint"))
    pickled = tmp_path / "pickled.pt"
    torch.save({**good, "extra": Vocab("byte")}, pickled)
    cases.append((pickled, "pickled Python objects"))
    for name, key, value in [
        ("config_key", "model_config", {"n_layers": 2}),
        ("vocab_kind", "vocab", {"kind": "word"}),
    ]:
        path = tmp_path / f"{name}.pt"
        torch.save({**good, key: {**good[key], **value}}, path)
        cases.append((path, "unusable model config or vocabulary"))
    return cases


@pytest.mark.slow
def test_damaged_checkpoints_are_refused_in_one_line(trained, tmp_path):
    out = tmp_path / "never"
    for path, message in damaged_checkpoints(trained, tmp_path):
        line = one_line_error(run(SAMPLE, "--ckpt", path, "--clearml", "off", "--out", out, rc=1))
        assert str(path) in line and message in line, line
        assert not out.exists()


@pytest.mark.slow
def test_damaged_resume_checkpoint_and_summary_are_refused(trained, text_file, tmp_path):
    run(TRAIN, "--text", text_file, "--max-iters", "10", "--out", tmp_path / "r", *tiny())
    (tmp_path / "r" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    done = run(
        TRAIN, "--text", text_file, "--max-iters", "20", "--out", tmp_path / "r", "--resume", *tiny(), rc=1
    )
    assert str(tmp_path / "r" / "checkpoint.pt") in one_line_error(done)
    (tmp_path / "r" / "summary.json").write_text("{broken")
    done = run(
        "decoder_transformer/compare_runs.py",
        "--runs",
        tmp_path / "r",
        "--clearml",
        "off",
        "--out",
        tmp_path / "c",
        rc=1,
    )
    assert str(tmp_path / "r" / "summary.json") in one_line_error(done)


@pytest.mark.slow
def test_bad_sampling_input(trained, tmp_path):
    out = tmp_path / "never"
    for extra, message, rc in [
        (["--prompt", "Zebra"], "characters not in the model's vocabulary: 'Z'", 1),
        (["--temperature", "-1"], "--temperature must be >= 0", 2),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]", 2),
        (["--prompt", "to be or not to be the king"], "longer than the model's context (block_size 16)", 1),
    ]:
        done = run(
            SAMPLE, "--ckpt", trained / "checkpoint.pt", "--clearml", "off", "--out", out, *extra, rc=rc
        )
        assert message in one_line_error(done) and not out.exists()
    done = run(SAMPLE, "--ckpt", tmp_path / "nothing.pt", "--clearml", "off", "--out", out, rc=1)
    assert "no such file" in one_line_error(done)
    done = run(SAMPLE, "--ckpt", trained, "--clearml", "off", "--out", out, rc=1)  # the run folder itself
    assert "is a folder, not a checkpoint file" in one_line_error(done)
    assert str(trained / "checkpoint.pt") in one_line_error(done) and not out.exists()
