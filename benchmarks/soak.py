"""
Soak test of QC's online loop: a run long enough to wrap a small ring buffer many times, with training on.

The env's observation is (global step counter, step within the episode), so every window the buffer samples can
be checked against the env's own clock: its last next-observation must be exactly ``chunk_size`` global steps
after its first observation. A window that crossed a ring's write position (newest data joined to the oldest) or
mixed two parallel envs would show another distance. At every checkpoint the script samples windows and checks
them, and records the process's resident memory; at the end it says whether memory stayed flat after the rings
were full.

    python benchmarks/soak.py --out benchmarks/results/soak_<machine>.md         # 200k primitive steps, ring of 1000
    python benchmarks/soak.py --smoke                                       # tiny (used by the tests)
"""

import argparse
import os
import resource
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

from sb3_qchunk import QC, ChunkedActionWrapper
from throughput import report_header  # noqa: E402  (benchmarks/ is the script's directory)


class ClockEnv(gym.Env):
    """Observation (global steps taken, steps in this episode); episodes of random length 3..40; reward 1 at the end."""

    observation_space = spaces.Box(0.0, np.inf, (2,), np.float64)
    action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)

    def __init__(self) -> None:
        self.total, self.t, self.length = 0, 0, 10

    def _obs(self) -> np.ndarray:
        return np.array([self.total, self.t], dtype=np.float64)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.t, self.length = 0, int(self.np_random.integers(3, 41))
        return self._obs(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self.total += 1
        self.t += 1
        end = self.t >= self.length
        terminated = end and self.length % 2 == 0
        return self._obs(), float(end), terminated, end and not terminated, {}


def resident_mib() -> float:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Checkpoints(BaseCallback):
    """Every ``every`` primitive steps: sample windows, check them against the env clock, record memory."""

    def __init__(self, every: int, n_windows: int) -> None:
        super().__init__()
        self.every, self.n_windows = every, n_windows
        self.next_at, self.rows = every, []
        self.checked, self.bad = 0, 0

    def _on_step(self) -> bool:
        if self.num_timesteps < self.next_at:
            return True
        self.next_at += self.every
        buffer = self.model.replay_buffer
        batch = buffer.sample(self.n_windows)
        distance = (batch.next_observations[:, 0] - batch.observations[:, 0]).cpu().numpy()
        self.bad += int((distance != buffer.chunk_size).sum())
        self.checked += len(distance)
        self.rows.append(
            dict(
                steps=self.num_timesteps,
                wraps=int(self.num_timesteps / (buffer.buffer_size * buffer.n_envs)),
                stored=buffer.online_size(),
                rss_mib=resident_mib(),
                bad_windows=self.bad,
            )
        )
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200_000, help="primitive steps")
    parser.add_argument("--buffer-size", type=int, default=1000, help="ring size over all envs")
    parser.add_argument("--n-envs", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=5)
    parser.add_argument("--checkpoints", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="markdown report")
    parser.add_argument("--smoke", action="store_true", help="tiny run")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.buffer_size, args.checkpoints = 2000, 100, 4

    env = make_vec_env(ClockEnv, n_envs=args.n_envs, seed=0, wrapper_class=ChunkedActionWrapper, wrapper_kwargs=dict(chunk_size=args.chunk_size))
    model = QC(
        "MlpPolicy",
        env,
        chunk_size=args.chunk_size,
        buffer_size=args.buffer_size,
        learning_starts=100,
        batch_size=32,
        gradient_steps=1,
        num_samples=2,
        flow_steps=2,
        policy_kwargs=dict(net_arch=[16, 16]),
        seed=0,
    )
    checkpoints = Checkpoints(args.steps // args.checkpoints, n_windows=512)
    start = time.perf_counter()
    model.learn(args.steps, callback=checkpoints)
    elapsed = time.perf_counter() - start

    rows = checkpoints.rows
    full = [row for row in rows if row["stored"] == model.replay_buffer.buffer_size * args.n_envs]
    growth = full[-1]["rss_mib"] - full[0]["rss_mib"] if len(full) >= 2 else float("nan")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines = [
        *report_header("Soak: QC's online loop over a small ring buffer", "cpu"),
        "",
        f"{args.steps} primitive steps, rings of {args.buffer_size // args.n_envs} transitions x {args.n_envs} envs, "
        f"chunk_size {args.chunk_size}: {elapsed:.0f} s, {checkpoints.n_calls} chunks per env, each followed by one "
        "gradient step once 100 steps were stored.",
        "",
        "| primitive steps | ring wraps | stored | resident MiB | bad windows so far |",
        "|---|---|---|---|---|",
        *(
            f"| {r['steps']} | {r['wraps']} | {r['stored']} | {r['rss_mib']:.1f} | {r['bad_windows']} |"
            for r in rows
        ),
        "",
        f"Windows checked against the env clock: {checkpoints.checked}, crossing a write position or mixing envs: "
        f"{checkpoints.bad}. Resident memory from the first to the last checkpoint with full rings: "
        f"{growth:+.1f} MiB (peak {peak_mib:.0f} MiB).",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    if checkpoints.bad:
        raise SystemExit(f"{checkpoints.bad} windows crossed a write position or mixed envs")


if __name__ == "__main__":
    main()
