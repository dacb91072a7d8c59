"""bbf_lunar/compare.py: items from several run folders, against hand-computed statistics."""

import json

import pytest
from conftest import one_line_error, run_script

COMPARE = "bbf_lunar/compare.py"


def fake_run(folder, variants: dict, lr=3e-4, dqn_lr=6.3e-4, replay_ratio=2.0):
    """A finished run.py folder as compare.py reads it: {variant: per-seed scores}."""
    folder.mkdir(parents=True)
    args = {"lr": lr, "dqn_lr": dqn_lr, "replay_ratio": replay_ratio}
    (folder / "config.json").write_text(json.dumps({"args": args}))
    summary = {"variants": {}, "curves": {}, "replay_ratio": {}}
    for name, scores in variants.items():
        seeds = list(range(len(scores)))
        summary["variants"][name] = {"final_returns": scores, "seeds": seeds}
        summary["curves"][name] = {"steps": [0, 10], "iqm": [0, 1], "ci_low": [0, 0], "ci_high": [0, 2]}
        summary["replay_ratio"][name] = 1.0 if name == "dqn" else replay_ratio
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_table_and_probabilities_match_hand_computed_values(tmp_path):
    a = fake_run(tmp_path / "a", {"bbf": [1.0, 2.0, 3.0]}, lr=1e-4)
    b = fake_run(tmp_path / "b", {"bbf": [10.0, 20.0, 30.0, 40.0], "dqn": [0.0, 0.0, 5.0]})
    out = tmp_path / "cmp"
    proc = run_script(
        COMPARE, "--runs", f"low={a}", f"high={b}", f"dqn={b}:dqn", "--reference", "dqn",
        "--out", out, "--clearml", "off",
    )  # fmt: skip
    result = json.loads((out / "summary.json").read_text())
    low, high, dqn = (result["items"][k] for k in ("low", "high", "dqn"))
    assert low["iqm"] == pytest.approx(2.0)  # 3 runs: trim_mean(0.25) trims nothing
    assert high["iqm"] == pytest.approx(25.0)  # 4 runs: the middle two
    # low beats dqn's 0, 0 with every run and loses to its 5 with every run: 6 of 9 pairs
    assert low["vs_reference"]["pairs_won"] == 6 and low["vs_reference"]["poi"] == pytest.approx(6 / 9)
    assert high["vs_reference"]["poi"] == 1.0 and high["vs_reference"]["newcombe_low"] < 1.0
    assert "vs_reference" not in dqn and result["best"] == "high"
    assert low["lr"] == 1e-4 and dqn["lr"] == 6.3e-4 and dqn["replay_ratio"] == 1.0
    assert "| low | bbf | 2 | 0.0001 | 3 (0-2) | 2.0 [1.0, 3.0]" in proc.stdout
    assert "highest IQM: high" in proc.stdout and (out / "learning_curves.png").stat().st_size > 5000
    assert (out / "final_iqm.png").stat().st_size > 5000


@pytest.mark.parametrize(
    "items, message",
    [
        (["a=nowhere", "b=nowhere"], "nowhere/summary.json not found"),
        (["a={run}:small_net", "b={run}"], "has no variant 'small_net' (it has: bbf)"),
        (["a={run}", "a={run}"], "labels must differ"),
        (["{run}", "b={run}"], "is not LABEL=FOLDER[:VARIANT]"),
        (["a={run}"], "at least two"),
    ],
)
def test_bad_items_are_one_line_errors(tmp_path, items, message):
    run = fake_run(tmp_path / "run", {"bbf": [1.0, 2.0]})
    flags = [i.format(run=run) for i in items]
    proc = run_script(COMPARE, "--runs", *flags, "--out", tmp_path / "cmp", "--clearml", "off", rc=None)
    assert proc.returncode in (1, 2) and message in one_line_error(proc)
    assert not (tmp_path / "cmp").exists()
