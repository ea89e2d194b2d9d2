import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env as gym_check_env
from gymnasium.wrappers import TimeLimit
from stable_baselines3 import SAC
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.monitor import Monitor

from sb3_qchunk import ChunkedActionWrapper
from scripted_envs import ScriptedEnv


def make(chunk_size=3, gamma=0.5, **env_kwargs):
    env = ChunkedActionWrapper(ScriptedEnv(**env_kwargs), chunk_size=chunk_size, gamma=gamma)
    env.reset(seed=0)
    return env


def test_discounted_sum_and_info():
    env = make(chunk_size=3, gamma=0.5, rewards=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    chunk = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=np.float32)
    obs, reward, terminated, truncated, info = env.step(chunk)
    assert reward == pytest.approx(1.0 + 0.5 * 2.0 + 0.25 * 3.0)
    assert obs[0] == 3.0 and not terminated and not truncated
    assert info["chunk_steps"] == 3
    np.testing.assert_allclose(info["primitive_rewards"], [1.0, 2.0, 3.0])
    assert info["bootstrap_discount"] == pytest.approx(0.125)
    tr = info["transitions"]
    np.testing.assert_allclose(tr["obs"][:, 0], [0.0, 1.0, 2.0])
    np.testing.assert_allclose(tr["next_obs"][:, 0], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(tr["action"], chunk.reshape(3, 2))
    np.testing.assert_allclose(tr["reward"], [1.0, 2.0, 3.0])
    assert not tr["terminated"].any() and not tr["truncated"].any()
    # The last primitive info is kept, and the env received the actions one by one in order.
    assert info["count"] == 3 and len(info["primitive_infos"]) == 3
    np.testing.assert_allclose(np.stack(env.unwrapped.actions_seen), chunk.reshape(3, 2))
    # The next chunk starts where the last one stopped.
    _, reward, *_ = env.step(chunk)
    assert reward == pytest.approx(4.0 + 0.5 * 5.0 + 0.25 * 6.0)


def test_early_stop_on_termination():
    env = make(chunk_size=5, gamma=0.9, terminate_at=2)
    obs, reward, terminated, truncated, info = env.step(np.zeros(10))
    assert terminated and not truncated
    assert info["chunk_steps"] == 2 and len(env.unwrapped.actions_seen) == 2
    assert reward == pytest.approx(1.0 + 0.9 * 2.0)
    assert info["bootstrap_discount"] == pytest.approx(0.81)
    np.testing.assert_array_equal(info["transitions"]["terminated"], [False, True])
    np.testing.assert_array_equal(info["transitions"]["truncated"], [False, False])
    assert obs[0] == 2.0 and info["transitions"]["next_obs"][-1][0] == 2.0


def test_early_stop_on_truncation():
    env = ChunkedActionWrapper(TimeLimit(ScriptedEnv(), max_episode_steps=4), chunk_size=3, gamma=1.0)
    env.reset(seed=0)
    _, reward, terminated, truncated, info = env.step(np.zeros(6))
    assert (reward, terminated, truncated, info["chunk_steps"]) == (6.0, False, False, 3)
    _, reward, terminated, truncated, info = env.step(np.zeros(6))
    assert (reward, terminated, truncated, info["chunk_steps"]) == (4.0, False, True, 1)
    np.testing.assert_array_equal(info["transitions"]["truncated"], [True])


@pytest.mark.parametrize(
    "space, expected",
    [
        (spaces.Box(np.array([-1.0, -2.0]), np.array([1.0, 3.0]), dtype=np.float32),
         spaces.Box(np.array([-1.0, -2.0] * 3), np.array([1.0, 3.0] * 3), dtype=np.float32)),
        (spaces.Discrete(4, start=1), spaces.MultiDiscrete([4, 4, 4], start=[1, 1, 1])),
        (spaces.MultiDiscrete([2, 3]), spaces.MultiDiscrete([2, 3, 2, 3, 2, 3])),
        (spaces.MultiBinary(2), spaces.MultiBinary(6)),
    ],
)
def test_space_conversion(space, expected):
    env = ChunkedActionWrapper(ScriptedEnv(action_space=space), chunk_size=3)
    assert env.action_space == expected
    assert env.primitive_action_space == space and env.chunk_size == 3
    chunk = env.action_space.sample()
    split = env.split_chunk(chunk)
    assert split.shape[0] == 3
    env.reset(seed=0)
    env.step(chunk)
    for i, action in enumerate(env.unwrapped.actions_seen):
        assert space.contains(action), (i, action)
    np.testing.assert_array_equal(np.stack([np.asarray(a) for a in env.unwrapped.actions_seen]).reshape(-1), np.asarray(chunk).reshape(-1))


def test_unsupported_spaces_and_arguments():
    with pytest.raises(ValueError, match="Tuple"):
        ChunkedActionWrapper(ScriptedEnv(action_space=spaces.Tuple([spaces.Discrete(2)])), chunk_size=2)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="chunk_size"):
            ChunkedActionWrapper(ScriptedEnv(), chunk_size=bad)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="gamma"):
            ChunkedActionWrapper(ScriptedEnv(), chunk_size=2, gamma=bad)


