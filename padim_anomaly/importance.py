"""Which ResNet18 embedding channels matter for PaDiM, measured so that the answer holds across folds.

Folds: repeated k-fold (--repeats shuffles of --folds folds). Fold (r, k) fits PaDiM on the other
train/good folds of shuffle r and validates on test fold k (stratified by defect type).
Importance of a channel in a fold = drop in full-resolution pixel AUROC (image AUROC as a second view)
1. when the channel is removed: the exact refit without it, d2 - w_c^2 / Lambda_cc (no randomness);
2. when it is shuffled across the validation images (permutation importance, --n-repeats times).
Channels are ranked by the mean drop-one pixel importance. Correlated channels share credit, so
clusters (hierarchical, on the Spearman correlation of channel activations over train patches) and
whole layers are dropped as sets too. Rank stability: Spearman and top-10 overlap of every fold pair,
bootstrap intervals of each rank over folds. Then top-k, bottom-k and --n-random random k-subsets are
fitted on the first shuffle's folds; fold k's top/bottom come from the other folds of that shuffle,
so no validation image chooses its own channels; top-k's place among the random subsets is a percentile.

Research: python padim_anomaly/importance.py --category bottle transistor metal_nut
Offline:  python padim_anomaly/importance.py --category bottle --weights none --data-dir PATH
Tiny:     python padim_anomaly/importance.py --weights none --n-features 16 --ks 2 4 --n-random 5 \\
              --image-size 64 --clearml off --data-dir DIR
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's common, not an installed one
from padim import (  # noqa: E402
    LAYER_CHANNELS,
    LAYERS,
    FeatureExtractor,
    OnlineGaussian,
    anomaly_map,
    aupro,
    auroc,
    channel_name,
    choose_channels,
    dropped_channel_squared,
    dropped_set_squared,
    image_scores,
    invert_covariance_,
    mahalanobis_terms,
    permuted_squared_distance,
    region_weights,
)
from padim_io import (  # noqa: E402
    Progress,
    backbone_weights,
    category_names,
    check_image_size,
    load_category,
    model_config,
    n_features_of,
    pick_device,
)
from study import (  # noqa: E402
    bootstrap_rank_ci,
    cluster_channels,
    cross_class_report,
    percentile_of,
    rank_of,
    repeated_folds,
    stability,
)

from common import DataArgs, RunLogger, check_fits, parse_args, read_json, run_main, run_name, write_json  # noqa: E402


@dataclass
class Args(DataArgs):
    category: list[str] = field(default_factory=lambda: ["bottle"])  # folder(s) under mvtec_ad/, or all
    weights: str = "imagenet"  # backbone weights: imagenet (torchvision cache), none (random init), or a PATH
    n_features: str = "100"  # channels ranked: a seeded random subset of this size, or 'all' (448)
    folds: int = 3  # cross-validation folds per shuffle
    repeats: int = 5  # shuffles of the folds (repeated k-fold)
    n_repeats: int = 2  # permutations per channel and fold (scikit-learn's n_repeats; 0 = exact drop only)
    cluster_threshold: float = 0.5  # join channels whose average |Spearman rho| is at least 1 - this
    n_patches: int = 20000  # train patches sampled for the channel correlations
    n_boot: int = 1000  # bootstrap resamples of the folds for each channel's rank interval
    ks: list[int] = field(default_factory=lambda: [10, 25, 50])  # subset sizes (each below --n-features)
    n_random: int = 50  # random k-subsets per k (the baseline top-k is placed in)
    batch_size: int = 16  # images per backbone forward pass
    image_size: int = 224  # model input in pixels (images are resized to it); multiple of 16
    crop: bool = False  # resize the shorter side to image_size*8/7 and centre crop, instead of resizing
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when available
    download: bool = True  # fetch a missing bottle/transistor/metal_nut from MVTec (you accept its license)

    # --resume reuses the finished folds; the subset study and the report after them are always redone
    RESUME_SAFE: ClassVar[frozenset[str]] = frozenset({"device", "download", "ks", "n_random", "n_boot"})
    EXTENDS: ClassVar[frozenset[str]] = frozenset({"ks", "n_random"})  # more subsets continue a finished run


def check_args(args: Args) -> None:
    n = n_features_of(args.n_features, low=2)
    if not all(1 <= k < n for k in args.ks):
        raise ValueError(f"--ks must each be in 1..{n - 1} (fewer than the ranked channels; got {args.ks})")
    for flag, value, low in (
        ("--folds", args.folds, 2),
        ("--repeats", args.repeats, 1),
        ("--n-random", args.n_random, 1),
        ("--n-patches", args.n_patches, 10),
        ("--n-boot", args.n_boot, 1),
        ("--batch-size", args.batch_size, 1),
    ):
        if value < low:
            raise ValueError(f"--{flag.lstrip('-')} must be >= {low} (got {value})")
    if not 0 < args.cluster_threshold <= 1:
        raise ValueError(f"--cluster-threshold must be in (0, 1] (got {args.cluster_threshold})")
    check_image_size(args.image_size)


@dataclass
class Study:
    """What every stage of one run shares."""

    args: Args
    config: object
    extractor: FeatureExtractor
    device: torch.device
    log: RunLogger


# ---------------------------------------------------------------- embeddings and fits


@torch.no_grad()
def embed_all(extractor, batches, total: int, device, desc) -> torch.Tensor:
    """(N, C, P) embeddings of every image (an iterable of batches), cached for all folds."""
    parts = []
    progress = Progress(desc, total)
    for batch in batches:
        parts.append(extractor(batch.to(device)).flatten(2))  # (B, C, P)
        progress.update(len(batch))
    return torch.cat(parts)


def fit(embeddings: torch.Tensor, epsilon: float, chunk: int = 32):
    """Online Gaussian over cached (N, C, P) embeddings -> mean (C, P), inverse covariance (P, C, C)."""
    stats = OnlineGaussian(embeddings.shape[1], embeddings.shape[2], device=embeddings.device)
    for start in range(0, len(embeddings), chunk):
        stats.update(embeddings[start : start + chunk])
    mean, covariance = stats.finalize(epsilon)
    return mean, invert_covariance_(covariance)


class Scorer:
    """Image AUROC, full-resolution pixel AUROC (and AUPRO) of squared distances of one validation set."""

    def __init__(self, masks: torch.Tensor, labels: torch.Tensor, config, rows_per_chunk: int = 4):
        self.masks, self.labels, self.config, self.chunk = masks, labels, config, rows_per_chunk
        self.pixels = masks.flatten()
        self.weights = region_weights(masks.numpy())

    def maps(self, squared: torch.Tensor) -> torch.Tensor:
        """(R, V, P) squared distances -> (R, V, S, S) anomaly maps."""
        r, v = squared.shape[:2]
        c = self.config
        maps = anomaly_map(squared.clamp_min(0).sqrt().flatten(0, 1), c.grid, c.image_size, c.sigma)
        return maps.reshape(r, v, c.image_size, c.image_size).cpu()

    def __call__(self, squared: torch.Tensor, with_aupro: bool = False) -> dict[str, np.ndarray]:
        """(R, V, P) -> {"image": (R,), "pixel": (R,)[, "aupro": (R,)]}."""
        out = {"image": [], "pixel": [], "aupro": []}
        for part in squared.split(self.chunk):
            maps = self.maps(part)
            out["image"].append(auroc(image_scores(maps.flatten(0, 1)).reshape(len(part), -1), self.labels))
            out["pixel"].append(auroc(maps.reshape(len(part), -1), self.pixels))
            if with_aupro:
                out["aupro"] += [[aupro(m, self.masks, weights=self.weights)] for m in maps]
        return {k: np.concatenate([np.asarray(x) for x in v]) for k, v in out.items() if v}


# ---------------------------------------------------------------- one fold


def fold_importance(study, train_embeddings, test, fold, groups, rng) -> dict:
    """Drop-one, permutation, cluster and layer importance (drops in image and pixel AUROC) in one fold."""
    embeddings, masks, labels = test
    mean, inv_covariance = fit(train_embeddings[torch.from_numpy(fold["fit"])], study.config.epsilon)
    val = torch.from_numpy(fold["val"])
    embeddings = embeddings[val]
    scorer = Scorer(masks[val], labels[val], study.config)
    squared, weighted = mahalanobis_terms(embeddings, mean, inv_covariance)  # (V, P), (V, C, P)
    base = scorer(squared.unsqueeze(0), with_aupro=True)
    result = {k: float(v[0]) for k, v in base.items()}

    def drops(squared_rows):  # (R, V, P) -> {"image": (R,), "pixel": (R,)} drops from the baseline
        scores = scorer(squared_rows)
        return {k: (result[k] - scores[k]).tolist() for k in ("image", "pixel")}

    result["drop"] = drops(dropped_channel_squared(squared, weighted, inv_covariance))
    result["groups"] = {
        kind: drops(torch.stack([dropped_set_squared(squared, weighted, inv_covariance, i) for i in sets]))
        for kind, sets in groups.items()
    }
    n_channels, n_val = embeddings.shape[1], embeddings.shape[0]
    permutation = {"image": [], "pixel": []}
    inv_diagonal = inv_covariance.diagonal(dim1=1, dim2=2).T.contiguous()  # (C, P)
    for channel in range(n_channels if study.args.n_repeats else 0):
        order = torch.from_numpy(np.stack([rng.permutation(n_val) for _ in range(study.args.n_repeats)]))
        shuffled = permuted_squared_distance(squared, weighted, inv_diagonal, embeddings, channel, order)
        for k, v in drops(shuffled).items():
            permutation[k].append(v)
    result["permutation"] = permutation  # (C, n_repeats) per metric
    return result


def run_folds(study, name, prefix, train_embeddings, test, folds, groups) -> list[dict]:
    """Every fold in turn; each fold's result is saved so --resume skips it."""
    results = []
    for i, fold in enumerate(folds):
        r, k = fold["repeat"], fold["fold"]
        path = study.log.path(f"{prefix}fold_r{r}k{k}_importance.json")
        if study.log.resumed and path.exists():
            results.append(read_json(path))
            print(f"{name} shuffle {r} fold {k}: reusing {path.name}")
            continue
        start = time.perf_counter()
        rng = np.random.default_rng([study.args.seed, r, k])
        result = fold_importance(study, train_embeddings, test, fold, groups, rng)
        result.update(repeat=r, fold=k, n_fit=len(fold["fit"]), n_val=len(fold["val"]))
        result["seconds"] = time.perf_counter() - start
        write_json(path, result)
        study.log.keep()  # a finished fold is worth keeping: --resume continues from it
        results.append(result)
        study.log.log(
            i, {f"eval/{name}/image_auroc": result["image"], f"eval/{name}/pixel_auroc": result["pixel"]}
        )
        print(
            f"{name} shuffle {r} fold {k} ({i + 1}/{len(folds)}): image AUROC {result['image']:.4f}, "
            f"pixel AUROC {result['pixel']:.4f}, AUPRO {result['aupro']:.4f}; {result['seconds']:.0f} s",
            flush=True,
        )
    return results


