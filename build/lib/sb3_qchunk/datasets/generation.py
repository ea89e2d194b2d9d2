"""
Local generation of OGBench manipulation "play" datasets with OGBench's own scripted oracles (no download), in the
official npz layout. Command line::

    python -m sb3_qchunk.datasets generate --env cube-single --size 1000000 --out data/cube-single-play.npz --seed 0
"""

import argparse
import math
import os
import pathlib
import re
import time
from typing import Any

import gymnasium as gym
import numpy as np
from tqdm import tqdm


def _manipspace_env_id(env_name: str) -> str:
    """``'cube-single'``, ``'cube-single-v0'`` or ``'cube-single-play-v0'`` -> ``'cube-single-v0'``."""
    match = re.fullmatch(r"(?P<base>.+?)(?:-play)?(?:-(?P<version>v\d+))?", env_name)
    base, version = match["base"], match["version"] or "v0"
    if base.startswith("visual-"):
        raise ValueError(f"{env_name}: pixel-observation datasets are not supported, use the state-based env")
    if not (base.startswith("cube-") or base == "scene" or base.startswith("puzzle-")):
        raise ValueError(
            f"{env_name}: generation supports the OGBench manipulation envs cube-*, scene and puzzle-* "
            "(e.g. 'cube-single', 'cube-double', 'scene', 'puzzle-3x3')"
        )
    env_id = f"{base}-{version}"
    import ogbench  # noqa: F401  (registers the OGBench envs)

    gym.spec(env_id)  # raises if unknown
    return env_id


def _p_stack(env_id: str) -> float:
    """Per-episode probability of stacking the target cube, as in OGBench's ``generate_manipspace.py``."""
    if "single" in env_id:
        return 0.0
    if "double" in env_id:
        return np.random.uniform(0.0, 0.25)
    if "triple" in env_id:
        return np.random.uniform(0.05, 0.35)
    if "quadruple" in env_id:
        return np.random.uniform(0.1, 0.5)
    if "octuple" in env_id:
        return np.random.uniform(0.0, 0.35)
    return 0.5


def _plan_oracles(env: gym.Env, env_id: str, noise: float, noise_smoothing: float) -> dict[str, Any]:
    """The scripted plan oracles of the official play datasets, keyed by the env's ``privileged/target_task``."""
    from ogbench.manipspace.oracles.plan.button_plan import ButtonPlanOracle
    from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle
    from ogbench.manipspace.oracles.plan.drawer_plan import DrawerPlanOracle
    from ogbench.manipspace.oracles.plan.window_plan import WindowPlanOracle

    kwargs = dict(env=env, noise=noise, noise_smoothing=noise_smoothing)
    if "cube" in env_id:
        return {"cube": CubePlanOracle(**kwargs)}
    if "scene" in env_id:
        return {
            "cube": CubePlanOracle(**kwargs),
            "button": ButtonPlanOracle(**kwargs),
            "drawer": DrawerPlanOracle(**kwargs),
            "window": WindowPlanOracle(**kwargs),
        }
    return {"button": ButtonPlanOracle(gripper_always_closed=True, **kwargs)}  # puzzle


def _scene_episode_is_healthy(qpos: np.ndarray) -> bool:
    """OGBench's health check for scene episodes: the cube stays visible unless it is in the drawer."""
    block_xyzs = qpos[:, 14:17]
    if (block_xyzs[:, 1] >= 0.29).any():  # too far right
        return False
    too_far_left = (block_xyzs[:, 1] <= -0.3) & ((block_xyzs[:, 2] < 0.06) | (block_xyzs[:, 2] > 0.08))
    return not too_far_left.any()


