"""The figures of bbf_lunar, one style for a run folder (report.py), compare.py and the README (tables.py).

Every variant keeps one colour in every figure (`COLORS`); learning curves mark the steps at which a
variant's networks were reset (an evaluation right after a reset scores low, and the dotted line says
why); legends sit outside the axes, never on the data. Each function returns a matplotlib figure.
"""

from __future__ import annotations

SOLVED = 200.0  # LunarLander's "solved" return (gymnasium docs)

COLORS = {  # tab10, fixed per variant
    "bbf": "#1f77b4",
    "dqn": "#ff7f0e",
    "no_nstep_anneal": "#2ca02c",
    "no_gamma_anneal": "#9467bd",
    "no_resets": "#d62728",
    "small_net": "#8c564b",
    "sb3_dqn": "#7f7f7f",
}
_SPARE = ("#e377c2", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")


def color(name: str, others=()) -> str:
    """A variant's colour; a label that is no variant (compare.py's items) takes the first spare colour
    the labels before it in `others` have not taken."""
    if name in COLORS:
        return COLORS[name]
    taken = [n for n in others if n not in COLORS]
    return _SPARE[taken.index(name) % len(_SPARE)] if name in taken else _SPARE[0]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _legend_outside(ax, below: bool = False) -> None:
    if below:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
    else:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)


def _axes(ax, size):
    if ax is not None:
        return ax.figure, ax
    return _pyplot().subplots(figsize=size)


def learning_curves(curves: dict, reset_steps: dict | None = None, title="IQM learning curves (95% CI)"):
    """curves: {name: {"steps", "iqm", "ci_low", "ci_high"}}; reset_steps: {name: [env steps]}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = list(curves)
    for name, c in curves.items():
        col = color(name, names)
        ax.plot(c["steps"], c["iqm"], color=col, marker="o", ms=3, label=c.get("label", name))
        ax.fill_between(c["steps"], c["ci_low"], c["ci_high"], color=col, alpha=0.15, lw=0)
    for name, steps in (reset_steps or {}).items():
        for i, step in enumerate(steps or []):
            label = f"{name}: reset (an evaluation at the same step follows it)" if i == 0 else None
            ax.axvline(step, color=color(name, names), ls=":", lw=1.2, label=label)
    ax.axhline(SOLVED, color="grey", ls="--", lw=1, label=f"solved ({SOLVED:g})")
    ax.set(xlabel="environment steps", ylabel="IQM evaluation return", title=title)
    _legend_outside(ax)
    return fig


def final_scores(variants: dict, xlabel: str, title="Final performance"):
    """variants: {name: {"iqm", "ci_low", "ci_high", "scores"}}: IQM with its interval, and every run."""
    plt = _pyplot()
    names = list(variants)
    fig, ax = plt.subplots(figsize=(7, 0.55 * len(names) + 1.6))
    for i, name in enumerate(names):
        v, col = variants[name], color(name, names)
        ax.plot(v["scores"], [i + 0.22] * len(v["scores"]), "x", color=col, alpha=0.6, ms=5)
        err = [[v["iqm"] - v["ci_low"]], [v["ci_high"] - v["iqm"]]]
        ax.errorbar(v["iqm"], i, xerr=err, fmt="o", color=col, capsize=4)
    ax.axvline(SOLVED, color="grey", ls="--", lw=1)
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(-0.6, len(names) - 0.2)
    ax.invert_yaxis()
    ax.set(xlabel=xlabel + ": IQM (95% CI, o) and each run (x)", title=title)
    return fig


def performance_profiles(profiles: dict, names: list[str], title="Performance profiles (95% CI)", ax=None):
    """profiles: {"thresholds": [...], name: {"fraction", "ci_low", "ci_high"}}."""
    fig, ax = _axes(ax, (8, 4.5))
    tau = profiles["thresholds"]
    for name in names:
        p, col = profiles[name], color(name, names)
        ax.step(tau, p["fraction"], where="post", color=col, label=name)
        ax.fill_between(tau, p["ci_low"], p["ci_high"], step="post", color=col, alpha=0.15, lw=0)
    ax.axvline(SOLVED, color="grey", ls="--", lw=1, label=f"solved ({SOLVED:g})")
    ax.set(xlabel="score threshold", ylabel="fraction of runs scoring above", title=title, ylim=(0, 1.02))
    _legend_outside(ax, below=ax.figure is not None and len(ax.figure.axes) > 1)
    return fig


def probability_of_improvement(pairs: dict, title="P(improvement), Newcombe 95% interval", ax=None):
    """pairs: {"X vs Y": {"poi", "newcombe_low", "newcombe_high", "pairs_won", "pairs"}}, in black."""
    labels = list(pairs)
    fig, ax = _axes(ax, (7, 0.55 * len(labels) + 1.6))
    for i, label in enumerate(labels):
        p = pairs[label]
        err = [[p["poi"] - p["newcombe_low"]], [p["newcombe_high"] - p["poi"]]]
        ax.errorbar(p["poi"], i, xerr=err, fmt="o", color="black", capsize=4)
        won = f"{p['pairs_won']:g}/{p['pairs']}" if "pairs_won" in p else ""
        ax.annotate(won, (p["newcombe_high"], i), xytext=(6, 0), textcoords="offset points", va="center")
    ax.axvline(0.5, color="grey", ls="--", lw=1)
    ax.set_yticks(range(len(labels)), [label.replace(" vs ", " > ") for label in labels])
    ax.set_ylim(-0.6, len(labels) - 0.4)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="P(X > Y): pairs of runs won (ties count half)", title=title)
    return fig


def profile_and_poi(profiles: dict, names: list[str], pairs: dict):
    """The headline's two panels: performance profiles, and P(bbf > other) with Newcombe intervals."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.4, 1]})
    performance_profiles(profiles, names, ax=left)
    probability_of_improvement(pairs, ax=right)
    fig.tight_layout()
    return fig
