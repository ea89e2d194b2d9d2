"""Replay buffer that stores primitive transitions and samples windows of ``chunk_size`` steps."""

from typing import Any, NamedTuple

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import BaseBuffer
from stable_baselines3.common.preprocessing import get_action_dim, get_obs_shape
from stable_baselines3.common.type_aliases import TensorDict
from stable_baselines3.common.vec_env import VecNormalize

from sb3_qchunk.datasets import cast_lossless
from sb3_qchunk.wrappers import check_chunk_size

# Observations are stored in a dict, under this key when the observation space is not a Dict.
_OBS_KEY = "obs"


class ChunkReplayBufferSamples(NamedTuple):
    """
    A batch of windows t .. t+h-1 of primitive steps, for the h-step backup of a chunk.

    :param observations: s_t
    :param actions: a_t .. a_{t+h-1}, (B, h, A), scaled to [-1, 1]
    :param next_observations: s'_{t+h-1}
    :param rewards: R_t = sum_{i<h} gamma^i r_{t+i}, (B,)
    :param masks: min_i (1 - terminated_{t+i}), (B,)
    :param valid: valid_i = 1 - max_{j<i} done_{t+j}, (B, h)
    """

    observations: th.Tensor | TensorDict
    actions: th.Tensor
    next_observations: th.Tensor | TensorDict
    rewards: th.Tensor
    masks: th.Tensor
    valid: th.Tensor


def _storage_dtype(dtype: np.dtype) -> np.dtype:
    # Float observations are stored in float32, what the networks consume; integer ones (images) as they are.
    return np.dtype(np.float32) if np.issubdtype(dtype, np.floating) else dtype


