"""Which ResNet18 embedding channels matter for PaDiM, and does the answer hold on new images and classes?

Importance of a channel = drop in full-resolution pixel AUROC (image AUROC as a second view) when it is
removed from the Gaussian: the exact refit without it, d2 - w_c^2 / Lambda_cc (no randomness); or when it
is shuffled across the validation images (permutation importance, --n-repeats times).
1. Split halves (the stability that counts): the test images are split --splits times into two disjoint
   halves, stratified by defect type; one model is fitted on all train/good; each half ranks the
   channels on its own; the two rankings are compared (Spearman, top-10 overlap).
2. Held-out top-k: the top-k and bottom-k of each half's ranking are scored on the other half (both
   directions, every split) beside --n-random random k-subsets scored on the same halves; a subset model
   is the Gaussian's marginal on those channels (exactly a refit on them). Top-k's place is a percentile.
3. Repeated CV (--repeats shuffles of --folds folds; fold k fits on the other train folds and validates
   on test fold k): drop-one, permutation, cluster (correlated channels) and whole-layer importance,
   agreement of disjoint folds of one shuffle, bootstrap rank intervals.
4. With several classes: top-k overlap against chance (hypergeometric), rank correlation, layers.

Research: python padim_anomaly/importance.py --category bottle transistor metal_nut
Offline:  python padim_anomaly/importance.py --category bottle mtile --weights none --data-dir PATH
Report:   python padim_anomaly/importance.py --from-runs RUN_A RUN_B   (classes run as separate processes)
Tiny:     python padim_anomaly/importance.py --weights none --n-features 16 --ks 2 4 --n-random 5 \\
              --splits 2 --repeats 2 --n-repeats 1 --image-size 64 --clearml off --data-dir DIR
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
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
    heldout_summary,
    rank_of,
    repeated_folds,
    same_shuffle_pairs,
    split_halves,
    stability,
)

from common import (  # noqa: E402
    DataArgs,
    RunLogger,
    UserError,
    check_fits,
    clock,
    parse_args,
    read_json,
    run_main,
    run_name,
    write_json,
)


@dataclass
class Args(DataArgs):
    category: list[str] = field(default_factory=lambda: ["bottle"])  # folder(s) under mvtec_ad/, or all
    weights: str = "imagenet"  # backbone weights: imagenet (torchvision cache), none (random init), or a PATH
    n_features: str = "100"  # channels ranked: a seeded random subset of this size, or 'all' (448)
    folds: int = 3  # cross-validation folds per shuffle
    repeats: int = 5  # shuffles of the folds (repeated k-fold)
    n_repeats: int = 5  # permutations per channel and fold (scikit-learn's n_repeats; 0 = exact drop only)
    cluster_threshold: float = 0.5  # join channels whose average |Spearman rho| is at least 1 - this
    n_patches: int = 20000  # train patches sampled for the channel correlations
    n_boot: int = 1000  # bootstrap resamples of the folds for each channel's rank interval
    ks: list[int] = field(default_factory=lambda: [10, 25, 50])  # subset sizes (each below --n-features)
    splits: int = 5  # random splits of the test set into two halves (rank on one, confirm on the other)
    n_random: int = 100  # random k-subsets per k (the baseline top-k is placed in)
    batch_size: int = 16  # images per backbone forward pass
    image_size: int = 224  # model input in pixels (images are resized to it); multiple of 16
    crop: bool = False  # resize the shorter side to image_size*8/7 and centre crop, instead of resizing
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when available
    download: bool = True  # fetch a missing bottle/transistor/metal_nut from MVTec (you accept its license)
    from_runs: list[str] = field(
        default_factory=list
    )  # finished run folders: only their (cross-class) report

    # --resume reuses the finished folds; the split-half study and the report after them are always redone
    RESUME_SAFE: ClassVar[frozenset[str]] = frozenset(
        {"device", "download", "ks", "n_random", "n_boot", "splits"}
    )
    EXTENDS: ClassVar[frozenset[str]] = frozenset({"ks", "n_random"})  # more subsets continue a finished run


def check_args(args: Args) -> None:
    n = n_features_of(args.n_features, low=2)
    if not all(1 <= k < n for k in args.ks):
        raise ValueError(f"--ks must each be in 1..{n - 1} (fewer than the ranked channels; got {args.ks})")
    for flag, value, low in (
        ("--folds", args.folds, 2),
        ("--repeats", args.repeats, 1),
        ("--n-random", args.n_random, 1),
        ("--splits", args.splits, 1),
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
        self._weights = None

    @property
    def weights(self) -> np.ndarray:
        """AUPRO's per-pixel region weights, computed when AUPRO is first asked for."""
        if self._weights is None:
            self._weights = region_weights(self.masks.numpy())
        return self._weights

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
    results, computed, loop_start = [], 0, time.perf_counter()
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
        computed += 1
        study.log.log(
            i, {f"eval/{name}/image_auroc": result["image"], f"eval/{name}/pixel_auroc": result["pixel"]}
        )
        # the folds computed here set the rate (reused ones cost nothing)
        left = (len(folds) - i - 1) * (time.perf_counter() - loop_start) / computed
        print(
            f"{name} shuffle {r} fold {k} ({i + 1}/{len(folds)}): image AUROC {result['image']:.4f}, "
            f"pixel AUROC {result['pixel']:.4f}, AUPRO {result['aupro']:.4f}; {result['seconds']:.0f} s, "
            f"ETA {clock(left)} for the folds left",
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
        "disjoint_folds": stability(ranking_view, pairs=same_shuffle_pairs(results)),
        "stability_by_view": {view: stability(values) for view, values in views.items()},
        "channels": per_channel,
        "clusters": clusters,
        "cluster_threshold": study.args.cluster_threshold,
        "layers": layer_drops,
    }


