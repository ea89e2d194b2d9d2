"""Loaders of offline datasets into the common form (see :mod:`sb3_qchunk.datasets`): OGBench npz, Minari, plain npz or dicts."""

import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from sb3_qchunk.datasets.validation import ObsArray, _check_binary, cast_lossless, validate_dataset

OGBENCH_INFO_KEYS = ("qpos", "qvel", "button_states")


def _map_obs(fn: Any, obs: Any) -> Any:
    """Apply ``fn`` to an observation array, or to each array of a (one-level) dict of arrays."""
    if isinstance(obs, Mapping):
        for key, value in obs.items():
            if isinstance(value, Mapping):
                raise ValueError(f"key 'observations': nested dict observations are not supported (sub-key {key!r})")
        return {key: fn(value) for key, value in obs.items()}
    return fn(obs)


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
    :param env: the env the data are for: an instance (its gymnasium id is used) or an id such as
        ``'cube-single-singletask-task1-v0'``; needed with ``task_id``
    :return: the dataset in the common form, not validated (:func:`load_dataset` validates; the info keys
        ``qpos``/``qvel``/``button_states`` are dropped, as OGBench does by default)
    """
    return _ogbench_transitions(_read_npz(path), str(path), task_id, sparse, env)


def _read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file (read once; pickled objects are refused)."""
    with np.load(path, allow_pickle=False) as file:
        return {k: file[k] for k in file.files}


def _ogbench_transitions(
    raw: dict[str, np.ndarray], path: str, task_id: int | None, sparse: bool, env: gym.Env | str | None
) -> dict[str, Any]:
    """The common form of the arrays of an OGBench npz file (see :func:`load_ogbench_npz`)."""
    keys = set(raw)
    missing = [k for k in ("observations", "actions", "terminals") if k not in keys]
    if missing:
        raise ValueError(f"{path}: OGBench npz is missing key(s) {missing} (it has {sorted(keys)})")
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
        raise ImportError("load_minari() needs the minari package: pip install 'sb3-qchunk[minari]' (or minari)") from e

    try:
        dataset = minari.load_dataset(dataset_id, download=True) if download else minari.load_dataset(dataset_id)
    except FileNotFoundError as error:
        local = sorted(minari.list_local_datasets())
        raise FileNotFoundError(
            f"minari:{dataset_id} is not a local Minari dataset ({error}). Local datasets: {', '.join(local) or 'none'} "
            "(the folder is $MINARI_DATASETS_PATH, default ~/.minari/datasets); download=True fetches a remote one"
        ) from error
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


def load_dataset(
    source: str | os.PathLike | Mapping[str, Any],
    observation_space: spaces.Space | None = None,
    action_space: spaces.Space | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """
    Load a dataset from any supported source into the common form and validate it (:func:`validate_dataset`),
    the one place where datasets are checked.

    - ``"minari:<id>"``: :func:`load_minari`
    - a path ending in ``.npz`` (read once): :func:`load_ogbench_npz` for a file in the OGBench layout
      (``terminals``, no ``next_observations``) without ``rewards`` or with ``env`` / ``task_id`` given, else
      :func:`load_npz`
    - a dict of arrays: :func:`load_npz`

    :param source: see above
    :param observation_space: the env's observation space, to check the observations' shapes against (default: the
        observation space of ``env`` when an env instance is passed to the OGBench loader)
    :param action_space: the primitive action space, to check the actions' dimension and bounds against
    :param kwargs: passed to the loader (e.g. ``task_id``, ``env``, ``sparse`` for OGBench files)
    :return: the dataset in the common form
    """
    env = kwargs.get("env")
    if observation_space is None and env is not None and not isinstance(env, str):
        observation_space = env.observation_space
    if isinstance(source, Mapping):
        data = load_npz(source, **kwargs)
    elif isinstance(source, str) and source.startswith("minari:"):
        data = load_minari(source[len("minari:") :], **kwargs)
    elif isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith(".npz"):
        raw = _read_npz(source)
        ogbench_layout = "terminals" in raw and "next_observations" not in raw and "timeouts" not in raw
        if ogbench_layout and ("rewards" not in raw or "env" in kwargs or "task_id" in kwargs):
            data = _ogbench_transitions(raw, os.fspath(source), kwargs.pop("task_id", None), kwargs.pop("sparse", False), kwargs.pop("env", None))
            if kwargs:
                raise TypeError(f"unexpected argument(s) for an OGBench file: {sorted(kwargs)}")
        else:
            data = load_npz(raw, **kwargs)
    else:
        raise ValueError(f"unknown dataset source {source!r}: expected a .npz path, 'minari:<id>' or a dict of arrays")
    validate_dataset(data, observation_space, action_space)
    return data
