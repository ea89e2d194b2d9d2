import hashlib
import sys
import types
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

from sb3_qchunk import QC
from sb3_qchunk.datasets import (
    cached_play_dataset,
    generate_ogbench_dataset,
    load_dataset,
    load_minari,
    load_npz,
    load_ogbench_npz,
    main,
    validate_dataset,
)

ogbench = pytest.importorskip("ogbench")

EPISODE_LENGTH = 200
N_EPISODES = 10
TASK1_ENV = "cube-single-singletask-task1-v0"
TASK1_GOAL = np.array([0.425, -0.1, 0.02])  # cube-single task1_horizontal, from OGBench's task list
TASK2_GOAL = np.array([0.50, 0.0, 0.02])  # task2_vertical1
CUBE_XYZ = slice(14, 17)  # the cube's position in qpos


def file_digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cube_single(tmp_path_factory):
    """2000 transitions of cube-single play data, 200-step episodes, saved in OGBench's layout."""
    path = tmp_path_factory.mktemp("data") / "cube-single-play.npz"
    raw = generate_ogbench_dataset(
        "cube-single", N_EPISODES * EPISODE_LENGTH, seed=0, out=path, episode_length=EPISODE_LENGTH, progress_bar=False
    )
    return path, raw


@pytest.fixture(scope="module")
def task1_env():
    env = gym.make(TASK1_ENV)
    yield env
    env.close()


def toy_ogbench_file(tmp_path, qpos_cube, name="toy.npz"):
    """Two episodes in OGBench's layout (3 and 4 rows) whose cube positions are ``qpos_cube`` (7, 3)."""
    qpos = np.zeros((7, 21), dtype=np.float32)
    qpos[:, CUBE_XYZ] = qpos_cube
    path = tmp_path / name
    np.savez(
        path,
        observations=np.arange(7 * 28, dtype=np.float32).reshape(7, 28),
        actions=np.linspace(-1, 1, 35, dtype=np.float32).reshape(7, 5),
        terminals=np.array([0, 0, 1, 0, 0, 0, 1], dtype=bool),
        qpos=qpos,
        qvel=np.zeros((7, 20), dtype=np.float32),
    )
    return path


def valid_dataset(n=6, obs_dim=3, action_dim=2):
    rng = np.random.default_rng(0)
    terminals = np.zeros(n, dtype=np.float32)
    terminals[[2, n - 1]] = 1.0
    return {
        "observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, action_dim)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "terminals": terminals,
        "terminated": np.zeros(n, dtype=np.float32),
        "next_observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
    }


OBS_SPACE = spaces.Box(-np.inf, np.inf, (3,), np.float64)
ACTION_SPACE = spaces.Box(-1.0, 1.0, (2,), np.float32)


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------
def test_generated_layout(cube_single, task1_env):
    path, raw = cube_single
    rows = N_EPISODES * (EPISODE_LENGTH + 1)
    with np.load(path) as file:
        assert sorted(file.files) == ["actions", "observations", "qpos", "qvel", "terminals"]
        assert file["terminals"].dtype == bool and file["observations"].dtype == np.float32
        for key in file.files:
            np.testing.assert_array_equal(file[key], raw[key])
    assert raw["observations"].shape == (rows, 28) and raw["actions"].shape == (rows, 5)
    assert raw["qpos"].shape == (rows, 21) and raw["qvel"].shape == (rows, 20)
    # Episodes of 201 rows: the official layout (max_episode_steps = episode length + 1).
    episode_ends = np.arange(1, N_EPISODES + 1) * (EPISODE_LENGTH + 1) - 1
    np.testing.assert_array_equal(np.flatnonzero(raw["terminals"]), episode_ends)
    assert raw["observations"].shape[1:] == task1_env.observation_space.shape
    assert np.abs(raw["actions"]).max() <= 1.0
    # qpos of a row is the state the observation of that row was computed from (arm joints come first).
    np.testing.assert_allclose(raw["observations"][:, :6], raw["qpos"][:, :6], atol=1e-6)
    # Within an episode the cube is moved by the oracle (it does pick and place), and the gripper opens and closes.
    cube_xy = raw["qpos"][:, 14:16]
    assert np.ptp(cube_xy[: EPISODE_LENGTH + 1], axis=0).max() > 0.05
    assert raw["qpos"][:, 16].max() > 0.05  # lifted
    gripper = raw["observations"][:, 17] / 3.0  # gripper opening (scaled by 3 in the observation)
    assert gripper.min() < 0.1 and gripper.max() > 0.5


