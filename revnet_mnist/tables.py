"""The README's tables and result sentences, rendered from the small files under results/.

    results/memory/<model>_seed<s>.json    measure.py, --preset memory (/usr/bin/time around train.py)
    results/clearml/<model>_seed0*.json    measure.py, ClearML's default mode and --clearml off
    results/default/<model>_seed<s>.json   measure.py --preset default (the default run)
    results/rss_main.json                  benchmark.py --rss (the depth study)

The README's cog blocks call these functions; `cog -I . -r revnet_mnist/README.md` rewrites them.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RATIO_TARGET, ACCURACY_TARGET, FLAT_TARGET = 0.35, 98.0, 0.02


def load(folder: str, results: Path = RESULTS) -> dict[str, dict]:
    """File stem -> contents, for every JSON file in results/<folder>/."""
    return {p.stem: json.loads(p.read_text()) for p in sorted((Path(results) / folder).glob("*.json"))}


def _runs(folder: str, model: str, results: Path = RESULTS) -> list[dict]:
    runs = [r for r in load(folder, results).values() if r["model"] == model and r["clearml"] == "auto"]
    return sorted(runs, key=lambda r: r["seed"])


def _mean_std(values: list[float], digits: int = 2) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def memory_pairs(results: Path = RESULTS) -> list[tuple[dict, dict]]:
    """(revnet, resnet) results of the memory preset, seed by seed (seeds with both)."""
    resnet = {r["seed"]: r for r in _runs("memory", "resnet", results)}
    return [(r, resnet[r["seed"]]) for r in _runs("memory", "revnet", results) if r["seed"] in resnet]


def memory_table() -> str:
    """Per seed: test accuracy of both models, whole-process peak RSS resnet -> revnet, the ratio."""
    rows, pairs = [], memory_pairs()
    if not pairs:
        return "(no seed has both a revnet and a resnet file in `results/memory/` yet)\n"
    for rev, res in pairs:
        rss_rev, rss_res = rev["whole_process_peak_rss_mib"], res["whole_process_peak_rss_mib"]
        rows.append(
            [
                rev["seed"],
                f"{100 * rev['test_accuracy']:.2f}",
                f"{100 * res['test_accuracy']:.2f}",
                f"{rss_res:.0f} -> {rss_rev:.0f}",
                f"{rss_rev / rss_res:.3f}",
                f"{rev['wall_seconds'] / 60:.0f} / {res['wall_seconds'] / 60:.0f}",
            ]
        )
    if len(pairs) > 1:
        rev_acc = [100 * rev["test_accuracy"] for rev, _ in pairs]
        res_acc = [100 * res["test_accuracy"] for _, res in pairs]
        ratios = [r["whole_process_peak_rss_mib"] / s["whole_process_peak_rss_mib"] for r, s in pairs]
        rss_rev = statistics.mean(r["whole_process_peak_rss_mib"] for r, _ in pairs)
        rss_res = statistics.mean(s["whole_process_peak_rss_mib"] for _, s in pairs)
        rows.append(
            [
                "mean ± std",
                _mean_std(rev_acc),
                _mean_std(res_acc),
                f"{rss_res:.0f} -> {rss_rev:.0f}",
                _mean_std(ratios, 3),
                "",
            ]
        )
    header = [
        "seed",
        "revnet test acc. (%)",
        "resnet test acc. (%)",
        "peak RSS resnet -> revnet (MiB)",
        "revnet / resnet",
        "wall time revnet / resnet (min)",
    ]
    return _table(header, rows)


def memory_inside_table() -> str:
    """What train.py itself reports for the same runs: peak RSS after epoch 1 and at the end, step memory."""
    rows = []
    if not load("memory"):
        return "(no result files in `results/memory/` yet)\n"
    for model in ("revnet", "resnet"):
        for r in _runs("memory", model):
            per_epoch = r["peak_rss_per_epoch_mib"]
            rows.append(
                [
                    model,
                    r["seed"],
                    f"{r['whole_process_peak_rss_mib']:.1f}",
                    f"{r['in_process_peak_rss_mib']:.1f}",
                    f"{per_epoch[0]:.1f}",
                    f"{per_epoch[-1]:.1f}",
                    f"{100 * (per_epoch[-1] / per_epoch[0] - 1):+.2f}%",
                    f"{r['peak_step_memory_mib']:.1f}",
                    f"{r['warm_step_memory_mib']:.3f}",
                ]
            )
    header = [
        "model",
        "seed",
        "whole process (time -f %M)",
        "in-process, end of training",
        "after epoch 1",
        "after the last epoch",
        "growth after epoch 1",
        "first step's working set",
        "a later step allocates",
    ]
    return _table(header, rows)


def memory_config() -> str:
    """One sentence: the memory preset's configuration and command, from the result files."""
    runs = _runs("memory", "revnet") + _runs("memory", "resnet")
    if not runs:
        return "(no result files in `results/memory/` yet)\n"
    c, run = runs[0]["config"], runs[0]
    return (
        f"`python revnet_mnist/train.py --preset memory`: depth {c['depth']}, width {c['width']}, "
        f"batch {c['batch_size']}, {c['epochs']} epochs, peak learning rate {c['lr']:g}, "
        + (
            f"each training image moved by a random translation of up to {c['augment_shift']} pixels, "
            if c.get("augment_shift")
            else ""
        )
        + f"{c['dtype']}, "
        f"{run['params']:,} parameters, {run['threads']} BLAS thread; machine: {run['machine']}.\n"
    )


