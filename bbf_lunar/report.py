"""Summary, table and plots of a bbf_lunar run from its per-job results (used by run.py).

`summarize` turns the jobs' result dicts into summary.json's content (IQM and bootstrap CI per variant
and per evaluation point, probability of improvement of `bbf` over each other variant, performance
profiles); `make_plots` draws them; `print_table` prints the final-return table.
"""

from __future__ import annotations

import numpy as np
import plots
import stats
from job import SCORE_POINTS

from common import RunLogger, UserError


def summarize(results: list[dict], reps: int, seed: int) -> dict:
    """summary.json's content. A run's score is the mean of its last 3 evaluation points (each the
    mean of --eval-episodes episodes), so one evaluation right after a reset does not decide a run."""
    by_variant: dict[str, list[dict]] = {}
    for r in sorted(results, key=lambda r: r["seed"]):
        by_variant.setdefault(r["variant"], []).append(r)
    out = {"variants": {}, "curves": {}, "probability_of_improvement": {}}
    for name, runs in by_variant.items():
        steps = runs[0]["eval_steps"]
        if any(r["eval_steps"] != steps for r in runs):
            raise UserError(
                f"variant {name}: its runs were evaluated at different steps; "
                "re-run them with the same --total-steps and --eval-every"
            )
        scores = [r["score"] for r in runs]
        curve = np.array([[np.mean(x) for x in r["eval_returns"]] for r in runs])  # (runs, points)
        out["variants"][name] = {
            **stats.iqm_with_ci(scores, reps, seed),
            "final_returns": scores,
            "last_eval_returns": [r["final_return"] for r in runs],
            "seeds": [r["seed"] for r in runs],
            "mean": float(np.mean(scores)),
            "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0,
            "seed_steps_per_second": float(np.mean([r["seed_steps_per_second"] for r in runs])),
            "seeds_in_process": runs[0]["seeds_in_process"],
            "minutes_per_process": float(np.mean([r["seconds"] for r in runs]) / 60),
        }
        out["curves"][name] = {"steps": steps, **stats.iqm_curve(curve, reps, seed)}
    if "bbf" in by_variant:
        bbf = out["variants"]["bbf"]["final_returns"]
        for name, v in out["variants"].items():
            if name != "bbf":
                poi = stats.probability_of_improvement_with_ci(bbf, v["final_returns"], reps, seed)
                out["probability_of_improvement"][f"bbf_vs_{name}"] = poi
    every = [r["score"] for r in results]
    lo, hi = min(every) - 20, max(every) + 20
    out["profiles"] = {"thresholds": np.linspace(lo, hi, 121).tolist()}
    for name, v in out["variants"].items():
        thresholds = out["profiles"]["thresholds"]
        out["profiles"][name] = stats.performance_profile_with_ci(v["final_returns"], thresholds, reps, seed)
    out["env_steps"] = max(r["env_steps"] for r in results)
    out["seeds"] = sorted({r["seed"] for r in results})
    out["score"] = f"mean of the last {SCORE_POINTS} evaluation points"
    out["caveat"] = stats.COVERAGE_CAVEAT
    return out


def make_plots(s: dict, log: RunLogger) -> None:
    """learning_curves (resets marked), final_iqm, performance_profiles, probability_of_improvement."""
    names = list(s["variants"])
    resets = {name: s.get("reset_steps", {}).get(name) for name in names}  # run.py adds them
    log.save_figure("learning_curves", plots.learning_curves(s["curves"], resets))
    scored = {name: v | {"scores": v["final_returns"]} for name, v in s["variants"].items()}
    log.save_figure("final_iqm", plots.final_scores(scored, f"score at {s['env_steps']:,} steps"))
    log.save_figure("performance_profiles", plots.performance_profiles(s["profiles"], names))
    if s["probability_of_improvement"]:
        pairs = {k.replace("_vs_", " vs "): p for k, p in s["probability_of_improvement"].items()}
        log.save_figure("probability_of_improvement", plots.probability_of_improvement(pairs))


def print_table(s: dict) -> None:
    print(
        f"\nscore = mean return of the last {SCORE_POINTS} evaluation points (up to {s['env_steps']:,} env "
        f"steps), {len(s['seeds'])} seeds; IQM with a 95% percentile bootstrap CI",
        flush=True,
    )
    print(f"{'variant':<17}{'IQM':>8}  {'95% CI':<18}{'mean +- std':<18}{'seed-steps/s':>13}{'min':>7}")
    for name, v in s["variants"].items():
        ci = f"[{v['ci_low']:.1f}, {v['ci_high']:.1f}]"
        print(
            f"{name:<17}{v['iqm']:>8.1f}  {ci:<18}{v['mean']:>7.1f} +- {v['std']:<7.1f}"
            f"{v['seed_steps_per_second']:>13.0f}{v['minutes_per_process']:>7.1f}"
        )
    for pair, p in s["probability_of_improvement"].items():
        print(
            f"P({pair.replace('_vs_', ' > ')}) = {p['poi']:.2f}: {p['pairs_won']} of {p['pairs']} pairs won, "
            f"{p['pairs_tied']} tied; 95% CI bootstrap [{p['ci_low']:.2f}, {p['ci_high']:.2f}], "
            f"Newcombe score [{p['newcombe_low']:.2f}, {p['newcombe_high']:.2f}]"
        )
    print(f"caveat: {s['caveat']}; the Newcombe interval does not collapse at 0 or 1.")