def test_generation_is_reproducible_and_restores_global_rng():
    np.random.seed(123)
    state = np.random.get_state()
    a = generate_ogbench_dataset("cube-single", 150, seed=3, episode_length=75, progress_bar=False)
    after = np.random.get_state()
    assert np.array_equal(state[1], after[1]) and state[2] == after[2]
    b = generate_ogbench_dataset("cube-single-play-v0", 150, seed=3, episode_length=75, progress_bar=False)
    c = generate_ogbench_dataset("cube-single", 150, seed=4, episode_length=75, progress_bar=False)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert a["observations"].shape == (2 * 76, 28)
    assert not np.array_equal(a["actions"], c["actions"])
    assert not np.array_equal(a["observations"][0], c["observations"][0])


@pytest.mark.parametrize(
    "env_name, obs_dim, button_dim",
    [("cube-double", 37, None), ("scene", 40, 2), ("puzzle-3x3", 55, 9)],
)
def test_generate_other_envs(tmp_path, env_name, obs_dim, button_dim):
    path = tmp_path / f"{env_name}.npz"
    raw = generate_ogbench_dataset(env_name, 60, seed=0, out=path, episode_length=60, progress_bar=False)
    assert raw["observations"].shape == (61, obs_dim)
    if button_dim is None:
        assert "button_states" not in raw
    else:
        assert raw["button_states"].shape == (61, button_dim) and raw["button_states"].dtype == np.int64
    env = gym.make(f"{env_name}-singletask-task2-v0")
    data = load_ogbench_npz(path, task_id=2, env=env)
    env.close()
    assert data["observations"].shape == (60, obs_dim) == (60, *env.observation_space.shape)
    # OGBench's reward: number of solved subtasks minus their number, so at most 0 and at least -n_subtasks.
    assert data["rewards"].max() <= 0 and data["rewards"].min() < 0


def test_generate_rejects_unsupported_envs():
    with pytest.raises(ValueError, match="pixel"):
        generate_ogbench_dataset("visual-cube-single", 10)
    with pytest.raises(ValueError, match="cube"):
        generate_ogbench_dataset("antmaze-large-navigate", 10)
    with pytest.raises(ValueError, match="positive"):
        generate_ogbench_dataset("cube-single", 0)


def test_cli(tmp_path, capsys):
    out = tmp_path / "sub" / "cli.npz"
    main(["generate", "--env", "cube-single", "--size", "100", "--episode-length", "50", "--out", str(out)]
         + ["--seed", "1", "--no-progress-bar"])
    assert "steps/s" in capsys.readouterr().out
    with np.load(out) as file:
        assert file["observations"].shape == (102, 28)
        np.testing.assert_array_equal(np.flatnonzero(file["terminals"]), [50, 101])