def clearml_table() -> str:
    """Whole-process peak RSS with ClearML's default mode (offline here) and with --clearml off."""
    runs = load("clearml")
    rows = []
    for model in ("revnet", "resnet"):
        on = [r for r in runs.values() if r["model"] == model and r["clearml"] == "auto"]
        off = [r for r in runs.values() if r["model"] == model and r["clearml"] == "off"]
        if on and off:
            a, b = on[0]["whole_process_peak_rss_mib"], off[0]["whole_process_peak_rss_mib"]
            rows.append([model, f"`{on[0]['command']}`", f"{a:.1f}", f"{b:.1f}", f"{a - b:.1f}"])
    header = [
        "model",
        "command (default mode)",
        "default mode (MiB)",
        "`--clearml off` (MiB)",
        "ClearML costs (MiB)",
    ]
    return _table(header, rows)


def default_table() -> str:
    """The default run, per seed: test accuracy, whole-process peak RSS, training time, load."""
    if not _runs("default", "revnet"):
        return "(no result files in `results/default/` yet: run the loop above)\n"
    rows = []
    for r in _runs("default", "revnet"):
        rows.append(
            [
                r["seed"],
                f"{100 * r['test_accuracy']:.2f}",
                f"{100 * r['best_val_accuracy']:.2f}",
                f"{r['whole_process_peak_rss_mib']:.0f}",
                f"{r['train_seconds']:.0f}",
                f"{r['wall_seconds']:.0f}",
                f"{r['max_rebuild_error']:.1e}",
                f"{r['load_average_before_after'][0]:.1f}-{r['load_average_before_after'][1]:.1f}",
            ]
        )
    acc = [100 * r["test_accuracy"] for r in _runs("default", "revnet")]
    if len(acc) > 1:
        rows.append(["mean ± std", _mean_std(acc), "", "", "", "", "", ""])
    header = [
        "seed",
        "test acc. (%)",
        "best val. acc. (%)",
        "peak RSS (MiB, time -f %M)",
        "training (s)",
        "whole command (s)",
        "max rebuild error",
        "load average (2 cores)",
    ]
    return _table(header, rows)


def depth_table() -> str:
    """The depth study (benchmark.py --rss): peak RSS of a fresh process per model and depth."""
    result = json.loads((RESULTS / "rss_main.json").read_text())
    rss, foot, step = result["peak_rss_mib"], result["footprint_mib"], result["step_memory_mib"]
    rows = []
    for depth in result["config"]["depths"]:
        d = str(depth)
        f = foot["resnet"][d]
        rows.append(
            [
                depth,
                f"{rss['revnet'][d]:.0f}",
                f"{rss['resnet'][d]:.0f}",
                f"{rss['mlp'][d]:.0f}",
                f"{rss['revnet'][d] / rss['resnet'][d]:.2f}",
                f"{f['weights'] + f['gradients'] + f['optimizer']:.1f}",
                f"{foot['revnet'][d]['stored_activations']:.1f} / {f['stored_activations']:.1f}",
                f"{step['revnet'][d]:.1f} / {step['resnet'][d]:.1f}",
            ]
        )
    header = [
        "depth",
        "revnet RSS",
        "resnet RSS",
        "mlp RSS",
        "revnet / resnet",
        "weights + grads + Adam",
        "stored activations revnet / resnet",
        "step working set revnet / resnet",
    ]
    return _table(header, rows)


def depth_config() -> str:
    result = json.loads((RESULTS / "rss_main.json").read_text())
    c = result["config"]
    return (
        f"Width {c['width']}, batch {c['batch_size']}, {c['dtype']}, {c['steps_per_process']} training "
        f"steps per process, {c['threads']} thread; the study took {result['seconds']:.0f} s.\n"
    )


