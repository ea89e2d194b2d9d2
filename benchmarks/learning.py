"""
Offline-to-online learning curves of the paper's methods ("Reinforcement Learning with Action Chunking",
Li, Zhou, Levine 2025) on OGBench cube tasks, from play data generated locally with OGBench's oracles.

Every method is a setting of ``sb3_qchunk.QC`` with the same networks, batch size and update-to-data ratio 1:

    QC      chunk_size=5, actor_type="best_of_n"
    QC-FQL  chunk_size=5, actor_type="distill", alpha=--alpha
    BFN     chunk_size=1, actor_type="best_of_n"
    FQL     chunk_size=1, actor_type="distill", alpha=--alpha
    BFN-n   chunk_size=5, action_chunking=False, actor_type="best_of_n"
    RLPD    chunk_size=1, actor_type="distill", alpha=0, offline_fraction=0.5
    DQC     chunk_size=5, critic_chunk_size=25, actor_type="best_of_n"  (decoupled chunk lengths)

RLPD is approximated with QC's machinery: a one-step actor with no BC/distillation pull (alpha=0), so it only
maximises Q, and RLPD's symmetric sampling (half of each batch from the offline data). Unlike the original
it keeps QC's 2-critic ensemble with mean aggregation and UTD 1 (no 10-critic ensemble, no high UTD).

For each env a dataset is generated once (``data/{env}-play-{size}-seed0.npz``) and shared by all runs. Each run
(env, method, seed) evaluates the fresh model, pre-trains offline in blocks, then learns online in blocks
(learning_starts=0: the pre-trained policy acts at once), evaluating after every block. Runs go to a pool of
``--workers`` processes (one torch thread each when there are several); each finished run appends its rows to ``curves.csv``.

    python benchmarks/learning.py                                  # 2 envs x 6 methods x 3 seeds
    python benchmarks/learning.py --envs cube-single --methods QC FQL RLPD --seeds 0 1
    python benchmarks/learning.py --envs cube-double --methods QC DQC BFN --compile --out benchmarks/results/decoupled
    python benchmarks/learning.py --resume                         # skip runs already in curves.csv
    python benchmarks/learning.py --report-only                    # rebuild the PNGs and summary.md
    python benchmarks/learning.py --smoke --out /tmp/learning      # tiny, about 20 s (used by the tests)
    python benchmarks/learning.py --paper --device cuda --envs cube-single --methods QC --seeds 0   # paper scale
"""

import argparse
import csv
import datetime
import itertools
import json
import multiprocessing
import platform
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import ogbench  # noqa: F401  (registers the OGBench envs)
import torch as th
from stable_baselines3.common.logger import configure
from stable_baselines3.common.utils import get_device

from throughput import machine_line  # benchmarks/ is the script's directory

from sb3_qchunk import QC
from sb3_qchunk.common.evaluation import evaluate_success
from sb3_qchunk.datasets import cached_play_dataset, load_ogbench_npz
from sb3_qchunk.common.env_util import wrap_chunked

