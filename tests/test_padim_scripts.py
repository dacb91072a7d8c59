"""PaDiM's scripts end to end on tiny made-up MVTec-layout classes, and their bad-input messages.

Two classes: `bottle` (square colour PNGs) and `widget` (elongated 128x48 grayscale JPEGs, PNG masks),
so "any MVTec-layout folder" is exercised with no code change.
"""

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, one_line_error, run_script
from PIL import Image
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(REPO / "padim_anomaly"))

import padim_io  # noqa: E402
from padim import ModelConfig  # noqa: E402
from test_conventions import load  # noqa: E402

from common import UserError, parse_args  # noqa: E402

train = load("padim_anomaly/train.py")  # by path: other experiments have a train.py too


def test_progress_text_sets_the_eta_from_the_rate_so_far():
    assert padim_io.progress_text(40, 100, 12.0, "img") == "40/100 (40%), 0:12 elapsed, 3.3 img/s, ETA 0:18"
    done = padim_io.progress_text(100, 100, 3725.0, "halves")
    assert done.endswith("1:02:05 elapsed, 0.0 halves/s, ETA 0:00")
    assert padim_io.progress_text(0, 5, 0.0, "subsets").endswith("ETA unknown")


TINY = ["--weights", "none", "--image-size", "64", "--clearml", "off", "--no-download"]


