"""Bigger, Better, Faster (Schwarzer et al. 2023, arXiv 2305.19452) on gymnasium's LunarLander-v3
against a tuned DQN, scored with the interquartile mean and bootstrap intervals of Agarwal et al.
2021 (arXiv 2108.13264).

All seeds of a variant train together in one process, as a batch dimension of the networks
(agent.py); variants x seed batches run in a pool of worker processes (one torch thread each), so
every core is busy. Each seed plays --eval-episodes fixed episodes every --eval-every steps (bbf:
its target network at epsilon 0.001, as the official BBF agent; dqn: its online network, greedily);
its score is the mean of its last 3 evaluation points. The parent writes
summary.json and the plots (learning curves, final IQM, performance profiles, probability of
improvement) into the run folder.

    python bbf_lunar/run.py                                   # bbf, 10 seeds, replay ratio 2
    python bbf_lunar/run.py --variants bbf,dqn                # and the zoo-tuned dqn
    python bbf_lunar/run.py --seeds 10 --variants bbf,no_nstep_anneal,no_gamma_anneal,no_resets,small_net,dqn
    python bbf_lunar/run.py --out runs/bbf_lunar/<run> --resume [same flags]   # continue a run
    python bbf_lunar/run.py --out runs/bbf_lunar/<run> --resume --summarize-only  # statistics again
    python bbf_lunar/run.py --out runs/bbf_lunar/<run> --resume --seeds 20         # add seeds 10-19
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing as mp
import os
import signal
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, also in spawned workers
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's common, not an installed one
from agent import AgentConfig, Layout, ModelConfig  # noqa: E402
from job import (  # noqa: E402
    at_step,
    progress_results,
    require_compiler,
    require_cuda,
    require_env,
    reset_schedule,
    seed_dir,
    train_job,
)
from progress import Console, Monitor  # noqa: E402
from report import make_plots, print_table, summarize  # noqa: E402

from common import RunArgs, RunLogger, UserError, check_fits, parse_args, read_json, run_main, run_name  # noqa: E402


@dataclass
class Args(RunArgs):
    seeds: int = 10  # independent runs per variant: seed, seed+1, ..., seed+seeds-1
    variants: str = "bbf"  # comma-separated: bbf,no_nstep_anneal,no_gamma_anneal,no_resets,small_net,dqn
    workers: int = (
        os.cpu_count() or 1
    )  # worker processes; a variant's seeds are split into enough batches to use them
    total_steps: int = 100_000  # environment steps per run
    eval_every: int = 10_000  # environment steps between evaluations (also at step 0 and the end)
    eval_episodes: int = 10  # evaluation episodes per evaluation point
    learning_starts: int = 2_000  # bbf: random steps before learning and the epsilon decay (BBF: 2000)
    # bbf: gradient steps per environment step. BBF.gin's replay_ratio = 64 counts replayed samples:
    # spr_agent.py set_replay_settings takes replay_ratio // batch_size = 64 // 32 = 2 gradient steps
    # per environment step; the paper's headline runs use 8 (scores/RR8_*.csv)
    replay_ratio: float = 2.0
    batch_size: int = 64  # bbf: transitions per gradient step
    lr: float = 3e-4  # bbf: AdamW learning rate (BBF: 1e-4)
    weight_decay: float = 0.1  # bbf: AdamW weight decay on weight matrices (BBF: 0.1)
    tau: float = 0.005  # bbf: target network EMA rate per gradient step (BBF: 0.005)
    width: int = 128  # bbf: hidden units of encoder and projection
    blocks: int = 1  # bbf: residual blocks in the encoder
    n_max: int = 10  # bbf: n-step horizon after each reset
    n_min: int = 3  # bbf: n-step horizon after annealing
    gamma_start: float = 0.97  # bbf: discount after each reset
    gamma_end: float = 0.997  # bbf: discount after annealing
    anneal_steps: int = 10_000  # bbf: gradient steps to anneal n and gamma after each reset
    reset_every: int = 20_000  # bbf: environment steps between resets, 0 = never (official BBF code: 20k)
    eps_end: float = 0.0  # bbf: epsilon after decay (BBF.gin: epsilon_train 0)
    # bbf: environment steps of linear epsilon decay 1 -> eps_end after the learning_starts random ones
    # (BBF.gin: epsilon_decay_period 2001 after min_replay_history 2000)
    eps_decay_steps: int = 2001
    dqn_lr: float = 6.3e-4  # dqn: Adam learning rate (rl-baselines3-zoo LunarLander-v3: 6.3e-4)
    compile: bool = False  # torch.compile each gradient step's TD loss (~1.25x on a CPU; not bit-identical)
    cuda_graph: bool = False  # GPU only: each gradient step replays one CUDA graph (not with --compile)
    checkpoint_every: int = 10_000  # environment steps between per-job checkpoints
    bootstrap_reps: int = 50_000  # bootstrap replicates when the resamples are too many to enumerate
    summarize_only: bool = False  # with --resume: no training, statistics and plots from the result files
    # with --summarize-only: score every run at this env step (0 = at its end); jobs still unfinished
    # are then read from their progress.jsonl
    score_step: int = 0
    progress_every: float = 30.0  # seconds between progress lines (a tqdm bar instead on a terminal)

    REPORT_ONLY: ClassVar[frozenset[str]] = frozenset({"summarize_only", "score_step"})
    # --seeds and --variants may change on --resume: finished (variant, seed) runs are kept, new ones
    # train, and the statistics cover the runs the flags name (a variant's settings do not depend on them)
    RESUME_SAFE: ClassVar[frozenset[str]] = frozenset(
        {"workers", "bootstrap_reps", "seeds", "variants", "progress_every"}
    )
    EXTENDS: ClassVar[frozenset[str]] = frozenset({"seeds", "variants"})  # more continue a finished run


# Variants as overrides of the settings `settings()` builds from Args. `no_*_anneal` hold n / gamma
# at the annealed value. small_net: SB3's default DQN MLP size, two hidden layers of 64, no LayerNorm.
VARIANTS = {
    "bbf": {},
    "no_nstep_anneal": {"n_max": "n_min"},
    "no_gamma_anneal": {"gamma_start": "gamma_end"},
    "no_resets": {"reset_every": 0},
    "small_net": {"width": 64, "blocks": 0, "residual": False, "layer_norm": False},
    # rl-baselines3-zoo's tuned DQN for LunarLander-v3 (stable-baselines3 2.x): Adam, no weight decay,
    # [256, 256], n = 1, gamma 0.99, hard target copy every 250 env steps, train_freq 4 with 4
    # gradient steps (replay ratio 1), batch 128, buffer 50k, epsilon 1 -> 0.1 over 12% of 100k steps
    "dqn": {
        "width": 256, "blocks": 1, "residual": False, "layer_norm": False, "projection": False,
        "dueling": False, "double": False, "lr": "dqn_lr", "weight_decay": 0.0, "adam_eps": 1e-8,
        "batch_size": 128, "buffer_size": 50_000, "learning_starts": 0, "replay_ratio": 1.0,
        "train_freq": 4, "n_max": 1, "n_min": 1, "gamma_start": 0.99, "gamma_end": 0.99, "tau": 1.0,
        "target_every": 250, "reset_every": 0, "eps_end": 0.1, "eps_decay_steps": 12_000,
        "act_with_target": False, "eval_epsilon": 0.0, "max_grad_norm": 10.0,
    },
}  # fmt: skip


def variant_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def check_args(a: Args) -> None:
    unknown = [v for v in variant_list(a.variants) if v not in VARIANTS]
    if unknown or not variant_list(a.variants):
        raise ValueError(
            f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}"
        )
    for name in ("seeds", "workers", "total_steps", "eval_every", "eval_episodes", "batch_size", "width"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(a, name)})")
    for name in ("n_max", "n_min", "checkpoint_every", "bootstrap_reps"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(a, name)})")
    for name in ("replay_ratio", "lr", "dqn_lr", "tau", "progress_every"):
        if getattr(a, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(a, name)})")
    for name in ("gamma_start", "gamma_end", "eps_end", "tau"):
        if getattr(a, name) > 1:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1] (got {getattr(a, name)})")
    if a.eval_every > a.total_steps:
        raise ValueError(f"--eval-every ({a.eval_every}) must be <= --total-steps ({a.total_steps})")
    if a.learning_starts >= a.total_steps:
        raise ValueError(f"--learning-starts must be < --total-steps (got {a.learning_starts})")
    if a.n_min > a.n_max:
        raise ValueError(f"--n-min ({a.n_min}) must be <= --n-max ({a.n_max})")
    if a.compile and a.cuda_graph:
        raise ValueError(
            "--compile and --cuda-graph: choose one (a CUDA graph of a compiled step is not supported)"
        )
    if a.summarize_only and not a.resume:
        raise ValueError("--summarize-only works on an earlier run: add --resume and its --out")
    if a.score_step and not a.summarize_only:
        raise ValueError("--score-step needs --summarize-only")


# ---------------------------------------------------------------------------------------------
# Jobs: one per (variant, seed batch)


def settings(a: Args, variant: str) -> dict:
    """A variant's full settings: Args, BBF's network defaults, then the variant's overrides."""
    s = {**asdict(a), "residual": True, "layer_norm": True, "projection": True, "dueling": True}
    s |= {"double": True, "adam_eps": 1.5e-4, "buffer_size": a.total_steps, "train_freq": 1}
    # BBF.gin: target_action_selection = True (the EMA target acts, in training and evaluation),
    # epsilon_eval 0.001; optax.adamw without gradient clipping; no_resets_after = the run's length
    s |= {"target_every": 0, "act_with_target": True, "eval_epsilon": 0.001, "max_grad_norm": 0.0}
    s |= {"no_resets_after": a.total_steps}
    for key, value in VARIANTS[variant].items():
        s[key] = s[value] if isinstance(value, str) else value
    s["num_blocks"] = s["blocks"]
    return s