# ---------------------------------------------------------------- groups of channels


def channel_groups(study, train_embeddings) -> tuple[dict, np.ndarray, list[str]]:
    """Clusters of correlated channels (from train patches only) and whole layers, as index tensors."""
    rng = np.random.default_rng(study.args.seed)
    n, c, p = train_embeddings.shape
    pick = rng.choice(n * p, size=min(study.args.n_patches, n * p), replace=False)
    patches = train_embeddings.permute(0, 2, 1).reshape(n * p, c)[torch.from_numpy(pick)]
    labels = cluster_channels(patches.double().cpu().numpy(), study.args.cluster_threshold)
    clusters = [np.flatnonzero(labels == j) for j in range(labels.max() + 1)]
    channels = study.extractor.channels.cpu().numpy()
    starts = np.cumsum((0, *LAYER_CHANNELS))
    layers = [
        np.flatnonzero((channels >= starts[i]) & (channels < starts[i + 1])) for i in range(len(LAYERS))
    ]
    layer_names = [LAYERS[i] for i in range(len(LAYERS)) if len(layers[i])]
    groups = {
        "clusters": [torch.from_numpy(c) for c in clusters],
        "layers": [torch.from_numpy(x) for x in layers if len(x)],
    }
    return groups, labels, layer_names


# ---------------------------------------------------------------- aggregate


