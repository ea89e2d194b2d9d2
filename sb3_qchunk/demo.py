"""
The main job: the paper's point at a scale a 2-core CPU runs in about 13 minutes (11 once the dataset is cached). QC (chunks of h=5 actions, best of
8 flow samples) against BFN, the same agent acting one action at a time (h=1), offline-to-online on OGBench
cube-single from the same data and seed.

1. Generate a cube-single "play" dataset with OGBench's scripted oracles, one process per core (cached under ``data/``).
2. Measure random chunks' success rate on the single-task env.
3. For QC and BFN, in parallel processes: pre-train offline on the dataset (relabelled for the task), then learn
   online with the new transitions in the same replay buffer, evaluating after every block.
4. Print the success rates, and write ``summary.md``, ``curves.csv`` and ``learning_curve.png`` under ``--out``.

    python -m sb3_qchunk.demo                                   # defaults below (about 13 min on 2 cores)
    python -m sb3_qchunk.demo --offline-updates 20000 --online-steps 20000 --eval-episodes 50
"""

import argparse
import csv
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import ogbench  # noqa: F401  (registers the OGBench envs, also in the worker processes)
import torch as th
from rich.console import Console
from rich.table import Table
from stable_baselines3.common.logger import configure

from sb3_qchunk import QC
from sb3_qchunk.common.env_util import wrap_chunked
from sb3_qchunk.common.evaluation import evaluate_success
from sb3_qchunk.datasets import cached_play_dataset, load_ogbench_npz

#: the compared agents: the same QC settings but the chunk size
METHODS = {"QC (h=5)": 5, "BFN (h=1)": 1}


class RandomChunks:
    """A uniformly random chunk policy with SB3's ``predict`` signature."""

    def __init__(self, action_space: gym.spaces.Space, seed: int) -> None:
        self.action_space = action_space
        self.action_space.seed(seed)

    def predict(self, observation, state=None, episode_start=None, deterministic=False):
        n_envs = observation.shape[0] if observation.ndim > 1 else 1
        return np.stack([self.action_space.sample() for _ in range(n_envs)]), None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="cube-single", help="OGBench manipulation env family")
    parser.add_argument("--task", type=int, default=1, help="single-task id (1-5)")
    parser.add_argument("--dataset-size", type=int, default=100_000, help="play-data transitions to generate")
    parser.add_argument("--offline-updates", type=int, default=5_000)
    parser.add_argument("--online-steps", type=int, default=5_000, help="primitive env steps online")
    parser.add_argument("--eval-every", type=int, default=2_500, help="updates (offline) / env steps (online)")
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-compile", action="store_true", help="eager updates (compile_update=False)")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true", help="tiny run (for the tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.dataset_size, args.offline_updates, args.online_steps, args.eval_every, args.eval_episodes = 2000, 20, 20, 10, 1
    return args


