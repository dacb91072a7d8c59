"""revnet_mnist/train.py and benchmark.py end to end on made-up MNIST-format files; the MNIST loader's
checks (magic number, truncation, checksum, no network) and the bad-input paths."""

import gzip
import hashlib
import io
import json
import struct
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest

FOLDER = Path(__file__).resolve().parent.parent / "revnet_mnist"
sys.path.insert(0, str(FOLDER))
import mnist_data  # noqa: E402

from common import UserError  # noqa: E402

SMALL = ["--width", "32", "--depth", "2", "--batch-size", "32", "--lr", "3e-3", "--clearml", "off"]


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def make_mnist(root: Path, n_train=320, n_test=100, gz=True, seed=0) -> Path:
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


def run(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(FOLDER / script), *map(str, args)], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_mnist(tmp_path_factory.mktemp("mnist"))


def assert_clean_failure(result, code: int, *phrases):
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    for phrase in phrases:
        assert phrase in result.stderr


# ----------------------------------------------------------------------------- train.py


@pytest.mark.parametrize("model", ["revnet", "resnet", "mlp"])
def test_train_end_to_end_writes_summary_metrics_plot_and_checkpoint(data_dir, tmp_path, model):
    out = tmp_path / "run"
    result = run("train.py", "--model", model, "--epochs", "2", "--data-dir", data_dir, "--out", out, *SMALL)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "test_accuracy",
        "peak_step_memory_mib",
        "peak_rss_mib",
        "seconds_per_epoch",
        "params",
        "model",
        "depth",
        "width",
    ):
        assert summary[key] is not None, key
    assert [summary[k] for k in ("model", "depth", "width", "train_images")] == [model, 2, 32, 320]
    assert summary["test_accuracy"] >= 0.8  # the made-up digits are easy; chance is 0.1
    assert 0 < summary["peak_step_memory_mib"] < summary["peak_rss_mib"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "test/accuracy" in r] == [0, 10, 20]  # step 0, then 10 steps an epoch
    assert any("train/loss" in r for r in rows) and any("memory/peak_step_mib" in r for r in rows)
    assert (out / "curves.png").stat().st_size > 1000 and (out / "checkpoint.npz").is_file()
    assert json.loads((out / "config.json").read_text())["args"]["model"] == model


def test_train_resumes_from_its_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"
    first = run("train.py", "--epochs", "1", "--data-dir", data_dir, "--out", out, *SMALL)
    assert first.returncode == 0, first.stderr
    epoch1 = json.loads((out / "summary.json").read_text())["test_accuracy"]
    resumed = run("train.py", "--epochs", "2", "--resume", "--data-dir", data_dir, "--out", out, *SMALL)
    assert resumed.returncode == 0, resumed.stderr
    assert "epoch 1/2" not in resumed.stdout and "epoch 2/2" in resumed.stdout  # epoch 1 is not redone
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    accuracies = [r["test/accuracy"] for r in rows if "test/accuracy" in r]
    assert accuracies[:2] == [accuracies[0], epoch1] and len(accuracies) == 3
    mismatch = run(
        "train.py",
        "--epochs",
        "3",
        "--resume",
        "--width",
        "64",
        "--data-dir",
        data_dir,
        "--out",
        out,
        *SMALL[2:],
    )
    assert_clean_failure(mismatch, 1, "--resume")


@pytest.mark.parametrize(
    "flags, phrase",
    [
        (["--width", "33"], "--width"),
        (["--width", "2"], "--width"),
        (["--depth", "0"], "--depth"),
        (["--lr", "0"], "--lr"),
        (["--limit-train", "10"], "--limit-train"),
    ],
)
def test_train_rejects_bad_flags_without_writing(data_dir, tmp_path, flags, phrase):
    out = tmp_path / "run"
    result = run("train.py", "--data-dir", data_dir, "--out", out, "--clearml", "off", *flags)
    assert_clean_failure(result, 2, phrase)
    assert not out.exists()


@pytest.mark.parametrize(
    "damage, phrase",
    [
        (
            lambda p: p.write_bytes(gzip.compress(b"\x00\x00\x12\x34" + gzip.decompress(p.read_bytes())[4:])),
            "not an MNIST idx file",
        ),
        (lambda p: p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-100])), "truncated"),
        (lambda p: p.write_bytes(b"not gzip at all"), "cannot read"),
    ],
)
def test_train_reports_corrupt_data_in_one_line_without_writing(tmp_path, damage, phrase):
    data = make_mnist(tmp_path / "data", n_train=64, n_test=20)
    damage(data / "MNIST" / "raw" / "train-images-idx3-ubyte.gz")
    out = tmp_path / "run"
    result = run("train.py", "--data-dir", data, "--out", out, "--clearml", "off")
    assert_clean_failure(result, 1, phrase, "train-images-idx3-ubyte.gz")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_train_will_not_overwrite_an_earlier_run(data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("earlier")
    result = run("train.py", "--epochs", "1", "--data-dir", data_dir, "--out", out, *SMALL)
    assert_clean_failure(result, 1, "already holds a run")
    assert [p.name for p in out.iterdir()] == ["summary.json"]
    assert (out / "summary.json").read_text() == "earlier"


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


# ----------------------------------------------------------------------------- benchmark.py


def test_benchmark_end_to_end_writes_json_and_plot(data_dir, tmp_path):
    out = tmp_path / "bench"
    result = run(
        "benchmark.py",
        "--depths",
        "1",
        "4",
        "--steps",
        "3",
        "--batch-size",
        "64",
        "--width",
        "32",
        "--data-dir",
        data_dir,
        "--out",
        out,
        "--clearml",
        "off",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "benchmark.json").read_text())
    assert report["data"] == "mnist"
    for model in ("revnet", "resnet", "mlp"):
        assert set(report["memory_mib"][model]) == {"1", "4"}
        assert all(t > 0 for t in report["step_seconds"][model].values())
    assert set(report["torch_step_seconds"]) == {"1", "4"}
    memory = report["memory_mib"]
    assert memory["resnet"]["4"] > memory["resnet"]["1"] and memory["revnet"]["4"] < memory["resnet"]["4"]
    assert all(
        v["grad_rel_error"] < 1e-10 and v["grad_rel_error_all"] <= v["grad_rel_error"]
        for v in report["numerics"]["float64"].values()
    )
    assert all(v["grad_rel_error"] < 1e-4 for v in report["numerics"]["float32"].values())
    assert (out / "benchmark.png").stat().st_size > 1000
    assert "revnet_over_resnet_memory" in result.stdout


def test_benchmark_uses_random_batches_without_data_and_rejects_bad_depths(tmp_path):
    out = tmp_path / "bench"
    result = run(
        "benchmark.py",
        "--depths",
        "1",
        "--steps",
        "1",
        "--batch-size",
        "16",
        "--width",
        "8",
        "--data-dir",
        tmp_path / "empty",
        "--out",
        out,
        "--clearml",
        "off",
    )
    assert result.returncode == 0, result.stderr
    assert "random batches" in result.stdout
    assert json.loads((out / "benchmark.json").read_text())["data"] == "random"
    bad = run("benchmark.py", "--depths", "0", "--out", tmp_path / "bad", "--clearml", "off")
    assert_clean_failure(bad, 2, "--depths")
    assert not (tmp_path / "bad").exists()