def product(rng, width, height, colour=True) -> np.ndarray:
    """A smooth 'product' with mild texture: every good image looks alike."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = 110 + 40 * np.sin(3 * x) * np.cos(2 * y) + rng.normal(0, 4, size=(height, width))
    return np.stack([base, base * 0.95, base * 0.9], axis=-1) if colour else base


def paint(image, rng, kind, column=None):
    """A defect: a bright square ('spot') or a dark stroke ('line'); returns the image and its mask."""
    height, width = image.shape[:2]
    mask = np.zeros((height, width), dtype=np.uint8)
    r = rng.integers(8, height - 20)
    c = rng.integers(4, width - 24) if column is None else column
    if kind == "spot":
        mask[r : r + 12, c : c + 12] = 255
        image[mask > 0] = 250 if image.ndim == 2 else (250, 40, 40)
    else:
        mask[r : r + 3, c : c + 20] = 255
        image[mask > 0] = 10
    return image, mask


def save(array, path, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(path, **kwargs)


def make_class(root: Path, name, width, height, colour, suffix, seed, n_train=12, n_good=6, n_defect=6):
    rng = np.random.default_rng(seed)
    folder = root / "mvtec_ad" / name
    options = {"quality": 95} if suffix == ".jpg" else {}
    for i in range(n_train):
        save(product(rng, width, height, colour), folder / "train" / "good" / f"{i:03d}{suffix}", **options)
    for i in range(n_good):
        save(product(rng, width, height, colour), folder / "test" / "good" / f"{i:03d}{suffix}", **options)
    for kind in ("spot", "line"):
        for i in range(n_defect):
            column = 2 if (kind, i) == ("spot", 0) else None  # at the very left: a centre crop loses it
            image, mask = paint(product(rng, width, height, colour), rng, kind, column)
            save(image, folder / "test" / kind / f"{i:03d}{suffix}", **options)
            save(mask, folder / "ground_truth" / kind / f"{i:03d}_mask.png")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mvtec")
    make_class(root, "bottle", 64, 64, colour=True, suffix=".png", seed=0)
    make_class(root, "widget", 128, 48, colour=False, suffix=".jpg", seed=1)
    return root


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_train_online_and_batch_agree_and_detect_painted_defects(data_dir, tmp_path):
    summaries = {}
    for stats in ("online", "batch"):
        out = tmp_path / stats
        args = [
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
        ]
        proc = run_script("padim_anomaly/train.py", *args, *TINY)
        summaries[stats] = json.loads((out / "summary.json").read_text())
        assert (out / "anomaly_maps.png").stat().st_size > 1000
        model = torch.load(out / "model.pt", weights_only=True)
        assert model["channels"].shape == (20,) and model["inv_covariance"].shape == (16 * 16, 20, 20)
        assert "bottle train (" in proc.stdout and "img/s, ETA " in proc.stdout  # lines off a terminal
    online, batch = summaries["online"], summaries["batch"]
    assert online["n_train"] == 12 and online["n_features"] == 20 and online["stats"] == "online"
    assert online["image_auroc"] > 0.8 and online["pixel_auroc"] > 0.8 and online["aupro"] > 0.5
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert round(online[key], 4) == round(batch[key], 4)
    # --resume with a changed training flag: one line naming it, the run untouched
    proc = run_script(
        "padim_anomaly/train.py", "--data-dir", data_dir, "--out", tmp_path / "online", "--resume",
        "--n-features", "30", "--stats", "online", "--batch-size", "5", *TINY, rc=1,
    )  # fmt: skip
    assert "--n-features 20 -> 30" in one_line_error(proc)


@pytest.mark.slow
def test_elongated_grayscale_jpegs_train_and_score_with_no_code_change(data_dir, tmp_path):
    out = tmp_path / "widget"
    run_script("padim_anomaly/train.py", "--category", "widget", "--data-dir", data_dir, "--out", out, *TINY)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["image_auroc"] > 0.8 and summary["pixel_auroc"] > 0.8
    scored = tmp_path / "scored"
    test_folder = data_dir / "mvtec_ad" / "widget" / "test"
    run_script("padim_anomaly/score.py", "--model", out / "model.pt", "--images", test_folder,
               "--out", scored, "--clearml", "off")  # fmt: skip
    with open(scored / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 18 and len(list((scored / "maps").glob("*.png"))) == 18
    labels = [not row["file"].startswith("good") for row in rows]
    # the folder's scores reproduce the training run's image AUROC (same model, same preprocessing)
    auroc = roc_auc_score(labels, [float(row["score"]) for row in rows])
    assert auroc == pytest.approx(summary["image_auroc"], abs=1e-6)
    maps = np.load(scored / "maps.npz")
    assert maps["spot__000"].shape == (64, 64)
    score = {row["file"]: float(row["score"]) for row in rows}["spot/000.jpg"]
    assert maps["spot__000"].max() == pytest.approx(score, rel=1e-4)


@pytest.mark.slow
def test_importance_over_all_classes_with_split_halves_heldout_topk_and_cross_class_report(
    data_dir, tmp_path
):
    out = tmp_path / "importance"
    args = ["--category", "all", "--data-dir", data_dir, "--out", out, "--n-features", "16", "--folds", "3",
            "--repeats", "2", "--n-repeats", "2", "--n-random", "6", "--n-boot", "50", "--splits", "2",
            *TINY]  # fmt: skip
    proc = run_script("padim_anomaly/importance.py", *args, "--ks", "2", "4")
    fold_lines = [line for line in proc.stdout.splitlines() if " fold " in line and "AUROC" in line]
    assert len(fold_lines) == 12 and all("for the folds left" in line for line in fold_lines)
    assert fold_lines[5].endswith("ETA 0:00 for the folds left")  # the last of bottle's 6 folds
    summary = json.loads((out / "importance_summary.json").read_text())
    assert set(summary["classes"]) == {"bottle", "widget"} and summary["weights"] == "none"
    for name in ("bottle", "widget"):
        importance = json.loads((out / f"{name}_importance.json").read_text())
        assert len(importance["channels"]) == 16 and len(importance["ranking"]) == 16
        channels = importance["channels"]
        assert [channels[str(c)]["rank"] for c in importance["ranking"]] == list(range(1, 17))
        means = [channels[str(c)]["drop_pixel_mean"] for c in importance["ranking"]]
        assert means == sorted(means, reverse=True)
        assert all(e["rank_ci95"][0] <= e["rank"] + 0.5 and e["rank_ci95"][1] >= 1 for e in channels.values())
        assert len(importance["stability"]["spearman"]) == 15  # 6 folds, every pair
        assert len(importance["disjoint_folds"]["spearman"]) == 6  # 3 pairs within each of 2 shuffles
        assert sorted(c for cluster in importance["clusters"] for c in cluster["channels"]) == sorted(
            int(c) for c in channels
        )
        halves = json.loads((out / f"{name}_split_half.json").read_text())
        assert halves["n_splits"] == 2 and len(halves["drop_pixel"]) == 4  # 2 splits x 2 halves
        assert sum(halves["half_sizes"][0]) == 18  # every test image in one half or the other
        drops = np.array(halves["drop_pixel"])
        assert halves["stability"]["spearman"][1] == pytest.approx(spearmanr(drops[2], drops[3]).statistic)
        entry = summary["classes"][name]
        assert set(entry["split_half"]) >= {"spearman_mean", "spearman_min", "top10_overlap_mean"}
        assert set(entry["disjoint_folds"]) >= {"spearman_mean", "spearman_min"}
        assert set(entry["topk"]) == {"2", "4"}
        for topk in entry["topk"].values():
            assert {"top", "bottom", "random_p95", "percentile"} <= set(topk)
            assert topk["n_random"] == 6 and topk["n_evaluations"] == 4 and 0 <= topk["percentile"] <= 100
            assert topk["resolution"] == pytest.approx(100 / 6)
        assert entry["topk"]["4"]["top"] > entry["topk"]["4"]["bottom"]
    report = json.loads((out / "cross_class.json").read_text())
    assert report["classes"] == ["bottle", "widget"] and set(report["pairs"]) == {"bottle|widget"}
    assert set(report["pairs"]["bottle|widget"]["topk_overlap"]) == {"2", "4"}
    assert summary["cross_class"] == report and (out / "cross_class.png").is_file()
    assert (out / "heldout_topk.png").is_file()
    # the report alone, from finished runs (classes run as separate processes are combined this way)
    combined = tmp_path / "combined"
    run_script("padim_anomaly/importance.py", "--from-runs", out, "--out", combined, "--clearml", "off")
    again = json.loads((combined / "importance_summary.json").read_text())
    assert again["cross_class"] == summary["cross_class"]
    for name, entry in summary["classes"].items():  # all but the run's minutes, which it measures its own way
        assert {k: v for k, v in again["classes"][name].items() if k != "run"} == {
            k: v for k, v in entry.items() if k != "run"
        }
    # --resume reuses every finished fold (the split-half study may change); a changed fold count is refused
    (out / "summary.json").unlink()
    again = run_script("padim_anomaly/importance.py", *args, "--ks", "2", "--resume")
    assert again.stdout.count("reusing") == 12
    assert set(json.loads((out / "importance_summary.json").read_text())["classes"]["bottle"]["topk"]) == {
        "2"
    }
    refused = run_script("padim_anomaly/importance.py", *args, "--ks", "2", "--resume", "--folds", "2", rc=1)
    assert "--folds 3 -> 2" in one_line_error(refused)


@pytest.mark.slow
def test_memory_reports_live_peaks_with_repeats(data_dir, tmp_path):
    out = tmp_path / "memory"
    args = ["--data-dir", data_dir, "--out", out, "--ns", "4", "8", "--n-features", "8", "--batch-size", "4",
            "--repeats", "2", "--batch-max-n", "4"]  # fmt: skip
    run_script("padim_anomaly/memory.py", *args, *TINY)
    memory = json.loads((out / "memory.json").read_text())
    stages = {"feature_extraction", "embedding_storage", "mean", "covariance", "inverse", "scoring"}
    assert set(memory["stages"]) == stages
    assert set(memory["fit"]["online"]) == {"4", "8"} and set(memory["fit"]["batch"]) == {"4"}  # batch <= 4
    for entry in [*memory["fit"]["online"].values(), *memory["fit"]["batch"].values()]:
        assert len(entry["live_peak_mib_runs"]) == 2 and len(entry["peak_mib_runs"]) == 2
        assert entry["live_peak_mib"] == pytest.approx(np.mean(entry["live_peak_mib_runs"]))
        assert entry["live_peak_mib"] > 0.1  # a 16-image batch of embeddings is live during the fit
    assert "mallinfo2" in memory["method"] or "cuda" in memory["method"]
    assert memory["checks"]["online_live_peak_mib_N8_over_N4"] == pytest.approx(
        memory["fit"]["online"]["8"]["live_peak_mib"] / memory["fit"]["online"]["4"]["live_peak_mib"]
    )
    agreement = memory["agreement"]
    assert agreement["covariance_max_relative_difference"] <= 1e-5
    assert agreement["mean_max_relative_difference"] <= 1e-5
    assert agreement["aurocs_identical_to_4_decimals"]


# ---------------------------------------------------------------- bad input: one clear line, no run folder


def broken_copy(data_dir: Path, tmp_path: Path, breakage) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(data_dir / "mvtec_ad" / "widget", copy / "mvtec_ad" / "widget")
    breakage(copy / "mvtec_ad" / "widget")
    return copy


def corrupt_image(category):
    (category / "train" / "good" / "003.jpg").write_bytes(b"not a jpeg at all")


def truncated_jpeg(category):
    path = category / "train" / "good" / "005.jpg"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # header fine, data cut


def small_mask(category):
    Image.new("L", (32, 32)).save(category / "ground_truth" / "spot" / "002_mask.png")


def empty_train(category):
    for image in (category / "train" / "good").iterdir():
        image.unlink()


def no_test_folder(category):
    shutil.rmtree(category / "test")


@pytest.mark.slow
@pytest.mark.parametrize(
    "breakage, message",
    [
        (corrupt_image, "003.jpg"),
        (truncated_jpeg, "005.jpg"),
        (small_mask, "masks must match their images"),
        (empty_train, "no training images"),
        (no_test_folder, "missing folder"),
    ],
)
def test_broken_data_gives_one_line_and_no_run_folder(data_dir, tmp_path, breakage, message):
    copy = broken_copy(data_dir, tmp_path, breakage)
    out = tmp_path / "run"
    args = ["--category", "widget", "--data-dir", copy, "--out", out, "--n-features", "8", *TINY]
    proc = run_script("padim_anomaly/train.py", *args, rc=1)
    assert message in one_line_error(proc)
    assert not out.exists()


def test_truncated_jpeg_is_caught_before_the_run(data_dir, tmp_path):
    copy = broken_copy(data_dir, tmp_path, truncated_jpeg)
    paths = sorted((copy / "mvtec_ad" / "widget" / "train" / "good").iterdir())
    with Image.open(paths[5]) as image:
        image.verify()  # the header check alone passes: only a full decode finds the cut
    with pytest.raises(UserError, match="cannot decode the image .*005.jpg"):
        padim_io.verify_images(paths)


def test_centre_crop_that_empties_a_mask_warns(data_dir, capsys):
    category = padim_io.find_category("widget", data_dir, download=False)
    _, masks = padim_io.load_test_set(category, ModelConfig(image_size=64, resize=73, crop=True))
    err = capsys.readouterr().err
    assert "warning: the centre crop (--crop: shorter side resized to 73" in err and "widget" in err
    lost = int(err.split("cuts the whole defect out of ")[1].split(" of 12")[0])
    assert lost == int((~masks[torch.from_numpy(category.test_labels).bool()].flatten(1).any(dim=1)).sum())
    assert lost >= 1 and "resizing" not in err
    _, whole = padim_io.load_test_set(category, ModelConfig(image_size=64, resize=64))
    assert "warning" not in capsys.readouterr().err
    defective = torch.from_numpy(category.test_labels).bool()
    assert whole[defective].flatten(1).any(dim=1).all()  # resizing the whole image keeps every defect
    assert not masks[defective].flatten(1).any(dim=1).all()


def test_a_defect_lost_to_the_resize_is_blamed_on_the_resize_not_the_crop(data_dir, tmp_path, capsys):
    def hairline(category):  # a 1-pixel column: halving the width (128 -> 64) keeps every other column
        mask = np.zeros((48, 128), dtype=np.uint8)
        mask[10:30, 40] = 255
        Image.fromarray(mask).save(category / "ground_truth" / "line" / "001_mask.png")

    category = padim_io.find_category("widget", broken_copy(data_dir, tmp_path, hairline), download=False)
    _, masks = padim_io.load_test_set(category, ModelConfig(image_size=64, resize=64))
    assert not masks[category.test.index(category.root / "test" / "line" / "001.jpg")].any()
    err = capsys.readouterr().err
    assert "warning: resizing to 64x64 (nearest neighbour) leaves no defect pixel" in err
    assert "001_mask.png: 20 defect pixels in 128x48" in err and "--crop" not in err


def grayscale_copies(data_dir: Path, root: Path) -> Path:
    """widget's grayscale JPEGs as 8-bit PNGs (widget8) and as 16-bit PNGs of the same values x 257."""
    source = data_dir / "mvtec_ad" / "widget"
    for name, scale, dtype in (("widget8", 1, np.uint8), ("widget16", 257, np.uint16)):
        for path in source.rglob("*.*"):
            target = root / "mvtec_ad" / name / path.relative_to(source).with_suffix(".png")
            target.parent.mkdir(parents=True, exist_ok=True)
            values = np.asarray(Image.open(path).convert("L"))
            if "ground_truth" in path.parts:
                Image.fromarray(values).save(target)
            else:
                Image.fromarray(values.astype(dtype) * scale).save(target)
    return root


