"""
RL Zoo integration of QC: ``python -m sb3_qchunk.zoo train|enjoy|record-video [RL Zoo flags]``.

Each command is RL Zoo's own (``rl_zoo3.train.train``, ``rl_zoo3.enjoy.enjoy``, ``rl_zoo3.record_video``) with,
before it runs:

- QC registered in RL Zoo's algorithm table (``--algo qc``), with its Optuna search space
  (:func:`sample_qc_params`, for ``-optimize``) and the converter used to load a trial (``--trial-id``);
- the OGBench manipulation envs registered under their dataset-style names, e.g.
  ``cube-single-play-singletask-task1-v0`` for ``cube-single-singletask-task1-v0`` (no download);
- for ``train``, :class:`QCExperimentManager` in place of RL Zoo's ``ExperimentManager``: it keeps the chunk
  wrapper of the hyperparameter file (``env_wrapper: - sb3_qchunk.ChunkedActionWrapper``) in step with QC's
  ``chunk_size``, ``action_chunking`` and ``gamma`` (also when they come from ``-params``, an Optuna trial or a
  loaded trial), and reports a missing offline dataset with the command that generates it; searches in a database
  send heartbeats, so that the trial of a worker that died is marked failed;
- for ``enjoy`` and ``record-video``, the model loaded as a primitive-step policy
  (:class:`PrimitiveStepPlayer`) on the env without its chunk wrapper: steps, episode lengths and rewards are
  primitive ones.

Example::

    python -m sb3_qchunk.zoo train --algo qc --env Pendulum-v1 -conf zoo_hyperparams/qc_cpu.yml -f logs/
    python -m sb3_qchunk.zoo enjoy --algo qc --env Pendulum-v1 -f logs/ --no-render -n 1000
"""

import importlib.resources
import os
import random
import re
import runpy
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from copy import deepcopy
from typing import Any

import gymnasium as gym
import yaml

try:
    import optuna
    import rl_zoo3
    import rl_zoo3.enjoy
    import rl_zoo3.hyperparams_opt
    import rl_zoo3.train
    import rl_zoo3.utils
    from rl_zoo3.exp_manager import ExperimentManager
    from rl_zoo3.utils import get_wrapper_class
except ImportError as error:
    raise ImportError(f"sb3_qchunk.zoo needs RL Zoo: pip install 'sb3-qchunk[zoo]' ({error})") from error

from sb3_qchunk.common.execution import ChunkExecutor
from sb3_qchunk.qc import QC

_create_test_env = rl_zoo3.utils.create_test_env  # RL Zoo's, before main() puts primitive_test_env in its place

#: OGBench manipulation envs given a ``-play-`` alias (tasks 1 to 5 each)
OGBENCH_ENVS = ("cube-single", "cube-double", "cube-triple", "cube-quadruple", "scene", "puzzle-3x3")
OGBENCH_TASKS = (1, 2, 3, 4, 5)
#: names under which the chunk wrapper may appear in a hyperparameter file
CHUNK_WRAPPER_NAMES = ("sb3_qchunk.ChunkedActionWrapper", "sb3_qchunk.wrappers.ChunkedActionWrapper")
#: net sizes of the Optuna search space (``policy_kwargs=dict(net_arch=...)``)
NET_ARCHS = {
    "small": [256, 256],
    "medium": [512, 512],
    "large": [512, 512, 512, 512],
}
#: the hyperparameter files shipped in the package (``zoo_hyperparams/`` of the repository)
SHIPPED_CONFIGS = ("qc.yml", "qc_cpu.yml")
# QC's defaults, for the chunk wrapper when the hyperparameter file leaves them out
DEFAULT_CHUNK_SIZE = 5
DEFAULT_GAMMA = 0.99


def register_ogbench_play_envs() -> list[str]:
    """
    Register ``<env>-play-singletask-task<k>-v0`` as an alias of OGBench's ``<env>-singletask-task<k>-v0``
    (same entry point, kwargs and time limit), for the envs of :data:`OGBENCH_ENVS` and tasks 1-5.
    The ``-play-`` name is the one of OGBench's datasets; nothing is downloaded.

    :return: the alias ids (already registered ones included)
    """
    import ogbench  # noqa: F401  (registers OGBench's env ids)

    aliases = []
    for env_name in OGBENCH_ENVS:
        for task_id in OGBENCH_TASKS:
            alias = f"{env_name}-play-singletask-task{task_id}-v0"
            aliases.append(alias)
            if alias in gym.registry:
                continue
            spec = gym.spec(f"{env_name}-singletask-task{task_id}-v0")
            gym.register(
                alias,
                entry_point=spec.entry_point,
                max_episode_steps=spec.max_episode_steps,
                kwargs=dict(spec.kwargs),
            )
    return aliases


