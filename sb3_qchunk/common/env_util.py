"""Env plumbing of the chunked algorithms: making an env chunk-level, and checking what it returns."""

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.env_util import is_wrapped
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.type_aliases import GymEnv
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecMonitor, VecNormalize, is_vecenv_wrapped

from sb3_qchunk.wrappers import ChunkedActionWrapper, find_chunk_wrapper

_MONITOR_INSIDE = (
    "Monitor must wrap the env inside the ChunkedActionWrapper, ChunkedActionWrapper(Monitor(env), ...), so that "
    "episode statistics count primitive steps and undiscounted rewards (outside it, it counts chunks and "
    "discounted chunk rewards)"
)


def check_box(action_space: spaces.Space) -> None:
    """
    :param action_space: the primitive action space of an env
    :raises ValueError: unless it is a Box (QC's flow actor is continuous)
    """
    if not isinstance(action_space, spaces.Box):
        raise ValueError(f"QC needs a Box (continuous) action space, got {type(action_space).__name__}: {action_space}")


def _monitor_outside_chunks(env: gym.Env) -> bool:
    """Whether a Monitor sits between ``env`` (outermost) and its ChunkedActionWrapper."""
    while isinstance(env, gym.Wrapper) and not isinstance(env, ChunkedActionWrapper):
        if isinstance(env, Monitor):
            return True
        env = env.env
    return False


def wrap_chunked(env: GymEnv | str | None, chunk_size: int, gamma: float) -> GymEnv | None:
    """
    Make ``env`` chunk-level with ``chunk_size`` actions per chunk, or check that it already is.

    A plain Gymnasium env (or env id) is wrapped in ``Monitor`` (so that episode statistics count primitive
    steps and undiscounted rewards) and then in :class:`~sb3_qchunk.ChunkedActionWrapper`. An env that already
    is a ``ChunkedActionWrapper`` without any ``Monitor`` gets a new wrapper with the same settings around
    ``Monitor(inner env)``. A VecEnv must have been built with the wrapper inside, as
    ``make_vec_env(..., wrapper_class=ChunkedActionWrapper, wrapper_kwargs=...)`` does (Monitor inside it).
    A ``Monitor`` or ``VecMonitor`` outside the chunk wrapper is refused: it would report chunk counts and
    discounted chunk rewards as episode lengths and returns.

    :param env: None, an env id, a Gymnasium env or a VecEnv
    :param chunk_size: primitive actions per chunk the agent emits
    :param gamma: discount of the in-chunk reward sum
    :return: the chunk-level env
    """
    if env is None:
        return None
    if isinstance(env, str):
        env = gym.make(env)
    if isinstance(env, VecEnv):
        return _check_chunked_vec_env(env, chunk_size)
    wrapper = find_chunk_wrapper(env)
    if wrapper is None:
        check_box(env.action_space)
        if not is_wrapped(env, Monitor):
            env = Monitor(env)
        return ChunkedActionWrapper(env, chunk_size=chunk_size, gamma=gamma)
    if wrapper.chunk_size != chunk_size:
        raise ValueError(f"The env's ChunkedActionWrapper has chunk_size={wrapper.chunk_size}, but QC expects {chunk_size}")
    check_box(wrapper.primitive_action_space)
    if _monitor_outside_chunks(env):
        raise ValueError(_MONITOR_INSIDE)
    if not is_wrapped(env, Monitor):
        if env is not wrapper:
            raise ValueError(f"{_MONITOR_INSIDE}; the env has wrappers outside its ChunkedActionWrapper and no Monitor")
        return ChunkedActionWrapper(Monitor(wrapper.env), chunk_size=wrapper.chunk_size, gamma=wrapper.gamma)
    return env