def test_bad_chunks_raise_before_running():
    env = make(chunk_size=3)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        env.step(np.array([0.0, 0.0, np.nan, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="NaN/inf"):
        env.step(np.array([0.0, 0.0, 0.0, np.inf, 0.0, 0.0]))
    assert env.unwrapped.actions_seen == []
    discrete = ChunkedActionWrapper(ScriptedEnv(action_space=spaces.Discrete(3)), chunk_size=2)
    discrete.reset(seed=0)
    with pytest.raises(ValueError, match="outside the action space"):
        discrete.step(np.array([1, 3]))
    with pytest.raises(ValueError, match="integers"):
        discrete.step(np.array([1.0, 0.5]))
    assert discrete.unwrapped.actions_seen == []
    # The (h, A) form of a chunk is accepted as well.
    env.step(np.zeros((3, 2)))
    assert len(env.unwrapped.actions_seen) == 3


def test_monitor_pass_through_counts_primitive_steps():
    env = ChunkedActionWrapper(Monitor(ScriptedEnv(rewards=[1.0] * 10, terminate_at=7)), chunk_size=3, gamma=0.5)
    env.reset(seed=0)
    infos = [env.step(np.zeros(6))[-1] for _ in range(3)]
    assert "episode" not in infos[0] and "episode" not in infos[1]
    assert infos[2]["chunk_steps"] == 1
    assert infos[2]["episode"]["r"] == pytest.approx(7.0)  # undiscounted, primitive
    assert infos[2]["episode"]["l"] == 7


def test_is_success_from_ogbench_success():
    env = make(chunk_size=3, success_at=2)
    info = env.step(np.zeros(6))[-1]
    assert info["is_success"] is True
    env = make(chunk_size=3, success_at=10)
    assert env.step(np.zeros(6))[-1]["is_success"] is False
    assert "is_success" not in make(chunk_size=3).step(np.zeros(6))[-1]


def test_env_checkers_and_dict_observations():
    gym_check_env(ChunkedActionWrapper(gym.make("Pendulum-v1"), chunk_size=4), skip_render_check=True)
    sb3_check_env(ChunkedActionWrapper(gym.make("Pendulum-v1"), chunk_size=4))
    env = make(chunk_size=2, dict_obs=True)
    sb3_check_env(env)
    env.reset(seed=0)
    obs, _, _, _, info = env.step(np.zeros(4))
    np.testing.assert_allclose(info["transitions"]["obs"]["twice"][:, 0], [0.0, 2.0])
    np.testing.assert_allclose(info["transitions"]["next_obs"]["count"][:, 0], [1.0, 2.0])


def test_render_close_and_seed_pass_through():
    env = ChunkedActionWrapper(ScriptedEnv(render_mode="rgb_array"), chunk_size=2)
    env.reset(seed=3)
    assert env.render().shape == (4, 4, 3)
    assert env.unwrapped.np_random is not None
    env.close()


def test_make_vec_env_wrapper_class():
    vec_env = make_vec_env("Pendulum-v1", n_envs=2, wrapper_class=ChunkedActionWrapper, wrapper_kwargs=dict(chunk_size=5))
    assert vec_env.action_space.shape == (5,)
    vec_env.reset()
    _, rewards, _, infos = vec_env.step(np.zeros((2, 5), dtype=np.float32))
    assert [info["chunk_steps"] for info in infos] == [5, 5]
    for reward, info in zip(rewards, infos):
        assert reward == pytest.approx(np.sum(info["primitive_rewards"] * 0.99 ** np.arange(5)), rel=1e-5)


def test_sac_runs_on_chunked_pendulum():
    env = ChunkedActionWrapper(gym.make("Pendulum-v1"), chunk_size=4)
    model = SAC("MlpPolicy", env, learning_starts=50, batch_size=32, policy_kwargs=dict(net_arch=[32]), seed=0)
    model.learn(200)
    assert model.num_timesteps == 200  # SB3 counts chunk-level steps here
    action, _ = model.predict(env.observation_space.sample())
    assert action.shape == (4,)


class InPlaceObsEnv(ScriptedEnv):
    """Returns the same observation array every step, updated in place (some envs do)."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = np.zeros(1, dtype=np.float32)

    def _obs(self):
        self.buffer[0] = self.count
        return self.buffer


def test_transitions_are_copies_when_the_env_reuses_its_obs_array():
    env = ChunkedActionWrapper(InPlaceObsEnv(), chunk_size=3, gamma=1.0)
    env.reset(seed=0)
    info = env.step(np.zeros(6))[-1]
    np.testing.assert_allclose(info["transitions"]["obs"][:, 0], [0.0, 1.0, 2.0])
    np.testing.assert_allclose(info["transitions"]["next_obs"][:, 0], [1.0, 2.0, 3.0])
