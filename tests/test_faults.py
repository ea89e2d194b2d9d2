"""Fault injection: bad values, interrupted runs and mismatched files fail loudly or are handled correctly."""

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from scripted_envs import FaultyEnv, ScriptedEnv, episodes_dataset
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.noise import NormalActionNoise
from stable_baselines3.common.vec_env import DummyVecEnv
from stable_baselines3.her.her_replay_buffer import HerReplayBuffer

from sb3_qchunk import QC, ChunkedActionWrapper, ChunkReplayBuffer
from sb3_qchunk.common.evaluation import evaluate_success
from sb3_qchunk.datasets import load_npz, load_ogbench_npz, validate_dataset

SMALL = dict(num_samples=2, flow_steps=2, batch_size=8, policy_kwargs=dict(net_arch=[8, 8]))
NO_TRAINING = pytest.mark.filterwarnings("ignore:This learn\\(\\) call")


def qc(env, **kwargs):
    return QC("MlpPolicy", env, seed=0, **{**SMALL, "learning_starts": 1000, **kwargs})


def stored(model, env_idx=0):
    """The online transitions of one env's ring, oldest first (the rings do not wrap in these tests)."""
    buffer = model.replay_buffer
    n = buffer.positions[env_idx]
    return {
        "obs": buffer.observations["obs"][:n, env_idx, 0].copy(),
        "next_obs": buffer.next_observations["obs"][:n, env_idx, 0].copy(),
        "actions": buffer.actions[:n, env_idx].copy(),
        "rewards": buffer.rewards[:n, env_idx].copy(),
        "dones": buffer.dones[:n, env_idx].copy(),
    }


class StopAfter(BaseCallback):
    def __init__(self, n_chunks):
        super().__init__()
        self.n_chunks = n_chunks

    def _on_step(self):
        return self.n_calls < self.n_chunks


# ------------------------------------------------------------------------------------------------
# 1. Non-finite values from the env, non-finite losses
# ------------------------------------------------------------------------------------------------
@NO_TRAINING
@pytest.mark.parametrize(
    "fault, dict_obs, message",
    [
        (dict(nan_reward_at=8), False, r"env 0 returned a non-finite reward at primitive step 8 \(step 3 of its chunk\)"),
        (dict(nan_obs_at=8), False, r"env 0 returned a non-finite next_obs at primitive step 8"),
        (dict(nan_obs_at=8), True, r"env 0 returned a non-finite next_obs\['count'\] at primitive step 8"),
    ],
)
def test_non_finite_env_values_raise_before_they_are_stored(fault, dict_obs, message):
    env = FaultyEnv(**fault, dict_obs=dict_obs, truncate_at=50)
    model = QC("MultiInputPolicy" if dict_obs else "MlpPolicy", env, seed=0, chunk_size=5, learning_starts=1000, **SMALL)
    with pytest.raises(ValueError, match=message):
        model.learn(30)
    # The first chunk (steps 1-5) was stored; nothing of the chunk with the NaN.
    assert model.replay_buffer.online_size() == model.num_timesteps == 5
    assert model.replay_buffer.dones[4, 0] == 1.0  # its episode is ended: the next learn() resets the env


@NO_TRAINING
def test_non_finite_vec_env_value_names_the_env():
    envs = [lambda: FaultyEnv(truncate_at=50), lambda: FaultyEnv(nan_reward_at=2, truncate_at=50)]
    env = DummyVecEnv([lambda f=f: ChunkedActionWrapper(Monitor(f()), chunk_size=3) for f in envs])
    model = qc(env, chunk_size=3)
    with pytest.raises(ValueError, match="env 1 returned a non-finite reward at primitive step 2"):
        model.learn(30)


def test_non_finite_loss_restores_the_weights_and_says_where():
    model = qc(gym.make("Pendulum-v1"), chunk_size=2)
    n = 64
    model.load_dataset(
        dict(
            observations=np.zeros((n, 3), np.float32),
            next_observations=np.zeros((n, 3), np.float32),
            actions=np.zeros((n, 1), np.float32),
            rewards=np.full(n, 1e30, np.float32),  # finite, but its squared TD error overflows float32
            terminals=np.eye(1, n, n - 1, dtype=np.float32)[0],
            terminated=np.zeros(n, np.float32),
        )
    )
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    with pytest.raises(FloatingPointError, match=r"train/critic_loss became inf at gradient step 1 .*restored"):
        model.pretrain(3)
    for key, value in model.policy.state_dict().items():
        assert th.equal(value, before[key]), key
    assert all(len(opt.state) == 0 for opt in (model.actor.optimizer, model.critic.optimizer))
    assert model._n_updates == 0