def per_fold(results, criterion, metric) -> np.ndarray:
    """(F, C) importances; permutation drops are averaged over their repeats."""
    values = [np.asarray(r[criterion][metric], dtype=np.float64) for r in results]
    return np.stack([v.mean(axis=1) if v.ndim == 2 else v for v in values])


def summarise(study, name, results, labels, layer_names) -> dict:
    """importance.json: per channel, cluster and layer, with rank stability and bootstrap rank intervals."""
    channels = study.extractor.channels.cpu().numpy()
    criteria = [("drop", "pixel"), ("drop", "image")]
    if study.args.n_repeats:
        criteria += [("permutation", "pixel"), ("permutation", "image")]
    views = {f"{c}_{m}": per_fold(results, c, m) for c, m in criteria}
    ranking_view = views["drop_pixel"]  # the ranking that picks top-k
    mean = ranking_view.mean(axis=0)
    ranks = rank_of(mean)
    interval = bootstrap_rank_ci(ranking_view, study.args.n_boot, study.args.seed)
    order = np.argsort(ranks)
    per_channel = {}
    for i in order:
        entry = {"name": channel_name(int(channels[i])), "rank": int(ranks[i]), "cluster": int(labels[i])}
        entry["rank_ci95"] = [float(x) for x in interval[i]]
        for view, values in views.items():
            entry[f"{view}_mean"], entry[f"{view}_std"] = (
                float(values[:, i].mean()),
                float(values[:, i].std()),
            )
        per_channel[str(int(channels[i]))] = entry
    cluster_pixel = np.stack([r["groups"]["clusters"]["pixel"] for r in results]).mean(axis=0)
    cluster_image = np.stack([r["groups"]["clusters"]["image"] for r in results]).mean(axis=0)
    clusters = [
        {
            "channels": [int(channels[i]) for i in np.flatnonzero(labels == j)],
            "pixel_drop_mean": float(cluster_pixel[j]),
            "image_drop_mean": float(cluster_image[j]),
        }
        for j in np.argsort(-cluster_pixel, kind="stable")
    ]
    layer_drops = {
        layer: {
            "pixel_drop_mean": float(np.mean([r["groups"]["layers"]["pixel"][j] for r in results])),
            "image_drop_mean": float(np.mean([r["groups"]["layers"]["image"][j] for r in results])),
        }
        for j, layer in enumerate(layer_names)
    }
    return {
        "category": name,
        "ranking_criterion": "drop in full-resolution pixel AUROC when the channel is removed (exact refit)",
        "folds": study.args.folds,
        "repeats": study.args.repeats,
        "n_repeats": study.args.n_repeats,
        "base": {k: [r[k] for r in results] for k in ("image", "pixel", "aupro")},
        "ranking": [int(channels[i]) for i in order],
        "stability": stability(ranking_view),
        "stability_by_view": {view: stability(values) for view, values in views.items()},
        "channels": per_channel,
        "clusters": clusters,
        "cluster_threshold": study.args.cluster_threshold,
        "layers": layer_drops,
    }


