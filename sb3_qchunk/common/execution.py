"""Running a chunk policy on a primitive-step env: one primitive action per call, from the chunks the policy emits."""

from typing import Any, Protocol

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.utils import is_vectorized_observation


class ChunkPolicy(Protocol):
    """Anything with SB3's ``predict`` that returns flat chunks (``QC``, a loaded QC model)."""

    observation_space: spaces.Space

    def predict(
        self, observation: Any, state: Any = None, episode_start: Any = None, deterministic: bool = False
    ) -> tuple[np.ndarray, Any]: ...


class ChunkExecutor:
    """
    A primitive-step policy made of a chunk policy, with SB3's ``predict`` signature, so that SB3's
    ``evaluate_policy``, RL Zoo's ``enjoy`` or a robot's control loop can run a QC model on the plain env (one
    primitive action per ``predict`` call, per env of a VecEnv).

    - ``replan_every=None`` (open loop, as in training): a new chunk is chosen when the last one has been executed
      to its end; the h actions run in order.
    - ``replan_every=k`` (receding horizon, ``1 <= k <= chunk_size``): a new chunk is chosen every k steps and only
      its first k actions run.

    A new episode (``episode_start``) drops what is left of the chunk. Training data is still collected open-loop by
    ``QC.learn``: replanning changes what is executed, and the h-step backup is unbiased only for chunks executed
    whole.

    :param model: the chunk policy (``predict`` returns chunks of ``chunk_size`` actions, flat)
    :param chunk_size: actions per chunk (``model.env_chunk_size`` for a QC model if None)
    :param action_shape: shape of one primitive action (from the chunk's size if None: ``(chunk dim / chunk_size,)``)
    :param replan_every: None for open-loop execution of whole chunks, else k: replan every k steps
    """

    def __init__(
        self,
        model: ChunkPolicy,
        chunk_size: int | None = None,
        action_shape: tuple[int, ...] | None = None,
        replan_every: int | None = None,
    ) -> None:
        chunk_size = chunk_size if chunk_size is not None else getattr(model, "env_chunk_size", None)
        if chunk_size is None:
            raise ValueError("chunk_size is needed for a model without env_chunk_size")
        if replan_every is not None and not 1 <= replan_every <= chunk_size:
            raise ValueError(f"replan_every must be None or in [1, chunk_size={chunk_size}], got {replan_every}")
        self.model, self.chunk_size, self.replan_every = model, int(chunk_size), replan_every
        self.action_shape = action_shape
        self.observation_space = model.observation_space
        self._queues: list[list[np.ndarray]] = []

    def reset(self) -> None:
        """Forget the chunks being executed (all envs)."""
        self._queues = []

    def predict(
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: Any = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, None]:
        """
        :param observation: the observation(s) of the primitive-step env(s)
        :param state: unused
        :param episode_start: which envs start a new episode (their remaining actions are dropped)
        :param deterministic: passed to the chunk policy's ``predict``
        :return: one primitive action per env (or one action for an unbatched observation), and None
        """
        vectorized = is_vectorized_observation(observation, self.observation_space)
        obs = observation if vectorized else _batch(observation)
        n_envs = len(next(iter(obs.values())) if isinstance(obs, dict) else obs)
        if len(self._queues) != n_envs:
            self._queues = [[] for _ in range(n_envs)]
        if episode_start is not None:
            for env_idx in np.flatnonzero(np.asarray(episode_start, dtype=bool)):
                self._queues[env_idx] = []
        need = [env_idx for env_idx, queue in enumerate(self._queues) if not queue]
        if need:
            index = np.array(need)
            chunks, _ = self.model.predict(_rows(obs, index), deterministic=deterministic)
            steps = self.replan_every or self.chunk_size
            for env_idx, chunk in zip(need, np.asarray(chunks).reshape(len(need), self.chunk_size, -1)):
                shape = self.action_shape or chunk.shape[1:]
                self._queues[env_idx] = [action.reshape(shape) for action in chunk[:steps]]
        actions = np.stack([queue.pop(0) for queue in self._queues])
        return (actions if vectorized else actions[0]), None


def _batch(observation: Any) -> Any:
    if isinstance(observation, dict):
        return {key: np.asarray(value)[None] for key, value in observation.items()}
    return np.asarray(observation)[None]


def _rows(observation: Any, index: np.ndarray) -> Any:
    if isinstance(observation, dict):
        return {key: np.asarray(value)[index] for key, value in observation.items()}
    return np.asarray(observation)[index]

