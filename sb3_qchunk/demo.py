"""
The main job: offline-to-online QC on OGBench cube-single, at a scale a 2-core CPU runs in about 10 minutes.

1. Generate a small cube-single "play" dataset with OGBench's scripted oracles (cached under ``data/``).
2. Measure a random policy's success rate on the single-task env.
3. Pre-train QC offline on the dataset (relabelled for the task), evaluating every few thousand updates.
4. Fine-tune online, the new transitions going into the same replay buffer, evaluating as it goes.
5. Print a table of success rates and save a learning-curve PNG and a CSV under ``--out``.

    python -m sb3_qchunk.demo                      # defaults below
    python -m sb3_qchunk.demo --offline-updates 20000 --online-steps 20000 --eval-episodes 50
"""

import argparse
import csv
import os
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch as th
from rich.console import Console
from rich.table import Table
from stable_baselines3.common.logger import configure

from sb3_qchunk import QC
from sb3_qchunk.common.evaluation import evaluate_success
from sb3_qchunk.datasets import cached_play_dataset, load_ogbench_npz
from sb3_qchunk.common.env_util import wrap_chunked


class RandomChunks:
    """A uniformly random chunk policy with SB3's ``predict`` signature."""

    def __init__(self, action_space: gym.spaces.Space, seed: int) -> None:
        self.action_space = action_space
        self.action_space.seed(seed)

    def predict(self, observation, state=None, episode_start=None, deterministic=False):
        n_envs = observation.shape[0] if observation.ndim > 1 else 1
        return np.stack([self.action_space.sample() for _ in range(n_envs)]), None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="cube-single", help="OGBench manipulation env family")
    parser.add_argument("--task", type=int, default=1, help="single-task id (1-5)")
    parser.add_argument("--dataset-size", type=int, default=20_000, help="play-data transitions to generate")
    parser.add_argument("--offline-updates", type=int, default=6_000)
    parser.add_argument("--online-steps", type=int, default=6_000, help="primitive env steps online")
    parser.add_argument("--eval-every", type=int, default=2_000, help="updates (offline) / env steps (online)")
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--actor-type", default="distill", choices=["best_of_n", "distill"])
    parser.add_argument("--chunk-size", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--device", default="auto")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    console = Console()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env_id = f"{args.env}-singletask-task{args.task}-v0"
    start = time.time()

    dataset_path = Path(args.data_dir) / f"{args.env}-play-{args.dataset_size}-seed{args.seed}.npz"
    if dataset_path.exists():
        console.print(f"Using the cached dataset {dataset_path}")
    cached_play_dataset(dataset_path, args.env, args.dataset_size, seed=args.seed)
    dataset = load_ogbench_npz(dataset_path, task_id=args.task, env=env_id)
    console.print(
        f"{len(dataset['rewards'])} transitions, {int(dataset['terminals'].sum())} episodes, "
        f"{100 * float(np.mean(dataset['rewards'] == 0)):.1f}% of steps at the task's goal"
    )

    eval_env = wrap_chunked(gym.make(env_id), args.chunk_size, 0.99)
    th.manual_seed(args.seed)
    model = QC(
        "MlpPolicy",
        env_id,
        chunk_size=args.chunk_size,
        actor_type=args.actor_type,
        num_samples=8,
        flow_steps=10,
        alpha=100.0,
        batch_size=256,
        learning_starts=1_000,
        policy_kwargs=dict(net_arch=[256, 256]),
        seed=args.seed,
        device=args.device,
    )
    model.set_logger(configure(str(out), ["csv"]))
    model.load_dataset(dataset)

    random_policy = RandomChunks(eval_env.action_space, args.seed)
    random_rate = evaluate_success(random_policy, eval_env, args.eval_episodes)["success_rate"]  # type: ignore[arg-type]
    console.print(f"Random chunks: success rate {random_rate:.2f} over {args.eval_episodes} episodes")

    curve: list[tuple[str, int, float]] = []  # (phase, x, success rate)

    def evaluate(phase: str, x: int) -> float:
        rate = evaluate_success(model, eval_env, args.eval_episodes)["success_rate"]
        curve.append((phase, x, rate))
        console.print(f"[{time.time() - start:6.0f} s] {phase:8s} {x:7d}: success rate {rate:.2f}")
        return rate

    evaluate("offline", 0)
    done = 0
    while done < args.offline_updates:
        block = min(args.eval_every, args.offline_updates - done)
        model.pretrain(block, log_interval=block)
        done += block
        evaluate("offline", done)
    after_offline = curve[-1][2]

    collected = 0
    while collected < args.online_steps:
        block = min(args.eval_every, args.online_steps - collected)
        model.learn(block, reset_num_timesteps=collected == 0)
        collected = model.num_timesteps
        evaluate("online", collected)
    after_online = curve[-1][2]

    model.save(out / "qc_model")
    with open(out / "curve.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["phase", "x", "success_rate"])
        writer.writerows(curve)
    plot_curve(curve, random_rate, out / "learning_curve.png", env_id, args)

    table = Table(title=f"QC ({args.actor_type}, h={args.chunk_size}) on {env_id}, {args.eval_episodes} eval episodes")
    for column in ("policy", "success rate"):
        table.add_column(column)
    table.add_row("random chunks", f"{random_rate:.2f}")
    table.add_row(f"QC after {args.offline_updates} offline updates", f"{after_offline:.2f}")
    table.add_row(f"QC after {collected} more online steps", f"{after_online:.2f}")
    console.print(table)
    console.print(f"Curve: {out / 'learning_curve.png'}, {out / 'curve.csv'}; model: {out / 'qc_model.zip'}; "
                  f"total {time.time() - start:.0f} s")


def plot_curve(curve: list[tuple[str, int, float]], random_rate: float, path: os.PathLike, env_id: str, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offline = [(x, r) for phase, x, r in curve if phase == "offline"]
    online = [(x, r) for phase, x, r in curve if phase == "online"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    axes[0].plot(*zip(*offline), marker="o")
    axes[0].set_xlabel("offline gradient updates")
    axes[0].set_ylabel("success rate")
    axes[1].plot([0] + [x for x, _ in online], [offline[-1][1]] + [r for _, r in online], marker="o", color="C1")
    axes[1].set_xlabel("online env steps")
    for ax in axes:
        ax.axhline(random_rate, color="gray", linestyle="--", label="random chunks")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper left")
    fig.suptitle(f"QC ({args.actor_type}, h={args.chunk_size}) offline-to-online on {env_id}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