# --------------------------------------------------------------------------------------------------
# OGBench loader
# --------------------------------------------------------------------------------------------------
def test_ogbench_loader_matches_ogbench(cube_single, task1_env):
    from ogbench.relabel_utils import relabel_dataset
    from ogbench.utils import load_dataset as ogbench_load_dataset

    path, raw = cube_single
    digest = file_digest(path)
    data = load_ogbench_npz(path, task_id=1, env=task1_env)
    ref = ogbench_load_dataset(str(path), add_info=True)
    ref_env = gym.make(TASK1_ENV)
    relabel_dataset(TASK1_ENV, ref_env, ref)
    ref_env.close()

    assert sorted(data) == sorted(["observations", "actions", "rewards", "terminals", "terminated", "next_observations"])
    for key in ["observations", "next_observations", "actions", "terminals", "rewards"]:
        np.testing.assert_array_equal(data[key], ref[key])
        assert data[key].dtype == np.float32
    np.testing.assert_array_equal(data["terminated"], 1.0 - ref["masks"])
    n = N_EPISODES * EPISODE_LENGTH
    assert data["observations"].shape == (n, 28)
    np.testing.assert_array_equal(np.flatnonzero(data["terminals"]), np.arange(1, N_EPISODES + 1) * EPISODE_LENGTH - 1)
    # Within an episode the next observation is the following row; the episode's last row is never a transition.
    np.testing.assert_array_equal(data["next_observations"][:EPISODE_LENGTH], raw["observations"][1 : EPISODE_LENGTH + 1])
    np.testing.assert_array_equal(data["observations"][EPISODE_LENGTH], raw["observations"][EPISODE_LENGTH + 1])
    assert file_digest(path) == digest
    # The task can be inferred from a single-task env, and the dispatcher recognises the OGBench layout.
    inferred = load_ogbench_npz(path, env=TASK1_ENV)
    np.testing.assert_array_equal(inferred["rewards"], data["rewards"])
    dispatched = load_dataset(path, task_id=1, env=TASK1_ENV, sparse=True)
    np.testing.assert_array_equal(dispatched["rewards"], (ref["rewards"] != 0) * -1.0)
    assert file_digest(path) == digest


def test_relabelling_hand_checked(tmp_path, task1_env):
    # Cube on task 1's goal at rows 1 and 4, 3 cm off at row 5 (within the 4 cm tolerance), 5 cm off at row 3.
    cube = np.tile([0.3, 0.2, 0.02], (7, 1))
    cube[[1, 4]] = TASK1_GOAL
    cube[5] = TASK1_GOAL + [0.03, 0.0, 0.0]
    cube[3] = TASK1_GOAL + [0.0, 0.05, 0.0]
    cube[6] = TASK2_GOAL
    path = toy_ogbench_file(tmp_path, cube)
    digest = file_digest(path)

    data = load_ogbench_npz(path, task_id=1, env=task1_env)
    # Rows 2 and 6 end the episodes (final observations only): transitions are rows 0, 1, 3, 4, 5.
    np.testing.assert_array_equal(data["rewards"], [-1, 0, -1, 0, 0])
    np.testing.assert_array_equal(data["terminated"], [0, 1, 0, 1, 1])
    np.testing.assert_array_equal(data["terminals"], [0, 1, 0, 0, 1])
    assert data["rewards"].dtype == np.float32 and data["terminated"].dtype == np.float32

    # With task 2 only a cube on task 2's goal counts (none of the kept rows); a task-1 env contradicts task_id=2.
    task2 = load_ogbench_npz(path, task_id=2, env="cube-single-v0")
    with pytest.raises(ValueError, match="contradicts"):
        load_ogbench_npz(path, task_id=2, env=task1_env)
    np.testing.assert_array_equal(task2["rewards"], [-1, -1, -1, -1, -1])
    np.testing.assert_array_equal(task2["terminated"], [0, 0, 0, 0, 0])

    sparse = load_ogbench_npz(path, task_id=1, env=TASK1_ENV, sparse=True)
    np.testing.assert_array_equal(sparse["rewards"], [-1, 0, -1, 0, 0])
    assert file_digest(path) == digest


def test_sparse_rewards_on_multi_subtask_rewards():
    data = valid_dataset(n=6)
    data["rewards"] = np.array([-2.0, -1.0, 0.0, -1.0, 0.5, 0.0], dtype=np.float32)
    rewards_before = data["rewards"].copy()
    sparse = load_npz(data, sparse=True)
    np.testing.assert_array_equal(sparse["rewards"], [-1.0, -1.0, 0.0, -1.0, -1.0, 0.0])
    assert sparse["rewards"].dtype == np.float32
    np.testing.assert_array_equal(data["rewards"], rewards_before)


