"""Each experiment's `headline()` (the top README's results table) from made-up result files in a
temporary folder: the numbers it renders, and "not yet run" / "not measured" when files are absent."""

import json

from conftest import REPO

from common.readme import EXPERIMENTS, experiment_module, headline_table

revnet = experiment_module("revnet_mnist/tables.py")
padim = experiment_module("padim_anomaly/tables.py")
decoder = experiment_module("decoder_transformer/tables.py")
bbf = experiment_module("bbf_lunar/tables.py")


def write(path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


def memory_run(folder, model: str, seed: int, rss: float, accuracy: float) -> None:
    config = {"depth": 64, "width": 128, "batch_size": 8192, "epochs": 40}
    write(
        folder / "memory" / f"{model}_seed{seed}.json",
        {"model": model, "seed": seed, "clearml": "auto", "whole_process_peak_rss_mib": rss,
         "test_accuracy": accuracy, "config": config},
    )  # fmt: skip


def test_revnet_headline_gives_the_ratio_and_its_range_over_seeds(tmp_path):
    memory_run(tmp_path, "revnet", 0, 200.0, 0.981)
    memory_run(tmp_path, "resnet", 0, 800.0, 0.983)
    memory_run(tmp_path, "revnet", 1, 210.0, 0.979)
    memory_run(tmp_path, "resnet", 1, 700.0, 0.981)
    row = revnet.headline(tmp_path)
    # ratios 0.25 and 0.30: mean 0.275; mean RSS 205 and 750 MiB; mean accuracies 98.00 and 98.20
    assert "revnet 205 MiB vs resnet 750 MiB: ratio **0.275**" in row["result"]
    assert "test accuracy 98.00% vs 98.20% (seeds 0, 1)" in row["result"]
    assert row["interval"] == "ratio 0.250-0.300 (range over 2 seeds)"
    assert "depth 64, width 128, batch 8192, 40 epochs" in row["measured"]


def test_revnet_headline_says_what_is_not_measured(tmp_path):
    assert revnet.headline(tmp_path)["result"] == "not yet run"
    memory_run(tmp_path, "resnet", 0, 758.6, 0.9735)
    row = revnet.headline(tmp_path)
    assert row["result"] == "resnet: 759 MiB, test accuracy 97.35% (seed 0); revnet: not measured"
    assert row["interval"] == "not measured"


def test_padim_headline_gives_mean_and_std_over_seeds_per_class(tmp_path):
    seeds = {
        str(seed): {"image_auroc": image, "pixel_auroc": pixel, "weights": "none"}
        for seed, (image, pixel) in enumerate([(0.9, 0.8), (0.7, 0.6), (0.8, 0.7)])
    }
    write(tmp_path / "train_summary.json", {"widget": seeds, "gadget": {"0": seeds["0"]}})
    row = padim.headline(tmp_path)
    assert row["result"] == "widget 0.800 / 0.700; gadget 0.900 / 0.800"
    assert row["interval"] == "std over seeds: widget ± 0.100 / ± 0.100; gadget: one seed, no interval"
    assert "random-init ResNet18" in row["measured"] and "seeds 0, 1, 2" in row["measured"]
    assert "--category widget --weights none" in row["command"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert padim.headline(empty)["result"] == "not yet run"


def test_decoder_headline_gives_per_seed_values_and_the_best_n_gram(tmp_path):
    def group(losses, bits):
        return {"seeds": [0, 1], "val_loss_full_context": losses, "val_bits_per_byte_full_context": bits}

    runs = {"rope_char": group([1.7, 1.8], [2.5, 2.6]), "learned_char": group([1.9, 2.0], [2.8, 2.9])}
    write(tmp_path / "baby_runs.json", runs)
    ngram = {"order_1_bits_per_byte": 4.0, "order_2_bits_per_byte": 3.0, "order_3_bits_per_byte": 3.2}
    write(tmp_path / "ngram.json", ngram | {"order_2_discounts": [0.5]})
    row = decoder.headline(tmp_path)
    assert row["result"] == (
        "RoPE 1.7500; learned 1.9500; RoPE minus learned -0.2000; "
        "bits/byte: RoPE 2.550, the best byte n-gram (2-gram) 3.000"
    )
    assert (
        row["interval"] == "per seed: RoPE 1.7000, 1.8000 (seeds 0, 1); learned 1.9000, 2.0000 (seeds 0, 1)"
    )
    write(tmp_path / "byte_6x192_runs.json", {"rope_byte": group([1.5, 1.6], [2.1, 2.2])})
    assert decoder.headline(tmp_path)["result"].endswith(
        "bits/byte: RoPE 2.550, RoPE 6x192 byte model 2.150 (seeds 0, 1), the best byte n-gram (2-gram) 3.000"
    )
    write(tmp_path / "baby_runs.json", {"rope_char": runs["rope_char"]})
    assert "learned: not measured" in decoder.headline(tmp_path)["result"]
    (tmp_path / "baby_runs.json").unlink()
    assert decoder.headline(tmp_path)["result"] == "not yet run"


def confirmation(confirmed: bool) -> dict:
    """A made-up confirmation.json, in the shape confirm.py writes."""
    low = 0.56 if confirmed else 0.44
    return {
        "protocol_commit": "1" * 40,
        "seeds": list(range(1000, 1020)),
        "variants": {
            "bbf": {"iqm": 231.26, "ci_low": 200.04, "ci_high": 250.56, "scores": [230.0] * 20},
            "dqn": {"iqm": 180.5, "ci_low": 150.0, "ci_high": 199.94, "scores": [180.0] * 20},
        },
        "poi": {"poi": 0.7, "newcombe_low": low, "newcombe_high": 0.81, "pairs_won": 280, "pairs": 400},
        "confirmed": confirmed,
    }


def test_bbf_headline_renders_the_confirmation_and_its_decision(tmp_path):
    assert bbf.headline(tmp_path)["result"] == "not yet run"
    for confirmed, verdict in ((True, "**confirmed**"), (False, "**not confirmed**")):
        write(tmp_path / "confirmation.json", confirmation(confirmed))
        row = bbf.headline(tmp_path)
        assert row["result"] == f"IQM bbf 231.3, dqn 180.5; P(bbf > dqn) = 0.70: {verdict}"
        newcombe = "[0.56, 0.81]" if confirmed else "[0.44, 0.81]"
        assert row["interval"] == (
            "IQM 95% bootstrap CI bbf [200.0, 250.6]; dqn [150.0, 199.9]; "
            f"P(bbf > dqn) Newcombe 95% {newcombe}"
        )
        assert "20 seeds (1000-1019) each" in row["measured"]


def test_the_table_has_one_row_per_experiment_linking_its_readme(tmp_path):
    folders = {name: tmp_path / name for name in EXPERIMENTS}
    for folder in folders.values():
        folder.mkdir()
    write(folders["bbf_lunar"] / "confirmation.json", confirmation(True))
    lines = headline_table(folders).splitlines()
    assert len(lines) == 2 + len(EXPERIMENTS)
    for name, line in zip(EXPERIMENTS, lines[2:]):
        assert line.startswith(f"| [{name}]({name}/README.md) |") and (REPO / name / "README.md").is_file()
        assert line.count(" | ") == 4  # five cells: no stray pipe inside one
    assert "not yet run" in lines[2] and "**confirmed**" in lines[5]
