"""Where PaDiM's training memory goes, and online vs batch statistics as the training set grows.

1. Stage profile of the traditional (batch) fit on the category's training set: feature extraction,
   embedding storage, mean, covariance, inverse, scoring; each stage's peak and what it adds.
2. Agreement: online and batch statistics from the same embeddings (max relative difference of
   means and covariances, and the test AUROCs of both models).
3. Batch vs online fitting for N training images (images reused past the class size): peak memory,
   seconds and images/s. Every (method, N) runs in a fresh process, so no run inherits another's heap.

Memory is the allocator's counter: torch.cuda.max_memory_allocated on a GPU; on CPU the process RSS
sampled every 2 ms (tracemalloc does not see torch's allocations), as peak above the fit's start.

Full:  python padim_anomaly/memory.py --category bottle
Here:  python padim_anomaly/memory.py --category bottle --weights none --data-dir ../shared/data
Tiny:  python padim_anomaly/memory.py --weights none --ns 4 8 --n-features 10 --image-size 64 --clearml off
"""

from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
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
    CATEGORIES,
    PeakMemory,
    backbone_weights,
    check_image_size,
    find_category,
    fit_statistics,
    image_batches,
    live_mib,
    load_test_set,
    n_features_of,
    pick_device,
    score_images,
    verify_images,
)
from sklearn.metrics import roc_auc_score  # noqa: E402

from common import RunLogger, default_data_dir, parse_args, run_main, run_name, write_json  # noqa: E402


@dataclass
class Args:
    category: str = "bottle"  # MVTec AD category: bottle, transistor or metal_nut
    weights: str = "imagenet"  # backbone weights: imagenet (torchvision cache), none (random init), or a PATH
    n_features: str = "100"  # embedding channels kept (random subset, seeded), or 'all' (= 448)
    ns: list[int] = field(default_factory=lambda: [25, 50, 100, 200, 1000])  # training-set sizes to fit
    methods: list[str] = field(default_factory=lambda: ["online", "batch"])  # fitting methods to compare
    profile: bool = True  # run the stage profile and the online-vs-batch agreement check first
    fixed_malloc_threshold: bool = False  # Linux: fix glibc's mmap threshold so freed buffers leave the RSS
    batch_size: int = 16  # images per backbone forward pass (the online method's memory unit)
    image_size: int = 224  # centre crop in pixels (resize = image_size * 8 / 7); multiple of 16
    seed: int = 0  # seeds the random init (--weights none) and the channel subset
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when available
    data_dir: str = default_data_dir()  # holds mvtec_ad/<category>/...
    download: bool = True  # fetch a missing category from MVTec's archives (you accept its license)
    out: str | None = None  # run folder (default runs/padim_anomaly/<name>)
    clearml: Literal["auto", "offline", "online", "off"] = "auto"  # ClearML tracking mode
    clearml_queue: str | None = None  # enqueue on this ClearML agent queue instead of running here


def check_args(args: Args) -> None:
    if args.category not in CATEGORIES:
        raise ValueError(f"--category must be one of {', '.join(CATEGORIES)} (got {args.category!r})")
    n_features_of(args.n_features)  # raises on a bad value
    if min(args.ns) < 2:
        raise ValueError(f"--ns must each be >= 2 (a covariance needs two samples; got {args.ns})")
    if not set(args.methods) <= {"online", "batch"} or not args.methods:
        raise ValueError(f"--methods must be online and/or batch (got {args.methods})")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1 (got {args.batch_size})")
    check_image_size(args.image_size)