def check_eval_env(env: VecEnv, chunk_size: int) -> None:
    """
    Check the env of an ``EvalCallback`` for a chunk policy: chunk-level (as :func:`wrap_chunked` makes it) with
    ``Monitor`` inside the chunk wrapper, so that SB3's ``evaluate_policy`` reports primitive episode lengths and
    undiscounted returns.

    :param env: the callback's ``eval_env`` (SB3 makes it a VecEnv)
    :param chunk_size: the policy's chunk size
    :raises ValueError: naming what is missing and how to build the env
    """
    fix = f"build it with sb3_qchunk.common.env_util.wrap_chunked(env, chunk_size={chunk_size}, gamma=model.gamma)"
    if not all(env.env_is_wrapped(ChunkedActionWrapper)):
        raise ValueError(f"The EvalCallback's env is not chunk-level (the policy emits chunks of {chunk_size} actions): {fix}")
    _check_chunked_vec_env(env, chunk_size)
    if not all(env.env_is_wrapped(Monitor)):
        raise ValueError(
            "The EvalCallback's env has no Monitor: evaluate_policy would report chunk counts and discounted chunk "
            f"rewards as episode lengths and returns; {fix}"
        )


def _check_chunked_vec_env(env: VecEnv, chunk_size: int) -> VecEnv:
    if is_vecenv_wrapped(env, VecNormalize):
        raise ValueError("QC does not support VecNormalize: its replay buffer stores the wrapper's raw transitions")
    if is_vecenv_wrapped(env, VecMonitor):
        raise ValueError(f"VecMonitor counts chunks: {_MONITOR_INSIDE}")
    if not all(env.env_is_wrapped(ChunkedActionWrapper)):
        raise ValueError(
            "QC needs a chunk-level env. Build the VecEnv with "
            f"make_vec_env(..., wrapper_class=ChunkedActionWrapper, wrapper_kwargs=dict(chunk_size={chunk_size})), "
            "or pass a plain Gymnasium env and QC wraps it."
        )
    if isinstance(env, DummyVecEnv) and any(_monitor_outside_chunks(sub_env) for sub_env in env.envs):
        raise ValueError(_MONITOR_INSIDE)
    sizes = env.get_attr("chunk_size")
    if any(size != chunk_size for size in sizes):
        raise ValueError(f"The env's ChunkedActionWrapper has chunk_size={sizes[0]}, but QC expects {chunk_size}")
    check_box(env.get_attr("primitive_action_space")[0])
    return env


def _first_non_finite(value: Any) -> tuple[str, int] | None:
    """(sub-key, first row) of the first NaN/inf in an array or a dict of arrays stacked along a first axis."""
    items = value.items() if isinstance(value, dict) else [("", value)]
    for sub_key, array in items:
        array = np.asarray(array)
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            rows = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1) if array.ndim > 0 else np.array([True])
            return sub_key, int(np.argmax(rows))
    return None


def check_finite_transitions(transitions: dict[str, Any], env_idx: int, first_step: int) -> None:
    """
    Refuse non-finite values that an env returned, before anything stores or trains on them.

    :param transitions: the primitive transitions of one chunk (``info["transitions"]`` of the wrapper)
    :param env_idx: index of the env in its VecEnv
    :param first_step: the global primitive step count of the chunk's first step (``num_timesteps + 1``)
    :raises ValueError: naming the key, the primitive step and the env
    """
    for key in ("reward", "next_obs", "obs"):
        found = _first_non_finite(transitions[key])
        if found is not None:
            sub_key, row = found
            name = key + (f"['{sub_key}']" if sub_key else "")
            raise ValueError(
                f"env {env_idx} returned a non-finite {name} at primitive step {first_step + row} "
                f"(step {row + 1} of its chunk): {np.asarray(transitions[key][sub_key] if sub_key else transitions[key])[row]}. "
                "Nothing of this chunk was stored. Fix the env (SB3's VecCheckNan locates such values)."
            )


def check_finite_observations(observations: Any, what: str) -> None:
    """
    :param observations: a VecEnv's observations (array or dict of arrays, one row per env)
    :param what: where they come from, for the message
    :raises ValueError: if any is NaN/inf, naming the env index
    """
    found = _first_non_finite(observations)
    if found is not None:
        sub_key, env_idx = found
        name = "observation" + (f"['{sub_key}']" if sub_key else "")
        raise ValueError(f"env {env_idx} returned a non-finite {name} {what}. Fix the env (SB3's VecCheckNan locates such values).")