def job_spec(a: Args, variant: str, seeds: list[int], jobs_dir: Path) -> dict:
    """Everything one worker needs, as plain data (it crosses a process boundary and is saved)."""
    s = settings(a, variant)
    pick = lambda cls: {f.name: s[f.name] for f in fields(cls) if f.name in s}  # noqa: E731
    run_keys = ("total_steps", "eval_every", "eval_episodes", "learning_starts", "replay_ratio", "train_freq")
    run_keys += ("eps_end", "eps_decay_steps", "checkpoint_every", "buffer_size", "act_with_target")
    run_keys += ("eval_epsilon", "target_every", "reset_every", "no_resets_after")
    return {
        "variant": variant,
        "seeds": seeds,
        "job_dir": str(jobs_dir / f"{variant}_seeds{seeds[0]}-{seeds[-1]}"),
        "seed_dirs": [str(seed_dir(jobs_dir, variant, k)) for k in seeds],
        "model": pick(ModelConfig),
        "agent": pick(AgentConfig),
        "run": {k: s[k] for k in run_keys},
    }


def seed_batches(a: Args, variants: list[str]) -> list[list[int]]:
    """The seeds split into as few batches as keep every worker busy (results do not depend on it)."""
    per_variant = min(a.seeds, max(1, math.ceil(a.workers / len(variants))))
    seeds = list(range(a.seed, a.seed + a.seeds))
    size = math.ceil(len(seeds) / per_variant)
    return [seeds[i : i + size] for i in range(0, len(seeds), size)]