def window_quantities(
    rewards: np.ndarray, terminated: np.ndarray, dones: np.ndarray, gamma: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """
    The cumulative reward, mask and valid flags of windows of primitive steps.

    :param rewards: (B, h) primitive rewards r_{t+i}
    :param terminated: (B, h) true terminal flags
    :param dones: (B, h) episode-end flags (terminated or truncated)
    :param gamma: discount factor
    :return: R (B,) = sum_i gamma^i r_{t+i}; mask (B,) = min_i (1 - terminated_{t+i});
        valid (B, h) with valid_0 = 1 and valid_i = 1 - max_{j<i} done_{t+j}
    """
    horizon = rewards.shape[1]
    cumulative_reward = (rewards * gamma ** np.arange(horizon)).sum(axis=1)
    mask = 1.0 - terminated.max(axis=1)
    valid = np.ones_like(dones, dtype=np.float32)
    valid[:, 1:] = 1.0 - np.maximum.accumulate(dones[:, :-1], axis=1)
    return cumulative_reward, mask, valid


def usable_windows(dones: np.ndarray, chunk_size: int) -> tuple[int, int]:
    """
    How many windows of ``chunk_size`` consecutive steps stay inside one episode (no episode end among their first
    h - 1 steps: ``valid_{h-1} = 1``, they have a bootstrap target and train the critic).

    :param dones: (N,) episode-end flags of consecutive steps
    :param chunk_size: h
    :return: (usable windows, windows)
    """
    n_windows = len(dones) - chunk_size + 1
    if n_windows <= 0:
        return 0, 0
    ends = np.concatenate([[0.0], np.cumsum(dones, dtype=np.float64)])
    usable = (ends[chunk_size - 1 : chunk_size - 1 + n_windows] - ends[:n_windows]) == 0
    return int(usable.sum()), n_windows


class ChunkReplayBuffer(BaseBuffer):
    """
    Replay buffer for Q-chunking.

    Stores primitive transitions (s, a, r, s', terminated, done) step by step, one ring per parallel env, and
    samples windows of ``chunk_size`` consecutive steps from any start index. Each window's quantities (the
    cumulative discounted reward, the termination mask, the valid flags) are computed at sampling time, so
    memory stays that of the raw transitions. Windows never cross a ring's write position and never mix
    two parallel envs. An offline dataset can be added as a separate, fixed block; by default windows are
    drawn uniformly over offline and online data together (the paper's setting), or a fixed fraction of
    each batch comes from the offline data (``offline_fraction``, RLPD's symmetric sampling).

    :param buffer_size: maximum number of online transitions over all parallel envs (as in SB3, each env's ring
        holds ``buffer_size // n_envs``; the ring of an env must hold at least one window of ``chunk_size``)
    :param observation_space: observation space
    :param action_space: the *primitive* action space (Box)
    :param device: PyTorch device of the sampled tensors
    :param n_envs: number of parallel environments
    :param chunk_size: window length h
    :param gamma: discount factor
    :param offline_fraction: None for uniform sampling over all windows, else the fraction of each batch
        drawn from the offline data (while both offline and online windows exist)
    """

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: th.device | str = "auto",
        n_envs: int = 1,
        chunk_size: int = 5,
        gamma: float = 0.99,
        offline_fraction: float | None = None,
    ) -> None:
        chunk_size = check_chunk_size(chunk_size)
        if buffer_size // n_envs < chunk_size:
            raise ValueError(
                f"buffer_size={buffer_size} over n_envs={n_envs} gives each env a ring of {buffer_size // n_envs} "
                f"transitions, fewer than one window of chunk_size={chunk_size}: no online window could be sampled"
            )
        super().__init__(buffer_size // n_envs, observation_space, action_space, device, n_envs=n_envs)
        if not isinstance(action_space, spaces.Box):
            raise ValueError(f"ChunkReplayBuffer needs a Box action space, got {action_space}")
        if offline_fraction is not None and not 0.0 <= offline_fraction <= 1.0:
            raise ValueError(f"offline_fraction must be None or in [0, 1], got {offline_fraction}")
        self.chunk_size = chunk_size
        self.gamma = gamma
        self.offline_fraction = offline_fraction
        self.action_dim = get_action_dim(action_space)
        if isinstance(observation_space, spaces.Dict):
            self.obs_spaces = dict(observation_space.spaces)
        else:
            self.obs_spaces = {_OBS_KEY: observation_space}
        self.observations = self._alloc_obs((self.buffer_size, n_envs))
        self.next_observations = self._alloc_obs((self.buffer_size, n_envs))
        self.actions = np.zeros((self.buffer_size, n_envs, self.action_dim), dtype=np.float32)
        self.rewards = np.zeros((self.buffer_size, n_envs), dtype=np.float32)
        self.terminated = np.zeros((self.buffer_size, n_envs), dtype=np.float32)
        self.dones = np.zeros((self.buffer_size, n_envs), dtype=np.float32)
        self.positions = np.zeros(n_envs, dtype=np.int64)
        self.fulls = np.zeros(n_envs, dtype=bool)
        self.offline: dict[str, Any] | None = None

    def _alloc_obs(self, prefix: tuple[int, ...]) -> dict[str, np.ndarray]:
        return {
            key: np.zeros((*prefix, *get_obs_shape(space)), dtype=_storage_dtype(space.dtype))
            for key, space in self.obs_spaces.items()
        }

    def _as_obs_dict(self, obs: Any) -> dict[str, np.ndarray]:
        return obs if isinstance(obs, dict) else {_OBS_KEY: obs}

    # ----------------------------------------------------------------------------------------------
    # Writing
    # ----------------------------------------------------------------------------------------------
    def add(self, transitions: dict[str, Any], env_idx: int = 0) -> None:  # type: ignore[override]
        """
        Append k consecutive primitive transitions of one env (the ``transitions`` a ChunkedActionWrapper
        reports, with actions scaled to [-1, 1]).

        :param transitions: dict with ``obs``, ``action``, ``reward``, ``next_obs``, ``terminated``,
            ``truncated``, each with a first axis of length k
        :param env_idx: which parallel env they come from
        """
        k = len(transitions["reward"])
        idx = (self.positions[env_idx] + np.arange(k)) % self.buffer_size
        for key, value in self._as_obs_dict(transitions["obs"]).items():
            self.observations[key][idx, env_idx] = np.asarray(value).reshape(k, *self.observations[key].shape[2:])
        for key, value in self._as_obs_dict(transitions["next_obs"]).items():
            self.next_observations[key][idx, env_idx] = np.asarray(value).reshape(k, *self.next_observations[key].shape[2:])
        self.actions[idx, env_idx] = np.asarray(transitions["action"]).reshape(k, self.action_dim)
        self.rewards[idx, env_idx] = transitions["reward"]
        terminated = np.asarray(transitions["terminated"], dtype=np.float32)
        self.terminated[idx, env_idx] = terminated
        self.dones[idx, env_idx] = np.maximum(terminated, np.asarray(transitions["truncated"], dtype=np.float32))
        new_pos = self.positions[env_idx] + k
        if new_pos >= self.buffer_size:
            self.fulls[env_idx] = True
        self.positions[env_idx] = new_pos % self.buffer_size

    def mark_episode_ends(self) -> None:
        """Mark the last stored transition of every env as an episode end (the env is about to be reset)."""
        for env_idx in range(self.n_envs):
            if self.fulls[env_idx] or self.positions[env_idx] > 0:
                self.dones[(self.positions[env_idx] - 1) % self.buffer_size, env_idx] = 1.0

    def add_offline(self, dataset: dict[str, Any], replace: bool = False) -> None:
        """
        Store an offline dataset in the fixed block beside the online rings (copied; the input is untouched).
        A second dataset is appended to the block, unless ``replace``; the last transition of each dataset ends
        an episode in the block, so no window bridges two datasets.

        :param dataset: dict with ``observations``, ``actions`` (scaled to [-1, 1]), ``rewards``,
            ``terminated`` (terminal states: no bootstrap), ``terminals`` (episode ends) and ``next_observations``,
            consecutive in time
        :param replace: drop the offline data stored so far instead of appending
        :raises ValueError: if an observation cannot be stored in the buffer's dtype without changing its value
        """
        block = {
            "observations": {
                k: cast_lossless(v, self.observations[k].dtype, f"observations/{k}" if k != _OBS_KEY else "observations")
                for k, v in self._as_obs_dict(dataset["observations"]).items()
            },
            "next_observations": {
                k: cast_lossless(v, self.next_observations[k].dtype, f"next_observations/{k}" if k != _OBS_KEY else "next_observations")
                for k, v in self._as_obs_dict(dataset["next_observations"]).items()
            },
            "actions": cast_lossless(dataset["actions"], np.float32, "actions").reshape(-1, self.action_dim),
            "rewards": cast_lossless(dataset["rewards"], np.float32, "rewards"),
            "terminated": cast_lossless(dataset["terminated"], np.float32, "terminated"),
            # Episode ends only: in offline data a terminal state (e.g. OGBench's task success) can sit in the
            # middle of an episode that goes on; it zeroes the window's mask, not its valid flags.
            "dones": cast_lossless(dataset["terminals"], np.float32, "terminals"),
        }
        block["dones"][-1] = 1.0  # nothing follows the last transition of a dataset
        if self.offline is None or replace:
            self.offline = block
            return
        old = self.offline
        self.offline = {
            key: (
                {k: np.concatenate([old[key][k], v]) for k, v in value.items()}
                if isinstance(value, dict)
                else np.concatenate([old[key], value])
            )
            for key, value in block.items()
        }

    def reset(self) -> None:
        """Forget the online transitions (the offline block stays)."""
        super().reset()
        self.positions[:] = 0
        self.fulls[:] = False

    # ----------------------------------------------------------------------------------------------
    # Sizes
    # ----------------------------------------------------------------------------------------------
    @property
    def offline_size(self) -> int:
        return 0 if self.offline is None else len(self.offline["rewards"])

    def online_size(self) -> int:
        return int(np.where(self.fulls, self.buffer_size, self.positions).sum())

    def size(self) -> int:
        """Number of stored primitive transitions, online and offline."""
        return self.online_size() + self.offline_size

    def online_window_count(self) -> int:
        """Number of distinct windows in the online rings."""
        return int(self._online_window_counts().sum())

    def usable_windows(self, online: bool) -> tuple[int, int]:
        """
        How many windows stay inside one episode (``valid_{h-1} = 1``: they have a bootstrap target and train the
        critic), out of all the windows of the online rings or of the offline block.

        :param online: count the online rings (True) or the offline block (False)
        :return: (usable windows, windows)
        """
        if online:
            stored = np.where(self.fulls, self.buffer_size, self.positions)
            first = np.where(self.fulls, self.positions, 0)
            sequences = [
                self.dones[(first[env_idx] + np.arange(stored[env_idx])) % self.buffer_size, env_idx]
                for env_idx in range(self.n_envs)
            ]
        else:
            sequences = [] if self.offline is None else [self.offline["dones"]]
        counts = [usable_windows(dones, self.chunk_size) for dones in sequences]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def _online_window_counts(self) -> np.ndarray:
        stored = np.where(self.fulls, self.buffer_size, self.positions)
        return np.maximum(stored - self.chunk_size + 1, 0)

    def _offline_window_count(self) -> int:
        return max(self.offline_size - self.chunk_size + 1, 0)

    def window_nbytes(self) -> int:
        """Bytes of one sampled window's arrays (observation, next observation, actions, reward, mask, valid flags)."""
        observation = sum(array[0, 0].nbytes for array in self.observations.values())
        return 2 * observation + self.actions[0, 0].nbytes * self.chunk_size + 4 * (2 + self.chunk_size)

    def num_windows(self) -> int:
        """Number of distinct windows that can be sampled."""
        return int(self._online_window_counts().sum()) + self._offline_window_count()

    # ----------------------------------------------------------------------------------------------
    # Sampling
    # ----------------------------------------------------------------------------------------------
    def sample(self, batch_size: int, env: VecNormalize | None = None) -> ChunkReplayBufferSamples:  # type: ignore[override]
        """
        Sample ``batch_size`` windows.

        :param batch_size: number of windows
        :param env: unused (VecNormalize is not supported), kept for SB3's signature
        :return: the windows' tensors
        """
        return self.sample_batches(batch_size, 1)[0]

    def sample_batches(self, batch_size: int, n_batches: int) -> list[ChunkReplayBufferSamples]:
        """
        ``n_batches`` independent batches of ``batch_size`` windows, each drawn as :meth:`sample` draws one, gathered
        in one pass: one indexing and one tensor per field for all of them (the batches are views into it), which
        costs less than ``n_batches`` calls of :meth:`sample`. QC's ``train`` draws the batches of several gradient
        steps at once.

        :param batch_size: number of windows per batch
        :param n_batches: number of batches
        :return: the batches' tensors
        """
        online_counts = self._online_window_counts()
        n_online, n_offline = int(online_counts.sum()), self._offline_window_count()
        if n_online + n_offline == 0:
            raise RuntimeError(
                f"The replay buffer holds no complete window of {self.chunk_size} steps yet "
                f"({self.size()} transitions stored)"
            )
        # Windows are gathered offline ones first, then online ones; ``order`` puts each batch's rows together.
        if self.offline_fraction is None or n_online == 0 or n_offline == 0:
            flat = np.random.randint(n_online + n_offline, size=n_batches * batch_size)
            from_offline = flat < n_offline
            offline_starts, online_flat = flat[from_offline], flat[~from_offline] - n_offline
            order = np.empty(len(flat), dtype=np.int64)
            order[from_offline] = np.arange(len(offline_starts))
            order[~from_offline] = len(offline_starts) + np.arange(len(online_flat))
        else:
            n_from_offline = int(round(batch_size * self.offline_fraction))
            offline_starts = np.random.randint(n_offline, size=n_batches * n_from_offline)
            online_flat = np.random.randint(n_online, size=n_batches * (batch_size - n_from_offline))
            order = np.concatenate(
                [
                    np.arange(len(offline_starts)).reshape(n_batches, -1),
                    len(offline_starts) + np.arange(len(online_flat)).reshape(n_batches, -1),
                ],
                axis=1,
            ).ravel()
        if len(offline_starts) == 0 or len(online_flat) == 0:
            order = None  # one source: the rows are in batch order already
        parts = []
        if len(offline_starts) > 0:
            parts.append(self._gather_offline(offline_starts))
        if len(online_flat) > 0:
            parts.append(self._gather_online(online_flat, online_counts))
        return self._to_samples(parts, order, n_batches)

    def _gather_online(self, flat: np.ndarray, counts: np.ndarray) -> dict[str, Any]:
        ends = np.cumsum(counts)
        env_idx = np.searchsorted(ends, flat, side="right")
        offset = flat - (ends - counts)[env_idx]
        # In a full ring the oldest transition sits at the write position.
        first = np.where(self.fulls[env_idx], self.positions[env_idx], 0) + offset
        steps = (first[:, None] + np.arange(self.chunk_size)) % self.buffer_size
        env_col = env_idx[:, None]
        return {
            "observations": {k: v[steps[:, 0], env_idx] for k, v in self.observations.items()},
            "next_observations": {k: v[steps[:, -1], env_idx] for k, v in self.next_observations.items()},
            "actions": self.actions[steps, env_col],
            "rewards": self.rewards[steps, env_col],
            "terminated": self.terminated[steps, env_col],
            "dones": self.dones[steps, env_col],
        }

    def _gather_offline(self, starts: np.ndarray) -> dict[str, Any]:
        assert self.offline is not None
        steps = starts[:, None] + np.arange(self.chunk_size)
        return {
            "observations": {k: v[steps[:, 0]] for k, v in self.offline["observations"].items()},
            "next_observations": {k: v[steps[:, -1]] for k, v in self.offline["next_observations"].items()},
            "actions": self.offline["actions"][steps],
            "rewards": self.offline["rewards"][steps],
            "terminated": self.offline["terminated"][steps],
            "dones": self.offline["dones"][steps],
        }

    def _to_samples(self, parts: list[dict[str, Any]], order: np.ndarray | None, n_batches: int) -> list[ChunkReplayBufferSamples]:
        """
        :param parts: the gathered windows, offline ones first
        :param order: the rows of the concatenated parts in batch order (None: they are)
        :param n_batches: into how many batches the rows are split
        """

        def rows(arrays: list[np.ndarray]) -> np.ndarray:
            joined = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            return joined if order is None else joined[order]

        def cat(name: str) -> Any:
            if isinstance(parts[0][name], dict):
                return {k: rows([p[name][k] for p in parts]) for k in parts[0][name]}
            return rows([p[name] for p in parts])

        def split(array: np.ndarray) -> tuple[th.Tensor, ...]:
            # (the array is a fresh copy that nothing else holds: the tensor may share its memory)
            return self.to_torch(array, copy=False).chunk(n_batches)

        def split_obs(obs: dict[str, np.ndarray]) -> list[th.Tensor] | list[TensorDict]:
            if not isinstance(self.observation_space, spaces.Dict):
                return list(split(obs[_OBS_KEY]))
            pieces = {k: split(v) for k, v in obs.items()}
            return [{k: v[i] for k, v in pieces.items()} for i in range(n_batches)]

        rewards, masks, valid = window_quantities(cat("rewards"), cat("terminated"), cat("dones"), self.gamma)
        fields = (
            split_obs(cat("observations")),
            split(cat("actions")),
            split_obs(cat("next_observations")),
            split(rewards.astype(np.float32)),
            split(masks.astype(np.float32)),
            split(valid),
        )
        return [ChunkReplayBufferSamples(*batch) for batch in zip(*fields)]

    def _get_samples(self, batch_inds: np.ndarray, env: VecNormalize | None = None) -> ChunkReplayBufferSamples:
        raise NotImplementedError("Use sample(): windows are drawn by start index, see ChunkReplayBuffer.sample")