METHODS: dict[str, dict[str, Any]] = {
    "QC": dict(chunk_size=5, actor_type="best_of_n"),
    "QC-FQL": dict(chunk_size=5, actor_type="distill"),
    "BFN": dict(chunk_size=1, actor_type="best_of_n"),
    "FQL": dict(chunk_size=1, actor_type="distill"),
    "BFN-n": dict(chunk_size=5, action_chunking=False, actor_type="best_of_n"),
    "RLPD": dict(chunk_size=1, actor_type="distill", alpha=0.0, offline_fraction=0.5),
    "DQC": dict(chunk_size=5, critic_chunk_size=25, actor_type="best_of_n"),
}
EXPECTED_ORDER = [["QC"], ["BFN", "FQL"], ["RLPD"]]  # the paper's expectation, best first
FIELDS = ["env", "method", "seed", "phase", "offline_updates_done", "online_env_steps", "success_rate", "wall_s"]
SMOKE = dict(
    net_arch=[16, 16], num_samples=2, flow_steps=2, batch_size=32, dataset_size=2_000, offline_updates=20,
    online_steps=50, eval_every_offline=10, eval_every_online=25, eval_episodes=2, envs=["cube-single"],
    methods=["QC", "RLPD", "DQC"], seeds=[0], workers=1, out="runs/learning-smoke",
)  # fmt: skip
# The paper's scale (DESIGN.md): for a GPU, one run per process, e.g. --paper --device cuda --workers 1.
PAPER = dict(
    net_arch=[512, 512, 512, 512], num_samples=32, dataset_size=1_000_000, offline_updates=1_000_000,
    online_steps=1_000_000, eval_every_offline=100_000, eval_every_online=100_000, eval_episodes=50, workers=1,
    compile=True, out="runs/learning-paper",
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["cube-single", "cube-double"], help="OGBench env families")
    parser.add_argument("--task", type=int, default=1, help="single-task id (1-5)")
    parser.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "DQC"], choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--dataset-size", type=int, default=100_000, help="play-data transitions per env")
    parser.add_argument("--offline-updates", type=int, default=20_000)
    parser.add_argument("--online-steps", type=int, default=20_000, help="primitive env steps online")
    parser.add_argument("--eval-every-offline", type=int, default=5_000, help="offline updates between evaluations")
    parser.add_argument("--eval-every-online", type=int, default=5_000, help="online env steps between evaluations")
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--net-arch", nargs="+", type=int, default=[256, 256], help="actor and critic hidden sizes")
    parser.add_argument("--num-samples", type=int, default=8, help="N of best-of-N")
    parser.add_argument("--flow-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--alpha", type=float, default=100.0, help="distillation weight of QC-FQL and FQL")
    parser.add_argument("--sampling-precision", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--training-precision", default="float32", choices=["float32", "bfloat16"],
                        help="precision of the gradient path (bfloat16: opt-in mixed precision)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the updates and the action choice "
                        "(compile_update=True, compile_sampling=True)")
    parser.add_argument("--workers", type=int, default=2, help="parallel runs (processes, one thread each)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", default=None, help="dataset cache (default: data/, or <out>/data with --smoke)")
    parser.add_argument("--out", default="benchmarks/results/learning", help="directory of the results")
    parser.add_argument("--resume", action="store_true", help="skip (env, method, seed) runs already in curves.csv")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the PNGs and summary.md")
    parser.add_argument("--smoke", action="store_true", help="tiny config and data (for the tests)")
    parser.add_argument("--paper", action="store_true", help="the paper's scale (4x512, N=32, 1M + 1M; for a GPU)")
    args = parser.parse_args(argv)
    if args.smoke or args.paper:  # the preset's values become the defaults; options given explicitly still win
        parser.set_defaults(**(SMOKE if args.smoke else PAPER))
        args = parser.parse_args(argv)
    if args.data_dir is None:
        args.data_dir = str(Path(args.out) / "data") if args.smoke else "data"
    return args


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def command_line() -> str:
    return shlex.join(["python", *sys.argv])