def convert_qc_params(sampled_params: dict[str, Any]) -> dict[str, Any]:
    """
    Turn sampled values (an Optuna trial's ``params``) into QC keyword arguments.

    :param sampled_params: values named as in :func:`sample_qc_params`
    :return: QC keyword arguments
    """
    hyperparams = dict(sampled_params)
    hyperparams["gamma"] = 1 - hyperparams.pop("one_minus_gamma")
    hyperparams["policy_kwargs"] = {"net_arch": NET_ARCHS[hyperparams.pop("net_arch")]}
    return hyperparams


def sample_qc_params(trial: optuna.Trial, n_actions: int, n_envs: int, additional_args: dict) -> dict[str, Any]:
    """
    Sampler for QC hyperparams (RL Zoo's ``-optimize``): chunk size, learning rate, ``num_samples``
    (best-of-N actor) and ``alpha`` (distilled actor; each is ignored by the other actor type), net size, gamma.

    The env's chunk size follows the sampled ``chunk_size`` (see :meth:`QCExperimentManager.objective`).

    :param trial: the Optuna trial
    :param n_actions: size of the (chunk-level) action space, unused
    :param n_envs: number of envs, unused
    :param additional_args: RL Zoo's extra arguments, unused
    :return: QC keyword arguments
    """
    return convert_qc_params(
        {
            "chunk_size": trial.suggest_categorical("chunk_size", [1, 3, 5, 10]),
            "learning_rate": trial.suggest_float("learning_rate", 1e-5, 1e-3, log=True),
            "num_samples": trial.suggest_categorical("num_samples", [8, 16, 32, 64]),
            "alpha": trial.suggest_float("alpha", 1.0, 1000.0, log=True),
            "net_arch": trial.suggest_categorical("net_arch", list(NET_ARCHS)),
            "one_minus_gamma": trial.suggest_float("one_minus_gamma", 0.001, 0.05, log=True),
        }
    )


def register_qc() -> None:
    """Register QC in RL Zoo's tables (``rl_zoo3.ALGOS`` and the Optuna sampler / converter tables) and the OGBench aliases."""
    rl_zoo3.ALGOS["qc"] = QC
    rl_zoo3.hyperparams_opt.HYPERPARAMS_SAMPLER["qc"] = sample_qc_params
    rl_zoo3.hyperparams_opt.HYPERPARAMS_CONVERTER["qc"] = convert_qc_params
    register_ogbench_play_envs()


def sync_chunk_wrapper(hyperparams: dict[str, Any]) -> list[Any]:
    """
    The ``env_wrapper`` entry of ``hyperparams`` with the chunk wrapper set to QC's chunk size and gamma
    (``chunk_size``, or 1 with ``action_chunking: False``); the wrapper is added last if the entry lacks it.

    :param hyperparams: QC hyperparameters as read from the file (``env_wrapper`` still a name/list)
    :return: the new ``env_wrapper`` list (``hyperparams`` is not modified)
    """
    chunk_size = hyperparams.get("chunk_size", DEFAULT_CHUNK_SIZE) if hyperparams.get("action_chunking", True) else 1
    chunk_kwargs = {"chunk_size": int(chunk_size), "gamma": float(hyperparams.get("gamma", DEFAULT_GAMMA))}
    wrappers = deepcopy(hyperparams.get("env_wrapper")) or []
    if not isinstance(wrappers, list):
        wrappers = [wrappers]
    synced, found = [], False
    for wrapper in wrappers:
        name, kwargs = (wrapper, {}) if isinstance(wrapper, str) else next(iter(wrapper.items()))
        if name in CHUNK_WRAPPER_NAMES:
            wrapper, found = {name: {**(kwargs or {}), **chunk_kwargs}}, True
        synced.append(wrapper)
    if not found:
        synced.append({CHUNK_WRAPPER_NAMES[0]: chunk_kwargs})
    return synced