def test_ogbench_loader_errors(tmp_path):
    path = toy_ogbench_file(tmp_path, np.zeros((7, 3)))
    with pytest.raises(ValueError, match="task_id"):
        load_ogbench_npz(path)  # goal-conditioned data: no rewards
    with pytest.raises(ValueError, match="needs env"):
        load_ogbench_npz(path, task_id=1)
    with pytest.raises(ValueError, match="'qpos'"):
        bad = tmp_path / "noqpos.npz"
        np.savez(bad, observations=np.zeros((3, 28)), actions=np.zeros((3, 5)), terminals=np.array([0, 0, 1]))
        load_ogbench_npz(bad, task_id=1, env=TASK1_ENV)
    with pytest.raises(ValueError, match=r"terminals\[-1\]"):
        cut = tmp_path / "cut.npz"
        np.savez(cut, observations=np.zeros((3, 28)), actions=np.zeros((3, 5)), terminals=np.array([0, 1, 0]))
        load_ogbench_npz(cut, task_id=1, env=TASK1_ENV)
    with pytest.raises(ValueError, match="observation space"):
        small = tmp_path / "small.npz"
        np.savez(
            small, observations=np.zeros((3, 4)), actions=np.zeros((3, 5)), terminals=np.array([0, 0, 1]), rewards=np.zeros(3)
        )
        load_dataset(small, env=gym.make("cube-single-v0"))  # validated against the env's observation space


# --------------------------------------------------------------------------------------------------
# next_observations, plain loader and dispatcher
# --------------------------------------------------------------------------------------------------
TWO_EPISODES = {
    # episode 1: s0 s1 s2 (s2 final), episode 2: s10 s11 s12 s13 (s13 final)
    "observations": np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [12.0], [13.0]]),
    "actions": np.array([[0.1], [0.2], [0.3], [0.4], [0.5], [0.6], [0.7]]),
    "rewards": np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]),
    "terminals": np.array([0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]),
}


def test_next_observations_two_episodes(tmp_path):
    before = {k: v.copy() for k, v in TWO_EPISODES.items()}
    data = load_npz(TWO_EPISODES)
    np.testing.assert_array_equal(data["observations"][:, 0], [0, 1, 10, 11, 12])
    np.testing.assert_array_equal(data["next_observations"][:, 0], [1, 2, 11, 12, 13])
    np.testing.assert_allclose(data["actions"][:, 0], [0.1, 0.2, 0.4, 0.5, 0.6])
    np.testing.assert_array_equal(data["rewards"], [1, 2, 4, 5, 6])
    np.testing.assert_array_equal(data["terminals"], [0, 1, 0, 0, 1])
    np.testing.assert_array_equal(data["terminated"], [0, 0, 0, 0, 0])
    assert all(data[k].dtype == np.float32 for k in data)
    for key, value in TWO_EPISODES.items():  # the input is untouched
        np.testing.assert_array_equal(value, before[key])
        assert value.dtype == np.float64
    validate_dataset(data, spaces.Box(-np.inf, np.inf, (1,)), spaces.Box(-1, 1, (1,)))

    # Same construction as OGBench's own loader on the same rows.
    from ogbench.utils import load_dataset as ogbench_load_dataset

    path = tmp_path / "two.npz"
    np.savez(path, **{k: v for k, v in TWO_EPISODES.items() if k != "rewards"})
    ref = ogbench_load_dataset(str(path))
    for key in ["observations", "next_observations", "actions", "terminals"]:
        np.testing.assert_array_equal(data[key], ref[key])


def test_load_npz_plain(tmp_path):
    data = valid_dataset()
    data["observations"] = data["observations"].astype(np.float64)
    del data["terminated"]
    out = load_npz(data)
    np.testing.assert_array_equal(out["terminated"], np.zeros(6))
    assert out["observations"].dtype == np.float32
    for key in ["observations", "actions", "rewards", "terminals", "next_observations"]:
        np.testing.assert_allclose(out[key], data[key].astype(np.float32))
        assert not np.shares_memory(out[key], data[key])  # copies, even when the dtype is already float32
    out["rewards"][:] = 99.0
    assert (data["rewards"] != 99.0).all()

    path = tmp_path / "plain.npz"
    np.savez(path, **valid_dataset())
    digest = file_digest(path)
    from_file = load_dataset(path, sparse=True)
    np.testing.assert_array_equal(from_file["rewards"], (valid_dataset()["rewards"] != 0) * -1.0)
    assert file_digest(path) == digest

    with pytest.raises(ValueError, match="missing key 'rewards'"):
        load_npz({k: v for k, v in TWO_EPISODES.items() if k != "rewards"})
    terminated_on_final_row = dict(TWO_EPISODES, terminated=np.array([0, 0, 1, 0, 0, 0, 0.0]))
    with pytest.raises(ValueError, match="'terminated' is 1 at index 2"):
        load_npz(terminated_on_final_row)


