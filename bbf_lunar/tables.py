"""The README's tables and figures, made from the small committed files in bbf_lunar/results/.

Each function returns markdown for a cog block of README.md (`cog -I . -r bbf_lunar/README.md`);
`python bbf_lunar/tables.py --figures` draws the README's figures again from the same files.

    confirmation.json            the confirmatory run's statistics (PROTOCOL.md), from confirm.py
    confirmation_curves.json     its per-seed evaluation curves and settings (export.py)
    ablation_curves.json         the ingredient ablation's per-seed curves, 6 variants x seeds 0-9 (export.py)
    ablation_seed_power.json     seeds per variant that would resolve each ablation effect (power.py)
    peer_sb3.json, peer_sb3/     stable-baselines3's zoo DQN beside ours, seeds 0-4
    benchmark_rr2.json, gpu_h200/benchmark_cuda_graph.json   seeds as a batch dimension: seed-steps/s
    wall_time_seeds5.json        wall time of `python bbf_lunar/run.py --seeds 5` under /usr/bin/time
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
SCORE_POINTS = 3  # a run's score: the mean of its last 3 evaluation points (job.py)


def _read(results: Path, name: str) -> dict | None:
    path = Path(results) / name
    return json.loads(path.read_text()) if path.is_file() else None


def _ci(v: dict) -> str:
    return f"[{v['ci_low']:.1f}, {v['ci_high']:.1f}]"


def _mean_std(x: list[float]) -> str:
    m = sum(x) / len(x)
    sd = (sum((v - m) ** 2 for v in x) / (len(x) - 1)) ** 0.5 if len(x) > 1 else 0.0
    return f"{m:.1f} +- {sd:.1f}"


def _newcombe(p: dict) -> str:
    won = f" ({p['pairs_won']:g}/{p['pairs']})" if "pairs_won" in p else ""
    return f"{p['poi']:.2f}{won}, Newcombe [{p['newcombe_low']:.2f}, {p['newcombe_high']:.2f}]"


def rederived_scores(curves: dict) -> dict[str, list[float]]:
    """Each run's score from its per-seed curve (mean of the last 3 evaluation points)."""
    return {
        name: [sum(r[-SCORE_POINTS:]) / SCORE_POINTS for r in v["returns"]]
        for name, v in curves["variants"].items()
    }


# ---------------------------------------------------------------------------------------------
# tables


