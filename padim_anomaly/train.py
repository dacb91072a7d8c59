"""PaDiM on one MVTec AD category: fit a Gaussian per patch on train/good, score the test split.

Defard et al. 2020, "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection and
Localization" (arXiv 2011.08785). ResNet18 layer1-3 embedding, a seeded channel subset, mean and
covariance per patch position (online by default), Mahalanobis map, blur, max = image score.

Full:  python padim_anomaly/train.py --category bottle
Offline (no ImageNet weights): python padim_anomaly/train.py --category bottle --weights none --data-dir PATH
Tiny:  python padim_anomaly/train.py --category bottle --weights none --n-features 10 --clearml off
Any folder mvtec_ad/NAME in the MVTec AD layout works: --category NAME.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's common, not an installed one
from padim import TOTAL_CHANNELS, FeatureExtractor, aupro, choose_channels  # noqa: E402
from padim_io import (  # noqa: E402
    PeakMemory,
    backbone_weights,
    check_image_size,
    fit_statistics,
    image_batches,
    load_category,
    model_config,
    n_features_of,
    pick_device,
    save_model,
    score_images,
)
from sklearn.metrics import roc_auc_score  # noqa: E402

from common import DataArgs, RunLogger, check_fits, parse_args, run_main, run_name  # noqa: E402


@dataclass
class Args(DataArgs):
    category: str = "bottle"  # a folder under mvtec_ad/ (any class in the MVTec AD layout)
    weights: str = "imagenet"  # backbone weights: imagenet (torchvision cache), none (random init), or a PATH
    n_features: str = "100"  # embedding channels kept (random subset, seeded), or 'all' (= 448)
    stats: Literal["online", "batch"] = "online"  # online: running mean/cov; batch: keep all, then fit
    batch_size: int = 16  # images per backbone forward pass
    image_size: int = 224  # model input in pixels (images are resized to it); multiple of 16
    crop: bool = False  # resize the shorter side to image_size*8/7 and centre crop, instead of resizing
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when available
    n_figure: int = 8  # test images shown in the anomaly-map figure
    download: bool = True  # fetch a missing bottle/transistor/metal_nut from MVTec (you accept its license)

    # a fit is one pass: --resume refits an unfinished run; only these may differ
    RESUME_SAFE: ClassVar[frozenset[str]] = frozenset({"device", "n_figure", "download"})


def check_args(args: Args) -> None:
    if not args.category or "/" in args.category:
        raise ValueError(f"--category must be a folder name under mvtec_ad/ (got {args.category!r})")
    n_features_of(args.n_features)  # raises on a bad value
    check_image_size(args.image_size)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1 (got {args.batch_size})")


def figure_rows(types: list[str], n: int, seed: int) -> list[int]:
    """Up to n test images, round-robin over the types so every defect kind shows."""
    rng = random.Random(seed)
    by_type: dict[str, list[int]] = {}
    for i, t in enumerate(types):
        by_type.setdefault(t, []).append(i)
    pools = [rng.sample(v, len(v)) for _, v in sorted(by_type.items())]
    chosen = []
    while len(chosen) < min(n, len(types)):
        for pool in pools:
            if pool and len(chosen) < n:
                chosen.append(pool.pop())
    return chosen


def anomaly_figure(images, masks, maps, scores, types, rows):
    vmax = float(maps.max())
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.5 * len(rows)), squeeze=False)
    for ax_row, i in zip(axes, rows):
        ax_row[0].imshow(images[i].permute(1, 2, 0).numpy())
        ax_row[0].set_title(f"{types[i]}  score {scores[i]:.1f}", fontsize=8)
        ax_row[1].imshow(masks[i].numpy(), cmap="gray", vmin=0, vmax=1)
        ax_row[1].set_title("ground truth", fontsize=8)
        shown = ax_row[2].imshow(maps[i].numpy(), cmap="jet", vmin=0, vmax=vmax)
        ax_row[2].set_title("anomaly map (Mahalanobis)", fontsize=8)
        fig.colorbar(shown, ax=ax_row[2], fraction=0.046)
        for ax in ax_row:
            ax.axis("off")
    fig.tight_layout()
    return fig


def setup(args: Args):
    """Seeds, device, data (every file decoded before a run folder exists), backbone."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    config = model_config(args)
    category, test_set = load_category(args.category, args.data_dir, args.download, config)
    backbone, weights_source = backbone_weights(args.weights, args.seed)
    extractor = FeatureExtractor(backbone, choose_channels(config.n_features, args.seed)).to(device)
    return config, device, category, test_set, extractor, weights_source


