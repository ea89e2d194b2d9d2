"""
Local generation of OGBench manipulation "play" datasets with OGBench's own scripted oracles (no download), in the
official npz layout. Command line::

    python -m sb3_qchunk.datasets generate --env cube-single --size 1000000 --out data/cube-single-play.npz --seed 0
"""

import argparse
import json
import math
import multiprocessing
import os
import pathlib
import re
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import gymnasium as gym
import numpy as np
from tqdm import tqdm


#: the version of the episode seeding scheme, recorded with cached datasets
GENERATION_RECIPE = "per-episode-seed-1"


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


class _EpisodeGenerator:
    """
    One env and its oracles, generating whole play episodes, each a function of ``(seed, episode index)`` only: the
    env, its action space and NumPy's global RNG (which OGBench's oracles draw from) are seeded per episode, so the
    arrays are the same however the episodes are shared out among processes.
    """

    def __init__(self, env_id: str, seed: int, episode_length: int, noise: float, noise_smoothing: float, p_random_action: float) -> None:
        import ogbench  # noqa: F401  (registers the OGBench envs, also in worker processes)

        self.env_id, self.seed, self.p_random_action = env_id, seed, p_random_action
        self.rows_per_episode = episode_length + 1
        self.env = gym.make(env_id, terminate_at_goal=False, mode="data_collection", max_episode_steps=self.rows_per_episode)
        self.agents = _plan_oracles(self.env, env_id, noise, noise_smoothing)
        self.has_button_states = hasattr(self.env.unwrapped, "_cur_button_states")
        self.action_space = self.env.action_space  # the env builds a new Box at each access: keep one

    def episode_seed(self, index: int) -> int:
        return int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0])

    def episode(self, index: int) -> dict[str, np.ndarray]:
        """The rows of episode ``index`` (scene episodes are regenerated until they pass OGBench's health check)."""
        episode_seed = self.episode_seed(index)
        global_rng_state = np.random.get_state()
        np.random.seed(episode_seed)
        self.action_space.seed(episode_seed)
        try:
            ob, info = self.env.reset(seed=episode_seed)
            while True:
                episode = self._rollout(ob, info)
                if "scene" not in self.env_id or _scene_episode_is_healthy(episode["qpos"]):
                    return episode
                ob, info = self.env.reset()  # continues the episode's RNG
        finally:
            np.random.set_state(global_rng_state)

    def _rollout(self, ob: np.ndarray, info: dict[str, Any]) -> dict[str, np.ndarray]:
        rows = self.rows_per_episode
        episode = {
            "observations": np.zeros((rows, *np.shape(ob)), dtype=np.float32),
            "actions": np.zeros((rows, *self.action_space.shape), dtype=np.float32),
            "terminals": np.zeros(rows, dtype=bool),
            "qpos": np.zeros((rows, len(info["qpos"])), dtype=np.float32),
            "qvel": np.zeros((rows, len(info["qvel"])), dtype=np.float32),
        }
        if self.has_button_states:
            episode["button_states"] = np.zeros((rows, len(info["prev_button_states"])), dtype=np.int64)
        p_stack = _p_stack(self.env_id)
        agent = self.agents[info["privileged/target_task"]]
        agent.reset(ob, info)
        row, done = 0, False
        while not done:
            if np.random.rand() < self.p_random_action:
                action = self.action_space.sample()
            else:
                action = np.array(agent.select_action(ob, info))
            action = np.clip(action, -1, 1)
            next_ob, _, terminated, truncated, info = self.env.step(action)
            done = terminated or truncated
            if agent.done:  # new target once the oracle has finished its plan
                agent_ob, agent_info = self.env.unwrapped.set_new_target(p_stack=p_stack)
                agent = self.agents[agent_info["privileged/target_task"]]
                agent.reset(agent_ob, agent_info)
            episode["observations"][row] = ob
            episode["actions"][row] = action
            episode["terminals"][row] = done
            episode["qpos"][row] = info["prev_qpos"]
            episode["qvel"][row] = info["prev_qvel"]
            if self.has_button_states:
                episode["button_states"][row] = info["prev_button_states"]
            ob = next_ob
            row += 1
        return {key: value[:row] for key, value in episode.items()}

    def close(self) -> None:
        self.env.close()


_worker_generator: _EpisodeGenerator | None = None


def _start_worker(*generator_args: Any) -> None:
    global _worker_generator
    _worker_generator = _EpisodeGenerator(*generator_args)