# ---------------------------------------------------------------- subsets


def evaluate_subset(study, train_embeddings, test, fold, subset) -> dict:
    """Fit on the fold's train images with the channels in `subset`; image/pixel AUROC and AUPRO."""
    embeddings, masks, labels = test
    index = torch.from_numpy(np.sort(subset))
    mean, inv_covariance = fit(
        train_embeddings[torch.from_numpy(fold["fit"])][:, index], study.config.epsilon
    )
    val = torch.from_numpy(fold["val"])
    squared, _ = mahalanobis_terms(embeddings[val][:, index], mean, inv_covariance)
    scores = fold["scorer"](squared.unsqueeze(0), with_aupro=True)
    return {k: float(v[0]) for k, v in scores.items()}


def subset_study(study, name, results, folds, train_embeddings, test) -> dict:
    """Top-k, bottom-k and random-k models on the first shuffle's folds, top-k placed among the random."""
    n_channels = train_embeddings.shape[1]
    first = [i for i, f in enumerate(folds) if f["repeat"] == 0]
    importance = per_fold([results[i] for i in first], "drop", "pixel")  # (folds, C)
    _, masks, labels = test
    for i in first:
        folds[i]["scorer"] = Scorer(masks[folds[i]["val"]], labels[folds[i]["val"]], study.config)
    progress = Progress(
        f"{name} subsets", len(study.args.ks) * len(first) * (2 + study.args.n_random), "fits"
    )
    out = {}
    for k in study.args.ks:
        rng = np.random.default_rng([study.args.seed, k])
        randoms = [rng.choice(n_channels, k, replace=False) for _ in range(study.args.n_random)]
        scores = {"top": [], "bottom": [], "random": []}  # random: (folds, n_random) dicts
        for j, i in enumerate(first):
            ranking = np.argsort(-np.delete(importance, j, axis=0).mean(axis=0), kind="stable")
            for choice, subset in (("top", ranking[:k]), ("bottom", ranking[-k:])):
                scores[choice].append(evaluate_subset(study, train_embeddings, test, folds[i], subset))
            scores["random"].append(
                [evaluate_subset(study, train_embeddings, test, folds[i], s) for s in randoms]
            )
            progress.update(2 + len(randoms))
        out[str(k)] = subset_summary(scores)
    return out