@pytest.mark.parametrize("compile_update", [False, True])
def test_non_finite_loss_after_earlier_updates_restores_weights_and_adam_state(monkeypatch, compile_update):
    model = qc(gym.make("Pendulum-v1"), chunk_size=2, compile_update=compile_update)
    n = 64
    model.load_dataset(
        dict(
            observations=np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32),
            next_observations=np.random.default_rng(1).normal(size=(n, 3)).astype(np.float32),
            actions=np.zeros((n, 1), np.float32),
            rewards=np.ones(n, np.float32),
            terminals=np.eye(1, n, n - 1, dtype=np.float32)[0],
            terminated=np.zeros(n, np.float32),
        )
    )
    model.pretrain(3)  # the first snapshot: no optimizer state yet
    model.pretrain(2)  # its layout changed (Adam's moments exist now): new buffers
    # The state a third call starts from, which it snapshots into the buffers of the second.
    weights = {k: v.clone() for k, v in model.policy.state_dict().items()}
    optimizers = (model.actor.optimizer, model.critic.optimizer)
    moments = [[{key: value.clone() for key, value in state.items()} for state in opt.state.values()] for opt in optimizers]
    sample_batches = model.replay_buffer.sample_batches

    def overflow(*args, **kwargs):  # finite rewards whose squared TD error overflows float32
        return [batch._replace(rewards=th.full_like(batch.rewards, 1e30)) for batch in sample_batches(*args, **kwargs)]

    monkeypatch.setattr(model.replay_buffer, "sample_batches", overflow)
    with pytest.raises(FloatingPointError, match=r"at gradient step 6 .*restored .* \(5 updates\)"):
        model.pretrain(2)
    for key, value in model.policy.state_dict().items():
        assert th.equal(value, weights[key]), key
    for opt, saved in zip(optimizers, moments):
        assert len(opt.state) == len(saved)
        for state, before in zip(opt.state.values(), saved):
            assert state.keys() == before.keys()
            for key in state:
                assert th.equal(state[key], before[key]), key
    assert model._n_updates == 5


# ------------------------------------------------------------------------------------------------
# 4. Interrupted and resumed runs
# ------------------------------------------------------------------------------------------------
@NO_TRAINING
def test_callback_stop_then_resume_stores_what_an_uninterrupted_run_stores():
    def make():
        return qc(ScriptedEnv(truncate_at=12), chunk_size=5)

    straight = make()
    straight.learn(40)
    resumed = make()
    resumed.learn(40, callback=StopAfter(3))
    assert resumed.num_timesteps == resumed.replay_buffer.online_size() == 12  # chunks of 5, 5, 2 (truncation)
    resumed.learn(40 - 12, reset_num_timesteps=False)
    assert resumed.num_timesteps == straight.num_timesteps == resumed.replay_buffer.online_size()
    a, b = stored(straight), stored(resumed)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # Each step's successor is the next stored step inside an episode.
    inside = a["dones"][:-1] == 0
    np.testing.assert_array_equal(a["next_obs"][:-1][inside], a["obs"][1:][inside])


@NO_TRAINING
def test_exception_mid_chunk_stores_the_steps_that_ran_and_ends_the_episode():
    env = FaultyEnv(raise_at=8, truncate_at=50)
    model = qc(env, chunk_size=5)
    with pytest.raises(RuntimeError, match="scripted failure at step 8"):
        model.learn(30)
    # Steps 1-5 (first chunk) and 6-7 (the interrupted chunk) ran and are stored, the last as an episode end.
    data = stored(model)
    assert model.num_timesteps == 7
    np.testing.assert_array_equal(data["obs"], np.arange(7))
    np.testing.assert_array_equal(data["dones"], [0, 0, 0, 0, 0, 0, 1])
    env.raise_at = None
    model.learn(10, reset_num_timesteps=False)  # the env is reset: a new episode starts at obs 0
    data = stored(model)
    assert model.num_timesteps == model.replay_buffer.online_size() == 17
    np.testing.assert_array_equal(data["obs"][7:], np.arange(10))


