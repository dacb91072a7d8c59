"""Which ResNet18 embedding channels matter for PaDiM: permutation importance under 3-fold CV.

Folds: train/good is split into 3 folds, the test split into 3 folds stratified by defect type;
fold k fits PaDiM on the other train folds and validates on test fold k. Permutation importance
(scikit-learn's algorithm): shuffle one channel's feature maps across the validation images,
n_repeats times; importance = drop in image AUROC (and in pixel AUROC). Then PaDiM models on the
top-k, bottom-k and random-k channels are cross-validated; for fold k the ranking comes from the
other folds' importances, so no validation image chooses its own channels.

Full:  python padim_anomaly/importance.py --category all
Here:  python padim_anomaly/importance.py --category bottle --weights none --data-dir ../shared/data
Tiny:  python padim_anomaly/importance.py --weights none --n-features 40 --n-repeats 2 --ks 5 10 --clearml off
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from padim import (  # noqa: E402
    FeatureExtractor,
    ModelConfig,
    OnlineGaussian,
    anomaly_map,
    auroc,
    channel_name,
    choose_channels,
    image_scores,
    invert_covariance_,
    mahalanobis_terms,
    permuted_squared_distance,
)
from padim_io import (  # noqa: E402
    CATEGORIES,
    backbone_weights,
    check_image_size,
    find_category,
    image_batches,
    load_test_set,
    n_features_of,
    pick_device,
    verify_images,
)
from sklearn.model_selection import KFold, StratifiedKFold  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common import RunLogger, UserError, default_data_dir, parse_args, run_main, run_name, write_json  # noqa: E402


@dataclass
class Args:
    category: str = "bottle"  # bottle, transistor, metal_nut, or all (the three in turn)
    weights: str = "imagenet"  # backbone weights: imagenet (torchvision cache), none (random init), or a PATH
    n_features: str = "all"  # channels ranked: 'all' (448) or a seeded random subset of this size
    folds: int = 3  # cross-validation folds
    n_repeats: int = 5  # permutations per channel and fold (scikit-learn's n_repeats)
    ks: list[int] = field(default_factory=lambda: [10, 25, 50])  # subset sizes for top/bottom/random-k models
    n_random: int = 5  # random-k subsets per k (seeds seed..seed+n_random-1)
    pixel_stride: int = 4  # pixel AUROC of the permutation loop on every n-th row/column (1 = all pixels)
    batch_size: int = 16  # images per backbone forward pass
    image_size: int = 224  # centre crop in pixels (resize = image_size * 8 / 7); multiple of 16
    seed: int = 0  # seeds the random init (--weights none), folds, permutations and random subsets
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when available
    resume: bool = False  # with --out: reuse the folds a stopped run already finished
    data_dir: str = default_data_dir()  # holds mvtec_ad/<category>/...
    download: bool = True  # fetch a missing category from MVTec's archives (you accept its license)
    out: str | None = None  # run folder (default runs/padim_anomaly/<name>)
    clearml: Literal["auto", "offline", "online", "off"] = "auto"  # ClearML tracking mode
    clearml_queue: str | None = None  # enqueue on this ClearML agent queue instead of running here


def check_args(args: Args) -> None:
    if args.category not in (*CATEGORIES, "all"):
        raise ValueError(f"--category must be one of {', '.join(CATEGORIES)} or all (got {args.category!r})")
    n = n_features_of(args.n_features, low=2)
    if not all(1 <= k <= n for k in args.ks):
        raise ValueError(f"--ks must each be in 1..{n} (the number of ranked channels; got {args.ks})")
    for flag, value, low in (
        ("--folds", args.folds, 2),
        ("--n-repeats", args.n_repeats, 1),
        ("--n-random", args.n_random, 1),
        ("--pixel-stride", args.pixel_stride, 1),
        ("--batch-size", args.batch_size, 1),
    ):
        if value < low:
            raise ValueError(f"{flag} must be >= {low} (got {value})")
    check_image_size(args.image_size)
    if args.resume and not args.out:
        raise ValueError("--resume needs --out (the folder of the run to continue)")


# ---------------------------------------------------------------- helpers


@torch.no_grad()
def embed_all(extractor, paths, config, batch_size, device, desc) -> torch.Tensor:
    """(N, C, P) embeddings of every image, kept in memory so no fold re-runs the backbone."""
    parts = []
    with tqdm(total=len(paths), desc=desc, unit="img", leave=False, disable=None) as bar:
        for images in image_batches(paths, config, batch_size):
            parts.append(extractor(images.to(device)).flatten(2))  # (B, C, P)
            bar.update(len(images))
    return torch.cat(parts)


def fit(embeddings: torch.Tensor, epsilon: float, chunk: int = 32):
    """Online Gaussian over cached (N, C, P) embeddings -> mean (C, P), inverse covariance (P, C, C)."""
    stats = OnlineGaussian(embeddings.shape[1], embeddings.shape[2], device=embeddings.device)
    for start in range(0, len(embeddings), chunk):
        stats.update(embeddings[start : start + chunk])
    mean, covariance = stats.finalize(epsilon)
    return mean, invert_covariance_(covariance)


def evaluate(embeddings, masks, labels, mean, inv_covariance, config, batch_size=16) -> tuple[float, float]:
    """Image and pixel AUROC (all pixels) of a fitted model on cached validation embeddings."""
    maps = []
    for start in range(0, len(embeddings), batch_size):
        squared, _ = mahalanobis_terms(embeddings[start : start + batch_size], mean, inv_covariance)
        distance = squared.clamp_min(0).sqrt()  # (B, P)
        maps.append(anomaly_map(distance, config.grid, config.image_size, config.sigma).cpu())
    maps = torch.cat(maps)
    return float(auroc(image_scores(maps), labels)), float(auroc(maps.flatten(), masks.flatten()))


def permutation_importance(embeddings, masks, labels, mean, inv_covariance, config, n_repeats, stride, rng):
    """Drop in image and pixel AUROC when each channel is shuffled across the validation images.

    Returns (baseline image, baseline pixel, image drops (C, R), pixel drops (C, R)).
    """
    squared, weighted = mahalanobis_terms(embeddings, mean, inv_covariance)  # (V, P), (V, C, P)
    inv_diagonal = inv_covariance.diagonal(dim1=1, dim2=2).T.contiguous()  # (C, P)
    pixel_masks = masks[:, ::stride, ::stride].flatten()

    def scores(squared_distances):  # (R, V, P) -> image AUROC (R,), pixel AUROC (R,)
        n_rows, n_images = squared_distances.shape[:2]
        distance = squared_distances.clamp_min(0).sqrt().flatten(0, 1)  # (R * V, P)
        maps = anomaly_map(distance, config.grid, config.image_size, config.sigma)  # (R * V, S, S)
        maps = maps.reshape(n_rows, n_images, config.image_size, config.image_size)
        image = auroc(image_scores(maps.flatten(0, 1)).reshape(n_rows, n_images), labels)
        pixel = auroc(maps[:, :, ::stride, ::stride].reshape(n_rows, -1), pixel_masks)
        return image, pixel

    base_image, base_pixel = scores(squared.unsqueeze(0))
    n_channels, n_images = embeddings.shape[1], embeddings.shape[0]
    image_drop = np.zeros((n_channels, n_repeats))
    pixel_drop = np.zeros((n_channels, n_repeats))
    channels = tqdm(range(n_channels), desc="permutation importance", unit="ch", leave=False, disable=None)
    for channel in channels:
        order = torch.from_numpy(np.stack([rng.permutation(n_images) for _ in range(n_repeats)]))  # (R, V)
        image, pixel = scores(
            permuted_squared_distance(
                squared, weighted, inv_diagonal, embeddings, channel, order.to(embeddings.device)
            )
        )
        image_drop[channel] = base_image.numpy() - image.numpy()
        pixel_drop[channel] = base_pixel.numpy() - pixel.numpy()
    return float(base_image[0]), float(base_pixel[0]), image_drop, pixel_drop


def make_folds(n_train: int, test_types: list[str], n_folds: int, seed: int):
    """[(train indices, validation test indices)] per fold."""
    counts = {t: test_types.count(t) for t in set(test_types)}
    if min(counts.values()) < n_folds:
        raise UserError(
            f"every test type needs at least {n_folds} images for {n_folds}-fold stratified CV "
            f"(have {counts}); lower --folds"
        )
    if n_train < 2 * n_folds:
        raise UserError(f"{n_train} training images are too few for {n_folds} folds")
    train_folds = KFold(n_folds, shuffle=True, random_state=seed).split(np.zeros(n_train))
    test_folds = StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(
        np.zeros(len(test_types)), test_types
    )
    return [(fit_index, val_index) for (fit_index, _), (_, val_index) in zip(train_folds, test_folds)]


# ---------------------------------------------------------------- plots


def ranking_figure(image_mean, image_std, channels, name):
    order = np.argsort(-image_mean)
    fig, ax = plt.subplots(figsize=(10, 3.8))
    x = np.arange(len(order))
    ax.errorbar(x, image_mean[order], yerr=image_std[order], fmt=".", ms=3, lw=0.6, capsize=0)
    ax.axhline(0, color="k", lw=0.6)
    top = "\n".join(
        f"{rank + 1}. {channel_name(int(channels[i]))}  {image_mean[i]:+.4f}"
        for rank, i in enumerate(order[:10])
    )
    ax.text(
        0.99,
        0.97,
        "top 10\n" + top,
        transform=ax.transAxes,
        ha="right",
        va="top",
        fontsize=7,
        family="monospace",
        bbox={"facecolor": "white", "alpha": 0.8, "lw": 0.5},
    )
    ax.set(
        xlabel="channel rank",
        ylabel="image AUROC drop (mean +- std)",
        title=f"{name}: permutation importance of embedding channels (folds x repeats)",
    )
    fig.tight_layout()
    return fig


def subsets_figure(subsets, full, name):
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ks = sorted(int(k) for k in subsets)
    dodge = 0.01 * (max(ks) - min(ks) + 1)  # keep the three error bars at one k apart
    styles = ((-1, "top", "tab:green"), (0, "random", "tab:blue"), (1, "bottom", "tab:red"))
    for shift, choice, color in styles:
        mean = [subsets[str(k)][choice]["mean"] for k in ks]
        std = [subsets[str(k)][choice]["std"] for k in ks]
        ax.errorbar(
            np.array(ks) + shift * dodge,
            mean,
            yerr=std,
            marker="o",
            capsize=3,
            color=color,
            label=f"{choice}-k",
        )
    ax.axhline(full["mean"], color="gray", ls="--", label=f"all {full['n_channels']} channels")
    ax.set(
        xlabel="k (channels kept)", ylabel="image AUROC (CV mean +- std)", title=f"{name}: channel subsets"
    )
    ax.legend()
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- one category


def run_category(name, category, test_set, extractor, config, args, device, log, prefix):
    channels = extractor.channels.cpu().numpy()
    test_images, test_masks = test_set
    labels = torch.from_numpy(category.test_labels)
    train_embeddings = embed_all(extractor, category.train, config, args.batch_size, device, f"{name} train")
    test_embeddings = []
    for start in range(0, len(test_images), args.batch_size):
        with torch.no_grad():
            batch = test_images[start : start + args.batch_size].to(device)
            test_embeddings.append(extractor(batch).flatten(2))  # (B, C, P)
    test_embeddings = torch.cat(test_embeddings)  # (N_test, C, P)
    folds = make_folds(len(category.train), category.test_types, args.folds, args.seed)

    # permutation importance, fold by fold (each fold's result is saved, so --resume can skip it)
    results = []
    for k, (fit_index, val_index) in enumerate(folds):
        path = log.path(f"{prefix}fold{k}_importance.json")
        if args.resume and path.exists():
            results.append(json.loads(path.read_text()))
            print(f"{name} fold {k}: reusing {path.name}")
            continue
        start = time.perf_counter()
        mean, inv_covariance = fit(train_embeddings[fit_index], config.epsilon)
        rng = np.random.default_rng([args.seed, k])
        base_image, base_pixel, image_drop, pixel_drop = permutation_importance(
            test_embeddings[val_index],
            test_masks[val_index],
            labels[val_index],
            mean,
            inv_covariance,
            config,
            args.n_repeats,
            args.pixel_stride,
            rng,
        )
        del mean, inv_covariance
        result = {
            "fold": k,
            "n_fit": len(fit_index),
            "n_val": len(val_index),
            "base_image_auroc": base_image,
            "base_pixel_auroc_strided": base_pixel,
            "image_drop": image_drop.tolist(),
            "pixel_drop": pixel_drop.tolist(),
            "seconds": time.perf_counter() - start,
        }
        write_json(path, result)
        results.append(result)
        log.log(k, {f"{name}/base_image_auroc": base_image, f"{name}/base_pixel_auroc": base_pixel})
        print(
            f"{name} fold {k}: baseline image AUROC {base_image:.4f}, pixel AUROC {base_pixel:.4f} "
            f"(stride {args.pixel_stride}); {result['seconds']:.0f} s"
        )

    image_drops = np.stack([np.array(r["image_drop"]) for r in results])  # (folds, C, R)
    pixel_drops = np.stack([np.array(r["pixel_drop"]) for r in results])
    image_mean = image_drops.mean(axis=(0, 2))
    image_std = image_drops.transpose(1, 0, 2).reshape(len(channels), -1).std(axis=1)
    pixel_mean = pixel_drops.mean(axis=(0, 2))
    pixel_std = pixel_drops.transpose(1, 0, 2).reshape(len(channels), -1).std(axis=1)
    ranking = np.argsort(-image_mean)
    importance = {
        "category": name,
        "metric": "drop in AUROC when the channel is shuffled across validation images",
        "folds": args.folds,
        "n_repeats": args.n_repeats,
        "pixel_stride": args.pixel_stride,
        "base_image_auroc": [r["base_image_auroc"] for r in results],
        "ranking": [int(channels[i]) for i in ranking],
        "channels": {
            str(int(channels[i])): {
                "name": channel_name(int(channels[i])),
                "rank": int(np.where(ranking == i)[0][0]) + 1,
                "image_mean": float(image_mean[i]),
                "image_std": float(image_std[i]),
                "pixel_mean": float(pixel_mean[i]),
                "pixel_std": float(pixel_std[i]),
            }
            for i in range(len(channels))
        },
    }
    write_json(log.path(f"{prefix}importance.json"), importance)
    log.save_figure(f"{prefix}importance_ranking", ranking_figure(image_mean, image_std, channels, name))

    # top-k, bottom-k and random-k models; fold k ranks channels by the other folds' importances
    scores = {str(kk): {"top": [], "bottom": [], "random": []} for kk in args.ks}
    pixel_scores = {str(kk): {"top": [], "bottom": [], "random": []} for kk in args.ks}
    full = [r["base_image_auroc"] for r in results]  # the all-channel model of each fold
    jobs = len(folds) * len(args.ks) * (2 + args.n_random)
    with tqdm(total=jobs, desc=f"{name} subsets", leave=False, disable=None) as bar:
        for k, (fit_index, val_index) in enumerate(folds):
            others = [f for f in range(len(folds)) if f != k]
            fold_ranking = np.argsort(-image_drops[others].mean(axis=(0, 2)), kind="stable")
            choices = {}
            for kk in args.ks:
                choices[f"{kk}/top"] = [fold_ranking[:kk]]
                choices[f"{kk}/bottom"] = [fold_ranking[-kk:]]
                choices[f"{kk}/random"] = [
                    np.random.default_rng([args.seed + r, kk, k]).choice(len(channels), kk, replace=False)
                    for r in range(args.n_random)
                ]
            for key, subsets in choices.items():
                for subset in subsets:
                    index = torch.from_numpy(np.sort(subset)).to(device)
                    rows = torch.from_numpy(fit_index).to(device)
                    mean, inv_covariance = fit(train_embeddings[rows[:, None], index], config.epsilon)
                    rows = torch.from_numpy(val_index).to(device)
                    image, pixel = evaluate(
                        test_embeddings[rows[:, None], index],
                        test_masks[val_index],
                        labels[val_index],
                        mean,
                        inv_covariance,
                        config,
                    )
                    kk, choice = key.split("/")
                    scores[kk][choice].append(image)
                    pixel_scores[kk][choice].append(pixel)
                    bar.update(1)
    subsets = {
        kk: {
            choice: {
                "mean": float(np.mean(v)),
                "std": float(np.std(v)),
                "n": len(v),
                "pixel_mean": float(np.mean(pixel_scores[kk][choice])),
                "pixel_std": float(np.std(pixel_scores[kk][choice])),
            }
            for choice, v in by_choice.items()
        }
        for kk, by_choice in scores.items()
    }
    write_json(log.path(f"{prefix}subsets.json"), subsets)
    full_summary = {"mean": float(np.mean(full)), "std": float(np.std(full)), "n_channels": len(channels)}
    log.save_figure(f"{prefix}subsets_auroc", subsets_figure(subsets, full_summary, name))
    print(
        f"{name}: all {len(channels)} channels, image AUROC {full_summary['mean']:.4f} "
        f"+- {full_summary['std']:.4f} over folds"
    )
    for kk, by_choice in subsets.items():
        cells = [f"{c} {v['mean']:.4f} +- {v['std']:.4f}" for c, v in by_choice.items()]
        print(f"  k={kk:>3}: " + "  ".join(cells))
    top = [channel_name(c) for c in importance["ranking"][:5]]
    return {"all_channels_image_auroc": full_summary, "top5_channels": top, "subsets": subsets}


def main() -> None:
    args = parse_args(Args, check=check_args, description=__doc__)

    # setup
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    config = ModelConfig(
        n_features=n_features_of(args.n_features),
        image_size=args.image_size,
        resize=round(args.image_size * 8 / 7),
    )
    names = list(CATEGORIES) if args.category == "all" else [args.category]

    # data: every category found and every file checked before a run folder exists
    categories = {name: find_category(name, args.data_dir, args.download) for name in names}
    test_sets = {}
    for name, category in categories.items():
        verify_images(category.train)
        test_sets[name] = load_test_set(category, config)

    # model
    backbone, weights_source = backbone_weights(args.weights, args.seed)
    extractor = FeatureExtractor(backbone, choose_channels(config.n_features, args.seed)).to(device)
    log = RunLogger(
        "padim_anomaly",
        run_name(f"importance_{args.category}", args.seed),
        asdict(args),
        out=args.out,
        clearml=args.clearml,
        clearml_queue=args.clearml_queue,
        resume=args.resume,
    )
    print(
        f"weights: {weights_source} | device {device} | ranking {config.n_features} channels | "
        f"{args.folds} folds x {args.n_repeats} repeats | k = {args.ks}, {args.n_random} random sets each"
    )

    # loop over categories
    summary = {"weights": args.weights, "weights_source": weights_source, "n_features": config.n_features}
    for name, category in categories.items():
        prefix = "" if len(categories) == 1 else f"{name}_"
        test_set = test_sets.pop(name)
        summary[name] = run_category(name, category, test_set, extractor, config, args, device, log, prefix)
    log.write_summary(summary)
    log.close()


if __name__ == "__main__":
    run_main(main)
