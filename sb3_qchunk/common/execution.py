"""Running a chunk policy on a primitive-step env: one primitive action per call, from the chunks the policy emits."""

import math
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
    ``evaluate_policy``, RL Zoo's ``enjoy``, :func:`~sb3_qchunk.common.evaluation.evaluate_success` or a robot's
    control loop can run a QC model on the plain env (one primitive action per ``predict`` call, per env of a VecEnv).
    Three ways to execute the chunks:

    - open loop (``replan_every=None``, the default; as in training): a new chunk is chosen when the last one has
      been executed to its end; its h actions run in order.
    - receding horizon (``replan_every=k``, ``1 <= k <= chunk_size``): a new chunk is chosen every k steps and only
      its first k actions run.
    - temporal ensembling (``temporal_ensemble=m``, ACT's scheme): a new chunk is chosen at every step, and the
      action executed at step t is a weighted average of what the chunks chosen in the last h steps planned for
      step t (the chunk chosen j steps ago contributes its action j). With the k <= h predictions ordered oldest
      first, prediction i has weight ``exp(-m * i) / sum_i' exp(-m * i')``: ``m > 0`` weighs older predictions more
      (ACT uses m = 0.01), ``m = 0`` is the plain mean, ``m < 0`` favours the newest.

    A new episode (``episode_start``) drops what is left of the chunks. Training data is still collected open-loop
    by ``QC.learn``, whatever is used here: QC's critic target sums the rewards of h primitive steps and bootstraps
    from the state after them, which is an unbiased h-step backup only for a chunk executed whole, as it was chosen.
    Replanning or blending executes other actions than the stored chunk, so these modes are for acting and
    evaluation only.

    :param model: the chunk policy (``predict`` returns chunks of ``chunk_size`` actions, flat)
    :param chunk_size: actions per chunk (``model.env_chunk_size`` for a QC model if None)
    :param action_shape: shape of one primitive action (from the chunk's size if None: ``(chunk dim / chunk_size,)``)
    :param replan_every: None for open-loop execution of whole chunks, else k: replan every k steps
    :param temporal_ensemble: None, or the decay m of temporal ensembling (replans at every step)
    """

    def __init__(
        self,
        model: ChunkPolicy,
        chunk_size: int | None = None,
        action_shape: tuple[int, ...] | None = None,
        replan_every: int | None = None,
        temporal_ensemble: float | None = None,
    ) -> None:
        chunk_size = chunk_size if chunk_size is not None else getattr(model, "env_chunk_size", None)
        if chunk_size is None:
            raise ValueError("chunk_size is needed for a model without env_chunk_size")
        if replan_every is not None and not 1 <= replan_every <= chunk_size:
            raise ValueError(f"replan_every must be None or in [1, chunk_size={chunk_size}], got {replan_every}")
        if temporal_ensemble is not None:
            if replan_every is not None:
                raise ValueError("replan_every and temporal_ensemble exclude each other (ensembling replans at every step)")
            if isinstance(temporal_ensemble, bool) or not isinstance(temporal_ensemble, (int, float)) or not math.isfinite(temporal_ensemble):
                raise ValueError(f"temporal_ensemble must be a finite number (the weights' decay), got {temporal_ensemble!r}")
        self.model, self.chunk_size, self.replan_every = model, int(chunk_size), replan_every
        self.temporal_ensemble = None if temporal_ensemble is None else float(temporal_ensemble)
        self.action_shape = action_shape
        self.observation_space = model.observation_space
        # per env: the chunks being executed, as [chunk (h, ...), steps since it was chosen], oldest first
        self._chunks: list[list[list[Any]]] = []

    def reset(self) -> None:
        """Forget the chunks being executed (all envs)."""
        self._chunks = []

    def ensemble_weights(self, n_predictions: int) -> np.ndarray:
        """The weights of ``n_predictions`` overlapping predictions of one step, oldest first (sum 1)."""
        assert self.temporal_ensemble is not None
        weights = np.exp(-self.temporal_ensemble * np.arange(n_predictions))
        return weights / weights.sum()

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
        if len(self._chunks) != n_envs:
            self._chunks = [[] for _ in range(n_envs)]
        if episode_start is not None:
            for env_idx in np.flatnonzero(np.asarray(episode_start, dtype=bool)):
                self._chunks[env_idx] = []
        steps = self.replan_every or self.chunk_size
        if self.temporal_ensemble is not None:
            need = list(range(n_envs))
        else:  # a new chunk where the last one has run its steps
            need = [env_idx for env_idx, chunks in enumerate(self._chunks) if not chunks or chunks[-1][1] >= steps]
        if need:
            index = np.array(need)
            chunks, _ = self.model.predict(_rows(obs, index), deterministic=deterministic)
            for env_idx, chunk in zip(need, np.asarray(chunks).reshape(len(need), self.chunk_size, -1)):
                shape = self.action_shape or chunk.shape[1:]
                if self.temporal_ensemble is None:
                    self._chunks[env_idx] = []
                self._chunks[env_idx].append([chunk.reshape(self.chunk_size, *shape), 0])
        actions = []
        for env_idx in range(n_envs):
            live = self._chunks[env_idx]
            if self.temporal_ensemble is None:
                chunk, age = live[-1]
                actions.append(chunk[age])
            else:
                predictions = np.stack([chunk[age] for chunk, age in live])  # oldest first
                weights = self.ensemble_weights(len(live)).reshape(-1, *([1] * (predictions.ndim - 1)))
                actions.append((weights * predictions).sum(axis=0).astype(predictions.dtype))
            for entry in live:
                entry[1] += 1
            self._chunks[env_idx] = [entry for entry in live if entry[1] < self.chunk_size]
        stacked = np.stack(actions)
        return (stacked if vectorized else stacked[0]), None


def _batch(observation: Any) -> Any:
    if isinstance(observation, dict):
        return {key: np.asarray(value)[None] for key, value in observation.items()}
    return np.asarray(observation)[None]


def _rows(observation: Any, index: np.ndarray) -> Any:
    if isinstance(observation, dict):
        return {key: np.asarray(value)[index] for key, value in observation.items()}
    return np.asarray(observation)[index]