def model_config(args: Args) -> ModelConfig:
    return ModelConfig(
        n_features=n_features_of(args.n_features),
        image_size=args.image_size,
        resize=round(args.image_size * 8 / 7),
    )


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
    with PeakMemory(device) as meter:
        start = time.perf_counter()
        fit_statistics(
            extractor,
            image_batches(paths, config, args.batch_size),
            n,
            method,
            config.epsilon,
            device,
            desc=f"{method} N={n}",
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return {
        "peak_mib": meter.peak_mib,
        "seconds": seconds,
        "images_per_second": n / seconds,
        "method": meter.method,
    }


@torch.no_grad()
def profile_worker(args: Args) -> dict:
    """Stage-by-stage profile of the batch fit on the training set, then online-vs-batch agreement."""
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    config = model_config(args)
    category = find_category(args.category, args.data_dir, download=False)
    extractor, _ = build_extractor(args, config, device)
    test_images, test_masks = load_test_set(category, config)
    labels = category.test_labels
    n = len(category.train)
    extractor(test_images[:1].to(device))  # warm-up: one-off library initialisation is no stage's cost
    base = live_mib(device)
    stages, added = {}, {}

    def stage(name):
        meter = PeakMemory(device)
        meter.name, meter.live_at_start = name, live_mib(device) - base
        return meter

    def record(meter):
        stages[meter.name] = meter.live_at_start + meter.peak_mib  # peak above the fit's start
        added[meter.name] = meter.peak_mib  # what the stage itself adds on top of what was live

    with stage("feature_extraction") as meter:  # backbone activations of one batch, nothing kept
        extractor(next(image_batches(category.train, config, args.batch_size)).to(device))
    record(meter)
    with stage("embedding_storage") as meter:  # every training embedding kept, then concatenated
        stored = [
            extractor(images.to(device)).flatten(2)
            for images in image_batches(category.train, config, args.batch_size)
        ]
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
        distance = mahalanobis(
            extractor(test_images[: args.batch_size].to(device)).flatten(2), mean, inv_covariance
        )
        anomaly_map(distance, config.grid, config.image_size, config.sigma)
    record(meter)
    del inv_covariance, covariance

    # agreement: the same embeddings through both estimators
    batch_mean, batch_covariance = fit_gaussian_batch(embeddings, config.epsilon)
    online = OnlineGaussian(embeddings.shape[1], embeddings.shape[2], device=embeddings.device)
    for start in range(0, n, args.batch_size):
        online.update(embeddings[start : start + args.batch_size])
    online_mean, online_covariance = online.finalize(config.epsilon)
    del embeddings

    def relative(a, b):
        return float((a.double() - b.double()).abs().max() / b.double().abs().max())

    agreement = {
        "n_train": n,
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
        pixel = roc_auc_score(test_masks.flatten().numpy(), maps.flatten().numpy())
        agreement[f"{name}_pixel_auroc"] = float(pixel)
        if name == "online":  # the Mahalanobis map alone: all patches of a batch in one batched product
            test_embeddings = [
                extractor(test_images[i : i + args.batch_size].to(device)).flatten(2)
                for i in range(0, len(test_images), args.batch_size)
            ]
            start = time.perf_counter()
            for embedding in test_embeddings:
                anomaly_map(mahalanobis(embedding, m, inverse), config.grid, config.image_size, config.sigma)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            timings["mahalanobis"] = len(test_images) / (time.perf_counter() - start)
            del test_embeddings
        del inverse, c
    agreement["aurocs_identical_to_4_decimals"] = all(
        round(agreement[f"online_{k}_auroc"], 4) == round(agreement[f"batch_{k}_auroc"], 4)
        for k in ("image", "pixel")
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


def memory_figure(fit, ns, floor_mib, name):
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for method, color in (("batch", "tab:red"), ("online", "tab:green")):
        if method not in fit:
            continue
        left.plot(ns, [fit[method][str(n)]["peak_mib"] for n in ns], "o-", color=color, label=method)
        speed = [fit[method][str(n)]["images_per_second"] for n in ns]
        right.plot(ns, speed, "o-", color=color, label=method)
    left.axhline(floor_mib, color="gray", ls="--", label="covariances alone (P*C*C float32)")
    left.set(
        xscale="log",
        xlabel="training images N",
        ylabel="peak memory above start (MiB)",
        title=f"{name}: fit memory",
    )
    right.set(xscale="log", xlabel="training images N", ylabel="images / s", title="fit throughput")
    left.legend()
    right.legend()
    fig.tight_layout()
    return fig


def main() -> None:
    args = parse_args(Args, check=check_args, description=__doc__)

    # setup and data checks (each worker re-reads the same files)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    config = model_config(args)
    category = find_category(args.category, args.data_dir, args.download)
    verify_images(category.train)
    load_test_set(category, config)
    _, weights_source = backbone_weights(args.weights, args.seed)
    if args.fixed_malloc_threshold:
        # glibc raises its mmap threshold after each large free, so later buffers come from the heap and
        # stay in the RSS after they are freed; a fixed threshold returns them (read at worker start-up)
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    log = RunLogger(
        "padim_anomaly",
        run_name(f"memory_{args.category}", args.seed),
        asdict(args),
        out=args.out,
        clearml=args.clearml,
        clearml_queue=args.clearml_queue,
    )
    n_positions = config.grid**2
    floor_mib = n_positions * config.n_features**2 * 4 / 2**20
    print(
        f"{args.category}: {len(category.train)} train images | weights: {weights_source} | "
        f"device {device} | {config.n_features} channels x {n_positions} positions: "
        f"covariances {floor_mib:.0f} MiB"
    )

    # 1-2. stage profile and agreement
    profile = {
        "stages": {},
        "stage_added_mib": {},
        "agreement": {},
        "scoring_images_per_second": None,
        "mahalanobis_map_images_per_second": None,
        "method": PeakMemory(device).method,
    }
    biggest = []
    if args.profile:
        profile = in_fresh_process(profile_worker, args)
        print(
            f"stage profile (batch fit, N = {len(category.train)}), MiB above the fit's start "
            f"[{profile['method']}]:"
        )
        for name, peak in profile["stages"].items():
            print(f"  {name:<20} peak {peak:8.0f}   adds {profile['stage_added_mib'][name]:8.0f}")
        biggest = sorted(profile["stage_added_mib"], key=profile["stage_added_mib"].get, reverse=True)[:3]
        a = profile["agreement"]
        print(f"biggest consumers: {', '.join(biggest)}")
        print(
            f"online vs batch: mean rel. diff {a['mean_max_relative_difference']:.2e}, covariance "
            f"{a['covariance_max_relative_difference']:.2e}; image AUROC {a['online_image_auroc']:.4f} vs "
            f"{a['batch_image_auroc']:.4f}, pixel {a['online_pixel_auroc']:.4f} vs "
            f"{a['batch_pixel_auroc']:.4f}; scoring {profile['scoring_images_per_second']:.1f} images/s "
            f"(Mahalanobis map alone {profile['mahalanobis_map_images_per_second']:.1f} images/s)"
        )
    agreement = profile["agreement"]

    # 3. batch vs online for growing N, each in a fresh process
    fit = {method: {} for method in args.methods}
    for step, n in enumerate(args.ns):
        for method in args.methods:
            result = in_fresh_process(fit_worker, args, method, n)
            fit[method][str(n)] = {k: v for k, v in result.items() if k != "method"}
            log.log(step, {f"{method}/peak_mib": result["peak_mib"], f"{method}/seconds": result["seconds"]})
        print(
            f"N={n:>5}: "
            + " | ".join(
                f"{method} {fit[method][str(n)]['peak_mib']:7.0f} MiB "
                f"{fit[method][str(n)]['images_per_second']:5.1f} img/s"
                for method in args.methods
            )
        )

    # targets, computed from the numbers above
    smallest, largest = str(min(args.ns)), str(max(args.ns))
    checks = {
        f"{method}_peak_largest_over_smallest_n": fit[method][largest]["peak_mib"]
        / fit[method][smallest]["peak_mib"]
        for method in args.methods
    }
    print(
        f"peak at N={largest} / peak at N={smallest}: " + ", ".join(f"{k} {v:.3f}" for k, v in checks.items())
    )
    if set(args.methods) == {"online", "batch"}:
        online, batch = fit["online"], fit["batch"]
        checks["online_over_batch_peak"] = {n: online[n]["peak_mib"] / batch[n]["peak_mib"] for n in online}
        checks["online_over_batch_throughput"] = {
            n: online[n]["images_per_second"] / batch[n]["images_per_second"] for n in online
        }
        checks["online_over_batch_throughput_all"] = sum(batch[n]["seconds"] for n in batch) / sum(
            online[n]["seconds"] for n in online
        )
        ratios = ", ".join(f"N={n} {r:.2f}" for n, r in checks["online_over_batch_peak"].items())
        print(
            f"online/batch peak: {ratios} | throughput online/batch (all N): "
            f"{checks['online_over_batch_throughput_all']:.2f}"
        )

    # save
    memory = {
        "stages": profile["stages"],
        "stage_added_mib": profile["stage_added_mib"],
        "biggest_consumers": biggest,
        "fit": fit,
        "agreement": agreement,
        "method": profile["method"]
        + ("; glibc MALLOC_MMAP_THRESHOLD_ fixed at 1 MiB" if args.fixed_malloc_threshold else ""),
        "scoring_images_per_second": profile["scoring_images_per_second"],
        "checks": checks,
        "mahalanobis_map_images_per_second": profile["mahalanobis_map_images_per_second"],
        "covariance_floor_mib": floor_mib,
        "n_features": config.n_features,
        "batch_size": args.batch_size,
        "weights": args.weights,
        "weights_source": weights_source,
        "device": str(device),
    }
    write_json(log.path("memory.json"), memory)
    log.save_figure("memory_vs_n", memory_figure(fit, args.ns, floor_mib, args.category))
    keys = (
        "biggest_consumers",
        "method",
        "agreement",
        "checks",
        "scoring_images_per_second",
        "mahalanobis_map_images_per_second",
        "weights",
        "device",
    )
    log.write_summary({k: memory[k] for k in keys})
    log.close()


if __name__ == "__main__":
    run_main(main)