def fit(args: Args, config, device, category, extractor):
    """Mean and inverse covariance per patch position, with the fit's time and peak memory."""
    with PeakMemory(device) as meter:
        start = time.perf_counter()
        batches = image_batches(category.train, config, args.batch_size)
        n, desc = len(category.train), f"{args.category} train"
        mean, inv_covariance = fit_statistics(extractor, batches, n, args.stats, config.epsilon, device, desc)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return (
        mean,
        inv_covariance,
        {"fit_seconds": seconds, "fit_peak_memory_mib": meter.peak_mib, "memory_method": meter.method},
    )


def evaluate(args: Args, config, device, category, test_set, extractor, mean, inv_covariance):
    """Anomaly maps of the test split; image AUROC, pixel AUROC and AUPRO."""
    test_images, test_masks = test_set
    start = time.perf_counter()
    desc = f"{args.category} test"
    maps, scores = score_images(
        extractor, test_images, mean, inv_covariance, config, device, args.batch_size, desc
    )
    seconds = time.perf_counter() - start
    metrics = {
        "image_auroc": float(roc_auc_score(category.test_labels, scores.numpy())),
        "pixel_auroc": float(roc_auc_score(test_masks.flatten().numpy(), maps.flatten().numpy())),
        "aupro": aupro(maps, test_masks),
        "score_images_per_second": len(category.test) / seconds,
    }
    return maps, scores, metrics


def main() -> None:
    args = parse_args(Args, check=check_args, description=__doc__)
    # per-position covariances and their inverses (float32), and a batch's backbone activations
    s, c = args.image_size, n_features_of(args.n_features, low=1)
    check_fits(8 * (s // 4) ** 2 * c * c + 200 * args.batch_size * s * s, f"--image-size {s}")
    config, device, category, test_set, extractor, weights_source = setup(args)
    labels = category.test_labels
    n_positions = config.grid**2
    print(
        f"{args.category}: {len(category.train)} train, {len(category.test)} test ({int(labels.sum())} "
        f"defective) | weights: {weights_source} | device {device}\n"
        f"embedding {config.n_features} of {TOTAL_CHANNELS} channels on a {config.grid}x{config.grid} grid "
        f"({n_positions} positions); covariances {n_positions}x{config.n_features}x{config.n_features} "
        f"= {n_positions * config.n_features**2 * 4 / 2**20:.0f} MiB in float32; stats: {args.stats}"
    )
    with RunLogger("padim_anomaly", run_name(f"padim_{args.category}", args.seed), args) as log:
        mean, inv_covariance, fit_info = fit(args, config, device, category, extractor)
        maps, scores, metrics = evaluate(
            args, config, device, category, test_set, extractor, mean, inv_covariance
        )
        fit_info["fit_images_per_second"] = len(category.train) / fit_info["fit_seconds"]
        log.log(
            0,
            {
                "eval/image_auroc": metrics["image_auroc"],
                "eval/pixel_auroc": metrics["pixel_auroc"],
                "eval/aupro": metrics["aupro"],
                "charts/fit_images_per_second": fit_info["fit_images_per_second"],
                "charts/score_images_per_second": metrics["score_images_per_second"],
            },
        )
        m, f = metrics, fit_info
        print(
            f"image AUROC {m['image_auroc']:.4f} | pixel AUROC {m['pixel_auroc']:.4f} | "
            f"AUPRO {m['aupro']:.4f} | fit {f['fit_seconds']:.1f} s, "
            f"peak {f['fit_peak_memory_mib']:.0f} MiB | scoring "
            f"{m['score_images_per_second']:.1f} images/s"
        )
        if args.n_figure:
            rows = figure_rows(category.test_types, args.n_figure, args.seed)
            figure = anomaly_figure(*test_set, maps, scores, category.test_types, rows)
            log.save_figure("anomaly_maps", figure)
        extra = {"weights": args.weights, "weights_source": weights_source, "category": args.category}
        save_model(log.path("model.pt"), config, extractor, mean, inv_covariance, extra)
        log.write_summary(
            {
                "category": args.category,
                **metrics,
                **fit_info,
                "n_train": len(category.train),
                "n_test": len(category.test),
                "n_features": config.n_features,
                **extra,
                "stats": args.stats,
                "seed": args.seed,
                "device": str(device),
            }
        )


if __name__ == "__main__":
    run_main(main)