def targets_table() -> str:
    """The memory targets, met or missed, from the result files."""
    rows, pairs = [], memory_pairs()
    if pairs:
        accs = [100 * r[m]["test_accuracy"] for r in ({"a": a, "b": b} for a, b in pairs) for m in ("a", "b")]
        ratios = [a["whole_process_peak_rss_mib"] / b["whole_process_peak_rss_mib"] for a, b in pairs]
        growth = [a["peak_rss_per_epoch_mib"][-1] / a["peak_rss_per_epoch_mib"][0] - 1 for a, _ in pairs]
        whole = [a["whole_process_peak_rss_mib"] / a["peak_rss_per_epoch_mib"][0] - 1 for a, _ in pairs]
        rows.append(
            [
                f"`--preset memory`: both models >= {ACCURACY_TARGET}% test accuracy ({len(pairs)} seeds)",
                f"lowest {min(accs):.2f}",
                "yes" if min(accs) >= ACCURACY_TARGET else "no",
            ]
        )
        rows.append(
            [
                f"whole-process peak RSS revnet / resnet <= {RATIO_TARGET} (time -f %M, ClearML default)",
                f"highest {max(ratios):.3f}",
                "yes" if max(ratios) <= RATIO_TARGET else "no",
            ]
        )
        rows.append(
            [
                f"revnet's peak after epoch 1 within {100 * FLAT_TARGET:.0f}% of its final peak",
                f"in-process {100 * max(growth):+.2f}%, whole process {100 * max(whole):+.2f}% (worst seed)",
                "yes" if max(growth + whole) <= FLAT_TARGET else "no",
            ]
        )
    if not pairs:
        rows.append(
            [
                f"`--preset memory`: both models >= {ACCURACY_TARGET}%, ratio <= {RATIO_TARGET}, flat peak",
                "no complete revnet/resnet pair in `results/memory/`",
                "not measured",
            ]
        )
    default = [100 * r["test_accuracy"] for r in _runs("default", "revnet")]
    if not default:
        rows.append(
            ["default run >= 98.4% test accuracy (3 seeds)", "no files in `results/default/`", "not measured"]
        )
    else:
        rows.append(
            [
                "default run >= 98.4% test accuracy (3 seeds)",
                f"{statistics.mean(default):.2f} (lowest {min(default):.2f})",
                "yes" if statistics.mean(default) >= 98.4 else "no",
            ]
        )
    return _table(["target", "result", "met?"], rows)


def headline(results: Path = RESULTS) -> dict[str, str]:
    """The top README's row: whole-process peak RSS of revnet against resnet under `--preset memory`,
    with test accuracy; what exists, and "not measured" for what does not."""
    runs = {m: _runs("memory", m, results) for m in ("revnet", "resnet")}
    first = (runs["revnet"] + runs["resnet"] or [None])[0]
    size = ""
    if first:
        c = first["config"]
        shift = f", random shifts of up to {c['augment_shift']} px" if c.get("augment_shift") else ""
        size = (
            f" (depth {c['depth']}, width {c['width']}, batch {c['batch_size']}, {c['epochs']} epochs{shift})"
        )
    row = {
        "measured": "whole-process peak RSS (`/usr/bin/time -f %M`) and test accuracy, "
        f"`--preset memory`{size}",
        "command": "`python revnet_mnist/measure.py --model revnet --seed 0` (and `--model resnet`)",
    }
    pairs = memory_pairs(results)
    if not pairs:
        found = [
            f"{m}: {r['whole_process_peak_rss_mib']:.0f} MiB, test accuracy {100 * r['test_accuracy']:.2f}% "
            f"(seed {r['seed']})"
            for m, rs in runs.items()
            for r in rs
        ]
        missing = [f"{m}: not measured" for m, rs in runs.items() if not rs]
        return row | {
            "result": "; ".join(found + missing) if found else "not yet run",
            "interval": "not measured",
        }
    rss = [(a["whole_process_peak_rss_mib"], b["whole_process_peak_rss_mib"]) for a, b in pairs]
    acc = [(100 * a["test_accuracy"], 100 * b["test_accuracy"]) for a, b in pairs]
    ratios = [a / b for a, b in rss]
    mean = [statistics.mean(column) for column in (*zip(*rss), *zip(*acc))]
    seeds = ", ".join(str(a["seed"]) for a, _ in pairs)
    row["result"] = (
        f"revnet {mean[0]:.0f} MiB vs resnet {mean[1]:.0f} MiB: ratio **{statistics.mean(ratios):.3f}**; "
        f"test accuracy {mean[2]:.2f}% vs {mean[3]:.2f}% (seeds {seeds})"
    )
    if len(pairs) > 1:
        row["interval"] = f"ratio {min(ratios):.3f}-{max(ratios):.3f} (range over {len(pairs)} seeds)"
    else:
        row["interval"] = "one seed: no interval"
    return row