def check_offline_dataset(hyperparams: dict[str, Any], env_id: str) -> None:
    """
    Raise an error that says how to make the file if ``offline_dataset`` names a missing file.

    :param hyperparams: QC hyperparameters
    :param env_id: the env id being trained on
    """
    path = hyperparams.get("offline_dataset")
    if not isinstance(path, str) or path.startswith("minari:") or os.path.exists(path):
        return
    message = f"Offline dataset {path!r} (offline_dataset of {env_id}) not found."
    match = re.fullmatch(r"(?P<name>.+?)(-play)?-singletask(-task\d+)?-v\d+", env_id)
    if match is not None:
        message += (
            " Generate it with: python -m sb3_qchunk.datasets generate "
            f"--env {match['name']} --size 1000000 --out {path}"
            " (1000000: the size of OGBench's play datasets; a smaller --size makes a quick one)"
        )
    raise FileNotFoundError(message)


class QCExperimentManager(ExperimentManager):
    """
    RL Zoo's ``ExperimentManager`` that keeps QC's chunk wrapper in step with its ``chunk_size``
    (see :func:`sync_chunk_wrapper`) and checks the offline dataset file. Other algorithms are unchanged.

    ``--eval-freq``, ``--save-freq`` and Optuna's evaluation frequency (``n_timesteps / n_evaluations``) count
    primitive steps, like ``n_timesteps``: QC counts the frequencies of ``EvalCallback`` and ``CheckpointCallback`` on
    primitive steps (see :meth:`QC.learn`).
    """

    #: seconds between two heartbeats of a running trial in a database storage (see :meth:`hyperparameters_optimization`)
    heartbeat_interval: int = 60

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.algo == "qc":
            self.config = qc_config(None if kwargs.get("config") is None else self.config)

    def read_hyperparameters(self) -> tuple[dict[str, Any], dict[str, Any]]:
        if self.algo == "qc" and self.config.endswith((".yml", ".yaml")):
            with open(self.config) as file:
                entries = [key for key in yaml.safe_load(file) if not str(key).startswith("_")]
            if self.env_name.gym_id not in entries and "default" not in entries:
                raise ValueError(
                    f"{self.config} has no entry for {self.env_name.gym_id}; its envs: {', '.join(entries)}. "
                    "Add one (or a 'default' entry) to a copy of the file and pass it with -conf."
                )
        hyperparams, saved_hyperparams = super().read_hyperparameters()
        if self.storage and self.study_name and self.trial_id == 0:
            # RL Zoo tests `if self.trial_id:` and so skips trial 0: load it as it loads the others (the file's values,
            # then the trial's, then -params)
            print("Loading from Optuna study...")
            hyperparams.update(self.load_trial(self.storage, self.study_name, 0))
            hyperparams.update(self.custom_hyperparams or {})
            saved_hyperparams = OrderedDict((key, hyperparams[key]) for key in sorted(hyperparams))
        if self.algo == "qc":
            # The saved config (used by enjoy / record-video) gets the synced wrapper too.
            hyperparams["env_wrapper"] = saved_hyperparams["env_wrapper"] = sync_chunk_wrapper(hyperparams)
            self._raw_env_wrapper = hyperparams["env_wrapper"]
            check_offline_dataset(hyperparams, self.env_name.gym_id)
        return hyperparams, saved_hyperparams

    def hyperparameters_optimization(self) -> None:
        """
        RL Zoo's Optuna search. To search in parallel, run several worker processes (on one machine or many) with
        the same ``--storage`` database URL and ``--study-name``: each runs ``--n-trials`` trials (or, with
        ``--max-total-trials``, until the study holds that many). ``--n-jobs > 1`` is refused for QC: its threads
        would share one process's torch RNG, thread pool and compiled code.

        With a database URL, running trials send Optuna heartbeats every :attr:`heartbeat_interval` seconds
        (``--heartbeat-interval`` of ``python -m sb3_qchunk.zoo train``); the trial of a worker that died (killed, machine
        lost) is marked ``FAIL`` by the next worker that starts a trial after twice that time, and no longer counts
        towards ``--max-total-trials``.
        """
        if self.algo == "qc" and self.n_jobs > 1:
            raise ValueError(
                f"--n-jobs {self.n_jobs}: trials in threads of one process share torch's global RNG, thread settings "
                "and compiled code. Run several worker processes with the same --storage and --study-name instead."
            )
        if self.storage is None or "://" not in self.storage:
            super().hyperparameters_optimization()
            return
        url = self.storage
        prepare_storage(url)
        self.storage = HeartbeatStorage(url, heartbeat_interval=self.heartbeat_interval)  # type: ignore[assignment]
        try:
            super().hyperparameters_optimization()
        finally:
            self.storage = url

    def objective(self, trial: optuna.Trial) -> float:
        if self.algo != "qc":
            return super().objective(trial)
        # Optuna gives the same values when RL Zoo's objective samples this trial again.
        sampled = sample_qc_params(trial, self.n_actions, self.n_envs, {})
        env_wrapper = sync_chunk_wrapper({**self._hyperparams, **sampled, "env_wrapper": self._raw_env_wrapper})
        self.env_wrapper = get_wrapper_class({"env_wrapper": env_wrapper})
        return super().objective(trial)


