"""Chunk-level view of a Gymnasium environment (Q-chunking's open-loop action chunks)."""

from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium import spaces


def check_chunk_size(chunk_size: Any) -> int:
    """
    :param chunk_size: a number of primitive actions per chunk
    :return: it as an int
    :raises ValueError: unless it is an integer >= 1 (not a bool)
    """
    if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    return int(chunk_size)


def chunk_action_space(action_space: spaces.Space, chunk_size: int) -> spaces.Space:
    """
    The action space of ``chunk_size`` primitive actions taken one after the other, flattened.

    Box(S) -> Box(h * prod(S)) with the bounds tiled, Discrete(n) -> MultiDiscrete([n] * h),
    MultiDiscrete(nvec) -> MultiDiscrete(tile(nvec, h)) (flattened), MultiBinary(n) -> MultiBinary(h * n).

    :param action_space: the primitive action space
    :param chunk_size: number of primitive actions in a chunk (h)
    :return: the chunk action space
    """
    h = check_chunk_size(chunk_size)
    if isinstance(action_space, spaces.Box):
        low = np.tile(action_space.low.reshape(-1), h)
        high = np.tile(action_space.high.reshape(-1), h)
        return spaces.Box(low=low, high=high, dtype=action_space.dtype)
    if isinstance(action_space, spaces.Discrete):
        return spaces.MultiDiscrete(
            np.full(h, action_space.n, dtype=np.int64),
            start=np.full(h, action_space.start, dtype=np.int64),
        )
    if isinstance(action_space, spaces.MultiDiscrete):
        return spaces.MultiDiscrete(
            np.tile(action_space.nvec.reshape(-1), h),
            start=np.tile(action_space.start.reshape(-1), h),
        )
    if isinstance(action_space, spaces.MultiBinary):
        return spaces.MultiBinary(h * int(np.prod(action_space.shape)))
    raise ValueError(
        f"ChunkedActionWrapper supports Box, Discrete, MultiDiscrete and MultiBinary action spaces, "
        f"got {type(action_space).__name__}: {action_space}"
    )


def _copy(obs: Any) -> Any:
    """A copy of an observation (array, scalar or dict of them): some envs update one array in place."""
    if isinstance(obs, dict):
        return {key: _copy(value) for key, value in obs.items()}
    return np.array(obs, copy=True)


def _stack(items: list[Any]) -> Any:
    """Stack a list of observations (arrays, scalars or dicts of them) along a new first axis."""
    if isinstance(items[0], dict):
        return {key: _stack([item[key] for item in items]) for key in items[0]}
    try:
        return np.stack([np.asarray(item) for item in items])
    except (TypeError, ValueError):
        return list(items)