def generate_ogbench_dataset(
    env_name: str,
    size: int,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    episode_length: int = 1000,
    noise: float = 0.1,
    noise_smoothing: float = 0.5,
    p_random_action: float = 0.0,
    progress_bar: bool = True,
) -> dict[str, np.ndarray]:
    """
    Generate an OGBench manipulation "play" dataset locally, following OGBench's
    ``data_gen_scripts/generate_manipspace.py --dataset_type=play``: the env is made with
    ``terminate_at_goal=False, mode='data_collection'``; the noisy scripted *plan* oracle of the current target
    task (cube / button / drawer / window; puzzle uses the button oracle with the gripper always closed) acts,
    and when it is done the env gets a new target (``env.unwrapped.set_new_target(p_stack=...)``); actions are
    clipped to [-1, 1]; scene episodes failing OGBench's health check are regenerated.

    Each episode has ``episode_length + 1`` rows (the official ``max_episode_steps=1001``): the last row only
    holds the final observation, so it gives ``episode_length`` transitions with :func:`load_ogbench_npz`.
    ``ceil(size / episode_length)`` episodes are generated (the official 1M datasets: 1000 episodes of 1001
    rows). No validation split is made.

    Seeding: the env's RNG is seeded through the first ``reset(seed=seed)``; the oracles draw from NumPy's
    global RNG (as in OGBench), which is seeded with ``seed`` for the run and restored afterwards. Same seed,
    same arrays.

    :param env_name: ``'cube-single'``, ``'cube-double'``, ``'cube-triple'``, ``'cube-quadruple'``,
        ``'scene'``, ``'puzzle-3x3'``, ... (``-v0`` and ``-play`` suffixes are accepted)
    :param size: number of transitions wanted (rounded up to whole episodes)
    :param seed: random seed
    :param out: ``.npz`` path to save to (compressed, official key layout), or None
    :param episode_length: transitions per episode (official: 1000)
    :param noise: oracle plan noise level (official: 0.1)
    :param noise_smoothing: oracle plan noise smoothing (official: 0.5)
    :param p_random_action: probability of a uniformly random action instead of the oracle's (official play: 0)
    :param progress_bar: show a tqdm progress bar
    :return: the arrays saved: ``observations``, ``actions``, ``terminals`` (bool), ``qpos``, ``qvel``
        (float32), and ``button_states`` (int64) for scene and puzzle
    """
    if size <= 0 or episode_length <= 0:
        raise ValueError(f"size and episode_length must be positive, got {size} and {episode_length}")
    env_id = _manipspace_env_id(env_name)
    num_episodes = math.ceil(size / episode_length)
    rows_per_episode = episode_length + 1
    total_rows = num_episodes * rows_per_episode

    global_rng_state = np.random.get_state()
    np.random.seed(seed)
    env = gym.make(env_id, terminate_at_goal=False, mode="data_collection", max_episode_steps=rows_per_episode)
    try:
        agents = _plan_oracles(env, env_id, noise, noise_smoothing)
        has_button_states = hasattr(env.unwrapped, "_cur_button_states")
        action_space = env.action_space  # the env builds a new Box at each access: keep one, seeded
        action_space.seed(seed)
        ob, info = env.reset(seed=seed)
        fresh_reset = True
        dataset = {
            "observations": np.zeros((total_rows, *np.shape(ob)), dtype=np.float32),
            "actions": np.zeros((total_rows, *action_space.shape), dtype=np.float32),
            "terminals": np.zeros(total_rows, dtype=bool),
            "qpos": np.zeros((total_rows, len(info["qpos"])), dtype=np.float32),
            "qvel": np.zeros((total_rows, len(info["qvel"])), dtype=np.float32),
        }
        if has_button_states:
            dataset["button_states"] = np.zeros((total_rows, len(info["prev_button_states"])), dtype=np.int64)

        row = 0
        start = time.perf_counter()
        with tqdm(total=total_rows, unit="step", disable=not progress_bar, desc=env_id) as pbar:
            for _ in range(num_episodes):
                while True:  # scene episodes are regenerated when they fail the health check
                    if not fresh_reset:
                        ob, info = env.reset()
                    fresh_reset = False
                    episode_start = row
                    p_stack = _p_stack(env_id)
                    agent = agents[info["privileged/target_task"]]
                    agent.reset(ob, info)
                    done = False
                    while not done:
                        if np.random.rand() < p_random_action:
                            action = action_space.sample()
                        else:
                            action = np.array(agent.select_action(ob, info))
                        action = np.clip(action, -1, 1)
                        next_ob, _, terminated, truncated, info = env.step(action)
                        done = terminated or truncated

                        if agent.done:  # new target once the oracle has finished its plan
                            agent_ob, agent_info = env.unwrapped.set_new_target(p_stack=p_stack)
                            agent = agents[agent_info["privileged/target_task"]]
                            agent.reset(agent_ob, agent_info)

                        dataset["observations"][row] = ob
                        dataset["actions"][row] = action
                        dataset["terminals"][row] = done
                        dataset["qpos"][row] = info["prev_qpos"]
                        dataset["qvel"][row] = info["prev_qvel"]
                        if has_button_states:
                            dataset["button_states"][row] = info["prev_button_states"]
                        ob = next_ob
                        row += 1
                        pbar.update(1)

                    if "scene" not in env_id or _scene_episode_is_healthy(dataset["qpos"][episode_start:row]):
                        break
                    row = episode_start  # drop the unhealthy episode
                    pbar.n = row
                    pbar.refresh()
        elapsed = time.perf_counter() - start
    finally:
        env.close()
        np.random.set_state(global_rng_state)

    dataset = {k: v[:row] for k, v in dataset.items()}
    print(f"{env_id}: {num_episodes} episodes, {row} steps in {elapsed:.1f} s ({row / elapsed:.0f} steps/s)")
    if out is not None:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        np.savez_compressed(out, **dataset)
        print(f"Saved to {out}")
    return dataset


def cached_play_dataset(
    path: str | os.PathLike, env_name: str, size: int, seed: int = 0, progress_bar: bool = True
) -> pathlib.Path:
    """
    ``path`` if it exists, else a play dataset generated there with :func:`generate_ogbench_dataset` (a cache
    for scripts that need the same data run after run).

    :param path: the ``.npz`` file
    :param env_name: OGBench env family, e.g. ``'cube-single'``
    :param size: transitions to generate if the file is missing
    :param seed: generation seed
    :param progress_bar: show the generation's progress bar
    :return: the path
    """
    path = pathlib.Path(path)
    if not path.exists():
        print(f"Generating {size} transitions of {env_name} play data into {path}", flush=True)
        generate_ogbench_dataset(env_name, size, seed=seed, out=path, progress_bar=progress_bar)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sb3_qchunk.datasets", description="Generate OGBench manipulation play datasets locally.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate an OGBench manipulation play dataset (official npz layout)")
    gen.add_argument("--env", required=True, help="cube-single, cube-double, scene, puzzle-3x3, ...")
    gen.add_argument("--size", type=int, default=1_000_000, help="number of transitions (rounded up to episodes)")
    gen.add_argument("--out", required=True, help="output .npz path")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--episode-length", type=int, default=1000, help="transitions per episode (official: 1000)")
    gen.add_argument("--noise", type=float, default=0.1, help="oracle plan noise (official: 0.1)")
    gen.add_argument("--noise-smoothing", type=float, default=0.5, help="oracle noise smoothing (official: 0.5)")
    gen.add_argument("--no-progress-bar", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "generate":
        generate_ogbench_dataset(
            args.env,
            args.size,
            seed=args.seed,
            out=args.out,
            episode_length=args.episode_length,
            noise=args.noise,
            noise_smoothing=args.noise_smoothing,
            progress_bar=not args.no_progress_bar,
        )


if __name__ == "__main__":
    main()
