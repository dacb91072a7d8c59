"""bbf_lunar/tables.py, export.py and plots.py: the README's tables and figures from the committed
result files (fast), and a made-up confirmation in a temporary folder (never committed)."""

import json
import sys

import numpy as np
import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "bbf_lunar"))
import export as E  # noqa: E402
import plots  # noqa: E402
import stats  # noqa: E402
import tables as T  # noqa: E402

RESULTS = REPO / "bbf_lunar" / "results"


def test_every_committed_table_renders_and_its_statistics_follow_from_its_scores():
    curves = json.loads((RESULTS / "ablation_curves.json").read_text())
    rederived = T.rederived_scores(curves)
    text = T.ablation()
    for name, v in curves["variants"].items():
        assert rederived[name] == pytest.approx(v["scores"])  # each score is its curve's last 3 points
        assert len(v["seeds"]) == 10 and v["eval_steps"][-1] == 100_000
        assert f"| `{name}` |" in text and f"| {stats.iqm(v['scores']):.1f} |" in text
        if name != "bbf":
            p = stats.probability_of_improvement(v["scores"], curves["variants"]["bbf"]["scores"])
            assert f"| {p:.2f} (" in text
    assert curves["variants"]["bbf"]["reset_steps"] == [20_000, 40_000, 60_000, 80_000]
    assert curves["variants"]["no_resets"]["reset_steps"] == []
    peer_ours = json.loads((RESULTS / "peer_sb3.json").read_text())["peer"]["our_dqn"]["scores"]
    assert curves["variants"]["dqn"]["scores"][:5] == peer_ours  # the same code, seeds 0-4: bit-exact
    peer = json.loads((RESULTS / "peer_sb3.json").read_text())["peer"]
    for key in ("sb3_dqn", "our_dqn"):
        assert stats.iqm(peer[key]["scores"]) == pytest.approx(peer[key]["iqm"])
    assert "P(ours > sb3) = 0.92 (23/25), Newcombe [0.55, 0.99]." in T.peer()
    for seed in peer["seeds"]:  # sb3's per-seed curves are kept too
        curve = json.loads((RESULTS / "peer_sb3" / f"seed{seed}_100000_10000_10.json").read_text())
        assert curve["score"] == pytest.approx(peer["sb3_dqn"]["scores"][seed])
    cpu = json.loads((RESULTS / "benchmark_rr2.json").read_text())
    five = cpu["vectorised"]["5"]
    assert five["one_process_steps_per_s"] / five["separate_steps_per_s"] == pytest.approx(five["speedup"])
    assert "S = 5, x2.26 on one CPU core, x1.97 with both cores busy, x4.19 on the H200" in T.batching()


def test_confirmation_absent_is_one_clear_line(tmp_path):
    assert T.ablation(tmp_path).startswith("**Not yet run**") and T.ablation_figures(tmp_path) == ""
    text = T.confirmation(tmp_path)
    assert text.startswith("**Not yet run.**") and "PROTOCOL.md" in text
    assert T.confirmation_figures(tmp_path) == "" and T.figures(tmp_path) == []
    assert "not yet run" in T.confirmation_time(tmp_path)


def made_up(tmp_path, shift: float) -> dict:
    """A made-up confirmation (20 seeds per agent, 11 evaluations) in tmp_path, as confirm.py and
    export.py would write it."""
    rng = np.random.default_rng(0)
    steps = list(range(0, 100_001, 10_000))
    curves = {"run": "made_up", "git_commit": "0" * 40, "variants": {}, "python": "3.11.7"}
    curves |= {"args": {"workers": 2}, "versions": {"torch": "2.14.1", "gymnasium": "1.2.0"}}
    for name, offset in (("bbf", shift), ("dqn", 0.0)):
        returns = rng.normal(150 + offset, 40, size=(20, len(steps))) * np.linspace(0.2, 1, len(steps))
        curves["variants"][name] = {
            "seeds": list(range(1000, 1020)),
            "eval_steps": steps,
            "returns": returns.tolist(),
            "reset_steps": [20_000, 40_000, 60_000, 80_000] if name == "bbf" else [],
            "seeds_in_process": 20,
            "minutes_per_process": 61.25,
            "seed_steps_per_second": 544.4,
        }
    scores = T.rederived_scores(curves)
    confirmation = {
        "protocol_commit": "1" * 40,
        "seeds": list(range(1000, 1020)),
        "variants": {n: {**stats.iqm_with_ci(s, 2000), "scores": s} for n, s in scores.items()},
        "poi": stats.probability_of_improvement_with_ci(scores["bbf"], scores["dqn"], 2000),
        "iqm_difference": {"diff": 1.0, "ci_low": -2.0, "ci_high": 3.5, "reps": 10},
    }
    (tmp_path / "confirmation_curves.json").write_text(json.dumps(curves))
    (tmp_path / "confirmation.json").write_text(json.dumps(confirmation))
    return confirmation