def test_sixteen_bit_png_decodes_like_its_eight_bit_copy(data_dir, tmp_path):
    root = grayscale_copies(data_dir, tmp_path / "data")
    path16 = root / "mvtec_ad" / "widget16" / "test" / "line" / "000.png"
    with Image.open(path16) as image:
        assert image.mode == "I;16"  # what PIL makes of it; its own convert("RGB") clips it to white
        assert np.asarray(image.convert("RGB")).mean() > 250
    config = ModelConfig(image_size=64, resize=64)
    eight = padim_io.load_image(root / "mvtec_ad" / "widget8" / "test" / "line" / "000.png", config)
    assert torch.equal(padim_io.load_image(path16, config), eight)
    assert 0.2 < eight.mean() < 0.8


@pytest.mark.slow
def test_a_sixteen_bit_png_class_scores_the_same_auroc_as_its_eight_bit_copy(data_dir, tmp_path):
    root = grayscale_copies(data_dir, tmp_path / "data")
    summaries = {}
    for name in ("widget8", "widget16"):
        out = tmp_path / name
        run_script("padim_anomaly/train.py", "--category", name, "--data-dir", root, "--out", out,
                   "--n-features", "10", *TINY)  # fmt: skip
        summaries[name] = json.loads((out / "summary.json").read_text())
    for metric in ("image_auroc", "pixel_auroc", "aupro"):
        assert summaries["widget16"][metric] == summaries["widget8"][metric]
    assert summaries["widget8"]["image_auroc"] > 0.9  # the painted defects are found: a real comparison