# ---------------------------------------------------------------- split halves


def full_fit(train_embeddings: torch.Tensor, epsilon: float, chunk: int = 32):
    """The class's model on every train image -> mean (C, P), covariance (P, C, C), inverse covariance."""
    stats = OnlineGaussian(
        train_embeddings.shape[1], train_embeddings.shape[2], device=train_embeddings.device
    )
    for start in range(0, len(train_embeddings), chunk):
        stats.update(train_embeddings[start : start + chunk])
    mean, covariance = stats.finalize(epsilon)
    return mean, covariance, invert_covariance_(covariance.clone())


def subset_squared(embeddings, mean, covariance, subset) -> torch.Tensor:
    """(V, P) squared distances of the model restricted to `subset`.

    That model is the Gaussian's marginal, exactly a refit on those channels (the covariance block,
    epsilon*I included), without another pass over the train images.
    """
    index = torch.from_numpy(np.sort(subset))
    inv_covariance = invert_covariance_(covariance[:, index][:, :, index].contiguous())  # (P, k, k)
    squared, _ = mahalanobis_terms(embeddings[:, index], mean[index], inv_covariance)
    return squared


def half_importance(scorer, embeddings, mean, inv_covariance) -> dict:
    """All-channel AUROCs/AUPRO on one half and every channel's drop-one importance there."""
    squared, weighted = mahalanobis_terms(embeddings, mean, inv_covariance)  # (V, P), (V, C, P)
    base = {k: float(v[0]) for k, v in scorer(squared.unsqueeze(0), with_aupro=True).items()}
    dropped = scorer(dropped_channel_squared(squared, weighted, inv_covariance))
    return {"base": base, **{f"drop_{m}": (base[m] - dropped[m]).tolist() for m in ("pixel", "image")}}


def split_half_study(study, name, train_embeddings, test, splits, save) -> dict:
    """Per split: a ranking on each half (drop-one pixel importance, one model fitted on all train/good)
    and their agreement; then, k by k, top-k / bottom-k of each half scored on the other half beside
    random k-subsets. `save(result)` runs after the rankings and after every k, so an interrupted run
    keeps what it finished."""
    embeddings, masks, labels = test
    config = study.config
    mean, covariance, inv_covariance = full_fit(train_embeddings, config.epsilon)
    halves = [torch.from_numpy(idx) for pair in splits for idx in pair]  # half e belongs to split e // 2
    scorers = [Scorer(masks[idx], labels[idx], config) for idx in halves]
    progress = Progress(f"{name} split halves", len(halves), "halves")
    rankings = []
    for e, idx in enumerate(halves):
        rankings.append(half_importance(scorers[e], embeddings[idx], mean, inv_covariance))
        progress.update(1)
    drops = np.array([r["drop_pixel"] for r in rankings])  # (2 S, C)
    pairs = [[2 * s, 2 * s + 1] for s in range(len(splits))]
    result = {
        "category": name,
        "model": "one Gaussian fitted on every train/good image; each half ranks the channels on its own",
        "n_splits": len(splits),
        "half_sizes": [[len(a), len(b)] for a, b in splits],
        "channels": study.extractor.channels.cpu().numpy().tolist(),
        "base": {m: [r["base"][m] for r in rankings] for m in ("image", "pixel", "aupro")},
        "drop_pixel": drops.tolist(),
        "drop_pixel_mean": drops.mean(axis=0).tolist(),
        "stability": stability(drops, pairs=pairs),
        "stability_image": stability(np.array([r["drop_image"] for r in rankings]), pairs=pairs),
        "topk": {},
    }
    save(result)
    model = (embeddings, mean, covariance)
    for k in study.args.ks:
        result["topk"][str(k)] = heldout_topk(study, name, k, model, halves, scorers, rankings)
        save(result)
    return result