def _worker_episode(index: int) -> dict[str, np.ndarray]:
    assert _worker_generator is not None
    return _worker_generator.episode(index)


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
    n_jobs: int = 1,
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

    Seeding: episode ``i`` is seeded with a seed drawn from ``numpy.random.SeedSequence([seed, i])``: the env's
    ``reset(seed=...)``, its action space, and NumPy's global RNG, which the oracles draw from (as in OGBench); the
    global RNG is restored afterwards. Same seed, same arrays, whatever ``n_jobs``.

    :param env_name: ``'cube-single'``, ``'cube-double'``, ``'cube-triple'``, ``'cube-quadruple'``,
        ``'scene'``, ``'puzzle-3x3'``, ... (``-v0`` and ``-play`` suffixes are accepted)
    :param size: number of transitions wanted (rounded up to whole episodes)
    :param seed: random seed
    :param out: ``.npz`` path to save to (compressed, official key layout), or None
    :param episode_length: transitions per episode (official: 1000)
    :param noise: oracle plan noise level (official: 0.1)
    :param noise_smoothing: oracle plan noise smoothing (official: 0.5)
    :param p_random_action: probability of a uniformly random action instead of the oracle's (official play: 0)
    :param progress_bar: show a tqdm progress bar (per step with one job, per episode with several)
    :param n_jobs: processes generating episodes in parallel (MuJoCo and the oracles run on one core each);
        -1 for one per CPU core
    :return: the arrays saved: ``observations``, ``actions``, ``terminals`` (bool), ``qpos``, ``qvel``
        (float32), and ``button_states`` (int64) for scene and puzzle
    """
    if size <= 0 or episode_length <= 0:
        raise ValueError(f"size and episode_length must be positive, got {size} and {episode_length}")
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or not (n_jobs >= 1 or n_jobs == -1):
        raise ValueError(f"n_jobs must be a positive int or -1 (one per CPU core), got {n_jobs!r}")
    env_id = _manipspace_env_id(env_name)
    num_episodes = math.ceil(size / episode_length)
    n_jobs = min(num_episodes, (os.cpu_count() or 1) if n_jobs == -1 else n_jobs)
    generator_args = (env_id, seed, episode_length, noise, noise_smoothing, p_random_action)

    start = time.perf_counter()
    if n_jobs == 1:
        generator = _EpisodeGenerator(*generator_args)
        try:
            episodes = []
            with tqdm(total=num_episodes * (episode_length + 1), unit="step", disable=not progress_bar, desc=env_id) as pbar:
                for index in range(num_episodes):
                    episodes.append(generator.episode(index))
                    pbar.update(len(episodes[-1]["actions"]))
        finally:
            generator.close()
    else:
        context = multiprocessing.get_context("spawn")  # MuJoCo and torch do not survive a fork
        with ProcessPoolExecutor(n_jobs, mp_context=context, initializer=_start_worker, initargs=generator_args) as pool:
            episodes = list(
                tqdm(pool.map(_worker_episode, range(num_episodes)), total=num_episodes, unit="episode", disable=not progress_bar, desc=f"{env_id} ({n_jobs} jobs)")
            )
    elapsed = time.perf_counter() - start

    dataset = {key: np.concatenate([episode[key] for episode in episodes]) for key in episodes[0]}
    rows = len(dataset["actions"])
    print(f"{env_id}: {num_episodes} episodes, {rows} steps in {elapsed:.1f} s ({rows / elapsed:.0f} steps/s, {n_jobs} jobs)")
    if out is not None:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        np.savez_compressed(out, **dataset)
        print(f"Saved to {out}")
    return dataset


def cached_play_dataset(
    path: str | os.PathLike, env_name: str, size: int, seed: int = 0, progress_bar: bool = True, n_jobs: int = 1
) -> pathlib.Path:
    """
    ``path`` if it holds the play dataset asked for, else one generated there with :func:`generate_ogbench_dataset`
    (a cache for scripts that need the same data run after run). What was asked for is recorded beside the data
    (``<path>.json``); a file there that was made with another env, size or seed raises a ``ValueError`` instead of
    standing in for it.

    :param path: the ``.npz`` file
    :param env_name: OGBench env family, e.g. ``'cube-single'``
    :param size: transitions to generate if the file is missing
    :param seed: generation seed
    :param progress_bar: show the generation's progress bar
    :param n_jobs: processes for the generation (the data do not depend on it)
    :return: the path
    """
    path = pathlib.Path(path)
    record = path.with_name(path.name + ".json")
    wanted = {"env": _manipspace_env_id(env_name), "size": size, "seed": seed, "recipe": GENERATION_RECIPE}
    if path.exists():
        found = json.loads(record.read_text()) if record.exists() else None
        if found != wanted:
            raise ValueError(
                f"{path} exists but was not made by this request {wanted}: its record {record} "
                f"{'says ' + str(found) if found is not None else 'is missing'}. Delete the file to regenerate it, or "
                "pass another path"
            )
        return path
    print(f"Generating {size} transitions of {env_name} play data into {path}", flush=True)
    generate_ogbench_dataset(env_name, size, seed=seed, out=path, progress_bar=progress_bar, n_jobs=n_jobs)
    record.write_text(json.dumps(wanted))
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
    gen.add_argument("--n-jobs", type=int, default=1, help="parallel processes, -1: one per CPU core (same data)")
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
            n_jobs=args.n_jobs,
        )


if __name__ == "__main__":
    main()
