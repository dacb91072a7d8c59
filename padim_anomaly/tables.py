"""The README's tables, rendered from the small committed files in padim_anomaly/results/.

    cog -I . -r padim_anomaly/README.md        # rewrite the tables from results/
    python padim_anomaly/tables.py collect-train runs/padim_anomaly/padim_*   # results/train_summary.json

Every function returns markdown; the README's cog blocks print it. No number in the README is typed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
RANDOM_INIT = "random-init ResNet18"


def _load(name: str, results: Path | None = None) -> dict:
    return json.loads(((results or RESULTS) / name).read_text())


def _mean_std(values) -> str:
    values = np.asarray(values, dtype=np.float64)
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.4f} +- {std:.4f}"


def train_table(results: Path | None = None) -> str:
    """Per class: image/pixel AUROC and AUPRO, mean +- std over seeds with each seed's value; fit peak RSS."""
    runs = _load("train_summary.json", results)
    lines = [
        f"| class ({RANDOM_INIT}) | seeds | image AUROC | pixel AUROC | AUPRO (FPR <= 0.3) "
        "| fit peak RSS (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for name, seeds in runs.items():
        ordered = [s for _, s in sorted(seeds.items(), key=lambda item: int(item[0]))]
        cells = []
        for metric in ("image_auroc", "pixel_auroc", "aupro"):
            values = [s[metric] for s in ordered]
            cells.append(f"**{_mean_std(values)}** ({', '.join(f'{v:.4f}' for v in values)})")
        rss = ", ".join(f"{s['fit_peak_memory_mib']:.0f}" for s in ordered)
        lines.append(f"| {name} | {', '.join(sorted(seeds, key=int))} | {' | '.join(cells)} | {rss} |")
    return "\n".join(lines) + "\n"


def stability_table(results: Path | None = None) -> str:
    """Split-half agreement (the headline) beside the disjoint folds of one shuffle and all fold pairs."""
    summary = _load("importance_summary.json", results)
    lines = [
        f"| class ({RANDOM_INIT}) | rankings compared | pairs | Spearman mean (min - max) | "
        "top-10 overlap mean (min) |",
        "|---|---|---|---|---|",
    ]
    for name, c in summary["classes"].items():
        split = c["split_half"]
        if split is None:
            lines.append(f"| {name} | **two halves of the test set** | not finished (see Limitations) | | |")
        rows = [
            (
                f"disjoint CV folds ({c['folds']['folds']} per shuffle)",
                c["disjoint_folds"]["n_pairs"],
                c["disjoint_folds"],
                False,
            ),
            (
                "every pair of CV folds (shuffles share images)",
                c["all_fold_pairs"]["n_pairs"],
                c["all_fold_pairs"],
                False,
            ),
        ]
        if c["all_fold_pairs"]["n_pairs"] == c["disjoint_folds"]["n_pairs"]:  # one shuffle: the same pairs
            rows.pop()
        if split is not None:
            rows.insert(
                0,
                (
                    "**two halves of the test set** "
                    f"({split['half_sizes'][0]} + {split['half_sizes'][1]} images)",
                    split["n_splits"],
                    split,
                    True,
                ),
            )
        for label, n, s, bold in rows:
            value = f"{s['spearman_mean']:.3f} ({s['spearman_min']:.3f} - {s['spearman_max']:.3f})"
            overlap = f"{s['top10_overlap_mean']:.1f} ({s['top10_overlap_min']})"
            if bold:
                value, overlap = f"**{value}**", f"**{overlap}**"
            lines.append(f"| {name} | {label} | {n} | {value} | {overlap} |")
    return "\n".join(lines) + "\n"


STUDIES = ("importance_summary.json", "importance_k100_summary.json")  # 100 channels; 200 for k = 100


def topk_table(results: Path | None = None, summary_files: tuple[str, ...] = STUDIES) -> str:
    """Top-k and bottom-k ranked on one half, scored on the other, among random k-subsets there; one
    block of rows per study (a study not yet run is left out)."""
    lines = [
        f"| class ({RANDOM_INIT}) | channels | k | top-k | bottom-k | random: mean +- std (p95) | top-k "
        "percentile (step) | worst half | halves above their p95 | top-k AUPRO (all channels) | top-k image "
        "AUROC percentile |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    summaries = [_load(f, results) for f in summary_files if ((results or RESULTS) / f).is_file()]
    for name, c in ((name, c) for summary in summaries for name, c in summary["classes"].items()):
        for k, t in sorted(c["topk"].items(), key=lambda item: int(item[0])):
            lines.append(
                f"| {name} | {c['run']['args']['n_features']} | {k} | **{t['top']:.4f}** | "
                f"{t['bottom']:.4f} | {t['random_mean']:.4f} +- "
                f"{t['random_std']:.4f} ({t['random_p95']:.4f}) | **{t['percentile']:.1f}** "
                f"({t['resolution']:.1f}) | "
                f"{t['percentile_min']:.1f} | {t['evaluations_above_p95']} of {t['n_evaluations']} | "
                f"{t['top_aupro']:.4f} ({t['all_channels_aupro']:.4f}) | {t['image']['percentile']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def cross_class_table(results: Path | None = None) -> str:
    """Shared top-k channels of the two classes against chance, and their rank correlation."""
    summary = _load("importance_summary.json", results)
    lines = []
    for pair, v in summary["cross_class"].get("pairs", {}).items():
        a, b = pair.split("|")
        lines += [
            f"| {a} vs {b} ({RANDOM_INIT}, {v['shared_channels']} channels) | shared | chance: expected "
            "(95% range) | P(at least as many by chance) |",
            "|---|---|---|---|",
        ]
        for k, o in sorted(v["topk_overlap"].items(), key=lambda item: int(item[0])):
            lines.append(
                f"| top-{k} | **{o['observed']}** | {o['expected']:.1f} "
                f"({o['range95'][0]} - {o['range95'][1]}) "
                f"| {o['p_at_least']:.2g} |"
            )
        lines.append(f"| Spearman of the channel importances | **{v['spearman']:.3f}** | 0 | |")
    return "\n".join(lines) + "\n"


def layer_table(results: Path | None = None) -> str:
    """Drop in pixel / image AUROC when a whole layer's channels are removed, per class."""
    summary = _load("importance_summary.json", results)
    names = list(summary["classes"])
    lines = [
        f"| layer ({RANDOM_INIT}) | " + " | ".join(f"{n}: pixel / image AUROC drop" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for layer in ("layer1", "layer2", "layer3"):
        cells = []
        for n in names:
            d = summary["classes"][n]["layers"].get(layer)
            cells.append(f"{d['pixel_drop_mean']:+.4f} / {d['image_drop_mean']:+.4f}" if d else "-")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def commands(results: Path | None = None, summary_file: str = "importance_summary.json") -> str:
    """The commands that made a study's summary, from the settings each class's run recorded."""
    if not ((results or RESULTS) / summary_file).is_file():
        return ""  # that study not run yet
    summary = _load(summary_file, results)
    lines, folders = [], []
    for name, c in summary["classes"].items():
        a = c["run"]["args"]
        lines.append(
            f"python padim_anomaly/importance.py --category {name} --weights {a['weights']} --data-dir PATH "
            f"--n-features {a['n_features']} --repeats {a['repeats']} --n-repeats {a['n_repeats']} \\\n"
            f"    --splits {a['splits']} --n-random {a['n_random']} --ks {' '.join(map(str, a['ks']))} "
            f"--out runs/padim_anomaly/{c['run']['folder']}"
        )
        folders.append(f"runs/padim_anomaly/{c['run']['folder']}")
    if "from_runs" in summary:
        lines.append(f"python padim_anomaly/importance.py --from-runs {' '.join(dict.fromkeys(folders))}")
    return "\n".join(lines) + "\n"


def settings_lines(results: Path | None = None, summary_file: str = "importance_summary.json") -> str:
    """Per class: the study's size and the time its run took."""
    if not ((results or RESULTS) / summary_file).is_file():
        return ""  # that study not run yet
    summary = _load(summary_file, results)
    lines = []
    for name, c in summary["classes"].items():
        a, s = c["run"]["args"], c["split_half"]
        halves = (
            f"{s['n_splits']} random half-splits of the test set "
            f"({s['half_sizes'][0]} + {s['half_sizes'][1]} images), {a['n_random']} random subsets per k, "
            "top-k finished for k = "
            f"{', '.join(c['topk']) or 'none'}"
            if s
            else f"{a['splits']} half-splits asked for, stopped before they finished"
        )
        lines.append(
            f"- {name} ({a['n_features']} channels): {halves}; CV {a['repeats']} x "
            f"{a['folds']} folds with {a['n_repeats']} permutations per channel and fold; "
            f"{c['run']['minutes']:.0f} minutes"
        )
    return "\n".join(lines) + "\n"


def targets(results: Path | None = None) -> str:
    """The study's targets, met or missed, from the summary."""
    summary = _load("importance_summary.json", results)
    lines = []
    for name, c in summary["classes"].items():
        s = c["split_half"]
        t = c["topk"].get("10")
        if s is None:
            lines.append(f"- **{name}**: the split-half study did not finish: both targets **not measured**.")
            continue
        met = "met" if s["spearman_mean"] >= 0.6 else "missed"
        line = (
            f"- **{name}** ({RANDOM_INIT}): split-half Spearman {s['spearman_mean']:.3f} (min "
            f"{s['spearman_min']:.3f} over {s['n_splits']} splits), target >= 0.6 on the mean: **{met}**"
        )
        if not t:
            line += "; top-10 on held-out halves: **not measured** (not finished in time)"
        if t:
            above = t["percentile"] > 95
            line += (
                f"; top-10 held-out pixel AUROC {t['top']:.4f} vs random p95 {t['random_p95']:.4f} "
                f"(percentile {t['percentile']:.1f}, {t['evaluations_above_p95']} of {t['n_evaluations']} "
                "held-out halves "
                f"above their own p95): **{'met' if above else 'missed'}**"
            )
        lines.append(line + ".")
    return "\n".join(lines) + "\n"


def memory_table(names=("memory_bottle.json", "memory_mtile.json"), results: Path | None = None) -> str:
    """memory.py's batch-vs-online fit per class and training-set size N: live and RSS peak above the fit's
    start (mean over fresh processes) and throughput; one sentence of checks per class."""
    names = [names] if isinstance(names, str) else list(names)
    lines = [
        "| class (train images) | N | online live peak | batch live peak | online RSS peak | batch RSS peak "
        "| online / batch (live) | images/s online / batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for name in names:
        path = (results or RESULTS) / name
        if not path.is_file():
            notes.append(f"(no `results/{name}` yet: run memory.py)")
            continue
        m = json.loads(path.read_text())
        category = m.get("category", name.removeprefix("memory_").removesuffix(".json"))
        label = f"{category} ({m['n_train_images']})"
        online, batch = m["fit"]["online"], m["fit"].get("batch", {})
        for n in sorted(online, key=int):
            o, b = online[n], batch.get(n)
            cells = [f"{o['live_peak_mib']:.0f}", f"{b['live_peak_mib']:.0f}" if b else "not run"]
            cells += [f"{o['peak_mib']:.0f}", f"{b['peak_mib']:.0f}" if b else "not run"]
            cells.append(f"{o['live_peak_mib'] / b['live_peak_mib']:.2f}" if b else "")
            cells.append(f"{o['images_per_second']:.1f} / " + (f"{b['images_per_second']:.1f}" if b else "-"))
            lines.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
        checks, agreement = m["checks"], m["agreement"]
        notes.append(
            f"{label.split(' ')[0]}: online live peak at N = 2000 over N = 100 "
            f"{checks['online_live_peak_mib_N2000_over_N100']:.3f}; online and batch statistics differ by at "
            f"most {agreement['covariance_max_relative_difference']:.1e} (covariance, relative), image AUROC "
            f"{agreement['online_image_auroc']:.4f} both; {m['repeats']} fresh processes per cell."
        )
    if len(lines) == 2:
        return "\n".join(notes) + "\n"
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"


def headline(results: Path | None = None) -> dict[str, str]:
    """The top README's row: image / pixel AUROC per class, mean and std over seeds, and the weights."""
    row = {
        "measured": "image / pixel AUROC",
        "result": "not yet run",
        "interval": "not measured",
        "command": "`python padim_anomaly/train.py --category bottle --weights none --seed 0`",
    }
    if not ((results or RESULTS) / "train_summary.json").is_file():
        return row
    runs = _load("train_summary.json", results)
    weights = sorted({s["weights"] for seeds in runs.values() for s in seeds.values()})
    backbone = RANDOM_INIT if weights == ["none"] else f"ResNet18, `--weights {', '.join(weights)}`"
    seeds = sorted({int(seed) for seeds in runs.values() for seed in seeds})
    means, spreads = [], []
    for name, by_seed in runs.items():
        image, pixel = (np.array([s[m] for s in by_seed.values()]) for m in ("image_auroc", "pixel_auroc"))
        means.append(f"{name} {image.mean():.3f} / {pixel.mean():.3f}")
        if len(by_seed) > 1:
            spreads.append(f"{name} ± {image.std(ddof=1):.3f} / ± {pixel.std(ddof=1):.3f}")
        else:
            spreads.append(f"{name}: one seed, no interval")
    return row | {
        "measured": f"image / pixel AUROC, MVTec-layout classes {', '.join(runs)}, {backbone}, "
        f"seeds {', '.join(map(str, seeds))}",
        "result": "; ".join(means),
        "interval": "std over seeds: " + "; ".join(spreads),
        "command": f"`python padim_anomaly/train.py --category {next(iter(runs))} --weights {weights[0]} "
        "--seed 0`",
    }


def collect_train(folders: list[str], results: Path | None = None) -> dict:
    """results/train_summary.json from train.py run folders: {class: {seed: metrics}}."""
    keep = ("image_auroc", "pixel_auroc", "aupro", "fit_peak_memory_mib", "fit_seconds", "n_train", "n_test")
    out: dict = {}
    for folder in map(Path, folders):
        s = json.loads((folder / "summary.json").read_text())
        out.setdefault(s["category"], {})[str(s["seed"])] = {k: s[k] for k in keep} | {
            "weights": s["weights"]
        }
    path = (results or RESULTS) / "train_summary.json"
    path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    return out


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "collect-train":
        collect_train(sys.argv[2:])
    else:
        sys.exit("usage: python padim_anomaly/tables.py collect-train RUN_FOLDER [RUN_FOLDER ...]")