class ChunkedActionWrapper(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """
    Turn any Gymnasium environment into a chunk-level environment, as in Q-chunking
    (Li, Zhou, Levine, "Reinforcement Learning with Action Chunking", NeurIPS 2025).

    An action of the wrapped env is a chunk of ``chunk_size`` (h) primitive actions, flattened. ``step(chunk)``
    runs them open-loop and returns the last observation, the discounted in-chunk reward
    ``sum_{i<k} gamma^i r_i``, and the last step's ``terminated`` / ``truncated``. It stops early, after
    ``k < h`` steps, as soon as a primitive step terminates or truncates.

    Nothing is lost: the returned ``info`` is a copy of the last primitive step's info (so Monitor's
    ``episode`` record passes through when Monitor wraps the inner env) with these keys added:

    - ``chunk_steps``: k, the number of primitive steps executed;
    - ``primitive_rewards``: array of the k primitive rewards;
    - ``bootstrap_discount``: gamma^k, the discount to bootstrap the chunk's value with;
    - ``transitions``: dict of the k primitive transitions, each entry stacked along a first axis of
      length k: ``obs``, ``action``, ``reward``, ``next_obs``, ``terminated``, ``truncated``
      (Dict observations are stacked key by key);
    - ``primitive_infos``: list of the k primitive infos;
    - ``is_success``: set when a primitive info carries OGBench's ``success`` (the value of the last step
      that has it), so that SB3's ``EvalCallback`` reports a success rate.

    Interruptions: if the wrapped env raises (or the process is interrupted) in the middle of a chunk, the
    primitive transitions that ran before are kept in :attr:`interrupted_transitions` (same layout as
    ``info["transitions"]``), the exception propagates, and the env must be reset before the next ``step``
    (its state is unknown). :attr:`chunks_completed` counts the chunks that ran to their end and
    :attr:`last_transitions` holds the transitions of the last one, so that a caller whose ``step`` call did
    not return (e.g. a VecEnv in which another env raised) can still store what ran.

    A chunk of the wrong shape, with NaN or inf values, or out of bounds for a discrete space raises a
    ``ValueError`` before anything runs in the env. Box chunks outside the bounds follow Gymnasium's
    convention: they are passed on as they are and the env decides (most clip, some raise).

    :param env: the environment to wrap (Box, Discrete, MultiDiscrete or MultiBinary action space)
    :param chunk_size: number of primitive actions per chunk (h >= 1)
    :param gamma: discount used to sum rewards inside a chunk, in (0, 1]
    """

    def __init__(self, env: gym.Env, chunk_size: int, gamma: float = 0.99) -> None:
        if not (isinstance(gamma, (float, int, np.floating)) and 0.0 < float(gamma) <= 1.0):
            raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
        gym.utils.RecordConstructorArgs.__init__(self, chunk_size=chunk_size, gamma=gamma)
        gym.Wrapper.__init__(self, env)
        self.primitive_action_space = env.action_space
        self.action_space = chunk_action_space(env.action_space, chunk_size)
        self.chunk_size = int(chunk_size)
        self.gamma = float(gamma)
        self._last_obs: Any = None
        self.chunks_completed = 0
        self.last_transitions: dict[str, Any] | None = None
        self.interrupted_transitions: dict[str, Any] | None = None

    def split_chunk(self, chunk: np.ndarray) -> np.ndarray:
        """
        Validate a chunk and split it into its h primitive actions.

        :param chunk: a chunk, flat (``action_space.shape``) or already split (h, *primitive shape)
        :return: array of shape (h, *primitive_action_space.shape)
        """
        primitive = self.primitive_action_space
        chunk_arr = np.asarray(chunk)
        flat_shape = self.action_space.shape
        split_shape = (self.chunk_size, *primitive.shape)
        if chunk_arr.shape not in (flat_shape, split_shape):
            raise ValueError(
                f"Chunk has shape {chunk_arr.shape}, expected {flat_shape} (flat) or {split_shape} "
                f"(chunk_size={self.chunk_size} actions of shape {primitive.shape})"
            )
        if chunk_arr.dtype.kind not in "biuf":
            raise ValueError(f"Chunk must be numeric, got dtype {chunk_arr.dtype}")
        if chunk_arr.dtype.kind == "f" and not np.all(np.isfinite(chunk_arr)):
            bad = np.flatnonzero(~np.isfinite(chunk_arr.reshape(-1)))
            raise ValueError(f"Chunk contains {len(bad)} NaN/inf value(s), first at flat index {bad[0]}: {chunk_arr}")
        actions = chunk_arr.reshape(split_shape)
        if isinstance(primitive, spaces.Box):
            return actions.astype(primitive.dtype, copy=False)
        # Discrete spaces: integral values inside the bounds, checked before anything runs.
        if chunk_arr.dtype.kind == "f" and not np.all(chunk_arr == np.round(chunk_arr)):
            raise ValueError(f"Chunk for a discrete action space must hold integers, got {chunk_arr}")
        actions = actions.astype(np.int64 if isinstance(primitive, spaces.Discrete) else primitive.dtype)
        for i, action in enumerate(actions):
            if not primitive.contains(action.item() if isinstance(primitive, spaces.Discrete) else action):
                raise ValueError(f"Action {i} of the chunk, {action}, is outside the action space {primitive}")
        if isinstance(primitive, spaces.Discrete):
            return actions.reshape(self.chunk_size)
        return actions

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        self._last_obs = _copy(obs)
        self.interrupted_transitions = None
        return obs, info

    def step(self, action: np.ndarray) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        actions = self.split_chunk(action)
        if self._last_obs is None:
            raise RuntimeError("Cannot call step() before reset() (or after a step that raised: reset the env first)")
        self.interrupted_transitions = None
        observations, next_observations, rewards, terminateds, truncateds, infos = [], [], [], [], [], []
        obs = self._last_obs
        terminated = truncated = False
        try:
            for primitive_action in actions:
                a = primitive_action.item() if isinstance(self.primitive_action_space, spaces.Discrete) else primitive_action
                next_obs, reward, terminated, truncated, info = self.env.step(a)
                observations.append(obs)
                next_obs = _copy(next_obs)
                next_observations.append(next_obs)
                rewards.append(float(reward))
                terminateds.append(bool(terminated))
                truncateds.append(bool(truncated))
                infos.append(info)
                obs = next_obs
                if terminated or truncated:
                    break
        except BaseException:
            # What ran stays available to the caller; the env's state after the exception is unknown.
            self._last_obs = None
            if rewards:
                self.interrupted_transitions = self._transitions(
                    observations, actions, rewards, next_observations, terminateds, truncateds
                )
            raise
        self._last_obs = obs
        k = len(rewards)
        primitive_rewards = np.asarray(rewards, dtype=np.float64)
        chunk_reward = float(np.sum(primitive_rewards * self.gamma ** np.arange(k)))

        out_info = dict(infos[-1])
        out_info["chunk_steps"] = k
        out_info["primitive_rewards"] = primitive_rewards
        out_info["bootstrap_discount"] = self.gamma**k
        out_info["transitions"] = self._transitions(observations, actions, rewards, next_observations, terminateds, truncateds)
        out_info["primitive_infos"] = infos
        successes = [info["success"] for info in infos if "success" in info]
        if successes:
            out_info["is_success"] = bool(successes[-1])
        self.chunks_completed += 1
        self.last_transitions = out_info["transitions"]
        return obs, chunk_reward, bool(terminated), bool(truncated), out_info

    @staticmethod
    def _transitions(
        observations: list[Any],
        actions: np.ndarray,
        rewards: list[float],
        next_observations: list[Any],
        terminateds: list[bool],
        truncateds: list[bool],
    ) -> dict[str, Any]:
        """The k primitive transitions that ran, each entry stacked along a first axis of length k."""
        k = len(rewards)
        return {
            "obs": _stack(observations),
            "action": actions[:k].copy(),
            "reward": np.asarray(rewards, dtype=np.float64),
            "next_obs": _stack(next_observations),
            "terminated": np.asarray(terminateds),
            "truncated": np.asarray(truncateds),
        }


def find_chunk_wrapper(env: gym.Env) -> ChunkedActionWrapper | None:
    """
    :param env: a Gymnasium env, possibly wrapped several times
    :return: the outermost ChunkedActionWrapper in the wrapper chain, or None
    """
    while isinstance(env, gym.Wrapper):
        if isinstance(env, ChunkedActionWrapper):
            return env
        env = env.env
    return None