def job_cost(spec: dict) -> float:
    """Rough relative cost: seeds x gradient steps x weights (plus a fixed per-step overhead)."""
    weights = Layout(ModelConfig(**spec["model"])).size * spec["agent"]["batch_size"] / 64
    return len(spec["seeds"]) * (spec["run"]["replay_ratio"] * (weights / 5e4 + 1) + 0.5)


# ---------------------------------------------------------------------------------------------
# Workers: die with the parent, report a damaged file as one line and let the other jobs finish


PR_SET_PDEATHSIG = 1


def _worker_init(parent_pid: int) -> None:
    """Linux: the kernel sends SIGKILL to this worker when its parent dies (even by SIGKILL)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the pool's own clean-up still runs on normal exits
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def run_one(spec: dict) -> dict:
    """Worker entry: {"results": [...]} or {"error": one line}. A damaged checkpoint is moved aside
    (checkpoint.pt.damaged) so the next --resume restarts this job from scratch."""
    try:
        return {"results": train_job(spec, report=lambda *_: None)}  # the parent prints (progress.py)
    except UserError as e:
        ckpt = Path(spec["job_dir"]) / "checkpoint.pt"
        if str(ckpt) in str(e) and ckpt.exists():
            os.replace(ckpt, ckpt.with_name("checkpoint.pt.damaged"))
            return {"error": f"{e}; moved aside, --resume restarts this job from scratch"}
        return {"error": str(e)}


def run_jobs(pending: list[dict], workers: int, say=print) -> tuple[list[dict], list[str]]:
    results, errors = [], []
    if not pending:
        return results, errors
    if workers == 1 or len(pending) == 1:
        outcomes = map(run_one, pending)
        return _collect(outcomes, results, errors, say)
    ctx = mp.get_context("spawn")
    with ctx.Pool(min(workers, len(pending)), initializer=_worker_init, initargs=(os.getpid(),)) as pool:
        _collect(pool.imap_unordered(run_one, pending), results, errors, say)
    return results, errors


def _collect(outcomes, results: list, errors: list, say):
    for outcome in outcomes:
        if "error" in outcome:
            errors.append(outcome["error"])  # printed once, at the end
            continue
        done = outcome["results"]
        results += done
        scores = ", ".join(f"{r['score']:.1f}" for r in done)
        say(
            f"done {done[0]['variant']} seeds {done[0]['seed']}-{done[-1]['seed']}: scores [{scores}] "
            f"({done[0]['seconds'] / 60:.1f} min)"
        )
    return results, errors


# ---------------------------------------------------------------------------------------------
# Stages of main


def plan(args: Args, log: RunLogger) -> tuple[list[dict], list[dict], list[str]]:
    """(finished results, pending job specs, damaged result files). A job is finished when every
    seed of its batch has a readable result.json (--resume has checked the settings); a job whose
    batch is partly finished trains only its missing seeds (results do not depend on the batching).
    A damaged result.json is moved aside; its seed trains again from scratch now, or with
    --summarize-only at the next --resume."""
    variants, jobs_dir = variant_list(args.variants), log.path("jobs")
    specs = [job_spec(args, v, b, jobs_dir) for v in variants for b in seed_batches(args, variants)]
    results, pending, damaged = [], [], []
    for spec in specs:
        found, bad = [], False
        for d in spec["seed_dirs"]:
            path = Path(d) / "result.json"
            if path.exists():
                try:
                    found.append(read_json(path))
                except UserError as e:
                    os.replace(path, path.with_name("result.json.damaged"))
                    if args.summarize_only:
                        damaged.append(f"{e}; moved aside, the next --resume trains its seed again")
                        bad = True
                    else:
                        print(f"note: {e}; moved aside, its seed trains again from scratch", flush=True)
        if len(found) < len(spec["seeds"]) and args.score_step and not bad:
            found = progress_results(spec)  # an unfinished job, scored at an earlier step
        if len(found) == len(spec["seeds"]) or (args.summarize_only and found):
            results += [at_step(r, args.score_step) for r in found] if args.score_step else found
        elif not bad:  # seeds added by a larger --seeds, or a re-batching: train only the missing ones
            done = {r["seed"] for r in found}
            results += found
            missing = [k for k in spec["seeds"] if k not in done]
            pending.append(spec if not done else job_spec(args, spec["variant"], missing, jobs_dir))
    pending.sort(key=job_cost, reverse=True)  # longest first, so the pool finishes together
    return results, [] if args.summarize_only else pending, damaged


def n_weights(s: dict) -> int:
    """Weights of one network of a variant's settings."""
    return Layout(ModelConfig(**{f.name: s[f.name] for f in fields(ModelConfig) if f.name in s})).size


