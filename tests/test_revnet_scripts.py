"""revnet_mnist's scripts end to end on made-up MNIST-format files (train.py, footprint.py, benchmark.py),
the MNIST loader's checks (magic number, truncation, flipped bytes, checksum, no network) and the
convention's bad-input paths: changed flags on --resume, corrupt files, bad flags."""

import gzip
import hashlib
import importlib.util
import io
import json
import struct
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, one_line_error, run_script

sys.path.insert(0, str(REPO / "revnet_mnist"))
import mnist_data  # noqa: E402

from common import UserError  # noqa: E402

TRAIN, FOOTPRINT, BENCHMARK = (
    "revnet_mnist/train.py",
    "revnet_mnist/footprint.py",
    "revnet_mnist/benchmark.py",
)
SMALL = ["--width", "32", "--depth", "2", "--batch-size", "32", "--lr", "3e-3", "--val-size", "80"]
SMALL += ["--clearml", "off"]


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def make_mnist(root: Path, n_train=400, n_test=100, gz=True, seed=0) -> Path:
    """Learnable made-up digits: class c is a bright 6x6 square at its own place, over noise."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(labels):
            row, col = 2 + 9 * (c // 4), 2 + 6 * (c % 4)
            images[i, row : row + 6, col : col + 6] = 255
        for kind, array, magic in (("images-idx3", images, 2051), ("labels-idx1", labels, 2049)):
            payload = idx_bytes(array, magic)
            name = f"{split}-{kind}-ubyte"
            if gz:
                (raw / f"{name}.gz").write_bytes(gzip.compress(payload))
            else:
                (raw / name).write_bytes(payload)
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_mnist(tmp_path_factory.mktemp("mnist"))


def load_train():
    """revnet_mnist/train.py as a module (under its own name: other experiments have a train.py too)."""
    spec = importlib.util.spec_from_file_location("revnet_train", REPO / TRAIN)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- train.py


@pytest.mark.slow
@pytest.mark.parametrize("model", ["revnet", "resnet", "mlp"])
def test_train_end_to_end_validates_every_epoch_and_tests_once(data_dir, tmp_path, model):
    out = tmp_path / "run"
    proc = run_script(TRAIN, "--model", model, "--epochs", "2", "--data-dir", data_dir, "--out", out, *SMALL)
    summary = json.loads((out / "summary.json").read_text())
    assert [summary[k] for k in ("model", "depth", "width", "train_images", "val_images")] == [
        model,
        2,
        32,
        320,
        80,
    ]
    assert summary["test_accuracy"] >= 0.8  # the made-up digits are easy; chance is 0.1
    assert 0 < summary["peak_step_memory_mib"] < summary["peak_rss_mib"]
    assert summary["threads"] == 1 and summary["train_seconds"] > 0
    assert f"{summary['train_seconds']:.0f} s training" in proc.stdout  # run time printed with the result
    metrics = rows(out)
    assert [r["step"] for r in metrics if "eval/val_accuracy" in r] == [0, 10, 20]  # 10 steps an epoch
    assert [r["step"] for r in metrics if "eval/test_accuracy" in r] == [20]  # the test set is used once
    assert all(k.split("/")[0] in ("step", "time", "train", "eval", "charts") for r in metrics for k in r)
    assert ("train/rebuild_error" in metrics[-2]) == (model == "revnet")
    assert (out / "curves.png").stat().st_size > 1000 and (out / "checkpoint.npz").is_file()
    peaks = [r["charts/peak_rss_mib"] for r in metrics if "charts/peak_rss_mib" in r]  # one per epoch
    assert len(peaks) == 2 and peaks[0] <= peaks[1] <= summary["peak_rss_mib"]
    # the first step fills the workspace; the warm ones after it reuse it (the model tests measure how well)
    assert summary["warm_step_memory_mib"] < summary["peak_step_memory_mib"]


@pytest.mark.slow
def test_train_with_clearml_off_never_imports_clearml(data_dir, tmp_path):
    argv = ["train.py", "--epochs", "1", "--data-dir", str(data_dir), "--out", str(tmp_path / "run"), *SMALL]
    code = (
        f"import runpy, sys; sys.path[:0] = [{str(REPO / 'revnet_mnist')!r}, {str(REPO)!r}]; "
        f"sys.argv = {argv!r}; "
        f"runpy.run_path({str(REPO / TRAIN)!r}, run_name='__main__'); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'clearml', 'torch', 'matplotlib'}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "['matplotlib']"  # the curves figure, and nothing of ClearML


def test_memory_preset_fills_the_flags_left_unset():
    from common import parse_args

    train = load_train()
    memory = parse_args(train.Args, ["--preset", "memory", "--epochs", "2"], check=train.check_args)
    preset = train.PRESETS["memory"]
    assert (memory.depth, memory.width, memory.batch_size, memory.lr) == tuple(
        preset[k] for k in ("depth", "width", "batch_size", "lr")
    )
    assert memory.epochs == 2  # a flag given on the command line wins over the preset
    default = parse_args(train.Args, [], check=train.check_args)
    assert (default.depth, default.width, default.batch_size, default.lr, default.epochs) == (
        4,
        256,
        128,
        1e-3,
        10,
    )


@pytest.mark.slow
def test_step_memory_is_the_same_whatever_the_clearml_mode(data_dir, tmp_path):
    flags = [f for f in SMALL if f not in ("--clearml", "off")]
    memory = {}
    for mode in ("off", "offline"):
        out = tmp_path / mode
        run_script(TRAIN, "--epochs", "1", "--data-dir", data_dir, "--out", out, *flags, "--clearml", mode)
        memory[mode] = json.loads((out / "summary.json").read_text())["peak_step_memory_mib"]
    # tracemalloc is process-wide: ClearML's threads may add a few bytes, never an activation
    assert memory["off"] > 0 and memory["offline"] == pytest.approx(memory["off"], rel=0.02)


@pytest.mark.slow
def test_reversibility_error_stays_small_over_a_few_hundred_float32_steps(tmp_path):
    data = make_mnist(tmp_path / "data", n_train=1200)
    out = tmp_path / "run"
    flags = ["--width", "32", "--depth", "4", "--batch-size", "16", "--val-size", "200", "--clearml", "off"]
    proc = run_script(TRAIN, "--epochs", "5", "--data-dir", data, "--out", out, *flags)  # 5 x 62 steps
    checks = [r for r in rows(out) if "train/rebuild_error" in r]
    assert [r["step"] for r in checks] == [62 * e for e in range(1, 6)]
    assert all(0 < r["train/rebuild_error"] < 1e-4 for r in checks), checks
    assert all(r["train/grad_error"] < 1e-3 for r in checks), checks
    assert "warning" not in proc.stderr


@pytest.mark.slow
def test_train_resumes_without_repeating_epochs_or_metrics_rows(data_dir, tmp_path):
    out = tmp_path / "run"
    run_script(TRAIN, "--epochs", "1", "--data-dir", data_dir, "--out", out, *SMALL)
    (out / "summary.json").unlink()  # as if the first run had been interrupted after its checkpoint
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 15, "train/loss": 9.9}) + "\n")  # logged after the checkpoint
    resumed = run_script(TRAIN, "--epochs", "2", "--resume", "--data-dir", data_dir, "--out", out, *SMALL)
    assert "epoch 1/2" not in resumed.stdout and "epoch 2/2" in resumed.stdout
    steps = [r["step"] for r in rows(out)]
    assert 9.9 not in [r.get("train/loss") for r in rows(out)]
    assert steps == sorted(steps) and steps.count(10) == 2  # epoch 1's row and the 2nd epoch's first loss
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2
    finished = run_script(
        TRAIN, "--epochs", "2", "--resume", "--data-dir", data_dir, "--out", out, *SMALL, rc=1
    )
    assert "nothing to resume" in one_line_error(finished)


def test_shift_images_is_zero_padding_then_cropping():
    rng = np.random.default_rng(0)
    table = mnist_data.shifts(2)
    counts = rng.multinomial(60, np.full(len(table), 1 / len(table)))
    src = rng.integers(1, 256, size=(60, 28, 28), dtype=np.uint8)
    out = np.full_like(src, 7)  # whatever was there before is overwritten
    mnist_data.shift_images(src, out, counts)
    padded = np.pad(src, ((0, 0), (2, 2), (2, 2)))  # an image moved by (dy, dx): pad, then crop
    which = np.repeat(np.arange(len(table)), counts)
    for i, (dy, dx) in enumerate(table[k] for k in which):
        np.testing.assert_array_equal(out[i], padded[i, 2 - dy : 30 - dy, 2 - dx : 30 - dx])
    assert table[which[0]] != table[which[-1]] and (out == 0).sum() > (src == 0).sum()
    with pytest.raises(ValueError, match="one per shift"):
        mnist_data.shift_images(src, out, counts[:-1])


@pytest.mark.slow
def test_the_checkpoint_carries_the_translation_stream_so_a_resume_continues_it(data_dir, tmp_path):
    out, flags = tmp_path / "run", [*SMALL, "--augment-shift", "1", "--data-dir", data_dir]
    run_script(TRAIN, "--epochs", "1", "--out", out, *flags)
    meta = json.loads(str(np.load(out / "checkpoint.npz")["meta"]))
    rng, probs = np.random.default_rng([0, 2]), np.full(9, 1 / 9)  # seed 0's stream, 9 shifts of <= 1 px
    for _ in range((400 - 80) // 32):  # one draw per step: 320 training images, batch 32
        rng.multinomial(32, probs)
    assert meta["shift_rng"] == rng.bit_generator.state
    (out / "summary.json").unlink()  # as if interrupted after the checkpoint
    resumed = run_script(TRAIN, "--epochs", "2", "--resume", "--out", out, *flags)
    assert "epoch 2/2" in resumed.stdout
    changed = run_script(
        TRAIN, "--epochs", "3", "--resume", "--out", out, *SMALL, "--data-dir", data_dir, rc=1
    )
    assert "--augment-shift" in one_line_error(changed)  # a training flag: refused when it changes


@pytest.mark.slow
@pytest.mark.parametrize("flag, value", [("--lr", "1e-2"), ("--batch-size", "16"), ("--val-size", "40")])
def test_resume_with_a_changed_training_flag_exits_1_naming_it(data_dir, tmp_path, flag, value):
    out = tmp_path / "run"
    run_script(TRAIN, "--epochs", "1", "--data-dir", data_dir, "--out", out, *SMALL)
    before = (out / "metrics.jsonl").read_text()
    flags = [*SMALL, flag, value]  # argparse: the last value wins
    proc = run_script(TRAIN, "--epochs", "2", "--resume", "--data-dir", data_dir, "--out", out, *flags, rc=1)
    assert flag in one_line_error(proc)
    assert (out / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize(
    "flags, phrase",
    [
        (["--width", "33"], "--width"),
        (["--depth", "0"], "--depth"),
        (["--lr", "0"], "--lr"),
        (["--limit-train", "10"], "--limit-train"),
        (["--rebuild-tolerance", "0"], "--rebuild-tolerance"),
        (["--val-size", "0"], "--val-size"),
    ],
)
def test_train_rejects_bad_flags(flags, phrase, capsys):
    train = load_train()
    with pytest.raises(SystemExit) as exc:
        train.parse_args(train.Args, flags, check=train.check_args)
    assert exc.value.code == 2 and phrase in capsys.readouterr().err


def flip_a_byte(path: Path) -> None:
    payload = bytearray(path.read_bytes())
    payload[len(payload) // 2] ^= 0xFF  # inside the deflate stream
    path.write_bytes(bytes(payload))


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage, phrase",
    [
        (
            lambda p: p.write_bytes(gzip.compress(b"\x00\x00\x12\x34" + gzip.decompress(p.read_bytes())[4:])),
            "not an MNIST idx file",
        ),
        (lambda p: p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-100])), "truncated"),
        (lambda p: p.write_bytes(b"not gzip at all"), "cannot read"),
        (flip_a_byte, "train-images-idx3-ubyte.gz"),
    ],
)
def test_train_reports_corrupt_data_in_one_line_without_writing(tmp_path, damage, phrase):
    data = make_mnist(tmp_path / "data", n_train=200, n_test=20)
    damage(data / "MNIST" / "raw" / "train-images-idx3-ubyte.gz")
    out = tmp_path / "run"
    proc = run_script(TRAIN, "--data-dir", data, "--out", out, "--val-size", "50", "--clearml", "off", rc=1)
    line = one_line_error(proc)
    assert phrase in line and "train-images-idx3-ubyte.gz" in line
    assert not out.exists()


@pytest.mark.slow
def test_train_reports_a_corrupt_checkpoint_on_resume(data_dir, tmp_path):
    out = tmp_path / "run"
    run_script(TRAIN, "--epochs", "1", "--data-dir", data_dir, "--out", out, *SMALL)
    (out / "summary.json").unlink()
    (out / "checkpoint.npz").write_bytes((out / "checkpoint.npz").read_bytes()[:300])
    proc = run_script(TRAIN, "--epochs", "2", "--resume", "--data-dir", data_dir, "--out", out, *SMALL, rc=1)
    # RunLogger adds a "run folder:" line when a resumed run stops; the error itself is one line
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in proc.stderr and len(errors) == 1 and "checkpoint.npz" in errors[0]


def test_flipped_byte_in_a_gz_file_is_one_user_error_naming_it(tmp_path):
    raw = make_mnist(tmp_path, n_train=50, n_test=20) / "MNIST" / "raw"
    flip_a_byte(raw / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte.gz"):
        mnist_data.load_split(tmp_path, "t10k", allow_download=False)


# ----------------------------------------------------------------------------- MNIST loader


def test_loader_reads_gzipped_and_uncompressed_files_alike(tmp_path):
    gz = mnist_data.load_split(make_mnist(tmp_path / "gz", gz=True), "t10k", allow_download=False)
    plain = mnist_data.load_split(make_mnist(tmp_path / "plain", gz=False), "t10k", allow_download=False)
    for a, b in zip(gz, plain):
        np.testing.assert_array_equal(a, b)
    assert gz[0].shape == (100, 28, 28) and gz[1].shape == (100,)
    x = mnist_data.normalise(gz[0], "float32")
    assert x.shape == (100, 784) and x.dtype == np.float32
    assert x.min() == pytest.approx(-mnist_data.MEAN / mnist_data.STD)  # pixel 0 after normalising


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_download_checks_the_checksum_and_fails_clearly_without_network(tmp_path, monkeypatch):
    source = make_mnist(tmp_path / "source", n_test=30) / "MNIST" / "raw"
    payloads = {p.name: p.read_bytes() for p in source.iterdir()}
    checksums = {name[:-3]: hashlib.md5(payload).hexdigest() for name, payload in payloads.items()}
    monkeypatch.setattr(mnist_data, "FILES", checksums)

    def serve(url, timeout):
        assert timeout > 0
        return FakeResponse(payloads[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(mnist_data.urllib.request, "urlopen", serve)
    images, labels = mnist_data.load_split(tmp_path / "fresh", "t10k")
    assert images.shape == (30, 28, 28)
    assert sorted(p.name for p in (tmp_path / "fresh" / "MNIST" / "raw").iterdir()) == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]  # no temporary files left behind

    monkeypatch.setattr(mnist_data, "FILES", dict.fromkeys(mnist_data.FILES, "0" * 32))
    with pytest.raises(UserError, match="checksum mismatch"):
        mnist_data.load_split(tmp_path / "bad_sum", "t10k")
    assert not list((tmp_path / "bad_sum" / "MNIST" / "raw").glob("*.gz"))

    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(mnist_data.urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match="could not be downloaded.*no network"):
        mnist_data.load_split(tmp_path / "offline", "train")


# ----------------------------------------------------------------------------- footprint.py, benchmark.py


@pytest.mark.slow
def test_footprint_reports_rss_above_the_arrays_it_accounts_for(data_dir):
    flags = [
        "--width",
        "64",
        "--batch-size",
        "256",
        "--depth",
        "8",
        "--val-size",
        "80",
        "--data-dir",
        data_dir,
    ]
    results = {}
    for model in ("revnet", "resnet"):
        results[model] = json.loads(run_script(FOOTPRINT, "--model", model, *flags).stdout.splitlines()[-1])
    rev, res = results["revnet"]["footprint_mib"], results["resnet"]["footprint_mib"]
    # resnet stores two (batch, width/2) float32 arrays per branch, two branches per block: 8 blocks
    stored_per_block = 4 * 256 * 32 * 4 / 2**20
    assert res["stored_activations"] - rev["stored_activations"] > 7 * stored_per_block
    assert rev["weights"] == res["weights"] == rev["gradients"] and rev["optimizer"] > 2 * rev["weights"]
    for r in results.values():  # a process holds at least the arrays it accounts for
        assert r["peak_rss_mib"] > sum(r["footprint_mib"].values())


@pytest.mark.slow
def test_the_measured_training_process_imports_neither_torch_nor_matplotlib(data_dir):
    argv = [
        "footprint.py",
        "--width",
        "16",
        "--batch-size",
        "32",
        "--val-size",
        "80",
        "--data-dir",
        str(data_dir),
    ]
    code = (
        f"import runpy, sys; sys.path[:0] = [{str(REPO / 'revnet_mnist')!r}, {str(REPO)!r}]; "
        f"sys.argv = {argv!r}; "
        f"runpy.run_path({str(REPO / FOOTPRINT)!r}, run_name='__main__'); "
        "print('torch' in sys.modules, 'matplotlib' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "False False"


@pytest.mark.slow
def test_benchmark_rss_writes_rss_json_and_compares_train_runs(data_dir, tmp_path):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        for model in ("revnet", "resnet"):
            flags = ["--seed", seed, "--model", model, "--epochs", "1", "--data-dir", data_dir]
            run_script(TRAIN, *flags, "--out", runs / f"{model}{seed}", *SMALL)
    out = tmp_path / "bench"
    flags = ["--depths", "1", "4", "--width", "32", "--batch-size", "32", "--steps", "2", "--rss-steps", "1"]
    flags += ["--time-depth", "2", "--runs", runs, "--val-size", "80", "--data-dir", data_dir, "--out", out]
    proc = run_script(BENCHMARK, "--rss", *flags, "--clearml", "off")
    report = json.loads((out / "rss.json").read_text())
    assert report["config"]["width"] == 32 and report["config"]["batch_size"] == 32
    for model in ("revnet", "resnet", "mlp"):
        assert set(report["peak_rss_mib"][model]) == {"1", "4"}
        for depth, rss in report["peak_rss_mib"][model].items():
            assert rss > sum(report["footprint_mib"][model][depth].values())
    assert report["accuracy"]["revnet d2"]["seeds"] == [0, 1]
    assert "|revnet - resnet| test accuracy" in proc.stdout and "step time at depth 2" in proc.stdout
    assert (out / "rss.png").stat().st_size > 1000
    assert "torch" not in proc.stdout


@pytest.mark.slow
def test_benchmark_step_study_writes_json_and_plot(data_dir, tmp_path):
    out = tmp_path / "bench"
    flags = ["--depths", "1", "4", "--steps", "3", "--batch-size", "64", "--width", "32"]
    proc = run_script(BENCHMARK, *flags, "--data-dir", data_dir, "--out", out, "--clearml", "off")
    report = json.loads((out / "benchmark.json").read_text())
    assert report["data"] == "mnist"
    for model in ("revnet", "resnet", "mlp", "torch"):
        assert set(report["step_seconds"][model]) == {"1", "4"}
    memory = report["memory_mib"]
    assert memory["resnet"]["4"] > memory["resnet"]["1"] and memory["revnet"]["4"] < memory["resnet"]["4"]
    assert all(
        v["grad_rel_error"] < 1e-10 and v["grad_rel_error_all"] <= v["grad_rel_error"]
        for v in report["numerics"]["float64"].values()
    )
    assert (out / "benchmark.png").stat().st_size > 1000
    assert "revnet_over_resnet_memory" in proc.stdout


@pytest.mark.slow
def test_benchmark_uses_random_batches_without_data(tmp_path):
    out = tmp_path / "bench"
    flags = ["--depths", "1", "--steps", "1", "--batch-size", "16", "--width", "8", "--clearml", "off"]
    proc = run_script(BENCHMARK, *flags, "--data-dir", tmp_path / "empty", "--out", out)
    assert "random batches" in proc.stdout
    assert json.loads((out / "benchmark.json").read_text())["data"] == "random"


# ----------------------------------------------------------------------------- README tables


def test_readme_tables_render_from_the_committed_results():
    from common.readme import experiment_module

    tables = experiment_module("revnet_mnist/tables.py")
    pairs = tables.memory_pairs()
    memory = tables.memory_table().splitlines()
    if pairs:
        assert len(memory) == 2 + len(pairs) + (len(pairs) > 1)  # header, rule, one row per seed (+ mean)
        rev, res = pairs[0]
        ratio = rev["whole_process_peak_rss_mib"] / res["whole_process_peak_rss_mib"]
        assert f"{ratio:.3f}" in memory[2] and memory[2].startswith(f"| {rev['seed']} |")
    else:
        assert memory == ["(no seed has both a revnet and a resnet file in `results/memory/` yet)"]
    clearml = tables.load("clearml")
    cost = clearml["revnet_seed0"]["whole_process_peak_rss_mib"]
    cost -= clearml["revnet_seed0_clearml-off"]["whole_process_peak_rss_mib"]
    assert f"| {cost:.1f} |" in tables.clearml_table()
    for render in (tables.clearml_table, tables.depth_table):
        lines = render().splitlines()
        assert len(lines) >= 3 and all(line.startswith("|") for line in lines), render.__name__
    assert tables.targets_table().count("\n") >= 3
    assert ("--preset memory" in tables.memory_config()) == bool(tables.load("memory"))
