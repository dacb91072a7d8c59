"""Where PaDiM's training memory goes, and online vs batch statistics as the training set grows.

1. Stage profile of the traditional (batch) fit on the class's training set: feature extraction,
   embedding storage, mean, covariance, inverse, scoring; each stage's peak and what it adds.
2. Agreement: online and batch statistics from the same embeddings (max relative difference of
   means and covariances, and the test AUROCs of both models).
3. Batch vs online fitting for N training images: peak memory, seconds and images/s, --repeats times
   per (method, N), every fit in a fresh process so no run inherits another's heap. Past the class's
   size the training images are reused in order (N = 2000 on bottle's 209 images = each about 10 times).

Two meters: live_peak_mib = live allocations (glibc mallinfo2: in-use heap + mmapped blocks, sampled
every 2 ms; torch.cuda.max_memory_allocated on a GPU) and peak_mib = process RSS (what the OS charges,
including memory glibc keeps after a free), both as peak above the fit's start.

Full:  python padim_anomaly/memory.py --category bottle
Here:  python padim_anomaly/memory.py --category bottle --weights none --data-dir PATH
Tiny:  python padim_anomaly/memory.py --weights none --ns 4 8 --n-features 10 --image-size 64 --clearml off
"""

from __future__ import annotations

import multiprocessing
import os
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
    FeatureExtractor,
    ModelConfig,
    OnlineGaussian,
    anomaly_map,
    choose_channels,
    fit_gaussian_batch,
    invert_covariance_,
    mahalanobis,
)
from padim_io import (  # noqa: E402
    PeakMemory,
    backbone_weights,
    check_image_size,
    find_category,
    fit_statistics,
    image_batches,
    live_mib,
    load_category,
    load_test_set,
    model_config,
    n_features_of,
    pick_device,
    score_images,
)
from sklearn.metrics import roc_auc_score  # noqa: E402

from common import DataArgs, RunLogger, check_fits, parse_args, run_main, run_name, write_json  # noqa: E402


@dataclass
class Args(DataArgs):
    category: str = "bottle"  # a folder under mvtec_ad/ (any class in the MVTec AD layout)
    weights: str = "imagenet"  # backbone weights: imagenet (torchvision cache), none (random init), or a PATH
    n_features: str = "100"  # embedding channels kept (random subset, seeded), or 'all' (= 448)
    ns: list[int] = field(default_factory=lambda: [25, 100, 200, 1000, 2000])  # training-set sizes to fit
    methods: list[str] = field(default_factory=lambda: ["online", "batch"])  # fitting methods to compare
    repeats: int = 3  # fits per (method, N), each in a fresh process
    batch_max_n: int = 1000  # batch fits only up to this N (they hold all N embeddings: 2.5 GB at N=2000)
    profile: bool = True  # run the stage profile and the online-vs-batch agreement check first
    fixed_malloc_threshold: bool = False  # Linux: fix glibc's mmap threshold so freed buffers leave the RSS
    batch_size: int = 16  # images per backbone forward pass (the online method's memory unit)
    image_size: int = 224  # model input in pixels (images are resized to it); multiple of 16
    crop: bool = False  # resize the shorter side to image_size*8/7 and centre crop, instead of resizing
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when available
    download: bool = True  # fetch a missing bottle/transistor/metal_nut from MVTec (you accept its license)

    # a measurement is redone whole on --resume; only where it runs may change
    RESUME_SAFE: ClassVar[frozenset[str]] = frozenset({"device", "download"})