def train_and_evaluate(job: tuple[argparse.Namespace, str, Path]) -> list[dict[str, Any]]:
    """One agent, offline then online, evaluated after every block: rows of (method, phase, x, success rate)."""
    args, method, dataset_path = job
    th.set_num_threads(1)  # the two agents share the cores
    env_id = f"{args.env}-singletask-task{args.task}-v0"
    start = time.time()
    th.manual_seed(args.seed)
    model = QC(
        "MlpPolicy",
        env_id,
        chunk_size=METHODS[method],
        actor_type="best_of_n",
        num_samples=8,
        flow_steps=10,
        batch_size=256,
        learning_starts=0,  # the pre-trained policy acts and learns from the first online step
        buffer_size=args.online_steps + 1_000,  # the online ring only: the dataset has its own block
        compile_update=not args.no_compile and not args.smoke,
        policy_kwargs=dict(net_arch=[256, 256]),
        seed=args.seed,
        device=args.device,
    )
    model.set_logger(configure(None, []))
    model.load_dataset(load_ogbench_npz(dataset_path, task_id=args.task, env=env_id))
    eval_env = wrap_chunked(gym.make(env_id), model.env_chunk_size, model.gamma)
    eval_env.reset(seed=10_000 + args.seed)  # later resets continue this RNG
    rows: list[dict[str, Any]] = []

    def evaluate(phase: str, x: int) -> None:
        # sampled chunks (fresh flow noise), as the paper evaluates
        rate = evaluate_success(model, eval_env, args.eval_episodes, deterministic=False)["success_rate"]
        rows.append(dict(method=method, phase=phase, x=x, success_rate=rate, wall_s=round(time.time() - start, 1)))
        print(f"[{time.time() - start:6.0f} s] {method:10s} {phase:8s} {x:6d}: success rate {rate:.2f}", flush=True)

    evaluate("offline", 0)
    while model.offline_updates_done < args.offline_updates:
        model.pretrain(min(args.eval_every, args.offline_updates - model.offline_updates_done), log_interval=args.eval_every)
        evaluate("offline", model.offline_updates_done)
    while model.num_timesteps < args.online_steps:
        model.learn(min(args.eval_every, args.online_steps - model.num_timesteps), reset_num_timesteps=model.num_timesteps == 0)
        evaluate("online", model.num_timesteps)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    console = Console()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env_id = f"{args.env}-singletask-task{args.task}-v0"
    start = time.time()

    dataset_path = Path(args.data_dir) / f"{args.env}-play-{args.dataset_size}-seed{args.seed}.npz"
    cached_play_dataset(dataset_path, args.env, args.dataset_size, seed=args.seed, n_jobs=-1)
    eval_env = wrap_chunked(gym.make(env_id), 5, 0.99)
    eval_env.reset(seed=10_000 + args.seed)
    random_rate = evaluate_success(RandomChunks(eval_env.action_space, args.seed), eval_env, args.eval_episodes)["success_rate"]  # type: ignore[arg-type]
    console.print(f"Random chunks: success rate {random_rate:.2f} over {args.eval_episodes} episodes")

    jobs = [(args, method, dataset_path) for method in METHODS]
    with ProcessPoolExecutor(max_workers=len(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = [row for result in pool.map(train_and_evaluate, jobs) for row in result]

    with open(out / "curves.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_curves(rows, random_rate, out / "learning_curve.png", env_id, args)

    def final(method: str, phase: str) -> float:
        return [row["success_rate"] for row in rows if row["method"] == method and row["phase"] == phase][-1]

    title = f"{env_id}: success rate over {args.eval_episodes} episodes (seed {args.seed})"
    table = Table(title=title)
    for column in ("policy", f"after {args.offline_updates} offline updates", f"after +{args.online_steps} online steps"):
        table.add_column(column)
    table.add_row("random chunks", f"{random_rate:.2f}", f"{random_rate:.2f}")
    for method in METHODS:
        table.add_row(method, f"{final(method, 'offline'):.2f}", f"{final(method, 'online'):.2f}")
    console.print(table)
    lines = [
        f"# {title}",
        "",
        f"`python -m sb3_qchunk.demo --dataset-size {args.dataset_size} --offline-updates {args.offline_updates} "
        f"--online-steps {args.online_steps} --eval-every {args.eval_every} --eval-episodes {args.eval_episodes} "
        f"--seed {args.seed}{' --no-compile' if args.no_compile else ''}`, {time.time() - start:.0f} s.",
        "",
        f"| policy | after {args.offline_updates} offline updates | after +{args.online_steps} online steps |",
        "|---|---|---|",
        f"| random chunks | {random_rate:.2f} | {random_rate:.2f} |",
        *(f"| {method} | {final(method, 'offline'):.2f} | {final(method, 'online'):.2f} |" for method in METHODS),
        "",
    ]
    (out / "summary.md").write_text("\n".join(lines))
    console.print(f"{out / 'summary.md'}, {out / 'curves.csv'}, {out / 'learning_curve.png'}; total {time.time() - start:.0f} s")


def plot_curves(rows: list[dict[str, Any]], random_rate: float, path: Path, env_id: str, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for i, method in enumerate(METHODS):
        offline = [(r["x"], r["success_rate"]) for r in rows if r["method"] == method and r["phase"] == "offline"]
        online = [(r["x"], r["success_rate"]) for r in rows if r["method"] == method and r["phase"] == "online"]
        axes[0].plot(*zip(*offline), marker="o", color=f"C{i}", label=method)
        axes[1].plot([0] + [x for x, _ in online], [offline[-1][1]] + [r for _, r in online], marker="o", color=f"C{i}", label=method)
    axes[0].set_xlabel("offline gradient updates")
    axes[0].set_ylabel("success rate")
    axes[1].set_xlabel("online env steps")
    for ax in axes:
        ax.axhline(random_rate, color="gray", linestyle="--", label="random chunks")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[1].legend(loc="upper left")
    fig.suptitle(f"QC against BFN, offline-to-online on {env_id} ({args.eval_episodes} episodes per point, seed {args.seed})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
