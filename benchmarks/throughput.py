"""
Gradient updates per second of QC (best-of-N and distill) against SB3's SAC with the same networks, and the
latency of choosing one chunk.

Both algorithms train from replay buffers filled with synthetic transitions (obs 28, action 5: OGBench
cube-single's sizes), so the numbers measure the update itself, not env stepping.

    python benchmarks/throughput.py                 # small and paper configs, prints a markdown table
    python benchmarks/throughput.py --smoke         # a few updates of a tiny config (used by the tests)
    python benchmarks/throughput.py --out benchmarks/results/throughput.md
"""

import argparse
import datetime
import os
import platform
import time

import gymnasium as gym
import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3 import SAC

from sb3_qchunk import QC

OBS_DIM, ACTION_DIM = 28, 5


class SyntheticEnv(gym.Env):
    """Random observations, never terminates on its own: only its spaces matter here."""

    def __init__(self) -> None:
        self.observation_space = spaces.Box(-10.0, 10.0, (OBS_DIM,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


def fill_qc_buffer(model: QC, n: int, rng: np.random.Generator) -> None:
    episode_ends = np.zeros(n, dtype=bool)
    episode_ends[999::1000] = True
    model.replay_buffer.add(
        {
            "obs": rng.standard_normal((n, OBS_DIM), dtype=np.float32),
            "next_obs": rng.standard_normal((n, OBS_DIM), dtype=np.float32),
            "action": rng.uniform(-1, 1, (n, ACTION_DIM)).astype(np.float32),
            "reward": -(rng.random(n) < 0.9).astype(np.float32),
            "terminated": np.zeros(n, dtype=bool),
            "truncated": episode_ends,
        }
    )


def fill_sac_buffer(model: SAC, n: int, rng: np.random.Generator) -> None:
    for _ in range(n):
        model.replay_buffer.add(
            rng.standard_normal((1, OBS_DIM), dtype=np.float32),
            rng.standard_normal((1, OBS_DIM), dtype=np.float32),
            rng.uniform(-1, 1, (1, ACTION_DIM)).astype(np.float32),
            np.array([-1.0]),
            np.array([False]),
            [{}],
        )


def time_updates(train_fn, n_updates: int, warmup: int) -> float:
    """Updates per second of ``train_fn(gradient_steps)``, after ``warmup`` updates."""
    train_fn(warmup)
    start = time.perf_counter()
    train_fn(n_updates)
    return n_updates / (time.perf_counter() - start)


def bench_qc(actor_type: str, net_arch: list[int], num_samples: int, n_updates: int, batch_size: int) -> dict[str, float]:
    th.manual_seed(0)
    model = QC(
        "MlpPolicy",
        SyntheticEnv(),
        chunk_size=5,
        actor_type=actor_type,
        num_samples=num_samples,
        flow_steps=10,
        batch_size=batch_size,
        buffer_size=20_000,
        policy_kwargs=dict(net_arch=net_arch),
        seed=0,
    )
    model.set_logger(_null_logger())
    fill_qc_buffer(model, 10_000, np.random.default_rng(0))
    ups = time_updates(lambda n: model.train(n, batch_size), n_updates, warmup=max(2, n_updates // 10))
    obs = np.zeros(OBS_DIM, dtype=np.float32)
    model.predict(obs)
    n_predict = 50
    start = time.perf_counter()
    for _ in range(n_predict):
        model.predict(obs)
    latency_ms = 1000 * (time.perf_counter() - start) / n_predict
    return {"updates_per_s": ups, "predict_ms": latency_ms}


def bench_sac(net_arch: list[int], n_updates: int, batch_size: int) -> float:
    th.manual_seed(0)
    model = SAC("MlpPolicy", SyntheticEnv(), batch_size=batch_size, buffer_size=20_000, policy_kwargs=dict(net_arch=net_arch), seed=0)
    model.set_logger(_null_logger())
    fill_sac_buffer(model, 2_000, np.random.default_rng(0))
    return time_updates(lambda n: model.train(n, batch_size), n_updates, warmup=max(2, n_updates // 10))


def _null_logger():
    from stable_baselines3.common.logger import configure

    return configure(None, [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny config, a few updates (for the tests)")
    parser.add_argument("--configs", nargs="+", default=["small", "paper"], choices=["small", "paper"])
    parser.add_argument("--out", type=str, default=None, help="write the markdown table to this file")
    args = parser.parse_args()

    configs = {
        "small": dict(net_arch=[256, 256], num_samples=8, n_updates=200, sac_updates=500),
        "paper": dict(net_arch=[512, 512, 512, 512], num_samples=32, n_updates=10, sac_updates=100),
    }
    batch_size = 256
    if args.smoke:
        configs = {"smoke": dict(net_arch=[16, 16], num_samples=2, n_updates=3, sac_updates=3)}
        batch_size = 8
    else:
        configs = {name: configs[name] for name in args.configs}

    rows = []
    for name, config in configs.items():
        sac_ups = bench_sac(config["net_arch"], config["sac_updates"], batch_size)
        for actor_type in ("best_of_n", "distill"):
            result = bench_qc(actor_type, config["net_arch"], config["num_samples"], config["n_updates"], batch_size)
            rows.append(
                f"| {name} | {'x'.join(map(str, config['net_arch']))} | {config['num_samples']} | {actor_type} | "
                f"{result['updates_per_s']:.2f} | {sac_ups:.1f} | {result['updates_per_s'] / sac_ups:.2f} | "
                f"{result['predict_ms']:.2f} |"
            )
            print(rows[-1], flush=True)

    header = [
        f"Date: {datetime.date.today().isoformat()}; machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {th.__version__} ({th.get_num_threads()} threads), CPU, fp32.",
        f"Batch {batch_size}, h=5, obs {OBS_DIM}, action {ACTION_DIM}, flow_steps 10, 2 critics.",
        "",
        "| config | net | N | actor | QC updates/s | SAC updates/s | QC / SAC | predict ms/chunk |",
        "|---|---|---|---|---|---|---|---|",
    ]
    table = "\n".join(header + rows)
    print()
    print(table)
    if args.out:
        with open(args.out, "w") as file:
            file.write(table + "\n")


if __name__ == "__main__":
    main()
