"""Success-rate evaluation on top of SB3's ``evaluate_policy``."""

from typing import Any

import numpy as np
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.type_aliases import GymEnv


def evaluate_success(
    model: BaseAlgorithm, env: GymEnv, n_eval_episodes: int = 50, deterministic: bool = True
) -> dict[str, float]:
    """
    Run ``n_eval_episodes`` episodes and report the success rate (from ``info["is_success"]`` at each
    episode's end, which :class:`~sb3_qchunk.ChunkedActionWrapper` sets from OGBench's ``success``) and the
    mean undiscounted episode return.

    :param model: the agent
    :param env: a chunk-level evaluation env (one env, or a VecEnv)
    :param n_eval_episodes: number of episodes
    :param deterministic: passed to ``model.predict``
    :return: ``success_rate``, ``mean_return``, ``mean_length`` (primitive steps)
    """
    successes: list[float] = []

    def record_success(locals_: dict[str, Any], globals_: dict[str, Any]) -> None:
        if locals_["done"]:
            successes.append(float(locals_["info"].get("is_success", False)))

    returns, lengths = evaluate_policy(
        model, env, n_eval_episodes=n_eval_episodes, deterministic=deterministic, callback=record_success, return_episode_rewards=True
    )
    return {
        "success_rate": float(np.mean(successes)),
        "mean_return": float(np.mean(returns)),
        "mean_length": float(np.mean(lengths)),
    }
