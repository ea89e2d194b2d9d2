"""
Execution modes of one trained QC model on OGBench cube-single: open loop (whole chunks, as in training), receding
horizon (a new chunk every k steps) and temporal ensembling (a chunk per step, ACT's weighted mean), on the plain
env, without and with Gaussian noise added to every executed action (a perturbation that replanning can correct
and an open-loop chunk cannot).

1. The demo's data: 100k transitions of cube-single play data (cached under ``data/``).
2. One QC model (h=5, best-of-8, 256x256), trained as in ``make demo``: 5000 offline updates, then 5000 online
   steps; saved, or loaded with ``--model``.
3. Each mode x noise level: ``evaluate_success`` of a ``ChunkExecutor`` on the plain env, sampled chunks (as the
   paper evaluates), the same episode seeds for every setting.

    python benchmarks/execution.py --out benchmarks/results/execution_<machine>.md
    python benchmarks/execution.py --smoke
"""

import argparse
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import ogbench  # noqa: F401  (registers the OGBench envs)
import torch as th
from stable_baselines3.common.logger import configure

from sb3_qchunk import QC
from sb3_qchunk.common.evaluation import evaluate_success
from sb3_qchunk.common.execution import ChunkExecutor
from sb3_qchunk.datasets import cached_play_dataset, load_ogbench_npz
from throughput import report_header, write_report  # benchmarks/ is the script's directory

ENV_ID = "cube-single-singletask-task1-v0"
#: name -> ChunkExecutor settings
MODES = {
    "open loop": {},
    "receding, replan every 3": {"replan_every": 3},
    "receding, replan every 1": {"replan_every": 1},
    "temporal ensemble m=0.01": {"temporal_ensemble": 0.01},
    "temporal ensemble m=0.5": {"temporal_ensemble": 0.5},
}


class GaussianActionNoise(gym.ActionWrapper):
    """Adds ``N(0, sigma^2)`` noise to every executed action, clipped to the action bounds (its own seeded RNG)."""

    def __init__(self, env: gym.Env, sigma: float, seed: int) -> None:
        super().__init__(env)
        self.sigma, self.rng = sigma, np.random.default_rng(seed)

    def action(self, action: np.ndarray) -> np.ndarray:
        noisy = action + self.sigma * self.rng.standard_normal(np.shape(action))
        return np.clip(noisy, self.action_space.low, self.action_space.high).astype(self.action_space.dtype)


def train(args: argparse.Namespace, dataset: Path) -> QC:
    """QC as ``make demo`` trains it (one process)."""
    th.manual_seed(args.seed)
    model = QC(
        "MlpPolicy",
        ENV_ID,
        chunk_size=5,
        num_samples=8,
        batch_size=256,
        learning_starts=0,
        buffer_size=args.online_steps + 1_000,
        compile_update=not args.smoke,
        policy_kwargs=dict(net_arch=[256, 256]),
        seed=args.seed,
    )
    model.set_logger(configure(None, []))
    model.load_dataset(load_ogbench_npz(dataset, task_id=1, env=ENV_ID))
    model.pretrain(args.offline_updates)
    model.learn(args.online_steps)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a saved QC model (h=5 on cube-single) instead of training one")
    parser.add_argument("--save-model", type=Path, default=Path("runs/execution/qc_cube_single"), help="where the trained model goes")
    parser.add_argument("--dataset-size", type=int, default=100_000)
    parser.add_argument("--offline-updates", type=int, default=5_000)
    parser.add_argument("--online-steps", type=int, default=5_000)
    parser.add_argument("--episodes", type=int, default=20, help="evaluation episodes per setting")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.3], help="std of the action noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--out", type=Path, default=None, help="markdown report")
    parser.add_argument("--smoke", action="store_true", help="tiny run (for the tests)")
    args = parser.parse_args()
    if args.smoke:
        args.dataset_size, args.offline_updates, args.online_steps, args.episodes = 2_000, 10, 10, 1
    start = time.time()
    if args.model is not None:
        model = QC.load(args.model)
    else:
        dataset = args.data_dir / f"cube-single-play-{args.dataset_size}-seed{args.seed}.npz"
        model = train(args, cached_play_dataset(dataset, "cube-single", args.dataset_size, seed=args.seed, n_jobs=-1))
        model.save(args.save_model)
    trained_s = time.time() - start
    rows = []
    for sigma in args.noise:
        for name, settings in MODES.items():
            env = gym.make(ENV_ID)
            if sigma > 0:
                env = GaussianActionNoise(env, sigma, seed=args.seed)
            env.reset(seed=10_000 + args.seed)  # later resets continue this RNG: the same episodes for every setting
            th.manual_seed(args.seed)
            result = evaluate_success(ChunkExecutor(model, **settings), env, args.episodes, deterministic=False)
            rows.append((sigma, name, result["success_rate"], result["mean_length"]))
            print(f"noise {sigma:.2f} | {name:26s} | success {result['success_rate']:.2f}", flush=True)
    lines = [
        *report_header("Execution modes of one QC model on cube-single, with and without action noise", "cpu"),
        "",
        f"One QC model (h=5, best-of-8, 256x256, seed {args.seed}) trained as in `make demo` "
        f"({args.offline_updates} offline updates on {args.dataset_size} play transitions, then {args.online_steps} online "
        f"steps; {'loaded from ' + str(args.model) if args.model else f'{trained_s:.0f} s'}), evaluated on "
        f"`{ENV_ID}` through `ChunkExecutor`: {args.episodes} episodes per setting, sampled chunks, the same episode "
        "seeds for every setting; the noise is N(0, std^2) added to every executed action, clipped to [-1, 1].",
        "",
        "| action noise std | execution | success rate | mean episode length |",
        "|---|---|---|---|",
        *(f"| {sigma:.2f} | {name} | {rate:.2f} | {length:.0f} |" for sigma, name, rate, length in rows),
        "",
        f"Resolution: {args.episodes} episodes, so a success rate moves in steps of {1 / args.episodes:.2f}; one model and seed.",
        "",
    ]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