def subset_summary(scores) -> dict:
    """Per choice: mean and std over folds; random: the distribution of per-subset fold means."""
    metrics = ("image", "pixel", "aupro")
    random_means = {m: np.mean([[s[m] for s in row] for row in scores["random"]], axis=0) for m in metrics}
    summary = {
        "random": {
            "n": len(random_means["pixel"]),
            **{f"{m}_mean": float(random_means[m].mean()) for m in metrics},
            **{f"{m}_std": float(random_means[m].std(ddof=1)) for m in metrics},
            **{f"{m}_p95": float(np.percentile(random_means[m], 95)) for m in metrics},
            "pixel_values": random_means["pixel"].tolist(),
        }
    }
    for choice in ("top", "bottom"):
        entry = {"n_folds": len(scores[choice])}
        for m in metrics:
            values = np.array([s[m] for s in scores[choice]])
            entry[f"{m}_mean"], entry[f"{m}_std"] = float(values.mean()), float(values.std())
            entry[f"percentile_{m}"] = percentile_of(values.mean(), random_means[m])
        summary[choice] = entry
    return summary


# ---------------------------------------------------------------- plots


def ranking_figure(importance, name):
    entries = list(importance["channels"].values())
    mean = np.array([e["drop_pixel_mean"] for e in entries])
    low = np.array([e["rank_ci95"][0] for e in entries])
    high = np.array([e["rank_ci95"][1] for e in entries])
    ranks = np.array([e["rank"] for e in entries])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    left.plot(ranks, mean, ".", ms=4)
    left.axhline(0, color="k", lw=0.6)
    left.set(xlabel="rank", ylabel="pixel AUROC drop when removed", title=f"{name}: drop-one importance")
    right.errorbar(ranks, ranks, yerr=[ranks - low, high - ranks], fmt=".", ms=3, lw=0.6)
    right.set(xlabel="rank (mean over folds)", ylabel="bootstrap 95% interval", title="rank stability")
    fig.tight_layout()
    return fig


def subsets_figure(subsets, name):
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ks = sorted(int(k) for k in subsets)
    for k in ks:
        ax.plot(
            [k] * len(subsets[str(k)]["random"]["pixel_values"]),
            subsets[str(k)]["random"]["pixel_values"],
            ".",
            color="tab:blue",
            alpha=0.3,
            ms=4,
        )
    for choice, color in (("top", "tab:green"), ("bottom", "tab:red")):
        ax.plot(
            ks, [subsets[str(k)][choice]["pixel_mean"] for k in ks], "o-", color=color, label=f"{choice}-k"
        )
    ax.plot([], [], ".", color="tab:blue", label="random-k subsets")
    ax.set(xscale="log", xlabel="k (channels kept)", ylabel="pixel AUROC (mean over folds)", title=name)
    ax.legend()
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- one category, then all


def run_category(study: Study, name: str, prefix: str) -> dict:
    category, (images, masks) = load_category(name, study.args.data_dir, study.args.download, study.config)
    args = study.args
    batches = category.train_batches(study.config, args.batch_size)
    train_embeddings = embed_all(study.extractor, batches, len(category.train), study.device, f"{name} train")
    batches = images.split(args.batch_size)
    test_embeddings = embed_all(study.extractor, batches, len(images), study.device, f"{name} test")
    test = (test_embeddings, masks, torch.from_numpy(category.test_labels))
    groups, labels, layer_names = channel_groups(study, train_embeddings)
    folds = repeated_folds(len(category.train), category.test_types, args.folds, args.repeats, args.seed)
    results = run_folds(study, name, prefix, train_embeddings, test, folds, groups)
    importance = summarise(study, name, results, labels, layer_names)
    subsets = subset_study(study, name, results, folds, train_embeddings, test)
    write_json(study.log.path(f"{prefix}importance.json"), importance)
    write_json(study.log.path(f"{prefix}subsets.json"), subsets)
    study.log.save_figure(f"{prefix}importance_ranking", ranking_figure(importance, name))
    study.log.save_figure(f"{prefix}subsets_auroc", subsets_figure(subsets, name))
    return report_category(name, importance, subsets)


