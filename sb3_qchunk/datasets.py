"""
Offline datasets for Q-chunking: loaders into one in-memory form, a validator, and local generation of
OGBench manipulation "play" datasets (OGBench's own downloads are not needed).

The common form is a plain ``dict[str, np.ndarray]`` of N consecutive primitive transitions:

- ``observations``: (N, *obs_shape), float32 (integer observations such as uint8 images keep their dtype); may
  be a dict of such arrays for dict observation spaces. The replay buffer stores them in the dtype of the
  observation space (float32 for float spaces) and refuses a cast that would change a value.
- ``actions``: (N, A) float32
- ``rewards``: (N,) float32
- ``terminals``: (N,) float32, 1 at the last transition of each episode (episode end, whatever the reason)
- ``terminated``: (N,) float32, 1 only at true terminal states (no bootstrapping from ``next_observations``)
- ``next_observations``: same layout as ``observations``

In OGBench single-task data, ``terminated`` (= 1 - OGBench's ``masks``) can be 1 in the middle of an
episode: the play data go on after the task is solved, so ``terminals`` stays 0 there.

Command line (generation of a dataset in the official OGBench npz layout)::

    python -m sb3_qchunk.datasets generate --env cube-single --size 1000000 --out data/cube-single-play.npz --seed 0
"""

import argparse
import math
import os
import pathlib
import re
import time
import warnings
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from tqdm import tqdm

ObsArray = np.ndarray | dict[str, np.ndarray]

REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals", "terminated", "next_observations")
OGBENCH_INFO_KEYS = ("qpos", "qvel", "button_states")


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------
def _map_obs(fn: Any, obs: Any) -> Any:
    """Apply ``fn`` to an observation array, or to each array of a (one-level) dict of arrays."""
    if isinstance(obs, Mapping):
        for key, value in obs.items():
            if isinstance(value, Mapping):
                raise ValueError(f"key 'observations': nested dict observations are not supported (sub-key {key!r})")
        return {key: fn(value) for key, value in obs.items()}
    return fn(obs)


def cast_lossless(x: Any, dtype: np.dtype | type, name: str) -> np.ndarray:
    """
    A copy of ``x`` in ``dtype``, refused where the cast would change values: floats that are not integers or out
    of range for an integer dtype (float images in [0, 1] for a uint8 observation space), integers out of range,
    integers beyond 2**24 in magnitude for float32, finite values that overflow to inf. Float64 -> float32 rounding
    is accepted (what the networks compute in).

    :param x: an array
    :param dtype: the dtype wanted
    :param name: the key, for the message
    :return: a new array, never a view of ``x``
    :raises ValueError: naming the key, how many values would change and the first of them
    """
    array, dtype = np.asarray(x), np.dtype(dtype)
    out = np.array(array, dtype=dtype)
    if array.dtype == dtype or array.size == 0:
        return out
    source = array.dtype.kind
    if dtype.kind == "f":
        if source == "f":
            bad = np.isinf(out) & np.isfinite(array)
        elif source in "iu":
            bad = (np.abs(array.astype(np.float64)) > 2**24) & (out.astype(np.float64) != array.astype(np.float64))
        else:
            bad = np.zeros(array.shape, dtype=bool)
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        if source == "f":
            with np.errstate(invalid="ignore"):
                bad = ~np.isfinite(array) | (array != np.round(array)) | (array < info.min) | (array > info.max)
        elif source in "iu":
            bad = (array < info.min) | (array > info.max)
        else:
            bad = np.zeros(array.shape, dtype=bool)
    else:
        bad = np.zeros(array.shape, dtype=bool)
    if bad.any():
        first = int(np.argmax(bad.reshape(-1)))
        row = np.unravel_index(first, array.shape)[0] if array.ndim > 0 else 0
        raise ValueError(
            f"key '{name}': casting its {array.dtype} values to {dtype} (the dtype they are stored in) would change "
            f"{int(bad.sum())} of them (first at row {row}: {array.reshape(-1)[first]}). Convert the data yourself if "
            f"that is what you want (e.g. images in [0, 1] to uint8 with np.round(x * 255)), or give the env an "
            f"observation space of their dtype."
        )
    return out