def test_load_npz_dict_observations():
    data = valid_dataset()
    data["observations"] = {"a": np.ones((6, 2)), "b": np.zeros((6, 1, 2))}
    data["next_observations"] = {"a": np.ones((6, 2)), "b": np.zeros((6, 1, 2))}
    out = load_dataset(data)
    assert out["observations"]["b"].shape == (6, 1, 2) and out["observations"]["a"].dtype == np.float32
    space = spaces.Dict({"a": spaces.Box(-1, 1, (2,)), "b": spaces.Box(-1, 1, (1, 2))})
    validate_dataset(out, space, ACTION_SPACE)
    with pytest.raises(ValueError, match=r"'observations/b' has observations of shape \(1, 2\)"):
        validate_dataset(out, spaces.Dict({"a": spaces.Box(-1, 1, (2,)), "b": spaces.Box(-1, 1, (2,))}))


def test_dispatcher_sources():
    with pytest.raises(ValueError, match="unknown dataset source"):
        load_dataset("data.hdf5")
    try:
        import minari  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install .sb3-qchunk\[minari\]."):
            load_dataset("minari:mujoco/hopper/medium-v0")


def test_load_minari_with_a_fake_minari(monkeypatch):
    def episode(idx, n, terminated):
        return types.SimpleNamespace(
            id=idx,
            observations=np.arange(n + 1, dtype=np.float64)[:, None] + 100 * idx,
            actions=np.full((n, 2), 0.5 * idx),
            rewards=np.arange(n, dtype=np.float64),
            terminations=np.array([False] * (n - 1) + [terminated]),
            truncations=np.array([False] * (n - 1) + [not terminated]),
        )

    episodes = [episode(0, 3, True), episode(1, 0, False), episode(2, 2, False)]
    fake = types.SimpleNamespace(
        load_dataset=lambda dataset_id: types.SimpleNamespace(iterate_episodes=lambda: iter(episodes))
    )
    monkeypatch.setitem(sys.modules, "minari", fake)
    data = load_minari("fake/data-v0")
    np.testing.assert_array_equal(data["observations"][:, 0], [0, 1, 2, 200, 201])
    np.testing.assert_array_equal(data["next_observations"][:, 0], [1, 2, 3, 201, 202])
    np.testing.assert_array_equal(data["terminated"], [0, 0, 1, 0, 0])
    np.testing.assert_array_equal(data["terminals"], [0, 0, 1, 0, 1])
    np.testing.assert_array_equal(data["rewards"], [0, 1, 2, 0, 1])
    assert data["actions"].shape == (5, 2) and data["actions"].dtype == np.float32
    sparse = load_dataset("minari:fake/data-v0", sparse=True)
    np.testing.assert_array_equal(sparse["rewards"], [0, -1, -1, 0, -1])


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
def break_dataset(change):
    data = valid_dataset()
    change(data)
    return data


