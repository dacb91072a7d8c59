"""decoder_transformer/tables.py renders the README's tables from the committed results/ files."""

import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from common.readme import experiment_module  # noqa: E402

tables = experiment_module("decoder_transformer/tables.py")
RESULTS = REPO / "decoder_transformer" / "results"


def test_encodings_table_shows_each_encodings_mean_over_its_seeds_at_each_context():
    text = tables.encodings_table()
    for file, block in (("baby_runs.json", 64), ("ctx128_runs.json", 128)):
        runs = json.loads((RESULTS / file).read_text())
        for pos in ("rope", "learned", "sinusoidal", "none"):
            values = runs[f"{pos}_char"]["val_loss_full_context"]
            assert len(values) == len(runs[f"{pos}_char"]["seeds"]) == 3
            assert f"| ours, {pos}, T = {block} | 0, 1, 2 | **{statistics.mean(values):.4f} ± " in text
        assert f"RoPE minus learned, full context, T = {block}: " in tables.rope_vs_learned()
    assert text.count("nanoGPT's model.py") == 1  # its run is at T = 64 only
    assert text.index("nanoGPT's model.py") < text.index("T = 128")


def test_byte_table_lists_the_n_grams_and_the_byte_model():
    ngram = json.loads((RESULTS / "ngram.json").read_text())
    text = tables.byte_baselines_table()
    assert f"{ngram['order_5_bits_per_byte']:.4f}" in text and "unigram" in text
    assert (
        "| ours, RoPE, char vocabulary, T = 128, 0.8M parameters, 2000 steps, full context (113-128" in text
    )
    big = json.loads((RESULTS / "byte_6x192_runs.json").read_text())["rope_byte"]
    seeds = ", ".join(map(str, sorted(big["seeds"])))
    row = "| ours, RoPE, byte vocabulary, T = 128, 2.7M parameters, 4000 steps, full context (113-128 tokens)"
    assert f"{row} | {seeds} |" in text
    for file, vocab, block in (("baby_runs.json", "byte", 64), ("ctx128_runs.json", "char", 128)):
        group = json.loads((RESULTS / file).read_text())[f"rope_{vocab}"]
        mean = statistics.mean(group["val_bits_per_byte_full_context"])
        assert f"| ours, RoPE, {vocab} vocabulary, T = {block}," in text and f"**{mean:.4f} ± " in text


def test_gpu_tables_read_their_logs():
    assert tables.gpu_generation_table().count("| `generate_") == 5
    assert "nanoGPT's train.py" in tables.gpu_training_table()


def test_cpu_generation_table_takes_medians_and_ranges_over_rounds(tmp_path):
    (tmp_path / "cpu").mkdir()
    rows = [(1000.0, 100.0, 250.0), (1200.0, 100.0, 300.0), (900.0, 90.0, 200.0)]
    lines = [
        json.dumps(
            {
                "step": i,
                **{f"charts/{k}_tokens_per_second": v for k, v in zip(("cached", "uncached", "nanogpt"), r)},
            }
        )
        for i, r in enumerate(rows)
    ]
    (tmp_path / "cpu" / "generate_baby_rounds.jsonl").write_text("\n".join(lines) + "\n")
    text = tables.cpu_generation_table(tmp_path)
    # per-round ratios 10, 12, 10 and 4, 4, 4.5: medians 10 and 4
    assert (
        "| 3 | 1000 (900-1200) | 100 (90-100) | 250 (200-300) | 10.00 (10.00-12.00) | 4.00 (4.00-4.50) |"
        in text
    )
    assert "| 5 |" in tables.cpu_generation_table()  # the committed run: 5 rounds