def _copy_obs(obs: Any, name: str = "observations") -> ObsArray:
    """Copy observations, floats as float32 (integer ones, e.g. images, keep their dtype); never a view of the input."""

    def copy(key: str, x: Any) -> np.ndarray:
        x = np.asarray(x)
        return cast_lossless(x, x.dtype if x.dtype.kind in "biu" else np.float32, key)

    if isinstance(obs, Mapping):
        _map_obs(lambda x: x, obs)  # refuses nested dicts
        return {key: copy(f"{name}/{key}", value) for key, value in obs.items()}
    return copy(name, obs)


def _float32_copy(x: Any, name: str) -> np.ndarray:
    return cast_lossless(x, np.float32, name)


def _num_rows(x: Any) -> int:
    if isinstance(x, Mapping):
        return min((len(v) for v in x.values()), default=0)
    return len(np.asarray(x))


def sparsify_rewards(rewards: np.ndarray) -> np.ndarray:
    """
    The Q-chunking paper's sparse reward option: -1 wherever the reward is non-zero, 0 elsewhere
    (``(r != 0) * -1.0``). On OGBench single-task data this makes every step -1 until all subtasks are solved.

    :param rewards: rewards, (N,)
    :return: a new float32 array
    """
    return ((np.asarray(rewards) != 0) * -1.0).astype(np.float32)


def _check_binary(name: str, values: np.ndarray) -> None:
    bad = np.flatnonzero((values != 0) & (values != 1))
    if len(bad) > 0:
        raise ValueError(
            f"key '{name}' must hold only 0/1 values: found {values[bad[0]].item()} at index {bad[0]} "
            f"({len(bad)} such values)"
        )