def check_sizes(args: Args) -> None:
    """One line before a run folder is made when a job's networks cannot fit: per seed, the online
    and target networks, the gradients and AdamW's two moments (5 float32 copies), for the seeds
    one job trains together."""
    variants = variant_list(args.variants)
    together = max(len(b) for b in seed_batches(args, variants))
    weights = {v: n_weights(settings(args, v)) for v in variants}
    largest = max(weights, key=weights.get)
    check_fits(20 * weights[largest] * together, f"one {largest} job (its networks)")


def describe(args: Args, log: RunLogger, results: list[dict], pending: list[dict]) -> None:
    variants, last = variant_list(args.variants), args.seed + args.seeds - 1
    to_train = sum(len(s["seeds"]) for s in pending) * args.total_steps  # resumed jobs: at most this
    print(
        f"bbf_lunar: {', '.join(variants)} x seeds {args.seed}-{last}, {args.total_steps:,} steps per run; "
        f"{len(pending)} job(s) to train on {min(args.workers, max(len(pending), 1))} worker(s), "
        f"up to {to_train:,} seed-steps; progress every {args.progress_every:g} s -> {log.run_dir}",
        flush=True,
    )
    for v in variants:
        s = settings(args, v)
        print(
            f"{v:<16} {n_weights(s):>7,} weights, replay ratio {s['replay_ratio']:g}, lr {s['lr']:g}",
            flush=True,
        )
    batches = ", ".join(f"{s['variant']} {s['seeds'][0]}-{s['seeds'][-1]}" for s in pending)
    print(f"{len(results)} seed runs done; to train: {batches or 'nothing'} -> {log.run_dir}", flush=True)