@NO_TRAINING
def test_exception_in_one_of_several_envs_stores_what_every_env_ran():
    env = DummyVecEnv(
        [
            lambda: ChunkedActionWrapper(Monitor(FaultyEnv(truncate_at=50)), chunk_size=3),
            lambda: ChunkedActionWrapper(Monitor(FaultyEnv(raise_at=5, truncate_at=50)), chunk_size=3),
        ]
    )
    model = qc(env, chunk_size=3)
    with pytest.raises(RuntimeError, match="scripted failure"):
        model.learn(30)
    # Env 0 ran two whole chunks (the second one not returned by the VecEnv), env 1 one chunk and one step.
    assert stored(model, 0)["obs"].tolist() == list(range(6))
    assert stored(model, 1)["obs"].tolist() == list(range(4))
    assert stored(model, 0)["dones"][-1] == stored(model, 1)["dones"][-1] == 1.0
    assert model.num_timesteps == model.replay_buffer.online_size() == 10


def test_wrapper_requires_a_reset_after_a_failed_step():
    env = ChunkedActionWrapper(FaultyEnv(raise_at=2), chunk_size=3)
    env.reset()
    with pytest.raises(RuntimeError, match="scripted failure"):
        env.step(np.zeros(6))
    assert env.interrupted_transitions["obs"].tolist() == [[0.0]]
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(6))
    env.reset()
    assert env.interrupted_transitions is None


# ------------------------------------------------------------------------------------------------
# 3. Windows that can never train the critic
# ------------------------------------------------------------------------------------------------
def test_offline_episodes_shorter_than_the_chunk_are_refused_or_warned():
    model = qc(gym.make("Pendulum-v1"), chunk_size=5)
    with pytest.raises(ValueError, match="No window of chunk_size=5 .*every episode is shorter"):
        model.load_dataset(episodes_dataset([3] * 10))
    assert model.replay_buffer.offline_size == 0
    # Episodes of 6 steps: 2 of the 6 window starts of each stay inside it; 30 windows in all, 10 usable.
    with pytest.warns(UserWarning, match=r"Only 10 of the 26 windows"):
        model.load_dataset(episodes_dataset([6] * 5))


@NO_TRAINING
def test_online_episodes_shorter_than_the_chunk_warn_once():
    model = qc(ScriptedEnv(truncate_at=3), chunk_size=5)
    with pytest.warns(UserWarning, match="online windows of 5 steps .* stay inside one episode"):
        model.learn(30)


# ------------------------------------------------------------------------------------------------
# 5, 6. Offline data appended, loaded replay buffers that must fit
# ------------------------------------------------------------------------------------------------
def test_second_dataset_is_appended_and_no_window_bridges_the_two():
    model = qc(gym.make("Pendulum-v1"), chunk_size=3)
    first, second = episodes_dataset([10]), episodes_dataset([10])
    first["terminals"][-1], first["terminated"][-1] = 0.0, 1.0  # ends with a true terminal, no episode end flag
    second["rewards"][:] = 1.0
    model.load_dataset(first)
    model.load_dataset(second)
    assert model.replay_buffer.offline_size == 20
    assert model.replay_buffer.offline["dones"][9] == 1.0  # the junction ends an episode
    assert first["terminals"][-1] == 0.0  # the user's arrays are untouched
    model.load_dataset(second, replace=True)
    assert model.replay_buffer.offline_size == 10 and model.replay_buffer.offline["rewards"].sum() == 10.0


@NO_TRAINING
@pytest.mark.parametrize(
    "other, message",
    [
        (lambda: ScriptedEnv(truncate_at=20, action_space=spaces.Box(-2.0, 2.0, (2,), np.float32)), "primitive action space"),
        (lambda: ScriptedEnv(truncate_at=20, dict_obs=True), "observation space"),
        (lambda: make_vec_env(lambda: ScriptedEnv(truncate_at=20), n_envs=2, wrapper_class=ChunkedActionWrapper, wrapper_kwargs=dict(chunk_size=3)), "n_envs"),
    ],
)
def test_loaded_replay_buffer_must_fit_the_model(tmp_path, other, message):
    model = qc(ScriptedEnv(truncate_at=20), chunk_size=3)
    model.learn(12)
    model.save_replay_buffer(tmp_path / "buffer.pkl")
    policy = "MultiInputPolicy" if message == "observation space" else "MlpPolicy"
    target = QC(policy, other(), seed=0, chunk_size=3, **SMALL)
    with pytest.raises(ValueError, match=f"does not fit this model: its {message}"):
        target.load_replay_buffer(tmp_path / "buffer.pkl")