def confirmation(results: Path = RESULTS) -> str:
    """The headline: bbf against dqn on the fresh seeds, as the protocol fixed it."""
    c = _read(results, "confirmation.json")
    if c is None:
        return (
            "**Not yet run.** The confirmation (bbf against dqn on seeds 1000-1019, configurations, "
            "score, test and decision rule fixed in advance) is described in [PROTOCOL.md](PROTOCOL.md); "
            "its result will be `results/confirmation.json`.\n"
        )
    seeds = c["seeds"]
    lines = [
        f"| agent (seeds {seeds[0]}-{seeds[-1]}) | runs | IQM | 95% CI | mean +- std | lowest, highest run |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in c["variants"].items():
        s = v["scores"]
        lines.append(
            f"| `{name}` | {len(s)} | **{v['iqm']:.1f}** | {_ci(v)} | {_mean_std(s)} | "
            f"{min(s):.1f}, {max(s):.1f} |"
        )
    p = c["poi"]
    confirmed = c.get("confirmed", p["newcombe_low"] > 0.5)
    lines += ["", f"- P(bbf > dqn) = **{_newcombe(p)}**."]
    if "iqm_difference" in c:
        d = c["iqm_difference"]
        ci = f"[{d['ci_low']:.1f}, {d['ci_high']:.1f}]"
        lines.append(f"- IQM(bbf) - IQM(dqn) = {d['diff']:.1f}, 95% bootstrap CI {ci}.")
    rule = c.get("decision_rule", "confirmed iff the Newcombe 95% lower bound of P(bbf > dqn) > 0.5")
    decision = "confirmed" if confirmed else "not confirmed"
    lines.append(f"- Decision ({rule}; protocol of commit `{c['protocol_commit'][:7]}`): **{decision}**.")
    if c.get("resumed_runs"):
        lines.append(
            f"- Runs continued from a checkpoint after an interruption: {', '.join(c['resumed_runs'])}."
        )
    return "\n".join(lines) + "\n"


def headline(results: Path = RESULTS) -> dict[str, str]:
    """The top README's row: the confirmation's IQMs with bootstrap intervals, P(bbf > dqn) with its
    Newcombe interval and the protocol's decision; "not yet run" while confirmation.json is absent."""
    c = _read(results, "confirmation.json")
    seeds = f"{len(c['seeds'])} seeds ({c['seeds'][0]}-{c['seeds'][-1]})" if c else "20 seeds (1000-1019)"
    row = {
        "measured": "LunarLander-v3 return after 100k steps (mean of the last 3 evaluations), `bbf` vs "
        f"rl-baselines3-zoo's tuned `dqn`, {seeds} each; test and decision rule fixed in advance",
        "result": "not yet run",
        "interval": "not yet run",
        "command": "`python bbf_lunar/run.py --seed 1000 --seeds 20 --variants bbf,dqn`, then "
        "`bbf_lunar/confirm.py`",
    }
    if c is None:
        return row
    p, v = c["poi"], c["variants"]
    confirmed = c.get("confirmed", p["newcombe_low"] > 0.5)
    iqms = ", ".join(f"{name} {x['iqm']:.1f}" for name, x in v.items())
    cis = "; ".join(f"{name} {_ci(x)}" for name, x in v.items())
    return row | {
        "result": f"IQM {iqms}; P(bbf > dqn) = {p['poi']:.2f}: "
        f"**{'confirmed' if confirmed else 'not confirmed'}**",
        "interval": f"IQM 95% bootstrap CI {cis}; P(bbf > dqn) Newcombe 95% "
        f"[{p['newcombe_low']:.2f}, {p['newcombe_high']:.2f}]",
    }


def confirmation_time(results: Path = RESULTS) -> str:
    """How the confirmation ran: commit, versions, processes and their time (from its curves file)."""
    c = _read(results, "confirmation_curves.json")
    if c is None:
        return "- The confirmation: not yet run.\n"
    a, v = c["args"], c["versions"]
    per = "; ".join(
        f"`{n}` {r['seeds_in_process']} seeds per process, {r['minutes_per_process']:.1f} min per process "
        f"({r['seed_steps_per_second']:.0f} seed-steps/s)"
        for n, r in c["variants"].items()
    )
    return (
        f"- The confirmation: commit `{(c['git_commit'] or '?')[:7]}`, Python {c.get('python')}, torch "
        f"{v.get('torch')}, gymnasium {v.get('gymnasium')}; `--workers {a['workers']}`, one torch thread "
        f"per worker; {per}.\n"
    )


def wall_time(results: Path = RESULTS) -> str:
    """The README's own command timed as a user times it (GNU time around the whole command)."""
    w = _read(results, "wall_time_seeds5.json")
    if w is None:
        return "- The wall time of `python bbf_lunar/run.py --seeds 5`: not measured.\n"
    minutes, target = w["wall_seconds"] / 60, w["target_minutes"]
    verdict = "met" if minutes <= target else "**missed**"
    return (
        f"- `{w['command']}`: **{minutes:.1f} min** wall time on {w['machine']} (load average "
        f"{w['load_before']} before; {w['other_load']}; commit `{w['git_commit'][:7]}`), target <= "
        f"{target} min: {verdict}; final scores IQM {w['iqm']:.1f} over seeds "
        f"{w['seeds'][0]}-{w['seeds'][-1]}.\n"
    )


def _figure_links(results: Path, figures: tuple[tuple[str, str], ...]) -> list[str]:
    """Markdown image links to the (file, alt text) figures tables.py --figures has drawn."""
    return [f"![{alt}](results/{name})" for name, alt in figures if (Path(results) / name).is_file()]


def confirmation_figures(results: Path = RESULTS) -> str:
    """The headline's figures, once tables.py --figures has drawn them."""
    shown = _figure_links(
        results,
        (
            ("confirmation_curves.png", "IQM learning curves, seeds 1000-1019, resets marked"),
            ("confirmation_profile_poi.png", "performance profiles and P(bbf > dqn), seeds 1000-1019"),
        ),
    )
    if not shown:
        return ""
    note = (
        "The curves mark `bbf`'s resets (dotted): the evaluation at a reset step comes right after the "
        "reset, with re-initialised final layers, and scores low. The protocol's score, the mean of the "
        "evaluations at 80k, 90k and 100k steps, was fixed before the run; it includes the evaluation "
        "right after the last reset (80k), so `bbf`'s drop there weighs a third of its score. The "
        "curves show `bbf` above `dqn` at 90k and 100k: an observation made after the result, not a test."
    )
    return "\n" + " ".join(shown) + "\n\n" + note + "\n"


ABLATION_REMOVES = {  # what each variant takes away from bbf (run.py VARIANTS)
    "no_nstep_anneal": "n-step annealing (n = 3 throughout)",
    "no_gamma_anneal": "discount annealing (gamma = 0.997 throughout)",
    "no_resets": "the resets",
    "small_net": "the bigger network (two hidden layers of 64, no LayerNorm)",
    "dqn": "all of BBF: the zoo-tuned DQN",
}


def ablation_stats(curves: dict, reps: int = 50_000) -> dict:
    """{variant: {"scores", "iqm", "ci_low", "ci_high", "exact"[, "vs_bbf"]}} from an ablation's curves
    file; "vs_bbf" is P(variant > bbf) with its bootstrap and Newcombe intervals."""
    import stats

    scores = rederived_scores(curves)
    out = {}
    for name, s in sorted(scores.items(), key=lambda kv: kv[0] != "bbf"):  # bbf first
        out[name] = {"scores": s, **stats.iqm_with_ci(s, reps)}
        if name != "bbf":
            out[name]["vs_bbf"] = stats.probability_of_improvement_with_ci(s, scores["bbf"], reps)
    return out


def verdict(name: str, p: dict, seeds_needed: int | None, largest: int) -> str:
    """The ingredient's verdict from P(variant > bbf)'s Newcombe interval; when it spans 0.5, the seeds
    per variant that would resolve an effect of the observed size (power.py)."""
    if p["newcombe_high"] < 0.5:
        return "`bbf` better"
    if p["newcombe_low"] > 0.5:
        return f"`{name}` better"
    needed = f"about {seeds_needed}" if seeds_needed else f"more than {largest}"
    return f"not resolved; {needed} seeds per variant would resolve an effect this size"


def ablation(results: Path = RESULTS) -> str:
    """The ingredient ablation on the agent described here: six variants, seeds 0-9, from the per-seed
    curves (ablation_curves.json) and the seed-count simulation (ablation_seed_power.json)."""
    curves = _read(results, "ablation_curves.json")
    if curves is None:
        return "**Not yet run** on the agent described here (`results/ablation_curves.json` is absent).\n"
    power = _read(results, "ablation_seed_power.json") or {"comparisons": {}}
    rows = ablation_stats(curves)
    seeds = curves["variants"]["bbf"]["seeds"]
    lines = [
        f"| variant (seeds {seeds[0]}-{seeds[-1]}) | removes | IQM | 95% CI | mean +- std | "
        "P(variant > bbf) | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in rows.items():
        if name == "bbf":
            lines.append(
                f"| `bbf` | nothing | {v['iqm']:.1f} | {_ci(v)} | {_mean_std(v['scores'])} | reference | |"
            )
            continue
        sim = power["comparisons"].get(name, {})
        largest = max(sim.get("seed_counts", [0]))
        lines.append(
            f"| `{name}` | {ABLATION_REMOVES.get(name, '')} | {v['iqm']:.1f} | {_ci(v)} | "
            f"{_mean_std(v['scores'])} | {_newcombe(v['vs_bbf'])} | "
            f"{verdict(name, v['vs_bbf'], sim.get('seeds_needed'), largest)} |"
        )
    return "\n".join(lines) + "\n"


def ablation_note(results: Path = RESULTS) -> str:
    """How the ablation was run and how its verdicts are reached, from its curves file."""
    curves = _read(results, "ablation_curves.json")
    if curves is None:
        return ""
    v = curves["variants"]
    minutes = ", ".join(
        f"`{n}` {x['minutes_per_process']:.0f}" for n, x in v.items() if x.get("minutes_per_process")
    )
    power = _read(results, "ablation_seed_power.json") or {}
    sims = f"{power['sims']:,} simulated experiments per seed count" if power else "no simulation file"
    return (
        f"\nAgent of commit `{(curves.get('git_commit') or 'unknown')[:7]}`, {len(v['bbf']['seeds'])} seeds "
        "per variant in one process each, 100k steps, the protocol's score (mean of the last 3 evaluations); "
        f"minutes per process on the 2-core VM, two at a time: {minutes}. P(variant > bbf) counts the "
        "pairs of runs won, ties half. Verdict: a side is better when the Newcombe 95% interval excludes "
        "0.5; otherwise, the seeds per variant at which 80% of experiments drawn from the observed scores "
        f"would exclude it ({sims}, `power.py`). Seeds 0-9 also served the exploratory agent's choices, "
        "so this table explores; it does not confirm.\n"
    )


def peer(results: Path = RESULTS) -> str:
    """stable-baselines3's zoo DQN beside ours, one protocol, seeds 0-4."""
    p = _read(results, "peer_sb3.json")["peer"]
    lines = ["| implementation | IQM | 95% CI (exact) | per seed |", "|---|---|---|---|"]
    for key, label in (("sb3_dqn", "stable-baselines3 DQN, zoo settings"), ("our_dqn", "our `dqn`")):
        v = p[key]
        per_seed = ", ".join(f"{x:.1f}" for x in v["scores"])
        lines.append(f"| {label} | {v['iqm']:.1f} | {_ci(v)} | {per_seed} |")
    lines += ["", f"P(ours > sb3) = {_newcombe(p['poi_ours_vs_sb3'])}."]
    return "\n".join(lines) + "\n"


def late_drops(results: Path = RESULTS, drop: float = 100.0) -> str:
    """The two DQNs' late collapses, from the kept curves: runs whose score (the last 3 evaluations)
    is more than `drop` below their best evaluation before that window (step 0 excluded). Ours: `dqn`
    of the ablation (ablation_curves.json); sb3's: peer_sb3/ (seeds 0-4)."""
    ours = _read(results, "ablation_curves.json")
    files = sorted((Path(results) / "peer_sb3").glob("seed*_100000_10000_10.json"))
    runs = {"stable-baselines3 DQN, zoo settings": []}
    for path in files:
        r = json.loads(path.read_text())
        runs["stable-baselines3 DQN, zoo settings"].append((r["seed"], r["eval_points"]))
    if ours is not None:
        v = ours["variants"]["dqn"]
        runs["our `dqn`"] = list(zip(v["seeds"], v["returns"]))
    lines = [
        f"| implementation | seeds | runs whose score fell more than {drop:g} below their best earlier "
        "evaluation | per seed: best evaluation 10k-70k -> score |",
        "|---|---|---|---|",
    ]
    for name, seeds in runs.items():
        pairs = [(k, max(r[1:-SCORE_POINTS]), sum(r[-SCORE_POINTS:]) / SCORE_POINTS) for k, r in seeds]
        fell = [k for k, best, score in pairs if best - score > drop]
        detail = "; ".join(f"{k}: {best:.0f} -> {score:.0f}" for k, best, score in pairs)
        seed_list = f"{seeds[0][0]}-{seeds[-1][0]}" if seeds else "none"
        lines.append(f"| {name} | {seed_list} | {len(fell)} of {len(seeds)} | {detail} |")
    return "\n".join(lines) + "\n"


def batching(results: Path = RESULTS) -> str:
    """Seed-steps/s of S seeds in one process over single-seed processes (bbf, replay ratio 2)."""
    cpu = _read(results, "benchmark_rr2.json")
    gpu = _read(results, "gpu_h200/benchmark_cuda_graph.json")

    def ratios(key: str) -> str:
        core, both = cpu["vectorised"][key]["speedup"], cpu["whole_machine"][key]["speedup"]
        eager, graph = gpu["vectorised"][key]["speedup"], gpu["vectorised_cuda_graph"][key]["speedup"]
        return (
            f"x{core:.2f} on one CPU core, x{both:.2f} with both cores busy, x{eager:.2f} on the H200 "
            f"(x{graph:.2f} with `--cuda-graph`)"
        )

    return (
        f"Seed-steps/s of S seeds in one process over single-seed processes: S = 5, {ratios('5')}; "
        f"S = 10, {ratios('10')}. With `--cuda-graph` one 10-seed process reaches "
        f"{gpu['vectorised_cuda_graph']['10']['one_process_steps_per_s']:.0f} seed-steps/s "
        f"(CPU core: {cpu['vectorised']['10']['one_process_steps_per_s']:.0f}).\n"
    )


# ---------------------------------------------------------------------------------------------
# figures


def _iqm_curves(curves: dict, reps: int) -> dict:
    import numpy as np
    import stats

    return {
        n: {"steps": v["eval_steps"], **stats.iqm_curve(np.array(v["returns"]), reps)}
        for n, v in curves["variants"].items()
    }


def _resets(curves: dict) -> dict:
    return {n: v.get("reset_steps") for n, v in curves["variants"].items()}


def figures(results: Path = RESULTS, reps: int = 50_000) -> list[Path]:
    """The README's figures from the curves files: the headline's learning curves (resets marked) and
    its performance profiles beside P(bbf > dqn) with Newcombe intervals (confirmation_curves.json);
    the ablation's learning curves and P(variant > bbf) (ablation_curves.json). A figure whose file
    is absent is not drawn."""
    import numpy as np
    import plots
    import stats

    written = []
    curves = _read(results, "confirmation_curves.json")
    if curves is not None:
        scores = rederived_scores(curves)
        names = list(curves["variants"])
        paths = [Path(results) / "confirmation_curves.png", Path(results) / "confirmation_profile_poi.png"]
        title = "IQM learning curves, seeds 1000-1019 (95% CI)"
        plots.learning_curves(_iqm_curves(curves, reps), _resets(curves), title).savefig(
            paths[0], dpi=110, bbox_inches="tight"
        )
        every = [x for s in scores.values() for x in s]
        thresholds = np.linspace(min(every) - 20, max(every) + 20, 121).tolist()
        profiles = {"thresholds": thresholds}
        profiles |= {n: stats.performance_profile_with_ci(scores[n], thresholds, reps) for n in names}
        pairs = {
            f"bbf vs {n}": stats.probability_of_improvement_with_ci(scores["bbf"], scores[n], reps)
            for n in names
            if n != "bbf" and "bbf" in scores
        }
        plots.profile_and_poi(profiles, names, pairs).savefig(paths[1], dpi=110, bbox_inches="tight")
        written += paths
    curves = _read(results, "ablation_curves.json")
    if curves is not None:
        seeds = curves["variants"]["bbf"]["seeds"]
        paths = [Path(results) / "ablation_curves.png", Path(results) / "ablation_poi.png"]
        title = f"The ablation: IQM learning curves, seeds {seeds[0]}-{seeds[-1]} (95% CI)"
        plots.learning_curves(_iqm_curves(curves, reps), _resets(curves), title).savefig(
            paths[0], dpi=110, bbox_inches="tight"
        )
        pairs = {f"{n} vs bbf": v["vs_bbf"] for n, v in ablation_stats(curves, reps).items() if n != "bbf"}
        fig = plots.probability_of_improvement(
            pairs, f"P(variant > bbf), seeds {seeds[0]}-{seeds[-1]}, Newcombe 95%"
        )
        fig.savefig(paths[1], dpi=110, bbox_inches="tight")
        written += paths
    return written


def ablation_figures(results: Path = RESULTS) -> str:
    """The ablation's figures, once tables.py --figures has drawn them."""
    shown = _figure_links(
        results,
        (
            ("ablation_curves.png", "the ablation's IQM learning curves, resets marked"),
            ("ablation_poi.png", "P(variant > bbf) with Newcombe intervals"),
        ),
    )
    return "\n" + " ".join(shown) + "\n" if shown else ""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--figures", action="store_true", help="draw the README's figures again")
    parser.add_argument("--results", default=str(RESULTS), help="the folder of the result files")
    args = parser.parse_args()
    results = Path(args.results)
    for name in ("confirmation", "ablation", "peer", "batching"):
        print(f"## {name}\n\n{globals()[name](results)}")
    if args.figures:
        written = figures(results)
        print("\n".join(f"wrote {p}" for p in written) or "no *_curves.json: no figures to draw")


if __name__ == "__main__":
    main()