def check_args(args: Args) -> None:
    if not args.category or "/" in args.category:
        raise ValueError(f"--category must be a folder name under mvtec_ad/ (got {args.category!r})")
    n_features_of(args.n_features)  # raises on a bad value
    if min(args.ns) < 2:
        raise ValueError(f"--ns must each be >= 2 (a covariance needs two samples; got {args.ns})")
    if not set(args.methods) <= {"online", "batch"} or not args.methods:
        raise ValueError(f"--methods must be online and/or batch (got {args.methods})")
    for flag, value in (("--batch-size", args.batch_size), ("--repeats", args.repeats)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1 (got {value})")
    check_image_size(args.image_size)


def build_extractor(args: Args, config: ModelConfig, device):
    backbone, source = backbone_weights(args.weights, args.seed)
    return FeatureExtractor(backbone, choose_channels(config.n_features, args.seed)).to(device), source


# ---------------------------------------------------------------- workers (each in a fresh process)


def fit_worker(args: Args, method: str, n: int) -> dict:
    """Fit N images (the class's images repeated) with one method; peak memory and time of the fit."""
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    config = model_config(args)
    category = find_category(args.category, args.data_dir, download=False)
    paths = (category.train * (n // len(category.train) + 1))[:n]
    extractor, _ = build_extractor(args, config, device)
    with torch.no_grad():  # warm-up: one-off library initialisation is no method's cost
        extractor(next(image_batches(paths[:1], config, 1)).to(device))
    batches = image_batches(paths, config, args.batch_size)
    with PeakMemory(device) as meter:
        start = time.perf_counter()
        fit_statistics(extractor, batches, n, method, config.epsilon, device, desc=f"{method} N={n}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return {
        "peak_mib": meter.peak_mib,
        "live_peak_mib": meter.live_peak_mib,
        "seconds": seconds,
        "images_per_second": n / seconds,
        "method": meter.method,
    }


@torch.no_grad()
def stage_profile(args: Args, config, device, category, extractor, test_images):
    """Peak of each stage of the batch fit above the fit's start, and what the stage itself adds."""
    extractor(test_images[:1].to(device))  # warm-up: one-off library initialisation is no stage's cost
    base = live_mib(device)
    stages, added = {}, {}

    def stage(name):
        meter = PeakMemory(device)
        meter.name, meter.live_at_start = name, live_mib(device) - base
        return meter

    def record(meter):
        peak = meter.live_peak_mib if meter.live_peak_mib is not None else meter.peak_mib
        stages[meter.name] = meter.live_at_start + peak  # peak above the fit's start
        added[meter.name] = peak  # what the stage itself adds on top of what was live

    with stage("feature_extraction") as meter:  # backbone activations of one batch, nothing kept
        extractor(next(image_batches(category.train, config, args.batch_size)).to(device))
    record(meter)
    with stage("embedding_storage") as meter:  # every training embedding kept, then concatenated
        batches = image_batches(category.train, config, args.batch_size)
        stored = [extractor(images.to(device)).flatten(2) for images in batches]
        embeddings = torch.cat(stored)  # (N, C, P)
        del stored
    record(meter)
    with stage("mean") as meter:
        mean = embeddings.mean(dim=0)  # (C, P)
    record(meter)
    with stage("covariance") as meter:
        _, covariance = fit_gaussian_batch(embeddings, config.epsilon)  # (P, C, C)
    record(meter)
    with stage("inverse") as meter:
        inv_covariance = invert_covariance_(covariance)
    record(meter)
    with stage("scoring") as meter:  # one batch of test images: Mahalanobis for all patches, maps
        embedding = extractor(test_images[: args.batch_size].to(device)).flatten(2)
        anomaly_map(
            mahalanobis(embedding, mean, inv_covariance), config.grid, config.image_size, config.sigma
        )
    record(meter)
    return stages, added, embeddings


@torch.no_grad()
def agreement_check(args: Args, config, device, extractor, embeddings, test_set, labels):
    """The same embeddings through both estimators: differences, test AUROCs, scoring speed."""
    test_images, test_masks = test_set
    batch_mean, batch_covariance = fit_gaussian_batch(embeddings, config.epsilon)
    online = OnlineGaussian(embeddings.shape[1], embeddings.shape[2], device=embeddings.device)
    for start in range(0, len(embeddings), args.batch_size):
        online.update(embeddings[start : start + args.batch_size])
    online_mean, online_covariance = online.finalize(config.epsilon)

    def relative(a, b):
        return float((a.double() - b.double()).abs().max() / b.double().abs().max())

    agreement = {
        "n_train": len(embeddings),
        "mean_max_relative_difference": relative(online_mean, batch_mean),
        "covariance_max_relative_difference": relative(online_covariance, batch_covariance),
        "definition": "max |online - batch| / max |batch| over all entries",
    }
    timings = {}
    fitted = {"batch": (batch_mean, batch_covariance), "online": (online_mean, online_covariance)}
    for name, (m, c) in fitted.items():
        inverse = invert_covariance_(c)
        start = time.perf_counter()
        maps, scores = score_images(
            extractor, test_images, m, inverse, config, device, args.batch_size, desc=f"score ({name})"
        )
        timings[name] = len(test_images) / (time.perf_counter() - start)
        agreement[f"{name}_image_auroc"] = float(roc_auc_score(labels, scores.numpy()))
        agreement[f"{name}_pixel_auroc"] = float(
            roc_auc_score(test_masks.flatten().numpy(), maps.flatten().numpy())
        )
        if name == "online":  # the Mahalanobis map alone: all patches of a batch in one batched product
            test_embeddings = [
                extractor(batch.to(device)).flatten(2) for batch in test_images.split(args.batch_size)
            ]
            start = time.perf_counter()
            for embedding in test_embeddings:
                anomaly_map(mahalanobis(embedding, m, inverse), config.grid, config.image_size, config.sigma)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            timings["mahalanobis"] = len(test_images) / (time.perf_counter() - start)
        del inverse, c
    agreement["aurocs_identical_to_4_decimals"] = all(
        round(agreement[f"online_{k}_auroc"], 4) == round(agreement[f"batch_{k}_auroc"], 4)
        for k in ("image", "pixel")
    )
    return agreement, timings


def profile_worker(args: Args) -> dict:
    """Stage-by-stage profile of the batch fit on the training set, then online-vs-batch agreement."""
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    config = model_config(args)
    category = find_category(args.category, args.data_dir, download=False)
    extractor, _ = build_extractor(args, config, device)
    test_set = load_test_set(category, config)
    stages, added, embeddings = stage_profile(args, config, device, category, extractor, test_set[0])
    agreement, timings = agreement_check(
        args, config, device, extractor, embeddings, test_set, category.test_labels
    )
    return {
        "stages": stages,
        "stage_added_mib": added,
        "agreement": agreement,
        "scoring_images_per_second": timings["online"],
        "mahalanobis_map_images_per_second": timings["mahalanobis"],
        "method": PeakMemory(device).method,
    }


def in_fresh_process(function, *arguments):
    """Run function(*arguments) in a new interpreter (spawn), so its peak memory is its own."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, arguments)


# ---------------------------------------------------------------- plot


def memory_figure(fit, floor_mib, name):
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for method, color in (("batch", "tab:red"), ("online", "tab:green")):
        if method not in fit:
            continue
        ns = sorted(int(n) for n in fit[method])
        for key, style, label in (("live_peak_mib", "o-", "live"), ("peak_mib", "s:", "RSS")):
            values = [fit[method][str(n)][key] for n in ns]
            if None not in values:
                left.plot(ns, values, style, color=color, label=f"{method} ({label})")
        right.plot(
            ns, [fit[method][str(n)]["images_per_second"] for n in ns], "o-", color=color, label=method
        )
    left.axhline(floor_mib, color="gray", ls="--", label="covariances alone (P*C*C float32)")
    left.set(
        xscale="log", xlabel="training images N", ylabel="peak above start (MiB)", title=f"{name}: fit memory"
    )
    right.set(xscale="log", xlabel="training images N", ylabel="images / s", title="fit throughput")
    left.legend(fontsize=7)
    right.legend()
    fig.tight_layout()
    return fig


def print_profile(profile: dict, n_train: int) -> list[str]:
    print(f"stage profile (batch fit, N = {n_train}), MiB above the fit's start [{profile['method']}]:")
    for name, peak in profile["stages"].items():
        print(f"  {name:<20} peak {peak:8.0f}   adds {profile['stage_added_mib'][name]:8.0f}")
    biggest = sorted(profile["stage_added_mib"], key=profile["stage_added_mib"].get, reverse=True)[:3]
    a = profile["agreement"]
    print(
        f"biggest consumers: {', '.join(biggest)}\n"
        f"online vs batch: mean rel. diff {a['mean_max_relative_difference']:.2e}, covariance "
        f"{a['covariance_max_relative_difference']:.2e}; image AUROC {a['online_image_auroc']:.4f} vs "
        f"{a['batch_image_auroc']:.4f}, pixel {a['online_pixel_auroc']:.4f} vs {a['batch_pixel_auroc']:.4f}; "
        f"scoring {profile['scoring_images_per_second']:.1f} images/s "
        f"(Mahalanobis map alone {profile['mahalanobis_map_images_per_second']:.1f} images/s)"
    )
    return biggest


def mean_std(values: list) -> tuple:
    if not values or None in values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def fit_sweep(args: Args, log) -> dict:
    """Every (N, method) --repeats times, each fit in a fresh process; means, stds and every run."""
    fit = {method: {} for method in args.methods}
    for step, n in enumerate(args.ns):
        for method in args.methods:
            if method == "batch" and n > args.batch_max_n:
                continue
            runs = [in_fresh_process(fit_worker, args, method, n) for _ in range(args.repeats)]
            entry = {}
            for key in ("live_peak_mib", "peak_mib", "seconds", "images_per_second"):
                entry[key], entry[f"{key}_std"] = mean_std([r[key] for r in runs])
                entry[f"{key}_runs"] = [r[key] for r in runs]
            fit[method][str(n)] = entry
            log.log(
                step,
                {f"train/{method}_peak_mib": entry["peak_mib"], f"charts/{method}_seconds": entry["seconds"]},
            )
            live = (
                "n/a"
                if entry["live_peak_mib"] is None
                else f"{entry['live_peak_mib']:.1f} +- {entry['live_peak_mib_std']:.1f}"
            )
            print(
                f"N={n:>5} {method:>6}: live peak {live} MiB, RSS peak {entry['peak_mib']:.0f} +- "
                f"{entry['peak_mib_std']:.0f} MiB, {entry['images_per_second']:.1f} img/s "
                f"({args.repeats} runs)",
                flush=True,
            )
    return fit


def ratio(fit, a: tuple, b: tuple, key: str):
    """fit[a][key] / fit[b][key] for (method, N) pairs; None where either is missing."""
    x, y = fit.get(a[0], {}).get(str(a[1]), {}).get(key), fit.get(b[0], {}).get(str(b[1]), {}).get(key)
    return None if x is None or y is None or y == 0 else x / y


def targets(args: Args, fit: dict) -> dict:
    """The issue's memory targets, from the live peaks (RSS ratios beside them)."""
    largest, smallest = max(args.ns), min(args.ns)
    reference = 100 if 100 in args.ns else smallest
    checks = {}
    for key in ("live_peak_mib", "peak_mib"):
        checks[f"online_{key}_N{largest}_over_N{reference}"] = ratio(
            fit, ("online", largest), ("online", reference), key
        )
        checks[f"online_over_batch_{key}"] = {
            n: ratio(fit, ("online", n), ("batch", n), key)
            for n in fit.get("batch", {})
            if n in fit.get("online", {})
        }
    print(
        "checks: "
        + ", ".join(
            f"{k} {v}" if isinstance(v, dict) else f"{k} {v:.3f}" for k, v in checks.items() if v is not None
        )
    )
    return checks


def main() -> None:
    args = parse_args(Args, check=check_args, description=__doc__)
    # per-position covariances and their inverses (float32), and a batch's backbone activations
    s, c = args.image_size, n_features_of(args.n_features, low=1)
    check_fits(8 * (s // 4) ** 2 * c * c + 200 * args.batch_size * s * s, f"--image-size {s}")
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    config = model_config(args)
    category, _ = load_category(args.category, args.data_dir, args.download, config)  # every file decoded
    _, weights_source = backbone_weights(args.weights, args.seed)
    if args.fixed_malloc_threshold:
        # glibc raises its mmap threshold after each large free, so later buffers come from the heap and
        # stay in the RSS after they are freed; a fixed threshold returns them (read at worker start-up)
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    floor_mib = config.grid**2 * config.n_features**2 * 4 / 2**20
    print(
        f"{args.category}: {len(category.train)} train images (reused in order past that N) | weights: "
        f"{weights_source} | device {device} | {config.n_features} channels x {config.grid**2} positions: "
        f"covariances {floor_mib:.0f} MiB"
    )
    with RunLogger("padim_anomaly", run_name(f"memory_{args.category}", args.seed), args) as log:
        profile = in_fresh_process(profile_worker, args) if args.profile else {}
        biggest = print_profile(profile, len(category.train)) if args.profile else []
        fit = fit_sweep(args, log)
        memory = {
            "stages": profile.get("stages"),
            "stage_added_mib": profile.get("stage_added_mib"),
            "biggest_consumers": biggest,
            "agreement": profile.get("agreement"),
            "scoring_images_per_second": profile.get("scoring_images_per_second"),
            "mahalanobis_map_images_per_second": profile.get("mahalanobis_map_images_per_second"),
            "fit": fit,
            "checks": targets(args, fit),
            "method": PeakMemory(device).method
            + ("; glibc MALLOC_MMAP_THRESHOLD_ fixed at 1 MiB" if args.fixed_malloc_threshold else ""),
            "n_train_images": len(category.train),
            "n_note": "past the class's size, its training images are reused in order to reach N",
            "covariance_floor_mib": floor_mib,
            **{k: getattr(args, k) for k in ("batch_size", "repeats", "weights")},
            "n_features": config.n_features,
            "weights_source": weights_source,
            "device": str(device),
        }
        write_json(log.path("memory.json"), memory)
        log.save_figure("memory_vs_n", memory_figure(fit, floor_mib, args.category))
        log.write_summary(
            {k: memory[k] for k in ("biggest_consumers", "method", "agreement", "checks", "device")}
        )


if __name__ == "__main__":
    run_main(main)
