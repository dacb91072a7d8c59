"""Seeds as a batch dimension, measured: seed-steps per second of one process training S seeds
together against one process training a single seed, on one core (one torch thread).

A seed-step is one environment step of one seed with everything that belongs to it at the same
replay ratio: action selection, the env step, the replay buffer and the gradient steps. Each round
times every S in turn in this one process (so a busy machine slows them alike), after --warmup
random-action steps that fill the buffers; the median over rounds is reported and written to
--out as {"vectorised": {"<S>": {"one_process_steps_per_s", "separate_steps_per_s", "speedup"}}}.

With --processes P, the same comparison is then made with the whole machine busy: P processes at
once, each training S seeds, against P single-seed processes at once (the seed-steps/s of the P
processes summed), written as {"whole_machine": {"processes": P, "<S>": {"batched_steps_per_s",
"separate_steps_per_s", "speedup"}}}.

    python bbf_lunar/benchmark.py                       # bbf at replay ratio 1, S = 5 and 10
    python bbf_lunar/benchmark.py --replay-ratio 8 --steps 300 --rounds 2
    python bbf_lunar/benchmark.py --replay-ratio 2 --processes 2   # and with both of 2 cores busy
    python bbf_lunar/benchmark.py --replay-ratio 2 --compile       # eager and torch.compile'd, in turn

With --compile every S is also timed with the TD loss compiled (run.py --compile), in turn with the eager
one, and written beside it as {"vectorised_compiled": {...the same keys...}, "compile_speedup": {"<S>":
compiled / eager seed-steps/s}} (and with --processes, "whole_machine_compiled" beside "whole_machine").
Compilation happens in untimed learning steps before the timed ones. On a GPU (--device cuda),
--cuda-graph likewise times the gradient step replayed as a CUDA graph (run.py --cuda-graph):
"vectorised_cuda_graph" and "cuda_graph_speedup".

    python bbf_lunar/benchmark.py --device cuda --replay-ratio 2 --cuda-graph

--peer sb3 instead trains stable-baselines3's DQN with the zoo hyperparameters (peer.py; an optional
extra) on --peer-seeds seeds under this folder's evaluation protocol, beside our `dqn` on the same
seeds (trained here, or read from a finished run.py folder given with --against), and reports both
IQMs with their 95% bootstrap CIs, P(ours > sb3), and whether our IQM lies inside sb3's interval.
Each finished sb3 seed is saved next to --out, so an interrupted comparison continues where it was.

    python bbf_lunar/benchmark.py --peer sb3 --peer-seeds 5 --against runs/bbf_lunar/<run>
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's common, not an installed one
import peer  # noqa: E402
import run as bbf_run  # noqa: E402
import stats  # noqa: E402
from job import Job, require_compiler, require_cuda, require_env, seed_dir, train_job  # noqa: E402

from common import UserError, parse_args, read_json, run_main, write_json  # noqa: E402
from common.cli import REPO_ROOT  # noqa: E402


@dataclass
class Args:
    variant: str = "bbf"  # variant to time (see run.py --variants)
    seeds: list[int] | None = None  # seed counts S to compare with S = 1 (default: 5 10)
    replay_ratio: float = 1.0  # bbf's gradient steps per environment step (dqn keeps its own)
    steps: int = 1000  # timed learning steps per S and round
    warmup: int = 300  # random-action steps before the timed ones (they fill the buffers)
    rounds: int = 3  # alternating rounds; the median is reported
    seed: int = 0  # first seed of every process
    out: str = str(REPO_ROOT / "runs" / "bbf_lunar" / "benchmark.json")  # where the JSON result goes
    processes: int = 0  # also time this many processes at once, all cores busy (0: per core only)
    peer: str = ""  # "sb3": compare our dqn with stable-baselines3's zoo DQN instead of timing seeds
    peer_seeds: int = 5  # --peer: seeds seed .. seed + peer_seeds - 1 of each implementation
    total_steps: int = 100_000  # --peer: environment steps per run
    eval_every: int = 10_000  # --peer: steps between evaluations (run.py's protocol)
    eval_episodes: int = 10  # --peer: greedy episodes per evaluation point
    against: str = ""  # --peer: a finished run.py folder whose dqn seeds to use (default: train ours here)
    compile: bool = False  # also time every S with the TD loss torch.compile'd, in turn with the eager one
    device: Literal["cpu", "cuda"] = "cpu"  # where the networks train (one torch thread either way)
    cuda_graph: bool = False  # --device cuda: also time every S with the gradient step as a CUDA graph


def check_args(a: Args) -> None:
    if a.variant not in bbf_run.VARIANTS:
        raise ValueError(f"--variant: unknown {a.variant}; choose from {', '.join(bbf_run.VARIANTS)}")
    if any(s < 2 for s in a.seeds or []):
        raise ValueError("--seeds: each seed count must be >= 2 (S = 1 is the reference)")
    if not a.replay_ratio > 0 or min(a.steps, a.rounds) < 1 or a.processes < 0:
        raise ValueError("--replay-ratio must be > 0, --steps and --rounds >= 1, --processes >= 0")
    if a.peer not in ("", "sb3"):
        raise ValueError(f"--peer: unknown {a.peer}; the one peer is sb3")
    if min(a.peer_seeds, a.total_steps, a.eval_every, a.eval_episodes) < 1:
        raise ValueError("--peer-seeds, --total-steps, --eval-every and --eval-episodes must be >= 1")
    if a.eval_every > a.total_steps:
        raise ValueError(f"--eval-every ({a.eval_every}) must be <= --total-steps ({a.total_steps})")
    if a.against and not a.peer:
        raise ValueError("--against goes with --peer sb3")
    if a.cuda_graph and a.device != "cuda":
        raise ValueError("--cuda-graph needs --device cuda")


UNTIMED_LEARNING_STEPS = 20  # after the random warm-up: torch.compile compiles here, caches warm up
# the ways a gradient step can run besides eager: the flag that asks for it, its speedup key, its title
MODES = {
    "compiled": ("compile", "compile_speedup", "TD loss torch.compile'd"),
    "cuda_graph": ("cuda_graph", "cuda_graph_speedup", "gradient step as a CUDA graph"),
}


def seed_steps_per_second(args: Args, num_seeds: int, folder: Path, mode: str = "eager") -> float:
    """Train a fresh S-seed job for warmup + 20 + steps env steps; time the last `steps`."""
    import torch

    torch.set_num_threads(1)
    total = args.warmup + UNTIMED_LEARNING_STEPS + args.steps
    base = replace(bbf_run.Args(), total_steps=total + 1, eval_every=total + 1, learning_starts=args.warmup)
    base = replace(base, eval_episodes=1, checkpoint_every=10 * total, replay_ratio=args.replay_ratio)
    base = replace(base, compile=mode == "compiled", cuda_graph=mode == "cuda_graph")
    seeds = list(range(args.seed, args.seed + num_seeds))
    job = Job(bbf_run.job_spec(base, args.variant, seeds, folder), args.device)
    progress, losses = io.StringIO(), []
    obs = job.start_envs()
    for _ in range(args.warmup + UNTIMED_LEARNING_STEPS):
        obs = job.env_step(obs, progress, losses)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        obs = job.env_step(obs, progress, losses)
    if args.device == "cuda":
        torch.cuda.synchronize()
    return num_seeds * args.steps / (time.perf_counter() - t0)


def whole_machine_rates(args: Args, num_seeds: int, folder: Path, mode: str = "eager") -> float:
    """Summed seed-steps/s of --processes processes timing num_seeds seeds each, all at once."""
    import multiprocessing as mp

    jobs = [(args, num_seeds, folder / str(p), mode) for p in range(args.processes)]
    with mp.get_context("spawn").Pool(args.processes) as pool:
        return float(sum(pool.starmap(seed_steps_per_second, jobs)))


def modes(args: Args) -> list[str]:
    return ["eager"] + [m for m, (flag, _, _) in MODES.items() if getattr(args, flag)]


def suffix(mode: str) -> str:
    """The result keys' suffix: "" for eager, "_compiled", "_cuda_graph"."""
    return "" if mode == "eager" else f"_{mode}"