class HeartbeatStorage(optuna.storages.RDBStorage):
    """
    Optuna's ``RDBStorage`` with heartbeats (``grace_period``: Optuna's default, twice the interval), in the place of
    ``--storage`` in RL Zoo's search: RL Zoo reads that attribute as the URL string and calls ``endswith(".log")`` on
    it to choose its journal-file storage; this storage answers for its URL.

    :param url: an SQLAlchemy URL of the database
    :param heartbeat_interval: seconds between two heartbeats of a running trial
    """

    def __init__(self, url: str, heartbeat_interval: int) -> None:
        super().__init__(url, heartbeat_interval=heartbeat_interval)

    def endswith(self, suffix: str | tuple[str, ...]) -> bool:
        return self.url.endswith(suffix)


def prepare_storage(url: str, attempts: int = 10) -> None:
    """
    Check the database driver of an Optuna storage URL (:func:`check_storage_driver`) and create Optuna's tables in the
    database if they are not there yet. Workers that start at the same moment on an empty database all try to create
    them and all but one fail (optuna/optuna#1092): here a worker that loses that race waits and tries again, and
    finds the tables made by the winner.

    :param url: an SQLAlchemy URL of the database
    :param attempts: tries before the error is raised
    """
    import sqlalchemy.exc

    check_storage_driver(url)
    for attempt in range(attempts):
        try:
            optuna.storages.RDBStorage(url)
            return
        except sqlalchemy.exc.SQLAlchemyError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 + random.random())  # another worker is creating the tables


def qc_config(config: str | None) -> str:
    """
    The hyperparameter file of ``--algo qc``: ``-conf``'s path if it exists; else, for a bare name or a path whose file
    is missing (e.g. ``-conf zoo_hyperparams/qc_cpu.yml`` outside the repo), the file of that name shipped in the
    package (``qc.yml``: the paper's scale, for a GPU; ``qc_cpu.yml``: a CPU scale); without ``-conf``, the shipped
    ``qc.yml``.

    :param config: what ``-conf`` gave, or None
    :return: the path of the file to read
    """
    if config is not None and (os.path.exists(config) or not config.endswith((".yml", ".yaml"))):
        return config
    name = "qc.yml" if config is None else os.path.basename(config)
    shipped = importlib.resources.files("sb3_qchunk.zoo_hyperparams") / name
    if not shipped.is_file():
        raise FileNotFoundError(f"-conf {config}: no such file, and the package ships only {SHIPPED_CONFIGS}")
    return str(shipped)


def check_storage_driver(url: str) -> None:
    """
    Check that the database driver of an Optuna storage URL can be imported, with a message that says what to install
    (SQLAlchemy 2.1 maps ``postgresql://`` to psycopg 3; ``postgresql+psycopg2://`` names psycopg2).

    :param url: an SQLAlchemy URL, e.g. ``postgresql+psycopg2://user@host:5432/optuna``
    :raises ImportError: if the driver is missing
    """
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    try:
        parsed.get_dialect().import_dbapi()
    except ImportError as error:
        raise ImportError(
            f"--storage {parsed.render_as_string(hide_password=True)}: its database driver is not installed ({error}). "
            "For PostgreSQL: pip install 'sb3-qchunk[postgresql]' and name the driver in the URL, "
            "postgresql+psycopg2://..."
        ) from error