def heldout_topk(study, name, k, model, halves, scorers, rankings) -> dict:
    """Evaluation (split s, ranked on half h) is scored on the other half of split s: top-k and bottom-k
    of half h's ranking, and random k-subsets (the same ones on every half; distances once over all test
    images)."""
    embeddings, mean, covariance = model
    args = study.args
    held = [e + 1 if e % 2 == 0 else e - 1 for e in range(len(halves))]  # the other half of the split
    choices = {"top": [], "bottom": []}
    for e, other in enumerate(held):
        order = np.argsort(-np.asarray(rankings[e]["drop_pixel"]), kind="stable")
        for choice, subset in (("top", order[:k]), ("bottom", order[-k:])):
            squared = subset_squared(embeddings[halves[other]], mean, covariance, subset)
            scores = scorers[other](squared.unsqueeze(0), with_aupro=True)
            choices[choice].append({m: float(v[0]) for m, v in scores.items()})
    draws = np.random.default_rng([args.seed, k]).random((args.n_random, embeddings.shape[1]))
    random = np.empty((args.n_random, len(halves), 2))  # pixel, image AUROC on every half
    progress = Progress(f"{name} random {k}-subsets", args.n_random, "subsets")
    for j in range(args.n_random):
        squared = subset_squared(embeddings, mean, covariance, np.argsort(draws[j])[:k])  # (N, P)
        for e, idx in enumerate(halves):
            scores = scorers[e](squared[idx].unsqueeze(0))
            random[j, e] = scores["pixel"][0], scores["image"][0]
        progress.update(1)
    entry = {}
    for i, metric in enumerate(("pixel", "image")):
        top = [r[metric] for r in choices["top"]]
        bottom = [r[metric] for r in choices["bottom"]]
        entry[metric] = heldout_summary(top, bottom, random[:, held, i])
    for choice in ("top", "bottom"):
        entry[f"{choice}_aupro"] = float(np.mean([r["aupro"] for r in choices[choice]]))
    entry["all_channels_aupro"] = float(np.mean([rankings[e]["base"]["aupro"] for e in held]))
    entry["all_channels_pixel"] = float(np.mean([rankings[e]["base"]["pixel"] for e in held]))
    return entry


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