def timed_rounds(args: Args, counts: list[int], measure) -> dict[tuple[int, str], list[float]]:
    """Each round times S = 1 and every S in counts in turn, in every mode (eager, and compiled or
    as a CUDA graph when asked): {(S, mode): [seed-steps/s per round]}."""
    rates: dict[tuple[int, str], list[float]] = {(s, m): [] for s in [1, *counts] for m in modes(args)}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for s, m in rates:
                rates[s, m].append(measure(args, s, Path(tmp) / f"{s}_{m}_{r}", m))
    return rates


def ratios(median: dict[tuple[int, str], float], counts: list[int], mode: str, keys: tuple) -> dict:
    """{"<S>": {keys[0]: S-seed rate, keys[1]: single-seed rate, "speedup": their ratio}}."""
    one = median[1, mode]
    return {
        str(s): {keys[0]: median[s, mode], keys[1]: one, "speedup": median[s, mode] / one} for s in counts
    }


def our_dqn(args: Args, seeds: list[int], folder: Path) -> list[dict]:
    """Our dqn's result dicts for the seeds: from --against's finished run, else trained here."""
    if args.against:
        paths = [seed_dir(Path(args.against) / "jobs", "dqn", k) / "result.json" for k in seeds]
        if missing := [str(p) for p in paths if not p.is_file()]:
            raise UserError(f"--against: no finished dqn seed at {missing[0]}")
        return [read_json(p) for p in paths]
    base = replace(bbf_run.Args(), total_steps=args.total_steps, eval_every=args.eval_every)
    base = replace(base, eval_episodes=args.eval_episodes, checkpoint_every=args.total_steps)
    return train_job(bbf_run.job_spec(base, "dqn", seeds, folder))