def _set(key, index, value):
    def change(data):
        data[key][index] = value

    return change


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("terminated"), "missing key 'terminated'"),
        (lambda d: d.pop("next_observations"), "missing key 'next_observations'"),
        (lambda d: d.update(actions=d["actions"][:5]), "key 'actions' has 5 rows but 'rewards' has 6"),
        (lambda d: d.update(next_observations=d["next_observations"][:, :2]), "key 'next_observations' has shape"),
        (lambda d: d.update(rewards=d["rewards"][:, None]), r"key 'rewards' must have shape \(N,\)"),
        (lambda d: d.update(actions=d["actions"][:, 0]), r"key 'actions' must have shape \(N, A\)"),
        (_set("observations", (3, 1), np.nan), r"key 'observations' has 1 NaN/inf value\(s\) \(first at index 3\)"),
        (lambda d: d["rewards"].__setitem__([2, 4], [np.inf, np.nan]), r"key 'rewards' has 2 NaN/inf value\(s\) \(first at index 2\)"),
        (_set("actions", (5, 0), -np.inf), r"key 'actions' has 1 NaN/inf value\(s\) \(first at index 5\)"),
        (_set("terminals", 1, 0.5), "key 'terminals' must hold only 0/1 values: found 0.5 at index 1"),
        (_set("terminated", 0, 2.0), "key 'terminated' must hold only 0/1"),
        (_set("terminals", 5, 0.0), r"last transition must end an episode \(terminals\[-1\] == 1\)"),
        (lambda d: d.update({k: v[:0] for k, v in d.items()}), "dataset is empty"),
        (lambda d: d.update(observations={"a": d["observations"]}), "differ"),
    ],
)
def test_validation_errors(change, message):
    data = break_dataset(change)
    with pytest.raises(ValueError, match=message):
        validate_dataset(data, OBS_SPACE, ACTION_SPACE)


def test_validation_against_spaces():
    data = valid_dataset()
    before = {k: v.copy() for k, v in data.items()}
    validate_dataset(data, OBS_SPACE, ACTION_SPACE)
    validate_dataset(data)
    # A true terminal at the end also ends the data.
    ends_terminated = dict(data, terminals=np.zeros(6, np.float32), terminated=np.eye(6, dtype=np.float32)[5])
    validate_dataset(ends_terminated)

    with pytest.raises(ValueError, match=r"key 'actions' has dimension 2 but the \(primitive\) action space has 6"):
        validate_dataset(data, action_space=spaces.Box(-1, 1, (6,)))
    data["actions"][4] = [1.5, -0.2]
    data["actions"][1] = [0.3, -3.0]
    with pytest.raises(ValueError) as error:
        validate_dataset(data, action_space=ACTION_SPACE)
    text = str(error.value)
    assert "key 'actions' has values outside the action space bounds in 2 row(s) (first at index 1)" in text
    assert "min found [" in text and "-3.0]" in text and "vs low [-1.0, -1.0]" in text
    assert "max found [1.5," in text and "vs high [1.0, 1.0]" in text
    validate_dataset(data, action_space=spaces.Box(-3.0, 1.5, (2,)))  # exactly on the bounds is fine

    message = r"key 'observations' has observations of shape \(3,\) but the env's observation space has shape \(28,\)"
    with pytest.raises(ValueError, match=message):
        validate_dataset(data, observation_space=spaces.Box(-np.inf, np.inf, (28,)))
    with pytest.raises(ValueError, match="Dict"):
        validate_dataset(data, observation_space=spaces.Dict({"a": OBS_SPACE}))
    with pytest.raises(ValueError, match="only Box"):
        validate_dataset(data, action_space=spaces.Discrete(3))
    for key in ["observations", "rewards", "terminals", "terminated", "next_observations"]:
        np.testing.assert_array_equal(data[key], before[key])  # validation never changes anything


def test_cached_play_dataset_generates_once_and_refuses_other_requests(tmp_path):
    path = tmp_path / "sub" / "cube-single-play.npz"
    assert cached_play_dataset(path, "cube-single", 100, seed=1, progress_bar=False) == path
    with np.load(path) as file:
        first = file["actions"].copy()
    assert len(first) == 1001  # one whole episode of 1000 transitions
    stamp = path.stat().st_mtime_ns
    assert cached_play_dataset(path, "cube-single-v0", 100, seed=1, progress_bar=False) == path  # cached
    assert path.stat().st_mtime_ns == stamp
    for env_name, size, seed in [("cube-single", 5000, 1), ("cube-single", 100, 2), ("cube-double", 100, 1)]:
        with pytest.raises(ValueError, match="was not made by this request"):
            cached_play_dataset(path, env_name, size, seed=seed, progress_bar=False)
    assert path.stat().st_mtime_ns == stamp  # never overwritten
    (tmp_path / "sub" / "cube-single-play.npz.json").unlink()  # a file of unknown origin
    with pytest.raises(ValueError, match="is missing"):
        cached_play_dataset(path, "cube-single", 100, seed=1, progress_bar=False)


