"""PaDiM's three scripts end to end on a tiny made-up MVTec-layout dataset, and their bad-input messages."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "padim_anomaly"))

import padim_io  # noqa: E402

from common import UserError  # noqa: E402

SIZE = 64  # generated images are 64x64; scripts run with --image-size 64 (a 16x16 patch grid)
TINY = ["--weights", "none", "--image-size", "64", "--clearml", "off", "--no-download"]


def background(rng) -> np.ndarray:
    """A smooth grey 'product' with mild texture: every good image looks alike."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    base = 110 + 40 * np.sin(3 * x) * np.cos(2 * y)
    image = np.stack([base, base * 0.95, base * 0.9], axis=-1) + rng.normal(0, 4, size=(SIZE, SIZE, 3))
    return image


def paint(image, rng, kind):
    """A defect: a bright square ('spot') or a dark stroke ('line'); returns the image and its mask."""
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    r, c = rng.integers(12, SIZE - 24, size=2)
    if kind == "spot":
        mask[r : r + 12, c : c + 12] = 255
        image[mask > 0] = (250, 40, 40)
    else:
        mask[r : r + 3, c : c + 20] = 255
        image[mask > 0] = (10, 10, 10)
    return image, mask


def save(array, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(path)


def make_category(root: Path, n_train=12, n_good=6, n_defect=6, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    category = root / "mvtec_ad" / "bottle"
    for i in range(n_train):
        save(background(rng), category / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        save(background(rng), category / "test" / "good" / f"{i:03d}.png")
    for kind in ("spot", "line"):
        for i in range(n_defect):
            image, mask = paint(background(rng), rng, kind)
            save(image, category / "test" / kind / f"{i:03d}.png")
            save(mask, category / "ground_truth" / kind / f"{i:03d}_mask.png")
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_category(tmp_path_factory.mktemp("mvtec"))


def run(script, *args, env=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "padim_anomaly" / script), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "MPLBACKEND": "Agg", **(env or {})},
    )


def test_train_online_and_batch_agree_and_detect_painted_defects(data_dir, tmp_path):
    summaries = {}
    for stats in ("online", "batch"):
        out = tmp_path / stats
        result = run(
            "train.py",
            "--data-dir",
            data_dir,
            "--out",
            out,
            "--n-features",
            "20",
            "--stats",
            stats,
            "--batch-size",
            "5",
            *TINY,
        )
        assert result.returncode == 0, result.stderr
        summaries[stats] = json.loads((out / "summary.json").read_text())
        assert (out / "anomaly_maps.png").stat().st_size > 1000
        model = torch.load(out / "model.pt", weights_only=True)
        assert model["channels"].shape == (20,) and model["inv_covariance"].shape == (16 * 16, 20, 20)
    online, batch = summaries["online"], summaries["batch"]
    for key in (
        "image_auroc",
        "pixel_auroc",
        "fit_seconds",
        "fit_peak_memory_mib",
        "n_train",
        "n_features",
        "weights",
        "stats",
    ):
        assert key in online
    assert online["n_train"] == 12 and online["n_features"] == 20 and online["stats"] == "online"
    assert online["image_auroc"] > 0.8 and online["pixel_auroc"] > 0.8  # chance is 0.5
    assert round(online["image_auroc"], 4) == round(batch["image_auroc"], 4)
    assert round(online["pixel_auroc"], 4) == round(batch["pixel_auroc"], 4)


def test_importance_writes_rankings_and_subsets_and_resumes(data_dir, tmp_path):
    out = tmp_path / "importance"
    args = [
        "--data-dir",
        data_dir,
        "--out",
        out,
        "--n-features",
        "16",
        "--n-repeats",
        "2",
        "--ks",
        "2",
        "4",
        "--n-random",
        "2",
        *TINY,
    ]
    result = run("importance.py", *args)
    assert result.returncode == 0, result.stderr
    importance = json.loads((out / "importance.json").read_text())
    assert len(importance["channels"]) == 16 and len(importance["ranking"]) == 16
    first = importance["channels"][str(importance["ranking"][0])]
    assert {"image_mean", "image_std", "pixel_mean", "pixel_std"} <= set(first)
    assert first["image_mean"] >= max(c["image_mean"] for c in importance["channels"].values())
    subsets = json.loads((out / "subsets.json").read_text())
    assert set(subsets) == {"2", "4"}
    for by_choice in subsets.values():
        assert set(by_choice) == {"top", "bottom", "random"}
        assert all(0 <= v["mean"] <= 1 and v["std"] >= 0 for v in by_choice.values())
    assert subsets["4"]["top"]["mean"] > 0.7
    assert (out / "importance_ranking.png").exists() and (out / "subsets_auroc.png").exists()
    # a second run over the same folder reuses every finished fold
    (out / "summary.json").unlink()
    again = run("importance.py", *args, "--resume")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("reusing") == 3
    assert json.loads((out / "importance.json").read_text())["ranking"] == importance["ranking"]


def test_memory_profiles_stages_and_compares_methods(data_dir, tmp_path):
    out = tmp_path / "memory"
    result = run(
        "memory.py",
        "--data-dir",
        data_dir,
        "--out",
        out,
        "--ns",
        "4",
        "8",
        "--n-features",
        "8",
        "--batch-size",
        "4",
        *TINY,
    )
    assert result.returncode == 0, result.stderr
    memory = json.loads((out / "memory.json").read_text())
    stages = {"feature_extraction", "embedding_storage", "mean", "covariance", "inverse", "scoring"}
    assert set(memory["stages"]) == stages
    for method in ("online", "batch"):
        assert set(memory["fit"][method]) == {"4", "8"}
        assert all(v["peak_mib"] >= 0 and v["seconds"] > 0 for v in memory["fit"][method].values())
    assert "RSS" in memory["method"] or "cuda" in memory["method"]
    agreement = memory["agreement"]
    assert agreement["covariance_max_relative_difference"] <= 1e-5
    assert agreement["mean_max_relative_difference"] <= 1e-5
    assert agreement["aurocs_identical_to_4_decimals"]
    assert (out / "memory_vs_n.png").exists()


# ---------------------------------------------------------------- bad input: one clear line, no run folder


def broken_copy(data_dir: Path, tmp_path: Path, breakage) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    breakage(copy / "mvtec_ad" / "bottle")
    return copy


def corrupt_image(category):
    (category / "train" / "good" / "003.png").write_bytes(b"not a png at all")


def small_mask(category):
    Image.new("L", (32, 32)).save(category / "ground_truth" / "spot" / "002_mask.png")


def empty_train(category):
    for image in (category / "train" / "good").iterdir():
        image.unlink()


def no_test_folder(category):
    shutil.rmtree(category / "test")


@pytest.mark.parametrize(
    "breakage, message",
    [
        (corrupt_image, "cannot decode the image"),
        (small_mask, "masks must match their images"),
        (empty_train, "no training images"),
        (no_test_folder, "missing folder"),
    ],
)
def test_broken_data_gives_one_line_and_no_run_folder(data_dir, tmp_path, breakage, message):
    copy = broken_copy(data_dir, tmp_path, breakage)
    out = tmp_path / "run"
    result = run("train.py", "--data-dir", copy, "--out", out, "--n-features", "8", *TINY)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # progress bars are off when stderr is no terminal
    assert not out.exists()


@pytest.mark.parametrize(
    "script, args, code, message",
    [
        ("train.py", ["--n-features", "500"], 2, "--n-features must be in 1..448"),
        ("train.py", ["--category", "banana"], 2, "--category must be one of"),
        ("importance.py", ["--ks", "5", "50", "--n-features", "20"], 2, "--ks must each be in 1..20"),
        ("memory.py", ["--category", "bottle"], 1, "is not in"),  # no such category folder; --no-download
    ],
)
def test_bad_arguments_and_missing_category(tmp_path, script, args, code, message):
    out = tmp_path / "run"
    result = run(script, "--data-dir", tmp_path / "empty", "--out", out, *TINY, *args)
    assert result.returncode == code
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_offline_imagenet_weights_name_the_alternatives(monkeypatch):
    from torchvision.models import ResNet18_Weights

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(type(ResNet18_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(UserError, match="--weights none .* --weights PATH"):
        padim_io.backbone_weights("imagenet", seed=0)


def test_weights_from_a_local_state_dict(tmp_path):
    torch.manual_seed(7)
    reference = padim_io.resnet18_backbone()
    torch.save(reference.state_dict(), tmp_path / "r18.pt")
    loaded, source = padim_io.backbone_weights(str(tmp_path / "r18.pt"), seed=0)
    assert torch.equal(loaded.conv1.weight, reference.conv1.weight) and "r18.pt" in source
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a torchvision ResNet18 state dict"):
        padim_io.backbone_weights(str(tmp_path / "bad.pt"), seed=0)
    with pytest.raises(UserError, match="no such file"):
        padim_io.backbone_weights(str(tmp_path / "missing.pt"), seed=0)