def heldout_figure(split_halves: dict):
    """Per class: held-out pixel AUROC of top-k, bottom-k and every random k-subset, against k."""
    fig, axes = plt.subplots(1, len(split_halves), figsize=(5 * len(split_halves), 3.8), squeeze=False)
    for ax, (name, result) in zip(axes[0], split_halves.items()):
        topk = result["topk"]
        ks = sorted(int(k) for k in topk)
        for k in ks:
            values = topk[str(k)]["pixel"]["random_values"]
            ax.plot([k] * len(values), values, ".", color="tab:blue", alpha=0.25, ms=4)
        for choice, color in (("top", "tab:green"), ("bottom", "tab:red")):
            ax.plot(ks, [topk[str(k)]["pixel"][choice] for k in ks], "o-", color=color, label=f"{choice}-k")
        ax.plot(
            ks, [topk[str(k)]["pixel"]["random_p95"] for k in ks], "_", color="k", ms=14, label="random p95"
        )
        ax.plot([], [], ".", color="tab:blue", label="random k-subsets")
        n = result["n_splits"]
        ax.set(xscale="log", xlabel="k (channels kept)", title=f"{name} (held-out halves, {n} splits x 2)")
        ax.set_xticks(ks, [str(k) for k in ks], minor=False)
        ax.set_xticks([], minor=True)
        ax.set_ylabel("pixel AUROC, mean over held-out halves")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def cross_class_figure(report: dict, importances: dict, layers: dict):
    """Two classes at a glance: channel importances against each other, top-k overlap against chance,
    and the drop in pixel AUROC when a whole layer is removed."""
    a, b = report["classes"][:2]
    pair = report["pairs"][f"{a}|{b}"]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 4))
    channels = np.asarray([int(c) for c in importances[a]["channels"]])
    x, y = (
        np.asarray([importances[n]["channels"][str(c)]["drop_pixel_mean"] for c in channels]) for n in (a, b)
    )
    starts = np.cumsum((0, *LAYER_CHANNELS))
    for i, layer in enumerate(LAYERS):
        inside = (channels >= starts[i]) & (channels < starts[i + 1])
        left.plot(x[inside], y[inside], ".", ms=6, label=layer)
    left.axhline(0, color="k", lw=0.5)
    left.axvline(0, color="k", lw=0.5)
    left.set(xlabel=f"{a}: pixel AUROC drop", ylabel=f"{b}: pixel AUROC drop")
    left.set_title(f"drop-one importance per channel (Spearman {pair['spearman']:.2f})", fontsize=10)
    left.legend(fontsize=8)
    overlap = pair["topk_overlap"]
    ks = sorted(overlap, key=int)
    positions = np.arange(len(ks))
    low = [overlap[k]["range95"][0] for k in ks]
    high = [overlap[k]["range95"][1] for k in ks]
    middle.bar(positions, [overlap[k]["observed"] for k in ks], color="tab:purple", label="shared channels")
    middle.errorbar(
        positions,
        [overlap[k]["expected"] for k in ks],
        fmt="o",
        color="k",
        capsize=6,
        label="chance (95% range)",
        yerr=[
            np.subtract([overlap[k]["expected"] for k in ks], low),
            np.subtract(high, [overlap[k]["expected"] for k in ks]),
        ],
    )
    middle.set_xticks(positions, [f"top-{k}" for k in ks])
    middle.set_title(f"top-k of {a} and {b}: shared vs chance", fontsize=10)
    middle.legend(fontsize=8)
    width = 0.8 / len(layers)
    for i, (name, by_layer) in enumerate(layers.items()):
        names = [layer for layer in LAYERS if layer in by_layer]
        right.bar(
            np.arange(len(names)) + i * width,
            [by_layer[n]["pixel_drop_mean"] for n in names],
            width,
            label=name,
        )
    right.set_xticks(np.arange(len(names)) + width * (len(layers) - 1) / 2, names)
    right.axhline(0, color="k", lw=0.5)
    right.set_title("pixel AUROC drop when a whole layer is removed", fontsize=10)
    right.legend(fontsize=8)
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
    del images, batches
    test = (test_embeddings, masks, torch.from_numpy(category.test_labels))
    groups, labels, layer_names = channel_groups(study, train_embeddings)
    folds = repeated_folds(len(category.train), category.test_types, args.folds, args.repeats, args.seed)
    results = run_folds(study, name, prefix, train_embeddings, test, folds, groups)
    importance = summarise(study, name, results, labels, layer_names)
    write_json(study.log.path(f"{prefix}importance.json"), importance)
    study.log.save_figure(f"{prefix}importance_ranking", ranking_figure(importance, name))
    splits = split_halves(category.test_types, args.splits, args.seed)

    def save(result):
        write_json(study.log.path(f"{prefix}split_half.json"), result)
        study.log.keep()

    halves = split_half_study(study, name, train_embeddings, test, splits, save)
    return {"importance": importance, "split_half": halves}