def variant_reset_steps(args: Args, variant: str, results: list[dict]) -> list[int]:
    """The environment steps at which the variant's runs reset, as their result files record them
    (the schedule from the settings for result files written before they did)."""
    for r in results:
        if r["variant"] == variant and "reset_steps" in r:
            return r["reset_steps"]
    s = settings(args, variant)
    return reset_schedule(s["total_steps"], s["reset_every"], s["no_resets_after"])


def report(args: Args, log: RunLogger, results: list[dict]) -> None:
    s = summarize(results, args.bootstrap_reps, args.seed)
    s["replay_ratio"] = {v: settings(args, v)["replay_ratio"] for v in s["variants"]}
    s["reset_steps"] = {v: variant_reset_steps(args, v, results) for v in s["variants"]}
    for j, step in enumerate(next(iter(s["curves"].values()))["steps"]):
        log.log(
            step,
            {
                f"eval/{k}_{name}": c[k][j]
                for name, c in s["curves"].items()
                if j < len(c["steps"])
                for k in ("iqm", "ci_low", "ci_high")
            },
        )
    make_plots(s, log)
    log.write_summary(s)
    print_table(s)


def unreadable_results(args: Args) -> list[Path]:
    """The result.json files of the runs the flags name that are missing or damaged."""
    jobs_dir, bad = Path(args.out) / "jobs", []
    for v in variant_list(args.variants):
        for k in range(args.seed, args.seed + args.seeds):
            path = seed_dir(jobs_dir, v, k) / "result.json"
            try:
                read_json(path)
            except UserError:
                bad.append(path)
    return bad


def open_run(args: Args) -> RunLogger:
    """The run folder. --resume of a finished run (summary.json) with a missing or damaged result file
    reopens it: summary.json is moved aside (summary.json.incomplete), so this --resume trains those
    seeds again; it goes back when the folder is refused for another reason."""
    summary = Path(args.out or ".") / "summary.json"
    aside = summary.with_name("summary.json.incomplete")
    reopen = args.resume and not args.summarize_only and summary.exists() and unreadable_results(args)
    if reopen:
        os.replace(summary, aside)
    try:
        log = RunLogger("bbf_lunar", run_name("bbf", args.seed), args)
    except BaseException:
        if reopen:
            os.replace(aside, summary)
        raise
    if reopen:
        print(f"note: {len(reopen)} result file(s) missing or damaged; reopened the finished run", flush=True)
    return log


def emit_results(log: RunLogger, results: list[dict]) -> None:
    """metrics.jsonl rows of the runs finished before this session (per seed, as progress.py writes them)."""
    for r in results:
        for step, returns in zip(r["eval_steps"], r["eval_returns"]):
            log.log(step, {f"eval/return_{r['variant']}_seed{r['seed']}": sum(returns) / len(returns)})


def main() -> None:
    args = parse_args(Args, check=check_args, description=__doc__)
    check_sizes(args)
    with open_run(args) as log, Console(log.path("log.txt")) as console:
        if log.resumed:
            log.rewind(-1)  # rebuilt below: finished runs from their results, pending jobs from progress
        results, pending, damaged = plan(args, log)
        describe(args, log, results, pending)
        if pending:
            require_env()
            if args.compile:
                require_compiler()
            if args.cuda_graph:
                require_cuda("--cuda-graph")
            log.keep()  # job folders with checkpoints will hold work worth keeping
        emit_results(log, results)
        with Monitor(pending, log, console, args.progress_every) as monitor:
            done, errors = run_jobs(pending, args.workers, monitor.say)
        results += done
        if len(damaged) + len(errors) == 1:  # one damaged file or failed job: its line alone
            raise UserError((damaged + errors)[0])
        if damaged or errors:
            for line in damaged + errors:
                print(f"error: {line}", file=sys.stderr, flush=True)
            raise UserError(f"{len(damaged) + len(errors)} job(s) failed (see above); the others are saved")
        if not results:
            raise UserError(f"no finished jobs under {log.path('jobs')}")
        report(args, log, results)
        log.path("summary.json.incomplete").unlink(missing_ok=True)  # replaced by the new summary.json


if __name__ == "__main__":
    run_main(main)
