"""padim_anomaly/tables.py renders the README's tables from the committed results, and from made-up ones."""

import json

import numpy as np
from test_conventions import load

tables = load("padim_anomaly/tables.py")


def test_every_table_renders_from_the_committed_results():
    summary = json.loads((tables.RESULTS / "importance_summary.json").read_text())
    stability = tables.stability_table()
    topk = tables.topk_table()
    for name, c in summary["classes"].items():
        if c["split_half"] is None:
            assert f"| {name} | **two halves of the test set** | not finished" in stability
        else:
            assert f"**{c['split_half']['spearman_mean']:.3f} (" in stability
        assert f"| {c['disjoint_folds']['spearman_mean']:.3f} (" in stability
        for k, t in c["topk"].items():
            assert f"| {name} | {c['run']['args']['n_features']} | {k} | **{t['top']:.4f}** |" in topk
    k100 = json.loads((tables.RESULTS / "importance_k100_summary.json").read_text())
    for name, c in k100["classes"].items():  # the second study's rows follow the first's
        t = c["topk"]["100"]
        assert f"| {name} | 200 | 100 | **{t['top']:.4f}** |" in topk.split("| mtile | 100 | 50 |")[1]
    assert "--n-features 200" in tables.commands(summary_file="importance_k100_summary.json")
    cross = tables.cross_class_table()
    for v in summary["cross_class"].get("pairs", {}).values():
        assert f"**{v['spearman']:.3f}**" in cross
    assert tables.layer_table().count("| layer") == 4  # the header and three layers
    assert "not measured" in tables.targets() or "random-init" in tables.targets()
    assert "--weights none" in tables.commands()
    assert tables.settings_lines().count("\n") == len(summary["classes"])
    train = json.loads((tables.RESULTS / "train_summary.json").read_text())
    rendered = tables.train_table()
    for name, seeds in train.items():
        image = [seeds[seed]["image_auroc"] for seed in sorted(seeds, key=int)]
        assert rendered.count(f"| {name} | ") == 1  # one row per class, every seed's value in it
        assert f"({', '.join(f'{v:.4f}' for v in image)})" in rendered


def test_train_table_mean_and_std_from_collected_runs(tmp_path):
    runs = []
    for seed, (image, pixel) in enumerate([(0.9, 0.8), (0.7, 0.6), (0.8, 0.7)]):
        folder = tmp_path / f"run{seed}"
        folder.mkdir()
        summary = {"category": "widget", "seed": seed, "image_auroc": image, "pixel_auroc": pixel,
                   "aupro": 0.5, "fit_peak_memory_mib": 100.0, "fit_seconds": 1.0, "n_train": 3, "n_test": 2,
                   "weights": "none"}  # fmt: skip
        (folder / "summary.json").write_text(json.dumps(summary))
        runs.append(folder)
    collected = tables.collect_train(runs, results=tmp_path)
    assert sorted(collected["widget"]) == ["0", "1", "2"]
    rendered = tables.train_table(results=tmp_path)
    std = np.std([0.9, 0.7, 0.8], ddof=1)  # 0.1
    assert f"| widget | 0, 1, 2 | **0.8000 +- {std:.4f}** (0.9000, 0.7000, 0.8000) |" in rendered
    assert "| **0.7000 +- 0.1000** (0.8000, 0.6000, 0.7000) |" in rendered
    assert rendered.endswith("| 100, 100, 100 |\n")


def test_memory_table_from_a_made_up_file(tmp_path):
    cell = {"live_peak_mib": 100.0, "peak_mib": 150.0, "images_per_second": 20.0}
    made_up = {
        "n_train_images": 7, "repeats": 2, "n_note": "reused", "fit": {
            "online": {"10": cell, "2000": {**cell, "live_peak_mib": 101.0}},
            "batch": {"10": {**cell, "live_peak_mib": 400.0}},
        },
        "checks": {"online_live_peak_mib_N2000_over_N100": 1.01},
        "agreement": {"covariance_max_relative_difference": 3e-7, "online_image_auroc": 0.7},
    }  # fmt: skip
    (tmp_path / "memory_x.json").write_text(json.dumps(made_up))
    rendered = tables.memory_table(["memory_x.json", "absent.json"], tmp_path)
    assert "| x (7) | 10 | 100 | 400 | 150 | 150 | 0.25 | 20.0 / 20.0 |" in rendered
    assert "| x (7) | 2000 | 101 | not run |" in rendered
    assert "- x: online live peak at N = 2000 over N = 100 1.010;" in rendered
    assert "- (no `results/absent.json` yet: run memory.py)" in rendered
    committed = tables.memory_table("memory_mtile.json")
    assert "not run" not in committed.split("| 1000 |")[1].split("\n")[0]
    assert "no `results/absent.json`" in tables.memory_table("absent.json", tmp_path)