def class_summary(importance: dict, halves: dict) -> dict:
    """One class in importance_summary.json (the README's tables read it)."""
    keep = ("spearman_mean", "spearman_min", "spearman_max", "spearman_std", "top10_overlap_mean",
            "top10_overlap_min")  # fmt: skip
    split, topk = None, {}
    if halves is not None:
        split = {k: halves["stability"][k] for k in keep}
        split.update(
            spearman=halves["stability"]["spearman"], top10_overlap=halves["stability"]["top10_overlap"]
        )
        split.update(n_splits=halves["n_splits"], half_sizes=halves["half_sizes"][0])
    for k, entry in (halves or {"topk": {}})["topk"].items():
        pixel = {m: v for m, v in entry["pixel"].items() if not m.endswith("_values")}
        topk[k] = {**pixel, "image": {m: v for m, v in entry["image"].items() if not m.endswith("_values")}}
        topk[k].update(
            {m: entry[m] for m in ("top_aupro", "bottom_aupro", "all_channels_aupro", "all_channels_pixel")}
        )
    return {
        "split_half": split,
        "split_half_base": halves and {m: float(np.mean(v)) for m, v in halves["base"].items()},
        "disjoint_folds": {k: importance["disjoint_folds"][k] for k in keep}
        | {"n_pairs": len(importance["disjoint_folds"]["pairs"])},
        "all_fold_pairs": {k: importance["stability"][k] for k in keep}
        | {"n_pairs": len(importance["stability"]["pairs"])},
        "folds": {
            "folds": importance["folds"],
            "repeats": importance["repeats"],
            "n_repeats": importance["n_repeats"],
        },
        "fold_base": {m: [float(np.mean(v)), float(np.std(v))] for m, v in importance["base"].items()},
        "views": {v: {k: s[k] for k in keep} for v, s in importance["stability_by_view"].items()},
        "layers": importance["layers"],
        "top_clusters": importance["clusters"][:3],
        "n_clusters": len(importance["clusters"]),
        "top10": [importance["channels"][str(c)]["name"] for c in importance["ranking"][:10]],
        "topk": topk,
    }


def report_category(name: str, summary: dict) -> None:
    s, d = summary["split_half"], summary["disjoint_folds"]
    halves = (
        "split halves not run"
        if s is None
        else (
            f"split halves ({s['n_splits']} splits): Spearman {s['spearman_mean']:.3f} "
            f"(min {s['spearman_min']:.3f}), top-10 overlap {s['top10_overlap_mean']:.1f}/10"
        )
    )
    print(
        f"{name}: {halves} | disjoint folds "
        f"({d['n_pairs']} pairs): Spearman {d['spearman_mean']:.3f} (min {d['spearman_min']:.3f})"
    )
    for k, t in summary["topk"].items():
        print(
            f"  k={k:>3} held out: pixel top {t['top']:.4f} (percentile {t['percentile']:.0f}, worst half "
            f"{t['percentile_min']:.0f}, resolution {t['resolution']:.1f}) bottom {t['bottom']:.4f} random "
            f"{t['random_mean']:.4f} (p95 {t['random_p95']:.4f}) | AUPRO top {t['top_aupro']:.4f} all "
            f"{t['all_channels_aupro']:.4f}"
        )


def cross_class(per_class: dict, ks) -> dict:
    """Cross-class agreement of the CV drop-one pixel importance, clusters and layers."""
    inputs = {}
    for name, result in per_class.items():
        importance = result["importance"]
        inputs[name] = {
            "importance": {int(c): e["drop_pixel_mean"] for c, e in importance["channels"].items()},
            "clusters": [c["channels"] for c in importance["clusters"]],
            "layers": {k: v["pixel_drop_mean"] for k, v in importance["layers"].items()},
        }
    return cross_class_report(inputs, ks=tuple(ks))


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


def report_classes(log, per_class: dict, ks) -> dict:
    """cross_class.json and cross_class.png (with two or more classes) and their lines."""
    if len(per_class) < 2:
        return {}
    report = cross_class(per_class, ks)
    write_json(log.path("cross_class.json"), report)
    for pair, v in report["pairs"].items():
        overlaps = ", ".join(
            f"top-{k} {o['observed']} (chance {o['expected']:.1f}, p {o['p_at_least']:.2g})"
            for k, o in v["topk_overlap"].items()
        )
        print(f"{pair}: Spearman {v['spearman']:.3f}; shared channels {overlaps}")
    for name, layers in report["layers_by_importance"].items():
        print(f"{name}: layers by pixel importance {', '.join(layers)}")
    importances = {name: r["importance"] for name, r in per_class.items()}
    layers = {name: r["importance"]["layers"] for name, r in per_class.items()}
    log.save_figure("cross_class", cross_class_figure(report, importances, layers))
    return report


def write_report(log, per_class: dict, header: dict, ks) -> None:
    """importance_summary.json, heldout_topk.png and (two or more classes) the cross-class report."""
    summaries = {}
    for name, result in per_class.items():
        summaries[name] = class_summary(result["importance"], result["split_half"]) | {"run": result["run"]}
        report_category(name, summaries[name])
    done = {n: r["split_half"] for n, r in per_class.items() if r["split_half"] and r["split_half"]["topk"]}
    if done:
        log.save_figure("heldout_topk", heldout_figure(done))
    report = report_classes(log, per_class, ks)
    write_json(log.path("importance_summary.json"), {**header, "classes": summaries, "cross_class": report})
    log.write_summary({**header, "classes": summaries, "cross_class": report})