class PrimitiveStepPlayer:
    """
    ``--algo qc``'s entry in RL Zoo's algorithm table for ``enjoy`` and ``record-video``: loads the saved QC model as
    a :class:`~sb3_qchunk.common.execution.ChunkExecutor`, a policy of one primitive action per ``predict``, to run
    on the env without its chunk wrapper (:func:`primitive_test_env`). So ``-n`` counts primitive steps, the episode
    lengths and rewards printed are primitive steps and undiscounted returns, and a video has a frame per step.
    The chunks run open-loop, or as ``--replan-every K`` / ``--temporal-ensemble M`` of ``enjoy`` and
    ``record-video`` say (:attr:`replan_every`, :attr:`temporal_ensemble`; see ``ChunkExecutor``).
    """

    #: the executor's settings, from the command line
    replan_every: int | None = None
    temporal_ensemble: float | None = None

    @classmethod
    def load(cls, path: str, env: Any = None, **kwargs: Any) -> ChunkExecutor:
        """
        :param path: the saved model
        :param env: ignored (the executor needs no env; the saved model knows its spaces)
        :param kwargs: passed to :meth:`QC.load`
        """
        return ChunkExecutor(QC.load(path, **kwargs), replan_every=cls.replan_every, temporal_ensemble=cls.temporal_ensemble)


def primitive_test_env(*args: Any, hyperparams: dict[str, Any], **kwargs: Any) -> Any:
    """RL Zoo's ``create_test_env`` without the chunk wrapper of ``hyperparams["env_wrapper"]`` (see :class:`PrimitiveStepPlayer`)."""
    hyperparams = dict(hyperparams)
    wrappers = hyperparams.get("env_wrapper") or []
    wrappers = [w for w in (wrappers if isinstance(wrappers, list) else [wrappers]) if _wrapper_name(w) not in CHUNK_WRAPPER_NAMES]
    if wrappers:
        hyperparams["env_wrapper"] = wrappers
    else:
        hyperparams.pop("env_wrapper", None)
    return _create_test_env(*args, hyperparams=hyperparams, **kwargs)


def _wrapper_name(wrapper: Any) -> str:
    return wrapper if isinstance(wrapper, str) else next(iter(wrapper))


def _pop_option(flags: list[str], name: str, convert: Callable[[str], Any]) -> Any:
    """Remove ``name VALUE`` from ``flags`` (ours, not RL Zoo's) and return ``convert(VALUE)``, or None if absent."""
    if name not in flags:
        return None
    index = flags.index(name)
    try:
        value = convert(flags[index + 1])
    except (IndexError, ValueError):
        raise SystemExit(f"{name} takes a {convert.__name__} value") from None
    del flags[index : index + 2]
    return value


def main(argv: list[str] | None = None) -> None:
    """
    Run an RL Zoo command with QC registered: ``train``, ``enjoy`` or ``record-video`` followed by its flags. ``train``
    also takes ``--heartbeat-interval SECONDS`` (default 60) for searches in a database (see
    :meth:`QCExperimentManager.hyperparameters_optimization`); ``enjoy`` and ``record-video`` take
    ``--replan-every K`` or ``--temporal-ensemble M`` (see :class:`PrimitiveStepPlayer`).

    :param argv: the command and its flags (default: ``sys.argv[1:]``)
    """
    argv = sys.argv[1:] if argv is None else argv
    commands = ("train", "enjoy", "record-video")
    if not argv or argv[0] not in commands:
        raise SystemExit(f"usage: python -m sb3_qchunk.zoo {{{','.join(commands)}}} [RL Zoo flags]")
    register_qc()
    command, flags = argv[0], list(argv[1:])
    if command == "train":
        heartbeat = _pop_option(flags, "--heartbeat-interval", int)
        if heartbeat is not None:
            if heartbeat < 1:
                raise SystemExit("--heartbeat-interval must be at least 1 second")
            QCExperimentManager.heartbeat_interval = heartbeat
    else:
        PrimitiveStepPlayer.replan_every = _pop_option(flags, "--replan-every", int)
        PrimitiveStepPlayer.temporal_ensemble = _pop_option(flags, "--temporal-ensemble", float)
    # RL Zoo's entry points parse sys.argv themselves
    sys.argv = [f"{sys.argv[0]} {command}", *flags]
    if command == "train":
        rl_zoo3.train.ExperimentManager = QCExperimentManager  # type: ignore[misc]
        rl_zoo3.train.train()
    else:
        rl_zoo3.ALGOS["qc"] = PrimitiveStepPlayer  # type: ignore[assignment]
        rl_zoo3.utils.create_test_env = primitive_test_env  # type: ignore[assignment]
        if command == "enjoy":
            rl_zoo3.enjoy.create_test_env = primitive_test_env  # type: ignore[assignment]
            rl_zoo3.enjoy.enjoy()
        else:
            # the script has no entry function: run it as ``python -m rl_zoo3.record_video`` would (it imports
            # create_test_env from rl_zoo3.utils when it runs)
            runpy.run_module("rl_zoo3.record_video", run_name="__main__")


if __name__ == "__main__":
    main()