def _ogbench_masks(terminals: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """
    Masks of OGBench's ``load_dataset`` (regular, non-compact form). In the file, each episode's last row only
    holds the final observation s_T (its action has no next state): it becomes the ``next_observations`` of the
    row before and is dropped as a transition.

    :param terminals: (N,) 1 at the last row of each episode (that row must be the file's last row too)
    :return: ob_mask (rows kept as transitions), next_ob_mask (rows used as next observations), and the new
        ``terminals`` (float32, 1 at the last kept transition of each episode), of the kept rows
    """
    terminals = np.asarray(terminals)
    if terminals.ndim != 1:
        raise ValueError(f"key 'terminals' must have shape (N,), got {terminals.shape}")
    if len(terminals) == 0:
        raise ValueError("dataset is empty (key 'terminals' has no rows)")
    _check_binary("terminals", terminals)
    terminals = terminals.astype(bool)
    if not terminals[-1]:
        raise ValueError(
            "key 'terminals': the last row must end an episode (terminals[-1] == 1): without next_observations, "
            "the last row of each episode holds that episode's final observation"
        )
    ob_mask = ~terminals
    next_ob_mask = np.concatenate([[False], ob_mask[:-1]])
    new_terminals = np.concatenate([terminals[1:], [True]])[ob_mask].astype(np.float32)
    if not ob_mask.any():
        raise ValueError("dataset is empty: every row has terminals == 1, so there is no transition")
    return ob_mask, next_ob_mask, new_terminals


def _env_id(env: Any) -> str:
    """The gymnasium id of an env instance (also of a VecEnv's first env), or ``env`` itself if it is a string."""
    if isinstance(env, str):
        return env
    spec = getattr(env, "spec", None)
    if spec is None and hasattr(env, "get_attr"):  # SB3 VecEnv
        spec = env.get_attr("spec", [0])[0]
    if spec is None:
        raise ValueError(f"cannot tell the gymnasium id of {env!r} (no spec): pass its id as a string instead")
    return spec.id


def _singletask_env_id(env_id: str, task_id: int | None) -> str | None:
    """
    The OGBench single-task env id to relabel rewards with: ``<base>-singletask-task<task_id>-<version>``;
    with ``task_id=None``, ``env_id`` itself if it is a single-task id, else None.
    """
    match = re.fullmatch(r"(?P<base>.+?)-singletask(?:-task(?P<task>\d+))?-(?P<version>v\d+)", env_id)
    if match is None:
        match = re.fullmatch(r"(?P<base>.+)-(?P<version>v\d+)", env_id)
        if match is None:
            raise ValueError(f"env id {env_id!r} does not look like an OGBench env id (e.g. 'cube-single-v0')")
        if task_id is None:
            return None
    elif task_id is None:
        return env_id
    elif match["task"] is not None and int(match["task"]) != task_id:
        raise ValueError(f"task_id={task_id} contradicts env {env_id!r} (task {match['task']}): pass one of them, or both alike")
    return f"{match['base']}-singletask-task{task_id}-{match['version']}"


# --------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------
def load_ogbench_npz(
    path: str | os.PathLike,
    task_id: int | None = None,
    sparse: bool = False,
    env: gym.Env | str | None = None,
) -> dict[str, np.ndarray]:
    """
    Load a dataset in the official OGBench npz layout (``observations``, ``actions``, ``terminals``, optional
    ``qpos``, ``qvel``, ``button_states``): a downloaded one or one made by :func:`generate_ogbench_dataset`.

    Transitions are built as ``ogbench.utils.load_dataset`` does: within an episode the next observation is the
    following row; the last row of each episode only holds the final observation (it is not a transition), so an
    episode of T+1 rows gives T transitions and ``terminals`` is 1 at the T-th.

    Rewards and ``terminated`` come from ``ogbench.relabel_utils.relabel_dataset`` with a fresh single-task env
    (as ``ogbench.make_env_and_datasets`` does for ``*-singletask-*`` datasets): success is measured on the
    state of ``observations`` (the single-task envs use ``success_timing='pre'``), ``rewards`` = number of
    solved subtasks - number of subtasks, ``terminated`` = 1 - OGBench's ``masks`` (1 when all are solved).
    The env passed in is not reset nor stepped.

    :param path: the ``.npz`` file (only read)
    :param task_id: OGBench task (1-5) to relabel rewards for. None: the task of ``env`` if it is a single-task
        env (``'...-singletask-task2-v0'``, or ``'...-singletask-v0'`` for the default task); otherwise the file
        must hold ``rewards`` itself
    :param sparse: the paper's sparse rewards: ``(r != 0) * -1.0``
    :param env: the env the data are for: an instance (its gymnasium id is used, and its observation space is
        checked against the data) or an id such as ``'cube-single-singletask-task1-v0'``; needed with ``task_id``
    :return: the dataset in the common form (float32; the info keys ``qpos``/``qvel``/``button_states`` are
        dropped, as OGBench does by default)
    """
    with np.load(path, allow_pickle=False) as file:
        keys = set(file.files)
        missing = [k for k in ("observations", "actions", "terminals") if k not in keys]
        if missing:
            raise ValueError(f"{path}: OGBench npz is missing key(s) {missing} (it has {sorted(keys)})")
        raw = {k: file[k] for k in file.files}

    ob_mask, next_ob_mask, terminals = _ogbench_masks(raw["terminals"])
    observations = raw["observations"]  # read from the file: a fresh array, masks below copy it again
    ob_dtype = np.uint8 if observations.dtype == np.uint8 else np.float32
    data: dict[str, Any] = {
        "observations": cast_lossless(observations[ob_mask], ob_dtype, "observations"),
        "next_observations": cast_lossless(observations[next_ob_mask], ob_dtype, "observations"),
        "actions": cast_lossless(raw["actions"][ob_mask], np.float32, "actions"),
        "terminals": terminals,
    }
    info = {k: raw[k][ob_mask] for k in OGBENCH_INFO_KEYS if k in raw}

    relabel_id = None
    if env is not None:
        relabel_id = _singletask_env_id(_env_id(env), task_id)
    elif task_id is not None:
        raise ValueError(
            f"task_id={task_id} needs env: an OGBench env or id such as 'cube-single-singletask-task1-v0' "
            "(its name tells which relabelling to use)"
        )

    if relabel_id is not None:
        if "qpos" not in info:
            raise ValueError(f"{path}: relabelling rewards needs key 'qpos' in the file (it has {sorted(keys)})")
        from ogbench.relabel_utils import relabel_dataset

        relabel_env = gym.make(relabel_id)
        try:
            relabelled = dict(info)
            relabel_dataset(relabel_id, relabel_env, relabelled)
        finally:
            relabel_env.close()
        data["rewards"] = relabelled["rewards"].astype(np.float32)
        data["terminated"] = (1.0 - relabelled["masks"]).astype(np.float32)
    elif "rewards" in raw:
        data["rewards"] = _float32_copy(raw["rewards"], "rewards")[ob_mask]
        if "terminated" in raw:
            data["terminated"] = _float32_copy(raw["terminated"], "terminated")[ob_mask]
        elif "masks" in raw:
            data["terminated"] = 1.0 - _float32_copy(raw["masks"], "masks")[ob_mask]
        else:
            data["terminated"] = np.zeros(len(terminals), dtype=np.float32)
    else:
        raise ValueError(
            f"{path} holds no rewards (a goal-conditioned OGBench dataset): pass task_id and env "
            "(e.g. task_id=1, env='cube-single-singletask-task1-v0') to relabel them for one task"
        )

    if sparse:
        data["rewards"] = sparsify_rewards(data["rewards"])
    observation_space = None if env is None or isinstance(env, str) else env.observation_space
    validate_dataset(data, observation_space=observation_space)
    return data


def load_minari(dataset_id: str, download: bool = False, sparse: bool = False) -> dict[str, Any]:
    """
    Load a Minari dataset (``minari.load_dataset``) into the common form. Each Minari episode has T steps and
    T + 1 observations: ``observations`` are the first T, ``next_observations`` the last T; ``terminated`` is
    Minari's ``terminations``; ``terminals`` is 1 at the last step of every episode (terminated, truncated, or
    just cut when recording stopped). Episodes with no step are skipped.

    :param dataset_id: Minari id, e.g. ``'mujoco/hopper/medium-v0'``
    :param download: download the dataset if it is not local (``minari.load_dataset(..., download=True)``)
    :param sparse: the paper's sparse rewards: ``(r != 0) * -1.0``
    :return: the dataset in the common form (dict observations stay dicts of arrays)
    """
    try:
        import minari
    except ImportError as e:
        raise ImportError("load_minari() needs the minari package: pip install minari") from e

    dataset = minari.load_dataset(dataset_id, download=True) if download else minari.load_dataset(dataset_id)
    observations, next_observations, actions, rewards, terminated, terminals = [], [], [], [], [], []
    for episode in dataset.iterate_episodes():
        n_steps = len(episode.rewards)
        if n_steps == 0:
            continue
        if _num_rows(episode.observations) != n_steps + 1:
            raise ValueError(
                f"minari:{dataset_id} episode {episode.id}: expected {n_steps + 1} observations for {n_steps} steps, "
                f"got {_num_rows(episode.observations)}"
            )
        observations.append(_map_obs(lambda x: np.asarray(x)[:-1], episode.observations))
        next_observations.append(_map_obs(lambda x: np.asarray(x)[1:], episode.observations))
        actions.append(np.asarray(episode.actions, dtype=np.float32).reshape(n_steps, -1))
        rewards.append(np.asarray(episode.rewards, dtype=np.float32))
        terminated.append(np.asarray(episode.terminations, dtype=np.float32))
        episode_end = np.zeros(n_steps, dtype=np.float32)
        episode_end[-1] = 1.0
        terminals.append(episode_end)
    if not rewards:
        raise ValueError(f"dataset is empty: minari:{dataset_id} has no episode with at least one step")

    def concat(parts: list[Any]) -> ObsArray:
        if isinstance(parts[0], Mapping):
            return {k: _copy_obs(np.concatenate([p[k] for p in parts])) for k in parts[0]}
        return _copy_obs(np.concatenate(parts))

    data = {
        "observations": concat(observations),
        "next_observations": concat(next_observations),
        "actions": np.concatenate(actions),
        "rewards": np.concatenate(rewards),
        "terminated": np.concatenate(terminated),
        "terminals": np.concatenate(terminals),
    }
    if sparse:
        data["rewards"] = sparsify_rewards(data["rewards"])
    validate_dataset(data)
    return data


def load_npz(path_or_dict: str | os.PathLike | Mapping[str, Any], sparse: bool = False) -> dict[str, Any]:
    """
    Load a dataset already in the common form, from an ``.npz`` file or a dict of arrays; the input is only read
    (everything returned is a copy).

    - ``rewards`` and ``terminals`` are required; ``terminated`` defaults to zeros.
    - D4RL convention: with a ``timeouts`` key, ``terminals`` are the true terminal states and ``timeouts`` the
      truncations (as in D4RL's ``get_dataset()`` / ``qlearning_dataset()``): ``terminated`` = ``terminals`` and
      the episode ends are ``terminals | timeouts``. Without ``next_observations`` the next observation of a row
      is the following row; rows where ``timeouts`` is 1 and the last row have none recorded and are dropped as
      transitions (as ``qlearning_dataset`` does; a warning says how many).
    - Without ``next_observations`` (and without ``timeouts``), the rows are read in the OGBench layout (see
      :func:`load_ogbench_npz`): the row where ``terminals`` is 1 only holds its episode's final observation, so
      it becomes the ``next_observations`` of the row before and is dropped as a transition (its action and
      reward are discarded); ``terminated`` set on such a row is an error (put it on the row before). A warning
      says that this layout was assumed and how many rows became transitions.
    - Other keys are ignored. An ``.npz`` holds array observations only; a dict can hold dict observations.
    - Values are cast to float32 (integer observations keep their dtype); a cast that would change values is an error.

    :param path_or_dict: ``.npz`` path or dict of arrays
    :param sparse: the paper's sparse rewards: ``(r != 0) * -1.0``
    :return: the dataset in the common form
    """
    if isinstance(path_or_dict, Mapping):
        raw = dict(path_or_dict)
    else:
        with np.load(path_or_dict, allow_pickle=False) as file:
            raw = {k: file[k] for k in file.files}
    for key in ("observations", "actions", "rewards", "terminals"):
        if key not in raw:
            raise ValueError(f"dataset is missing key '{key}' (it has {sorted(raw)})")
    n_rows = _num_rows(raw["rewards"])
    for key in ("observations", "actions", "terminals", "terminated", "timeouts", "next_observations"):
        if key in raw and _num_rows(raw[key]) != n_rows:
            raise ValueError(f"key '{key}' has {_num_rows(raw[key])} rows but 'rewards' has {n_rows}")

    if "timeouts" in raw:
        data = _d4rl_transitions(raw)
    elif "next_observations" in raw:
        data = {
            "observations": _copy_obs(raw["observations"]),
            "next_observations": _copy_obs(raw["next_observations"], "next_observations"),
            "actions": _float32_copy(raw["actions"], "actions"),
            "rewards": _float32_copy(raw["rewards"], "rewards"),
            "terminals": _float32_copy(raw["terminals"], "terminals"),
            "terminated": (
                _float32_copy(raw["terminated"], "terminated") if "terminated" in raw else np.zeros(n_rows, dtype=np.float32)
            ),
        }
    else:
        ob_mask, next_ob_mask, terminals = _ogbench_masks(raw["terminals"])
        terminated = _float32_copy(raw["terminated"], "terminated") if "terminated" in raw else np.zeros(n_rows, np.float32)
        dropped = np.flatnonzero(terminated.astype(bool) & ~ob_mask)
        if len(dropped) > 0:
            raise ValueError(
                f"key 'terminated' is 1 at index {dropped[0]}, a row that (without next_observations) only holds an "
                "episode's final observation and is dropped: set terminated on the row before it"
            )
        observations = _copy_obs(raw["observations"])
        data = {
            "observations": _map_obs(lambda x: x[ob_mask], observations),
            "next_observations": _map_obs(lambda x: x[next_ob_mask], observations),
            "actions": _float32_copy(raw["actions"], "actions")[ob_mask],
            "rewards": _float32_copy(raw["rewards"], "rewards")[ob_mask],
            "terminals": terminals,
            "terminated": terminated[ob_mask],
        }
        warnings.warn(
            f"The dataset has no 'next_observations': read in the OGBench layout, where the last row of each episode "
            f"only holds its final observation. {n_rows} rows -> {int(ob_mask.sum())} transitions in "
            f"{int((~ob_mask).sum())} episodes. Pass 'next_observations' to keep every row as a transition, or "
            "'timeouts' for the D4RL convention.",
            stacklevel=2,
        )
    if sparse:
        data["rewards"] = sparsify_rewards(data["rewards"])
    return data


def _d4rl_transitions(raw: dict[str, Any]) -> dict[str, Any]:
    """The common form of a dataset in the D4RL convention (``terminals`` = true terminals, ``timeouts``)."""
    terminal = _float32_copy(raw["terminals"], "terminals")
    timeouts = _float32_copy(raw["timeouts"], "timeouts")
    _check_binary("terminals", terminal)
    _check_binary("timeouts", timeouts)
    if "terminated" in raw:
        raise ValueError("keys 'terminated' and 'timeouts' both given: with 'timeouts' (D4RL), 'terminals' are the true terminals")
    observations = _copy_obs(raw["observations"])
    actions, rewards = _float32_copy(raw["actions"], "actions"), _float32_copy(raw["rewards"], "rewards")
    if "next_observations" in raw:
        next_observations = _copy_obs(raw["next_observations"], "next_observations")
        keep = np.ones(len(terminal), dtype=bool)
    else:
        # The next observation of row i is row i + 1, except after a timeout (not recorded) and after the last row.
        keep = timeouts == 0
        keep[-1] = False
        next_index = np.minimum(np.arange(len(terminal)) + 1, len(terminal) - 1)
        next_observations = _map_obs(lambda x: x[next_index], observations)
        if not keep.any():
            raise ValueError("dataset is empty: no row has a next observation (every row is a timeout or the last one)")
        warnings.warn(
            f"D4RL-style dataset without 'next_observations': {len(keep)} rows -> {int(keep.sum())} transitions "
            f"({int((~keep).sum())} rows dropped: timeouts and the last row, whose next observation is not recorded).",
            stacklevel=3,
        )
    # An episode ends at a terminal state, at a timeout, at the row before a dropped row, and at the data's end.
    ends = np.maximum(terminal, timeouts)
    if "next_observations" not in raw:
        ends = np.maximum(ends, np.concatenate([~keep[1:], [True]]).astype(np.float32))
    ends[-1] = 1.0
    return {
        "observations": _map_obs(lambda x: x[keep], observations),
        "next_observations": _map_obs(lambda x: x[keep], next_observations),
        "actions": actions[keep],
        "rewards": rewards[keep],
        "terminals": ends[keep],
        "terminated": terminal[keep],
    }


def load_dataset(source: str | os.PathLike | Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
    """
    Load a dataset from any supported source into the common form.

    - ``"minari:<id>"``: :func:`load_minari`
    - a path ending in ``.npz``: :func:`load_ogbench_npz` if the file has ``terminals`` but no ``rewards``
      (the OGBench layout), else :func:`load_npz`
    - a dict of arrays: :func:`load_npz`

    :param source: see above
    :param kwargs: passed to the loader (e.g. ``task_id``, ``env``, ``sparse`` for OGBench files)
    :return: the dataset in the common form
    """
    if isinstance(source, Mapping):
        return load_npz(source, **kwargs)
    if isinstance(source, str) and source.startswith("minari:"):
        return load_minari(source[len("minari:") :], **kwargs)
    if isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith(".npz"):
        with np.load(source, allow_pickle=False) as file:
            keys = set(file.files)
        if "terminals" in keys and "rewards" not in keys:
            return load_ogbench_npz(source, **kwargs)
        return load_npz(source, **kwargs)
    raise ValueError(f"unknown dataset source {source!r}: expected a .npz path, 'minari:<id>' or a dict of arrays")


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
def _check_finite(name: str, x: np.ndarray) -> None:
    if not np.issubdtype(x.dtype, np.floating):
        return
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        count = int((~np.isfinite(x)).sum())
        raise ValueError(f"key '{name}' has {count} NaN/inf value(s) (first at index {int(np.argmax(bad))})")


def _check_obs_shape(name: str, obs: ObsArray, space: spaces.Space | None) -> None:
    if space is None:
        return
    if isinstance(space, spaces.Dict):
        if not isinstance(obs, Mapping):
            raise ValueError(f"key '{name}' holds an array but the observation space is a Dict: {space}")
        if set(obs) != set(space.spaces):
            raise ValueError(
                f"key '{name}' has sub-keys {sorted(obs)} but the observation space has {sorted(space.spaces)}"
            )
        for key, sub_space in space.spaces.items():
            _check_obs_shape(f"{name}/{key}", obs[key], sub_space)
        return
    if isinstance(obs, Mapping):
        raise ValueError(f"key '{name}' holds a dict but the observation space is not a Dict: {space}")
    if space.shape is not None and tuple(obs.shape[1:]) != tuple(space.shape):
        raise ValueError(
            f"key '{name}' has observations of shape {tuple(obs.shape[1:])} but the env's observation space has "
            f"shape {tuple(space.shape)}"
        )


def validate_dataset(
    data: Mapping[str, Any],
    observation_space: spaces.Space | None = None,
    action_space: spaces.Space | None = None,
) -> None:
    """
    Check a dataset in the common form before anything trains on it; nothing is modified. Each problem raises a
    ``ValueError`` naming the key: a missing key, an empty dataset, wrong shapes or mismatched lengths, NaN/inf
    values (how many, first index), ``terminals``/``terminated`` not 0/1, action dimension or Box bounds not
    matching ``action_space`` (the min/max found vs the bounds), observation shapes not matching
    ``observation_space``.

    The last transition must end an episode (``terminals[-1]`` or ``terminated[-1]`` is 1): this is an error,
    not a warning, because the replay buffer never builds a chunk across the end of the data, and an unfinished
    last episode usually means a truncated copy (set ``terminals[-1] = 1`` on your copy if that is intended).

    :param data: the dataset
    :param observation_space: the env's observation space (shapes are checked, not dtypes: OGBench envs
        declare float64, datasets hold float32)
    :param action_space: the primitive action space (of one step, not of a chunk); only ``Box`` is supported
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"dataset must be a dict of arrays, got {type(data).__name__}")
    for key in REQUIRED_KEYS:
        if key not in data:
            raise ValueError(f"dataset is missing key '{key}' (it has {sorted(data)})")

    arrays: dict[str, np.ndarray] = {}
    for key in REQUIRED_KEYS:
        value = data[key]
        if key in ("observations", "next_observations") and isinstance(value, Mapping):
            for sub_key, sub_value in value.items():
                arrays[f"{key}/{sub_key}"] = np.asarray(sub_value)
        else:
            arrays[key] = np.asarray(value)

    n = len(arrays["rewards"]) if arrays["rewards"].ndim > 0 else 0
    if n == 0:
        raise ValueError("dataset is empty (key 'rewards' has no rows)")
    for key, array in arrays.items():
        if array.ndim == 0 or len(array) != n:
            length = "a scalar" if array.ndim == 0 else f"{len(array)} rows"
            raise ValueError(f"key '{key}' has {length} but 'rewards' has {n}")
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise ValueError(f"key '{key}' must be numeric, got dtype {array.dtype}")
    for key in ("rewards", "terminals", "terminated"):
        if arrays[key].ndim != 1:
            raise ValueError(f"key '{key}' must have shape (N,), got {arrays[key].shape}")
    if arrays["actions"].ndim != 2:
        raise ValueError(f"key 'actions' must have shape (N, A), got {arrays['actions'].shape} (use reshape(N, -1))")
    obs_keys = sorted(k for k in arrays if k.startswith("observations"))
    next_keys = sorted(k[len("next_") :] for k in arrays if k.startswith("next_observations"))
    if obs_keys != next_keys:
        raise ValueError(f"keys 'observations' and 'next_observations' differ: {obs_keys} vs {next_keys}")
    for key in obs_keys:
        if arrays[key].shape != arrays["next_" + key].shape:
            raise ValueError(
                f"key 'next_{key}' has shape {arrays['next_' + key].shape} but '{key}' has {arrays[key].shape}"
            )

    for key, array in arrays.items():
        _check_finite(key, array)
    _check_binary("terminals", arrays["terminals"])
    _check_binary("terminated", arrays["terminated"])
    if arrays["terminals"][-1] != 1 and arrays["terminated"][-1] != 1:
        raise ValueError(
            "key 'terminals': the last transition must end an episode (terminals[-1] == 1); "
            "the data seem cut in the middle of an episode"
        )

    if action_space is not None:
        if not isinstance(action_space, spaces.Box):
            raise ValueError(f"key 'actions': only Box action spaces are supported, got {action_space}")
        actions = arrays["actions"]
        action_dim = int(np.prod(action_space.shape))
        if actions.shape[1] != action_dim:
            raise ValueError(
                f"key 'actions' has dimension {actions.shape[1]} but the (primitive) action space has {action_dim} "
                f"({action_space}); pass the action space of one step, not of a chunk"
            )
        low, high = action_space.low.reshape(-1), action_space.high.reshape(-1)
        # Tolerance for float32 data against float64 bounds (0.3 as float32 is slightly above 0.3).
        below = actions < low - 1e-6 * np.maximum(1.0, np.abs(low))
        above = actions > high + 1e-6 * np.maximum(1.0, np.abs(high))
        outside = (below | above).any(axis=1)
        if outside.any():
            raise ValueError(
                f"key 'actions' has values outside the action space bounds in {int(outside.sum())} row(s) "
                f"(first at index {int(np.argmax(outside))}): min found {np.round(actions.min(axis=0), 4).tolist()} "
                f"vs low {low.tolist()}, max found {np.round(actions.max(axis=0), 4).tolist()} vs high {high.tolist()}"
            )

    _check_obs_shape("observations", data["observations"], observation_space)
    _check_obs_shape("next_observations", data["next_observations"], observation_space)


# --------------------------------------------------------------------------------------------------
# Local generation of OGBench manipulation "play" datasets
# --------------------------------------------------------------------------------------------------
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
    parser = argparse.ArgumentParser(prog="python -m sb3_qchunk.datasets", description=__doc__.split("\n\n")[0])
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