def test_generation_is_the_same_with_several_jobs():
    one = generate_ogbench_dataset("cube-single", 120, seed=5, episode_length=40, progress_bar=False)
    two = generate_ogbench_dataset("cube-single", 120, seed=5, episode_length=40, progress_bar=False, n_jobs=2)
    assert one.keys() == two.keys()
    for key in one:
        np.testing.assert_array_equal(one[key], two[key])
    assert one["observations"].shape == (3 * 41, 28)
    assert not np.array_equal(one["actions"][:41], one["actions"][41:82])  # episodes are seeded apart
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="n_jobs"):
            generate_ogbench_dataset("cube-single", 10, n_jobs=bad)




# --------------------------------------------------------------------------------------------------
# Minari, the real package: a dataset made locally with its DataCollector, nothing downloaded
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def minari_datasets(tmp_path, monkeypatch):
    """
    Minari with its datasets folder in a temp dir, holding a random-policy Pendulum dataset of 3 episodes (60-step
    time limit) made with ``minari.create_dataset_from_buffers`` (Minari's DataCollector needs jax: extra 'create').
    """
    minari = pytest.importorskip("minari", reason="the minari package (extra 'minari') is not installed")
    from minari.data_collector import EpisodeBuffer

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    env = gym.make("Pendulum-v1", max_episode_steps=60)
    env.action_space.seed(0)
    buffers = []
    for episode in range(3):
        obs, _ = env.reset(seed=episode)
        steps = {"observations": [obs], "actions": [], "rewards": [], "terminations": [], "truncations": []}
        done = False
        while not done:
            action = env.action_space.sample()
            obs, reward, terminated, truncated, _ = env.step(action)
            for key, value in zip(steps, (obs, action, reward, terminated, truncated)):
                steps[key].append(value)
            done = terminated or truncated
        buffers.append(EpisodeBuffer(id=episode, seed=episode, **{key: np.array(value) for key, value in steps.items()}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Minari's notes on the eval env and metadata it was not given
        minari.create_dataset_from_buffers("sb3qchunk/pendulum-random-v0", buffers, env=env, algorithm_name="random", author="tests")
    return minari


def test_load_a_real_minari_dataset(minari_datasets):
    env = gym.make("Pendulum-v1")
    data = load_dataset("minari:sb3qchunk/pendulum-random-v0", env.observation_space, env.action_space)
    episodes = list(minari_datasets.load_dataset("sb3qchunk/pendulum-random-v0").iterate_episodes())
    assert [len(episode.rewards) for episode in episodes] == [60, 60, 60]
    np.testing.assert_array_equal(data["observations"], np.concatenate([e.observations[:-1] for e in episodes]))
    np.testing.assert_array_equal(data["next_observations"], np.concatenate([e.observations[1:] for e in episodes]))
    np.testing.assert_array_equal(data["actions"], np.concatenate([e.actions for e in episodes]))
    np.testing.assert_allclose(data["rewards"], np.concatenate([e.rewards for e in episodes]), rtol=1e-6)
    np.testing.assert_array_equal(data["terminals"], np.tile(np.eye(60)[-1], 3))  # each episode ends at its 60th step
    np.testing.assert_array_equal(data["terminated"], np.zeros(180))  # time limits: truncated, not terminated
    model = QC("MlpPolicy", env, chunk_size=5, num_samples=2, flow_steps=2, batch_size=16, learning_starts=0,
               policy_kwargs=dict(net_arch=[16]), seed=0)  # fmt: skip
    model.load_dataset("minari:sb3qchunk/pendulum-random-v0")
    assert model.replay_buffer.offline_size == 180
    model.pretrain(5)
    model.learn(20)
    assert model.offline_updates_done == 5 and model.num_timesteps == 20


def test_missing_minari_id_says_what_is_there(minari_datasets):
    with pytest.raises(FileNotFoundError, match=r"minari:sb3qchunk/nothing-v0 .*sb3qchunk/pendulum-random-v0"):
        load_dataset("minari:sb3qchunk/nothing-v0")