@pytest.mark.parametrize("shift, verdict", [(60.0, "**confirmed**"), (0.0, "**not confirmed**")])
def test_a_made_up_confirmation_renders_its_numbers_and_verdict(tmp_path, shift, verdict):
    c = made_up(tmp_path, shift)
    text = T.confirmation(tmp_path)
    bbf, p = c["variants"]["bbf"], c["poi"]
    assert f"| `bbf` | 20 | **{bbf['iqm']:.1f}** | [{bbf['ci_low']:.1f}, {bbf['ci_high']:.1f}] |" in text
    assert f"Newcombe [{p['newcombe_low']:.2f}, {p['newcombe_high']:.2f}]" in text and verdict in text
    assert (p["newcombe_low"] > 0.5) == (verdict == "**confirmed**")
    assert "| agent (seeds 1000-1019) |" in text and "protocol of commit `1111111`" in text
    assert "IQM(bbf) - IQM(dqn) = 1.0, 95% bootstrap CI [-2.0, 3.5]" in text
    when = T.confirmation_time(tmp_path)
    assert "commit `0000000`" in when and "torch 2.14.1" in when and "`--workers 2`" in when
    assert "`bbf` 20 seeds per process, 61.2 min per process (544 seed-steps/s)" in when


def test_headline_row_is_not_yet_run_without_the_file_and_follows_a_made_up_one(tmp_path):
    assert T.headline(tmp_path)["result"] == T.headline(tmp_path)["interval"] == "not yet run"
    c = made_up(tmp_path, 60.0)
    row = T.headline(tmp_path)
    bbf, dqn, p = c["variants"]["bbf"], c["variants"]["dqn"], c["poi"]
    assert row["result"].startswith(
        f"IQM bbf {bbf['iqm']:.1f}, dqn {dqn['iqm']:.1f}; P(bbf > dqn) = {p['poi']:.2f}"
    )
    assert f"bbf [{bbf['ci_low']:.1f}, {bbf['ci_high']:.1f}]" in row["interval"]
    assert row["interval"].endswith(f"Newcombe 95% [{p['newcombe_low']:.2f}, {p['newcombe_high']:.2f}]")
    assert row["result"].endswith("**confirmed**") == (p["newcombe_low"] > 0.5)


ABLATION = ("bbf", "no_nstep_anneal", "no_gamma_anneal", "no_resets", "small_net", "dqn")


def made_up_ablation(tmp_path, shifts: dict, power: dict | None = None) -> dict:
    """A made-up ablation (10 seeds per variant) in tmp_path, as export.py and power.py write it."""
    rng = np.random.default_rng(1)
    steps = list(range(0, 100_001, 10_000))
    curves = {"run": "made_up", "git_commit": "0" * 40, "args": {}, "variants": {}}
    for name in ABLATION:
        returns = rng.normal(200 + shifts.get(name, 0.0), 30, size=(10, len(steps)))
        curves["variants"][name] = {
            "seeds": list(range(10)),
            "eval_steps": steps,
            "returns": returns.tolist(),
            "scores": returns[:, -3:].mean(axis=1).tolist(),
            "reset_steps": [] if name in ("no_resets", "dqn") else [20_000, 40_000, 60_000, 80_000],
        }
    (tmp_path / "ablation_curves.json").write_text(json.dumps(curves))
    if power is not None:
        (tmp_path / "ablation_seed_power.json").write_text(json.dumps({"comparisons": power}))
    return curves


def test_a_made_up_ablation_gives_each_ingredient_the_verdict_its_interval_supports(tmp_path):
    sim = {"seed_counts": [10, 20, 400], "seeds_needed": 150}
    power = {"no_nstep_anneal": sim, "no_gamma_anneal": sim | {"seeds_needed": None}}
    curves = made_up_ablation(tmp_path, {"small_net": -300.0, "dqn": 300.0}, power)
    rows = {line.split(" | ")[0][2:]: line for line in T.ablation(tmp_path).splitlines()[2:]}
    assert list(rows) == [f"`{n}`" for n in ABLATION]
    assert rows["`small_net`"].endswith("| `bbf` better |") and rows["`dqn`"].endswith("| `dqn` better |")
    high = stats.newcombe_interval(0.0, 10, 10)[1]  # every pair lost
    assert f"0.00 (0/100), Newcombe [0.00, {high:.2f}]" in rows["`small_net`"]
    assert "not resolved; about 150 seeds per variant would resolve" in rows["`no_nstep_anneal`"]
    assert "not resolved; more than 400 seeds per variant" in rows["`no_gamma_anneal`"]
    bbf = stats.iqm_with_ci(T.rederived_scores(curves)["bbf"])
    assert rows["`bbf`"].startswith(
        f"| `bbf` | nothing | {bbf['iqm']:.1f} | [{bbf['ci_low']:.1f}, {bbf['ci_high']:.1f}] |"
    )


