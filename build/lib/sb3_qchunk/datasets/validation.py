"""Validation of datasets in the common form (see :mod:`sb3_qchunk.datasets`), and the lossless casts they go through."""

from collections.abc import Mapping
from typing import Any

import numpy as np
from gymnasium import spaces

ObsArray = np.ndarray | dict[str, np.ndarray]

REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals", "terminated", "next_observations")


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


def _check_binary(name: str, values: np.ndarray) -> None:
    bad = np.flatnonzero((values != 0) & (values != 1))
    if len(bad) > 0:
        raise ValueError(
            f"key '{name}' must hold only 0/1 values: found {values[bad[0]].item()} at index {bad[0]} "
            f"({len(bad)} such values)"
        )


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