@NO_TRAINING
def test_loaded_replay_buffer_samples_with_the_models_gamma_and_offline_fraction(tmp_path):
    model = qc(ScriptedEnv(truncate_at=20), chunk_size=3, gamma=0.5)
    model.learn(12)
    model.save_replay_buffer(tmp_path / "buffer.pkl")
    target = qc(ScriptedEnv(truncate_at=20), chunk_size=3, gamma=0.9, offline_fraction=0.25)
    target.load_replay_buffer(tmp_path / "buffer.pkl")
    assert target.replay_buffer.gamma == 0.9 and target.replay_buffer.offline_fraction == 0.25
    # Rewards of ScriptedEnv are 1, 2, 3, ...: a window starting at step 0 sums 1 + 0.9 * 2 + 0.81 * 3.
    np.random.seed(0)
    batch = target.replay_buffer.sample(64)
    first = batch.observations[:, 0] == 0
    np.testing.assert_allclose(batch.rewards[first].numpy(), 1 + 0.9 * 2 + 0.81 * 3, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# 7, 8. Episode statistics in primitive steps; chunk policies on primitive envs
# ------------------------------------------------------------------------------------------------
@NO_TRAINING
def test_chunk_wrapped_env_without_monitor_logs_primitive_episodes():
    model = qc(ChunkedActionWrapper(ScriptedEnv(truncate_at=7), chunk_size=5, gamma=0.5), chunk_size=5)
    model.learn(14)
    # Two episodes of 7 primitive steps, undiscounted returns 1 + ... + 7 = 28.
    assert [info["l"] for info in model.ep_info_buffer] == [7, 7]
    assert [info["r"] for info in model.ep_info_buffer] == [28.0, 28.0]


def test_monitor_outside_the_chunk_wrapper_is_refused():
    env = Monitor(ChunkedActionWrapper(ScriptedEnv(truncate_at=7), chunk_size=5))
    with pytest.raises(ValueError, match=r"Monitor must wrap the env inside the ChunkedActionWrapper"):
        qc(env, chunk_size=5)


def test_evaluate_success_counts_primitive_steps_and_runs_chunks_on_a_primitive_env():
    model = qc(ScriptedEnv(truncate_at=7, success_at=7), chunk_size=5, gamma=0.5)
    chunk_env = ChunkedActionWrapper(ScriptedEnv(truncate_at=7, success_at=7), chunk_size=5, gamma=0.5)  # no Monitor
    result = evaluate_success(model, chunk_env, n_eval_episodes=2)
    assert result == {"success_rate": 1.0, "mean_return": 28.0, "mean_length": 7.0}
    primitive = ScriptedEnv(truncate_at=7, success_at=7)
    assert evaluate_success(model, primitive, n_eval_episodes=2) == result
    # Every primitive step got one primitive action (shape (2,)), not a flattened chunk.
    assert len(primitive.actions_seen) == 14 and all(np.shape(a) == (2,) for a in primitive.actions_seen)


# ------------------------------------------------------------------------------------------------
# 9, 11. Offline-to-online that would never train, sizes and settings
# ------------------------------------------------------------------------------------------------
def test_learn_that_never_trains_warns():
    model = qc(gym.make("Pendulum-v1"), chunk_size=5, learning_starts=5000)
    model.load_dataset(episodes_dataset([50] * 4))
    model.pretrain(2)
    with pytest.warns(UserWarning, match=r"ends at 20 primitive steps but training starts after learning_starts=5000"):
        model.learn(20)
    assert model._n_updates == 2


def test_buffer_size_counts_all_envs_as_in_sb3():
    env = make_vec_env(lambda: ScriptedEnv(truncate_at=20), n_envs=4, wrapper_class=ChunkedActionWrapper, wrapper_kwargs=dict(chunk_size=3))
    model = qc(env, chunk_size=3, buffer_size=100)
    assert model.replay_buffer.buffer_size == 25 and model.replay_buffer.actions.shape[:2] == (25, 4)
    with pytest.raises(ValueError, match="ring of 2 transitions, fewer than one window of chunk_size=3"):
        qc(env, chunk_size=3, buffer_size=8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=0), "batch_size must be an integer >= 1"),
        (dict(batch_size=2.5), "batch_size must be an integer >= 1"),
        (dict(gamma=True), r"gamma must be a number in \(0, 1\]"),
        (dict(gamma=1.5), r"gamma must be a number in \(0, 1\]"),
        (dict(alpha=float("nan")), "alpha must be a finite number >= 0"),
        (dict(alpha=float("inf")), "alpha must be a finite number >= 0"),
        (dict(tau=2.0), r"tau must be a number in \[0, 1\]"),
        (dict(buffer_size=0), "buffer_size must be an integer >= 1"),
        (dict(learning_starts=-1), "learning_starts must be an integer >= 0"),
        (dict(action_noise=NormalActionNoise(np.zeros(1), np.ones(1))), "QC does not take action_noise"),
        (dict(optimize_memory_usage=True), "QC does not support optimize_memory_usage"),
        (dict(replay_buffer_class=ReplayBuffer), "replay_buffer_class must be ChunkReplayBuffer or a subclass"),
        (dict(replay_buffer_class=HerReplayBuffer), "QC does not offer HER relabelling: a relabelled chunk window"),
        (dict(replay_buffer_kwargs=dict(gamma=0.5)), r"replay_buffer_kwargs \['gamma'\] come from QC's own settings"),
    ],
)
def test_bad_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        qc(gym.make("Pendulum-v1"), **kwargs)