def git_commit() -> str:
    """The commit the code ran from (with "+dirty" if the work tree had changes), so results can be traced."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def dataset_path(args: argparse.Namespace, env: str) -> Path:
    """The cached play dataset of ``env`` (same naming as ``sb3_qchunk.demo``), generated if missing."""
    path = Path(args.data_dir) / f"{env}-play-{args.dataset_size}-seed0.npz"
    return cached_play_dataset(path, env, args.dataset_size, seed=0, progress_bar=False, n_jobs=-1)


def run_one(job: tuple[argparse.Namespace, str, str, int, Path]) -> list[dict[str, Any]]:
    """One (env, method, seed) run: offline pre-training then online learning, evaluated after every block."""
    args, env, method, seed, path = job
    if args.workers > 1:
        th.set_num_threads(1)  # parallel runs share the cores
    env_id = f"{env}-singletask-task{args.task}-v0"
    start = time.time()
    th.manual_seed(seed)
    model = QC(
        "MlpPolicy",
        env_id,
        **{"alpha": args.alpha, **METHODS[method]},
        num_samples=args.num_samples,
        flow_steps=args.flow_steps,
        batch_size=args.batch_size,
        learning_starts=0,
        buffer_size=args.online_steps + 1_000,  # the online ring only: the dataset is kept in its own block
        compile_update=args.compile,
        policy_kwargs=dict(
            net_arch=args.net_arch,
            sampling_precision=args.sampling_precision,
            training_precision=args.training_precision,
            compile_sampling=args.compile,
        ),
        seed=seed,
        device=args.device,
    )
    model.set_logger(configure(None, []))
    model.load_dataset(load_ogbench_npz(path, task_id=args.task, env=env_id))
    eval_env = wrap_chunked(gym.make(env_id), model.env_chunk_size, model.gamma)
    eval_env.reset(seed=10_000 + seed)  # later resets continue this RNG
    rows: list[dict[str, Any]] = []

    def evaluate(phase: str) -> None:
        # sampled chunks (fresh flow noise), as the paper evaluates
        rate = evaluate_success(model, eval_env, args.eval_episodes, deterministic=False)["success_rate"]
        rows.append(dict(
            env=env, method=method, seed=seed, phase=phase, offline_updates_done=model.offline_updates_done,
            online_env_steps=model.num_timesteps, success_rate=rate, wall_s=round(time.time() - start, 1),
        ))  # fmt: skip

    evaluate("offline")
    while model.offline_updates_done < args.offline_updates:
        block = min(args.eval_every_offline, args.offline_updates - model.offline_updates_done)
        model.pretrain(block, log_interval=block)
        evaluate("offline")
    while model.num_timesteps < args.online_steps:
        block = min(args.eval_every_online, args.online_steps - model.num_timesteps)
        model.learn(block, reset_num_timesteps=model.num_timesteps == 0)
        evaluate("online")
    return rows


def read_rows(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    for row in rows:
        for key in ("seed", "offline_updates_done", "online_env_steps"):
            row[key] = int(row[key])
        row["success_rate"], row["wall_s"] = float(row["success_rate"]), float(row["wall_s"])
    return rows


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def run_all(args: argparse.Namespace, out: Path) -> None:
    curves = out / "curves.csv"
    done: set[tuple[str, str, int]] = set()
    if args.resume and curves.exists():  # a run's rows are written only once it has finished
        done = {(row["env"], row["method"], row["seed"]) for row in read_rows(curves)}
    else:
        curves.unlink(missing_ok=True)
    config = {key: value for key, value in vars(args).items() if key not in ("resume", "report_only")}
    device = get_device(args.device).type  # as the runs' QC models resolve it ("auto": cuda where there is one)
    threads = 1 if args.workers > 1 else th.get_num_threads()  # (see main: parallel runs get one thread each)
    machine = f"{machine_line(device, threads)}, {platform.platform()}"
    info = dict(command=command_line(), date=now(), machine=machine, commit=git_commit())
    (out / "config.json").write_text(json.dumps({**info, "config": config}, indent=2))

    paths = {env: dataset_path(args, env) for env in args.envs}
    # Seed by seed, so that a run stopped early has compared every method on the same seeds.
    jobs = [
        (args, env, method, seed, paths[env])
        for env, seed, method in itertools.product(args.envs, args.seeds, args.methods)
        if (env, method, seed) not in done
    ]
    print(f"{len(jobs)} runs to do ({len(done)} already in {curves}), {args.workers} workers", flush=True)
    start = time.time()
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for i, rows in enumerate(pool.imap_unordered(run_one, jobs), 1):
            append_rows(curves, rows)
            last = {row["phase"]: row["success_rate"] for row in rows}  # the phase's final evaluation
            print(
                f"[{time.time() - start:7.0f} s] {i}/{len(jobs)} {rows[0]['env']} {rows[0]['method']} seed "
                f"{rows[0]['seed']}: success offline {last.get('offline', float('nan')):.2f}, online "
                f"{last.get('online', float('nan')):.2f} ({rows[-1]['wall_s']:.0f} s)",
                flush=True,
            )


def curve(rows: list[dict[str, Any]], env: str, method: str, phase: str) -> tuple[np.ndarray, np.ndarray]:
    """x (mean over seeds) and success rates (seeds, evaluations) of one phase, cut to the shortest seed."""
    key = "offline_updates_done" if phase == "offline" else "online_env_steps"
    by_seed: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        if (row["env"], row["method"], row["phase"]) == (env, method, phase):
            by_seed[row["seed"]].append((row[key], row["success_rate"]))
    if not by_seed:
        return np.zeros(0), np.zeros((0, 0))
    n = min(len(points) for points in by_seed.values())
    data = np.array([points[:n] for _, points in sorted(by_seed.items())], dtype=float)  # (seeds, n, 2)
    return data[:, :, 0].mean(axis=0), data[:, :, 1]


def plot_env(rows: list[dict[str, Any]], env: str, methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for color, method in enumerate(methods):
        x_off, off = curve(rows, env, method, "offline")
        x_on, on = curve(rows, env, method, "online")
        if on.size:  # the online panel starts from the final offline policy
            x_on, on = np.concatenate([[0], x_on]), np.concatenate([off[:, -1:], on], axis=1)
        for ax, x, rates in ((axes[0], x_off, off), (axes[1], x_on, on)):
            if rates.size:
                ax.plot(x, rates.mean(axis=0), marker="o", markersize=3, color=f"C{color}", label=method)
                ax.fill_between(x, rates.min(axis=0), rates.max(axis=0), color=f"C{color}", alpha=0.15)
    axes[0].set_xlabel("offline gradient updates")
    axes[1].set_xlabel("online env steps")
    axes[0].set_ylabel("success rate (mean, min-max over seeds)")
    for ax in axes:
        ax.set_ylim(-0.02, 1.02)
        ax.locator_params(axis="x", nbins=5)
        ax.grid(alpha=0.3)
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small")
    fig.suptitle(f"{env}: offline-to-online")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ordering(means: dict[str, float]) -> str:
    """Whether the final means follow QC >= BFN/FQL >= RLPD (over the methods that were run)."""
    groups = [[m for m in group if m in means] for group in EXPECTED_ORDER]
    groups = [group for group in groups if group]
    chain = " >= ".join(", ".join(f"{m} {means[m]:.2f}" for m in group) for group in groups)
    if len(groups) < 2:
        return f"cannot be checked ({chain or 'none of QC, BFN, FQL, RLPD'} run)"
    ok = all(means[a] >= means[b] for i, g in enumerate(groups) for later in groups[i + 1 :] for a in g for b in later)
    if ok and len(set(means.values())) == 1:
        return f"matches only trivially: all equal ({chain})"
    return f"{'matches' if ok else 'does not match'} ({chain})"


def write_report(out: Path, args: argparse.Namespace) -> None:
    rows = read_rows(out / "curves.csv")
    meta_path = out / "config.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else dict(command="?", date="?", machine="?")
    config = meta.get("config", {})
    eval_episodes = config.get("eval_episodes", args.eval_episodes)
    envs = list(dict.fromkeys(row["env"] for row in rows))
    methods = [m for m in METHODS if any(row["method"] == m for row in rows)]
    final: dict[tuple[str, str, str], dict[int, float]] = defaultdict(dict)
    for row in rows:  # rows are in evaluation order: the last one of a phase wins
        final[row["env"], row["method"], row["phase"]][row["seed"]] = row["success_rate"]

    def cell(rates: dict[int, float]) -> str:
        values = list(rates.values())
        if not values:
            return "-"
        successes = int(round(sum(values) * eval_episodes))  # pooled over seeds: successes / episodes
        return f"{np.mean(values):.2f} ± {np.std(values):.2f} ({successes}/{len(values) * eval_episodes})"

    lines = [
        "# Offline-to-online learning: QC and baselines on OGBench cube tasks",
        "",
        f"Command: `{meta['command']}` (started {meta['date']})",
        f"Report built by: `{command_line()}` on {now()}",
        f"Machine: {meta['machine']}; code at commit {meta.get('commit', '?')}",
        "",
        "Config: " + ", ".join(f"{key}={value}" for key, value in config.items()),
        "",
        f"## Final success rate (mean ± std over seeds, and successes / episodes pooled over seeds; "
        f"{eval_episodes} evaluation episodes per point)",
        "",
        "| env | method | after offline | after online | seeds |",
        "|---|---|---|---|---|",
    ]
    checks = []
    for env in envs:
        for method in methods:
            off, on = final[env, method, "offline"], final[env, method, "online"]
            if off or on:
                lines.append(f"| {env} | {method} | {cell(off)} | {cell(on)} | {len(off or on)} |")
        means = {m: float(np.mean(list(final[env, m, "online"].values()))) for m in methods if final[env, m, "online"]}
        checks.append(f"- {env}: {ordering(means)}")
        plot_env(rows, env, methods, out / f"{env}.png")
    lines += [
        "",
        "## Against the paper's expectation QC >= BFN/FQL >= RLPD (final online means)",
        "",
        *checks,
        "",
        f"Resolution: each point is {eval_episodes} episodes, so one seed's success rate moves in steps of "
        f"{1 / eval_episodes:.2g}; differences of an episode or two per seed are within the noise.",
        "",
        f"Curves: {', '.join(f'`{env}.png`' for env in envs)} (mean over seeds, band: min-max). Rows: `curves.csv`.",
    ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        run_all(args, out)
    write_report(out, args)


if __name__ == "__main__":
    main()
