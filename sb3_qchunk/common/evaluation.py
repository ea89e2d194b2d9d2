"""Success-rate evaluation of chunk policies on top of SB3's ``evaluate_policy``."""

from typing import Any

import numpy as np
from tqdm.auto import tqdm
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.type_aliases import GymEnv
from stable_baselines3.common.vec_env import VecEnv

from sb3_qchunk.common.execution import ChunkExecutor
from sb3_qchunk.wrappers import ChunkedActionWrapper, find_chunk_wrapper


def evaluate_success(
    model: BaseAlgorithm, env: GymEnv, n_eval_episodes: int = 50, deterministic: bool = True, progress_bar: bool = False
) -> dict[str, float]:
    """
    Run ``n_eval_episodes`` episodes and report the success rate (from ``info["is_success"]`` at each
    episode's end, which :class:`~sb3_qchunk.ChunkedActionWrapper` sets from OGBench's ``success``), the mean
    undiscounted episode return and the mean episode length in primitive steps, counted from what each chunk
    really ran (``info["primitive_rewards"]``), whatever Monitor wrappers the env has.

    A plain (primitive-step) Gymnasium env is wrapped into chunks of the model's size, so each chunk runs
    open-loop as in training; a VecEnv must be chunk-level already. A
    :class:`~sb3_qchunk.common.execution.ChunkExecutor` (receding horizon, temporal ensembling) runs on the plain
    env instead, one primitive action per step; success is then read from the env's ``info["is_success"]`` or
    OGBench's ``info["success"]`` at the episode's end.

    :param model: the agent (``predict`` returns a chunk), or a ``ChunkExecutor`` made of it
    :param env: a chunk-level env or VecEnv, or a plain Gymnasium env (for a ``ChunkExecutor``: a plain env or VecEnv)
    :param n_eval_episodes: number of episodes
    :param deterministic: passed to ``model.predict``
    :param progress_bar: show a progress bar of the finished episodes
    :return: ``success_rate``, ``mean_return``, ``mean_length`` (primitive steps)
    """
    if isinstance(model, ChunkExecutor):
        return _evaluate_primitive_policy(model, env, n_eval_episodes, deterministic, progress_bar)
    if not isinstance(env, VecEnv) and find_chunk_wrapper(env) is None:
        chunk_size = getattr(model, "env_chunk_size", None)
        if chunk_size is None:
            raise ValueError("evaluate_success needs a chunk-level env (ChunkedActionWrapper) for a model without env_chunk_size")
        env = ChunkedActionWrapper(env, chunk_size=chunk_size, gamma=getattr(model, "gamma", 0.99))
    n_envs = env.num_envs if isinstance(env, VecEnv) else 1
    if isinstance(env, VecEnv) and not all(env.env_is_wrapped(ChunkedActionWrapper)):
        raise ValueError("evaluate_success needs chunk-level envs: build the VecEnv with wrapper_class=ChunkedActionWrapper")
    successes: list[float] = []
    returns: list[float] = []
    lengths: list[int] = []
    running_return, running_length = np.zeros(n_envs), np.zeros(n_envs, dtype=np.int64)
    pbar = tqdm(total=n_eval_episodes, disable=not progress_bar, desc="evaluation", unit="episode")

    def record(locals_: dict[str, Any], globals_: dict[str, Any]) -> None:
        i, info = locals_["i"], locals_["info"]
        if locals_["episode_counts"][i] >= locals_["episode_count_targets"][i]:
            return  # evaluate_policy no longer counts this env's episodes
        running_return[i] += float(np.sum(info["primitive_rewards"]))
        running_length[i] += int(info["chunk_steps"])
        if locals_["done"]:
            successes.append(float(info.get("is_success", False)))
            returns.append(float(running_return[i]))
            lengths.append(int(running_length[i]))
            running_return[i], running_length[i] = 0.0, 0
            pbar.update(1)

    with pbar:
        evaluate_policy(
            model, env, n_eval_episodes=n_eval_episodes, deterministic=deterministic, callback=record, warn=False
        )
    return {
        "success_rate": float(np.mean(successes)),
        "mean_return": float(np.mean(returns)),
        "mean_length": float(np.mean(lengths)),
    }



def _evaluate_primitive_policy(
    policy: ChunkExecutor, env: GymEnv, n_eval_episodes: int, deterministic: bool, progress_bar: bool
) -> dict[str, float]:
    """:func:`evaluate_success` of a primitive-step policy on a primitive-step env."""
    chunked = all(env.env_is_wrapped(ChunkedActionWrapper)) if isinstance(env, VecEnv) else find_chunk_wrapper(env) is not None
    if chunked:
        raise ValueError("A ChunkExecutor acts one primitive action at a time: evaluate it on the env without ChunkedActionWrapper")
    successes: list[float] = []

    def record(locals_: dict[str, Any], globals_: dict[str, Any]) -> None:
        i, info = locals_["i"], locals_["info"]
        if locals_["episode_counts"][i] < locals_["episode_count_targets"][i] and locals_["done"]:
            successes.append(float(info.get("is_success", info.get("success", False))))
            pbar.update(1)

    with tqdm(total=n_eval_episodes, disable=not progress_bar, desc="evaluation", unit="episode") as pbar:
        returns, lengths = evaluate_policy(
            policy,  # type: ignore[arg-type]
            env,
            n_eval_episodes=n_eval_episodes,
            deterministic=deterministic,
            callback=record,
            return_episode_rewards=True,
            warn=False,
        )
    return {"success_rate": float(np.mean(successes)), "mean_return": float(np.mean(returns)), "mean_length": float(np.mean(lengths))}