# ------------------------------------------------------------------------------------------------
# 2, 10. Lossy casts; datasets read in another layout than the user's
# ------------------------------------------------------------------------------------------------
class ImageEnv(gym.Env):
    """uint8 "image" observations of shape (2, 2)."""

    observation_space = spaces.Box(0, 255, (2, 2), np.uint8)
    action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        return np.zeros((2, 2), np.uint8), {}

    def step(self, action):
        return np.zeros((2, 2), np.uint8), 0.0, False, False, {}


def image_dataset(observations):
    data = episodes_dataset([10], action_dim=1)
    data["observations"] = observations
    data["next_observations"] = observations.copy()
    return data


@pytest.mark.parametrize(
    "observations, message",
    [
        (np.full((10, 2, 2), 0.5, np.float32), r"key 'observations': casting its float32 values to uint8 .* would change 40"),
        (np.full((10, 2, 2), 300, np.int64), r"casting its int64 values to uint8 .* would change 40"),
    ],
)
def test_lossy_observation_casts_are_refused(observations, message):
    model = QC("MlpPolicy", ImageEnv(), seed=0, chunk_size=2, learning_starts=1000, **SMALL)
    with pytest.raises(ValueError, match=message):
        model.load_dataset(image_dataset(observations))
    assert model.replay_buffer.offline_size == 0


def test_lossless_casts_are_kept():
    model = QC("MlpPolicy", ImageEnv(), seed=0, chunk_size=2, learning_starts=1000, **SMALL)
    images = np.arange(40).reshape(10, 2, 2)
    model.load_dataset(image_dataset(images.astype(np.float64)))  # integral floats in range: exact
    np.testing.assert_array_equal(model.replay_buffer.offline["observations"]["obs"], images)
    model = qc(gym.make("Pendulum-v1"), chunk_size=2)
    data = episodes_dataset([10])
    data["observations"] = np.arange(30, dtype=np.int64).reshape(10, 3)  # small integers into float32
    model.load_dataset(data)
    np.testing.assert_array_equal(model.replay_buffer.offline["observations"]["obs"], data["observations"])
    with pytest.raises(ValueError, match=r"casting its int64 values to float32 .* would change 1 of them"):
        data["observations"][0, 0] = 2**24 + 1
        model.load_dataset(data)


def test_missing_next_observations_says_which_layout_was_assumed():
    data = episodes_dataset([200] * 5)
    del data["next_observations"]
    with pytest.warns(UserWarning, match=r"OGBench layout.*1000 rows -> 995 transitions in 5 episodes"):
        out = load_npz(data)
    assert len(out["rewards"]) == 995


