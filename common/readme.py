"""README tables written by code: `cog -r -I . README.md */README.md` regenerates them from the
committed result files, and CI's `cog --check` fails when a README has drifted from its data.

A README's cog block loads its experiment's `tables.py` by path (experiments are folders, not
packages, and never import each other) and prints what it returns:

    <!-- [[[cog
    from common.readme import experiment_module
    cog.out(experiment_module("revnet_mnist/tables.py").memory_table())
    ]]] -->
    ...generated markdown...
    <!-- [[[end]]] -->

The top README's results table is `headline_table()`: one row per experiment from its `headline()`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def experiment_module(path: str):
    """Import `<repo>/<path>` under a name of its own (e.g. `revnet_mnist.tables`)."""
    file = REPO / path
    name = ".".join(Path(path).with_suffix("").parts)
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


EXPERIMENTS = ("revnet_mnist", "padim_anomaly", "decoder_transformer", "bbf_lunar")


def headline_table(results: dict[str, Path] | None = None) -> str:
    """One markdown row per experiment, from `<experiment>/tables.py`'s `headline()` (a dict with
    measured, result, interval, command); `results` maps an experiment to another results folder."""
    lines = [
        "| experiment | what is measured | result | interval or spread | command |",
        "|---|---|---|---|---|",
    ]
    for name in EXPERIMENTS:
        tables = experiment_module(f"{name}/tables.py")
        row = tables.headline(results[name]) if results and name in results else tables.headline()
        cells = [f"[{name}]({name}/README.md)"]
        cells += [row[key].replace("|", "\\|") for key in ("measured", "result", "interval", "command")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