SHARED = ("weights", "seed", "n_features", "image_size", "crop")  # what runs must share to be compared


def load_runs(folders: list[str]) -> tuple[dict, dict]:
    """The classes of earlier runs (their importance.json and split_half.json), checked to be comparable.

    An interrupted run counts with what it finished: split_half.json is rewritten after every k.
    """
    per_class, header = {}, None
    for folder in map(Path, folders):
        if not list(folder.glob("*importance.json")) or not (folder / "config.json").is_file():
            raise UserError(f"--from-runs {folder}: not an importance.py run folder (no importance.json)")
        config = read_json(folder / "config.json")
        found = {k: config["args"][k] for k in SHARED}
        if header is not None and any(header[k] != found[k] for k in SHARED):
            differ = ", ".join(f"{k} {header[k]} vs {found[k]}" for k in SHARED if header[k] != found[k])
            raise UserError(f"--from-runs: {folder} used other settings than the runs before it ({differ})")
        header = found
        last = max(path.stat().st_mtime for path in folder.glob("*.json"))
        minutes = (
            datetime.fromtimestamp(last) - datetime.fromisoformat(config["started"])
        ).total_seconds() / 60
        for path in sorted(folder.glob("*importance.json")):
            if path.name.startswith("fold_") or "_fold_" in path.name:
                continue
            prefix = path.name[: -len("importance.json")]
            importance = read_json(path)
            halves_path = folder / f"{prefix}split_half.json"
            halves = read_json(halves_path) if halves_path.is_file() else None  # stopped before the halves
            run = {"folder": folder.name, "args": study_args(config["args"]), "minutes": minutes}
            per_class[importance["category"]] = {"importance": importance, "split_half": halves, "run": run}
    return per_class, header


def study_args(args: dict) -> dict:
    """The flags that set a study's size and what it measures (for the README's commands)."""
    keys = ("weights", "n_features", "folds", "repeats", "n_repeats", "splits", "ks", "n_random", "seed")
    return {k: args[k] for k in keys}


def main() -> None:
    args = parse_args(Args, check=check_args, description=__doc__)
    if args.from_runs:  # the report of finished single-class runs: no data, no backbone
        per_class, header = load_runs(args.from_runs)
        ks = sorted({int(k) for r in per_class.values() for k in (r["split_half"] or {"topk": {}})["topk"]})
        ks = ks or [10, 25, 50]
        with RunLogger(
            "padim_anomaly", run_name(f"importance_{len(per_class)}classes", args.seed), args
        ) as log:
            write_report(log, per_class, {**header, "from_runs": args.from_runs}, ks)
        return
    # per-position covariances and their inverses (float32), and a batch's backbone activations
    s, c = args.image_size, n_features_of(args.n_features, low=1)
    check_fits(8 * (s // 4) ** 2 * c * c + 200 * args.batch_size * s * s, f"--image-size {s}")
    device, config, names, extractor, weights_source = setup(args)
    tag = names[0] if len(names) == 1 else f"{len(names)}classes"
    print(
        f"weights: {weights_source} | device {device} | {config.n_features} channels | "
        f"{args.repeats} x {args.folds} folds, {args.n_repeats} permutations | {args.splits} split halves | "
        f"k = {args.ks}, {args.n_random} random subsets each | classes: {', '.join(names)}"
    )
    start = time.perf_counter()
    with RunLogger("padim_anomaly", run_name(f"importance_{tag}", args.seed), args) as log:
        study = Study(args, config, extractor, device, log)
        per_class = {name: run_category(study, name, "" if len(names) == 1 else f"{name}_") for name in names}
        minutes = (time.perf_counter() - start) / 60
        for result in per_class.values():
            result["run"] = {
                "folder": log.path("summary.json").parent.name,
                "args": study_args(vars(args)),
                "minutes": minutes,
            }
        header = {"weights": args.weights, "weights_source": weights_source, "n_features": config.n_features}
        header.update(seed=args.seed, image_size=args.image_size, crop=args.crop)
        write_report(log, per_class, header, args.ks)


if __name__ == "__main__":
    run_main(main)