def test_d4rl_convention_with_timeouts():
    # Two episodes: the first ends at a true terminal (row 2), the second is cut by a timeout (row 5).
    raw = dict(
        observations=np.arange(6, dtype=np.float32)[:, None],
        actions=np.zeros((6, 1), np.float32),
        rewards=np.arange(6, dtype=np.float32),
        terminals=np.array([0, 0, 1, 0, 0, 0], np.float32),
        timeouts=np.array([0, 0, 0, 0, 0, 1], np.float32),
    )
    with_next = load_npz({**raw, "next_observations": raw["observations"] + 0.5})
    np.testing.assert_array_equal(with_next["terminated"], [0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(with_next["terminals"], [0, 0, 1, 0, 0, 1])
    validate_dataset(with_next)
    # Raw D4RL (no next_observations): row i's next observation is row i + 1; the timeout row has none.
    with pytest.warns(UserWarning, match=r"6 rows -> 5 transitions"):
        data = load_npz(raw)
    np.testing.assert_array_equal(data["observations"][:, 0], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(data["next_observations"][:, 0], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(data["terminated"], [0, 0, 1, 0, 0])
    np.testing.assert_array_equal(data["terminals"], [0, 0, 1, 0, 1])
    validate_dataset(data)


def test_contradicting_task_ids_are_refused(tmp_path):
    path = tmp_path / "toy.npz"
    np.savez(path, observations=np.zeros((3, 28)), actions=np.zeros((3, 5)), terminals=np.array([0, 0, 1]), qpos=np.zeros((3, 21)))
    with pytest.raises(ValueError, match=r"task_id=2 contradicts env 'cube-single-singletask-task1-v0' \(task 1\)"):
        load_ogbench_npz(path, task_id=2, env="cube-single-singletask-task1-v0")


# ------------------------------------------------------------------------------------------------
# 8 (cont.). A chunk policy on a primitive-step env, through SB3's evaluate_policy
# ------------------------------------------------------------------------------------------------
class CountingChunks:
    """A chunk policy whose k-th call (0-based) returns, for each env, the chunk [10k, 10k + 1, ...] of 1-d actions."""

    observation_space = spaces.Box(0.0, 1000.0, (1,), np.float32)
    env_chunk_size = 3

    def __init__(self):
        self.calls = 0

    def predict(self, observation, state=None, episode_start=None, deterministic=False):
        chunk = 10.0 * self.calls + np.arange(3, dtype=np.float32)
        self.calls += 1
        return np.tile(chunk, (len(observation), 1)), None


@pytest.mark.parametrize(
    "replan_every, expected, after_reset",
    [(None, [0, 1, 2, 10, 11, 12, 20], 30), (2, [0, 1, 10, 11, 20, 21, 30], 40)],
)
def test_chunk_executor_runs_chunks_one_action_at_a_time(replan_every, expected, after_reset):
    from sb3_qchunk.common.execution import ChunkExecutor

    executor = ChunkExecutor(CountingChunks(), replan_every=replan_every)
    actions = [executor.predict(np.zeros(1))[0] for _ in range(7)]
    assert [float(a[0]) for a in actions] == expected
    # A new episode drops the rest of the chunk: the next action is the first of a new chunk.
    action, _ = executor.predict(np.zeros(1), episode_start=np.array([True]))
    assert float(action[0]) == after_reset
    # Batched: each env keeps its own chunk.
    batched = ChunkExecutor(CountingChunks())
    first, _ = batched.predict(np.zeros((2, 1)))
    second, _ = batched.predict(np.zeros((2, 1)), episode_start=np.array([False, True]))
    assert first[:, 0].tolist() == [0.0, 0.0] and second[:, 0].tolist() == [1.0, 10.0]


def test_evaluate_policy_on_a_primitive_env_through_the_executor():
    from stable_baselines3.common.evaluation import evaluate_policy

    from sb3_qchunk.common.execution import ChunkExecutor

    model = qc(ScriptedEnv(truncate_at=7), chunk_size=5)
    env = ScriptedEnv(truncate_at=7)
    returns, lengths = evaluate_policy(ChunkExecutor(model), env, n_eval_episodes=2, return_episode_rewards=True, warn=False)
    assert lengths == [7, 7] and returns == [28.0, 28.0]
    assert len(env.actions_seen) == 14 and all(np.shape(a) == (2,) for a in env.actions_seen)
    with pytest.raises(ValueError, match="replan_every must be None or in"):
        ChunkExecutor(model, replan_every=6)


def test_replay_buffer_subclass_and_kwargs_reach_the_buffer():
    class TaggedBuffer(ChunkReplayBuffer):
        def __init__(self, *args, tag="", **kwargs):
            super().__init__(*args, **kwargs)
            self.tag = tag

    model = qc(gym.make("Pendulum-v1"), replay_buffer_class=TaggedBuffer, replay_buffer_kwargs=dict(tag="mine"))
    assert isinstance(model.replay_buffer, TaggedBuffer) and model.replay_buffer.tag == "mine"