def test_figures_are_drawn_from_the_curves_file(tmp_path):
    made_up(tmp_path, 60.0)
    written = T.figures(tmp_path, reps=200)
    assert [p.name for p in written] == ["confirmation_curves.png", "confirmation_profile_poi.png"]
    made_up_ablation(tmp_path, {})
    written = T.figures(tmp_path, reps=200)
    assert [p.name for p in written][2:] == ["ablation_curves.png", "ablation_poi.png"]
    assert T.ablation_figures(tmp_path).count("![") == 2
    assert all(p.stat().st_size > 20_000 for p in written)
    assert T.confirmation_figures(tmp_path).count("![") == 2 and "resets (dotted)" in T.confirmation_figures(
        tmp_path
    )


def test_every_variant_keeps_its_colour_and_other_labels_get_distinct_ones():
    assert plots.color("dqn") == plots.color("dqn", ["bbf", "rr1"]) == plots.COLORS["dqn"]
    labels = ["rr1", "bbf", "rr4", "lr1e-4"]
    spare = [plots.color(x, labels) for x in labels if x not in plots.COLORS]
    assert len(set(spare)) == 3 and not set(spare) & set(plots.COLORS.values())


def test_learning_curves_mark_resets_and_keep_the_legend_off_the_axes():
    curve = {"steps": [0, 10, 20], "iqm": [0, 1, 2], "ci_low": [0, 0, 1], "ci_high": [1, 2, 3]}
    fig = plots.learning_curves({"bbf": curve, "dqn": curve}, {"bbf": [10, 20], "dqn": []})
    ax = fig.axes[0]
    resets = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert [line.get_xdata()[0] for line in resets] == [10, 20]
    assert {line.get_color() for line in resets} == {plots.COLORS["bbf"]}
    fig.canvas.draw()
    legend, axes = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= axes.x1  # right of the plotting area


def test_export_refuses_a_folder_that_holds_no_finished_run(tmp_path):
    with pytest.raises(E.UserError, match="summary.json not found"):
        E.curves(tmp_path)


def test_the_readme_stays_within_250_lines_with_the_tables_it_renders():
    lines = (REPO / "bbf_lunar" / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    assert any('experiment_module("bbf_lunar/tables.py")' in line for line in lines)


def test_wall_time_line_says_whether_the_target_is_met(tmp_path):
    assert "not measured" in T.wall_time(tmp_path)
    made_up = {
        "command": "python bbf_lunar/run.py --seeds 5", "wall_seconds": 1500.0, "target_minutes": 20,
        "machine": "a test box", "load_before": "0.1", "other_load": "nothing else",
        "git_commit": "abcdef0123", "iqm": 12.34, "seeds": [0, 1, 2, 3, 4],
    }  # fmt: skip
    (tmp_path / "wall_time_seeds5.json").write_text(json.dumps(made_up))
    line = T.wall_time(tmp_path)
    assert "**25.0 min**" in line and "**missed**" in line and "IQM 12.3 over seeds 0-4" in line
    (tmp_path / "wall_time_seeds5.json").write_text(json.dumps({**made_up, "wall_seconds": 1100.0}))
    assert "18.3 min" in T.wall_time(tmp_path) and ": met;" in T.wall_time(tmp_path)


def test_late_drops_count_runs_whose_score_fell_below_their_best_earlier_evaluation(tmp_path):
    curves = made_up_ablation(tmp_path, {})
    rising = [0.0, 50, 100, 150, 200, 210, 220, 230, 240, 250, 260]
    collapsed = [0.0, 50, 100, 150, 200, 210, 220, 230, 100, 110, 120]  # best 230 before 80k, score 110
    at_start_only = [500.0, 50, 60, 70, 80, 90, 100, 110, 100, 100, 100]  # step 0 is not an earlier best
    curves["variants"]["dqn"]["returns"] = [collapsed, rising, at_start_only] + [rising] * 7
    (tmp_path / "ablation_curves.json").write_text(json.dumps(curves))
    (tmp_path / "peer_sb3").mkdir()
    for seed, points in enumerate([collapsed, rising]):
        record = {"seed": seed, "eval_points": points, "score": sum(points[-3:]) / 3}
        (tmp_path / "peer_sb3" / f"seed{seed}_100000_10000_10.json").write_text(json.dumps(record))
    rows = T.late_drops(tmp_path).splitlines()[2:]
    assert rows[0].startswith(
        "| stable-baselines3 DQN, zoo settings | 0-1 | 1 of 2 | 0: 230 -> 110; 1: 230 -> 250"
    )
    assert rows[1].startswith("| our `dqn` | 0-9 | 1 of 10 | 0: 230 -> 110; 1: 230 -> 250; 2: 110 -> 100;")