def test_palette_alpha_and_cmyk_are_decoded_or_refused_by_name(tmp_path):
    rng = np.random.default_rng(0)
    colours = np.array([[200, 30, 30], [20, 180, 60], [40, 40, 220], [250, 250, 250]], dtype=np.uint8)
    rgb = colours[
        rng.integers(0, 4, size=(32, 48))
    ]  # (32, 48, 3), four colours: a palette holds them exactly
    config = ModelConfig(image_size=64, resize=64)
    reference = padim_io.load_image(_saved(Image.fromarray(rgb), tmp_path / "rgb.png"), config)
    palette = Image.fromarray(rgb).quantize(colors=4)
    assert torch.equal(padim_io.load_image(_saved(palette, tmp_path / "p.png"), config), reference)
    opaque = Image.fromarray(np.dstack([rgb, np.full((32, 48), 255, np.uint8)]))
    assert torch.equal(padim_io.load_image(_saved(opaque, tmp_path / "rgba.png"), config), reference)
    cmyk = padim_io.load_image(
        _saved(Image.fromarray(rgb).convert("CMYK"), tmp_path / "c.jpg", quality=100), config
    )
    assert (cmyk - reference).abs().mean() < 0.02  # JPEG's loss only
    alpha = np.full((32, 48), 255, np.uint8)
    alpha[3, 4] = 0
    see_through = Image.fromarray(np.dstack([rgb, alpha]))
    with pytest.raises(UserError, match=r"the image .*hole\.png has transparent pixels"):
        padim_io.load_image(_saved(see_through, tmp_path / "hole.png"), config)
    keyed = palette.copy()
    keyed.info["transparency"] = 0
    with pytest.raises(UserError, match=r"keyed\.png has transparent pixels"):
        padim_io.load_image(_saved(keyed, tmp_path / "keyed.png", transparency=0), config)


def _saved(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def test_every_class_folder_and_unknown_names(data_dir):
    assert padim_io.category_names(["all"], data_dir) == ["bottle", "widget"]
    assert padim_io.category_names(["widget", "bottle", "widget"], data_dir) == ["widget", "bottle"]
    with pytest.raises(UserError, match="no folder .*gizmo.*MVTec AD layout"):
        padim_io.find_category("gizmo", data_dir, download=True)  # unknown names are never downloaded


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--n-features", "500"], "--n-features must be in 1..448"),
        (["--category", "a/b"], "--category must be a folder name"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_bad_arguments_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(train.Args, argv, check=train.check_args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_load_model_refuses_garbage_and_foreign_files(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="garbage.pt"):
        padim_io.load_model(tmp_path / "garbage.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="other.pt is not a PaDiM model.pt .*missing config"):
        padim_io.load_model(tmp_path / "other.pt")


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
