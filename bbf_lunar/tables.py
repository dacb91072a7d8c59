"""The README's tables and figures, made from the small committed files in bbf_lunar/results/.

Each function returns markdown for a cog block of README.md (`cog -I . -r bbf_lunar/README.md`);
`python bbf_lunar/tables.py --figures` draws the README's figures again from the same files.

    confirmation.json            the confirmatory run's statistics (PROTOCOL.md), from confirm.py
    confirmation_curves.json     its per-seed evaluation curves and settings (export.py)
    ablation_s10_summary.json    final scores of the ingredient ablation, 6 variants x 10 seeds
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
# the commits whose agent made the results kept from before the agent followed the official BBF code
PRE_OFFICIAL = {"ablation": "da240ef", "peer": "6f4c6f8", "benchmark": "7e423a3", "gpu": "8113555"}


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


def confirmation_figures(results: Path = RESULTS) -> str:
    """The headline's figures, once tables.py --figures has drawn them."""
    shown = [
        f"![{alt}](results/{name})"
        for name, alt in (
            ("confirmation_curves.png", "IQM learning curves, seeds 1000-1019, resets marked"),
            ("confirmation_profile_poi.png", "performance profiles and P(bbf > dqn), seeds 1000-1019"),
        )
        if (Path(results) / name).is_file()
    ]
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


def ablation(results: Path = RESULTS) -> str:
    """Final scores of the six variants, seeds 0-9, made by the agent before it followed the official code."""
    a = _read(results, "ablation_s10_summary.json")
    lines = ["| variant | IQM | 95% CI | mean +- std | P(variant > bbf) |", "|---|---|---|---|---|"]
    for name, v in a["items"].items():
        p = v.get("vs_reference")
        lines.append(
            f"| `{name}` | {v['iqm']:.1f} | {_ci(v)} | {_mean_std(v['scores'])} | "
            f"{_newcombe(p) if p else 'reference'} |"
        )
    return "\n".join(lines) + "\n"


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


def figures(results: Path = RESULTS, reps: int = 50_000) -> list[Path]:
    """The headline's learning curves (resets marked) and its performance profiles beside P(bbf > dqn)
    with Newcombe intervals, from confirmation_curves.json; nothing while that file is absent."""
    import numpy as np
    import plots
    import stats

    curves = _read(results, "confirmation_curves.json")
    if curves is None:
        return []
    scores = rederived_scores(curves)
    names = list(curves["variants"])
    iqm = {
        n: {"steps": v["eval_steps"], **stats.iqm_curve(np.array(v["returns"]), reps)}
        for n, v in curves["variants"].items()
    }
    resets = {n: v.get("reset_steps") for n, v in curves["variants"].items()}
    written = [Path(results) / "confirmation_curves.png", Path(results) / "confirmation_profile_poi.png"]
    fig = plots.learning_curves(iqm, resets, "IQM learning curves, seeds 1000-1019 (95% CI)")
    fig.savefig(written[0], dpi=110, bbox_inches="tight")

    every = [x for s in scores.values() for x in s]
    thresholds = np.linspace(min(every) - 20, max(every) + 20, 121).tolist()
    profiles = {"thresholds": thresholds}
    profiles |= {n: stats.performance_profile_with_ci(scores[n], thresholds, reps) for n in names}
    pairs = {
        f"bbf vs {n}": stats.probability_of_improvement_with_ci(scores["bbf"], scores[n], reps)
        for n in names
        if n != "bbf" and "bbf" in scores
    }
    fig = plots.profile_and_poi(profiles, names, pairs)
    fig.savefig(written[1], dpi=110, bbox_inches="tight")
    return written


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
        print("\n".join(f"wrote {p}" for p in written) or "no confirmation_curves.json: no figures to draw")


if __name__ == "__main__":
    main()