def report_category(name, importance, subsets) -> dict:
    s = importance["stability"]
    base = {k: (float(np.mean(v)), float(np.std(v))) for k, v in importance["base"].items()}
    print(
        f"{name}: all channels image AUROC {base['image'][0]:.4f} +- {base['image'][1]:.4f}, pixel "
        f"{base['pixel'][0]:.4f} +- {base['pixel'][1]:.4f}, AUPRO {base['aupro'][0]:.4f} (over folds)\n"
        f"  ranking stability over {len(s['spearman'])} fold pairs: Spearman {s['spearman_mean']:.3f} "
        f"(min {s['spearman_min']:.3f}), top-10 overlap {s['top10_overlap_mean']:.1f}/10"
    )
    for k, by_choice in subsets.items():
        t, b, r = by_choice["top"], by_choice["bottom"], by_choice["random"]
        print(
            f"  k={k:>3}: pixel top {t['pixel_mean']:.4f} (percentile {t['percentile_pixel']:.0f}) "
            f"bottom {b['pixel_mean']:.4f} random {r['pixel_mean']:.4f} +- {r['pixel_std']:.4f} "
            f"(p95 {r['pixel_p95']:.4f}) | image top {t['image_mean']:.4f} random {r['image_mean']:.4f} | "
            f"AUPRO top {t['aupro_mean']:.4f} random {r['aupro_mean']:.4f}"
        )
    return {
        "base_mean_std": base,
        "stability": {k: v for k, v in s.items() if k != "pairs"},
        "top10": [importance["channels"][str(c)]["name"] for c in importance["ranking"][:10]],
        "layers": importance["layers"],
        "subsets": {
            k: {c: {m: v for m, v in e.items() if m != "pixel_values"} for c, e in by.items()}
            for k, by in subsets.items()
        },
        "_importance": importance,
    }


def cross_class(per_class: dict) -> dict:
    """Cross-class agreement from each class's importance.json (drop-one pixel importance)."""
    inputs = {}
    for name, summary in per_class.items():
        importance = summary.pop("_importance")
        inputs[name] = {
            "importance": {int(c): e["drop_pixel_mean"] for c, e in importance["channels"].items()},
            "clusters": [c["channels"] for c in importance["clusters"]],
            "layers": {k: v["pixel_drop_mean"] for k, v in importance["layers"].items()},
        }
    return cross_class_report(inputs)


def setup(args: Args):
    """Device, model config, class names, every file decoded (before a run folder exists), backbone."""
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    config = model_config(args)
    names = category_names(args.category, args.data_dir)
    for name in names:
        load_category(name, args.data_dir, args.download, config, verify_only=True)
    backbone, weights_source = backbone_weights(args.weights, args.seed)
    extractor = FeatureExtractor(backbone, choose_channels(config.n_features, args.seed)).to(device)
    return device, config, names, extractor, weights_source


def report_classes(log, per_class: dict) -> dict:
    """cross_class.json (with two or more classes) and its lines."""
    report = cross_class(per_class)
    if len(per_class) > 1:
        write_json(log.path("cross_class.json"), report)
        for pair, v in report["pairs"].items():
            print(
                f"{pair}: top-10 Jaccard {v['top10_jaccard']:.2f}, Spearman {v['spearman']:.3f}, "
                f"top-3 clusters Jaccard {v['top3_clusters_jaccard']:.2f}"
            )
        for name, layers in report["layers_by_importance"].items():
            print(f"{name}: layers by pixel importance {', '.join(layers)}")
    return report


def main() -> None:
    args = parse_args(Args, check=check_args, description=__doc__)
    # per-position covariances and their inverses (float32), and a batch's backbone activations
    s, c = args.image_size, n_features_of(args.n_features, low=1)
    check_fits(8 * (s // 4) ** 2 * c * c + 200 * args.batch_size * s * s, f"--image-size {s}")
    device, config, names, extractor, weights_source = setup(args)
    tag = names[0] if len(names) == 1 else f"{len(names)}classes"
    print(
        f"weights: {weights_source} | device {device} | {config.n_features} channels | "
        f"{args.repeats} x {args.folds} folds, {args.n_repeats} permutations | k = {args.ks}, "
        f"{args.n_random} random subsets each | classes: {', '.join(names)}"
    )
    with RunLogger("padim_anomaly", run_name(f"importance_{tag}", args.seed), args) as log:
        study = Study(args, config, extractor, device, log)
        per_class = {name: run_category(study, name, "" if len(names) == 1 else f"{name}_") for name in names}
        report = report_classes(log, per_class)
        summary = {"weights": args.weights, "weights_source": weights_source, "n_features": config.n_features}
        log.write_summary({**summary, "classes": per_class, "cross_class": report})


if __name__ == "__main__":
    run_main(main)