def compare_with_peer(args: Args) -> None:
    peer.require_sb3()
    seeds = list(range(args.seed, args.seed + args.peer_seeds))
    saved = Path(args.out).with_suffix("") / "sb3"
    saved.mkdir(parents=True, exist_ok=True)
    theirs = []
    for k in seeds:  # each finished seed is kept, so an interrupted comparison continues
        path = saved / f"seed{k}_{args.total_steps}_{args.eval_every}_{args.eval_episodes}.json"
        if not path.is_file():
            write_json(path, peer.train_sb3_dqn(k, args.total_steps, args.eval_every, args.eval_episodes))
        theirs.append(read_json(path))
    with tempfile.TemporaryDirectory() as tmp:
        ours = our_dqn(args, seeds, Path(tmp))
    if any(r["eval_steps"] != theirs[0]["eval_steps"] for r in ours):
        raise UserError("--against: its dqn was evaluated at other steps than --total-steps / --eval-every")
    result = {"seeds": seeds, "protocol": f"mean of the last {peer.SCORE_POINTS} evaluation points"}
    for name, runs in (("sb3_dqn", theirs), ("our_dqn", ours)):
        scores = [r["score"] for r in runs]
        minutes = [r["seconds"] / 60 for r in runs]
        result[name] = {"scores": scores, **stats.iqm_with_ci(scores), "minutes_per_process": minutes}
    result["poi_ours_vs_sb3"] = stats.probability_of_improvement_with_ci(
        result["our_dqn"]["scores"], result["sb3_dqn"]["scores"]
    )
    sb3 = result["sb3_dqn"]
    result["ours_inside_sb3_ci"] = bool(sb3["ci_low"] <= result["our_dqn"]["iqm"] <= sb3["ci_high"])
    write_json(args.out, {"peer": result})
    for name in ("sb3_dqn", "our_dqn"):
        r = result[name]
        per_seed = ", ".join(f"{x:.1f}" for x in r["scores"])
        print(f"{name}: IQM {r['iqm']:.1f} [{r['ci_low']:.1f}, {r['ci_high']:.1f}], per seed {per_seed}")
    p = result["poi_ours_vs_sb3"]
    print(
        f"P(ours > sb3) = {p['poi']:.2f} ({p['pairs_won']}/{p['pairs']} pairs won, Newcombe "
        f"[{p['newcombe_low']:.2f}, {p['newcombe_high']:.2f}]); our IQM inside sb3's 95% CI: "
        f"{result['ours_inside_sb3_ci']}"
    )
    print(f"-> {args.out}")


def main() -> None:
    args = parse_args(Args, check=check_args, description=__doc__)
    require_env()
    if args.compile:
        require_compiler()
    if args.device == "cuda":
        require_cuda("--device cuda")
    if args.peer:
        return compare_with_peer(args)
    counts = args.seeds or [5, 10]
    per_core = ("one_process_steps_per_s", "separate_steps_per_s")
    rates = timed_rounds(args, counts, seed_steps_per_second)
    median = {key: float(np.median(v)) for key, v in rates.items()}
    result = {
        "variant": args.variant,
        "replay_ratio": args.replay_ratio,
        "threads": 1,
        "cpu": os.cpu_count(),
        "device": device_name(args.device),
    }
    print(
        f"{args.variant} at replay ratio {args.replay_ratio:g}, one torch thread, {result['device']},"
        f" median of {args.rounds} rounds of {args.steps} steps (after {args.warmup} random and"
        f" {UNTIMED_LEARNING_STEPS} learning ones):"
    )
    for mode in modes(args):
        result[f"rounds{suffix(mode)}"] = {str(s): v for (s, m), v in rates.items() if m == mode}
        result[f"vectorised{suffix(mode)}"] = ratios(median, counts, mode, per_core)
        if mode != "eager":
            result[MODES[mode][1]] = {str(s): median[s, mode] / median[s, "eager"] for s in [1, *counts]}
        print_rates("one core" + ("" if mode == "eager" else f", {MODES[mode][2]}"), median, counts, mode)
    if args.processes:
        machine = timed_rounds(args, counts, whole_machine_rates)
        total = {key: float(np.median(v)) for key, v in machine.items()}
        both = ("batched_steps_per_s", "separate_steps_per_s")
        for mode in modes(args):
            result[f"whole_machine{suffix(mode)}"] = {
                "processes": args.processes,
                "rounds": {str(s): v for (s, m), v in machine.items() if m == mode},
                **ratios(total, counts, mode, both),
            }
            title = f"{args.processes} processes at once, summed" + ("" if mode == "eager" else f", {mode}")
            print_rates(title, total, counts, mode)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(f"-> {args.out}")


def print_rates(title: str, median: dict[tuple[int, str], float], counts: list[int], mode: str) -> None:
    print(f"  {title}:")
    one = median[1, mode]
    print(f"    S = 1 (single-seed processes): {one:8.0f} seed-steps/s")
    for s in counts:
        rate = median[s, mode]
        print(f"    S = {s:<2} per process         : {rate:8.0f} seed-steps/s  x{rate / one:.2f}")
    if mode != "eager":
        gains = ", ".join(f"S = {s}: x{median[s, mode] / median[s, 'eager']:.2f}" for s in [1, *counts])
        print(f"    {mode + ' / eager':<29}: {gains}")


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


if __name__ == "__main__":
    run_main(main)
