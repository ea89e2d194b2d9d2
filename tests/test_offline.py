"""Offline data in QC's replay buffer, pre-training, and offline-to-online learning."""

import numpy as np
import pytest
import torch as th

from sb3_qchunk import QC
from scripted_envs import SparseChainEnv
from test_qc import success_rate

SMALL = dict(chunk_size=5, num_samples=8, flow_steps=5, batch_size=64, gamma=0.95, policy_kwargs=dict(net_arch=[64, 64]), seed=0)


def chain_dataset(n_episodes=30, p_expert=0.8, seed=0):
    """Episodes of SparseChainEnv by a noisy scripted policy that mostly pushes right, in the common form."""
    rng = np.random.default_rng(seed)
    env = SparseChainEnv()
    columns = {k: [] for k in ("observations", "actions", "rewards", "terminals", "terminated", "next_observations")}
    for episode in range(n_episodes):
        obs, _ = env.reset(seed=episode)
        done = False
        while not done:
            action = np.clip(rng.normal(0.8, 0.3, 1), -1, 1) if rng.random() < p_expert else rng.uniform(-1, 1, 1)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            done = terminated or truncated
            for key, value in zip(columns, (obs, action, reward, done, terminated, next_obs)):
                columns[key].append(value)
            obs = next_obs
    return {key: np.asarray(value, dtype=np.float32) for key, value in columns.items()}


def test_load_dataset_fills_the_offline_block_and_keeps_the_input():
    data = chain_dataset(n_episodes=3)
    original = {k: v.copy() for k, v in data.items()}
    model = QC("MlpPolicy", SparseChainEnv(), **SMALL)
    model.load_dataset(data)
    for key in data:
        np.testing.assert_array_equal(data[key], original[key])
    assert model.replay_buffer.offline_size == len(data["rewards"])
    assert model.replay_buffer.online_size() == 0
    # Actions are stored scaled to [-1, 1]: the chain's bounds already are, so they are unchanged.
    np.testing.assert_allclose(model.replay_buffer.offline["actions"], data["actions"])


def test_bad_datasets_raise_before_anything_changes():
    model = QC("MlpPolicy", SparseChainEnv(), **SMALL)
    data = chain_dataset(n_episodes=2)
    wrong_dim = dict(data, actions=np.zeros((len(data["rewards"]), 3), dtype=np.float32))
    with pytest.raises(ValueError, match="actions"):
        model.load_dataset(wrong_dim)
    with_nan = dict(data, rewards=data["rewards"].copy())
    with_nan["rewards"][4] = np.nan
    with pytest.raises(ValueError, match="rewards"):
        model.load_dataset(with_nan)
    missing = {k: v for k, v in data.items() if k != "rewards"}
    with pytest.raises(ValueError, match="rewards"):
        model.load_dataset(missing)
    assert model.replay_buffer.offline is None
    with pytest.raises(RuntimeError, match="load_dataset"):
        model.pretrain(10)


def test_pretrain_then_learn_appends_online_data_to_the_same_buffer(tmp_path):
    data = chain_dataset(n_episodes=5)
    n_offline = len(data["rewards"])
    model = QC("MlpPolicy", SparseChainEnv(), learning_starts=50, **SMALL)
    model.load_dataset(data)
    model.pretrain(40, log_interval=20)
    assert model._n_updates == 40 and model.offline_updates_done == 40 and model.num_timesteps == 0
    model.learn(100)
    assert model.num_timesteps == 100
    assert model.replay_buffer.offline_size == n_offline and model.replay_buffer.online_size() == 100
    assert model._n_updates == 40 + 50  # online updates start after learning_starts

    model.save(tmp_path / "model.zip")
    model.save_replay_buffer(tmp_path / "buffer.pkl")
    loaded = QC.load(tmp_path / "model.zip", env=SparseChainEnv())
    loaded.load_replay_buffer(tmp_path / "buffer.pkl")
    assert loaded.replay_buffer.offline_size == n_offline and loaded.replay_buffer.online_size() == 100
    assert loaded.offline_updates_done == 40
    loaded.learn(50, reset_num_timesteps=False)
    assert loaded.num_timesteps == 150 and loaded.replay_buffer.online_size() == 150 and loaded._n_updates == 140


def test_constructor_arguments_express_offline_to_online(tmp_path):
    path = tmp_path / "chain.npz"
    np.savez(path, **chain_dataset(n_episodes=3))
    model = QC("MlpPolicy", SparseChainEnv(), offline_dataset=str(path), offline_updates=30, offline_fraction=0.5, learning_starts=1000, **SMALL)
    assert model.replay_buffer.offline_size > 0 and model.replay_buffer.offline_fraction == 0.5
    model.learn(20)
    assert model.offline_updates_done == 30 and model._n_updates == 30
    model.learn(20)  # the offline phase runs once
    assert model.offline_updates_done == 30


def test_offline_dataset_kwargs_reach_the_loader(tmp_path):
    path = tmp_path / "chain.npz"
    data = chain_dataset(n_episodes=3)
    np.savez(path, **dict(data, rewards=2.0 * data["rewards"]))  # rewards -2 / 0
    model = QC("MlpPolicy", SparseChainEnv(), offline_dataset=str(path), offline_dataset_kwargs=dict(sparse=True), **SMALL)
    # sparse: (r != 0) * -1 turns the -2 rewards into -1
    np.testing.assert_array_equal(np.unique(model.replay_buffer.offline["rewards"]), [-1.0, 0.0])
    plain = QC("MlpPolicy", SparseChainEnv(), offline_dataset=str(path), **SMALL)
    np.testing.assert_array_equal(np.unique(plain.replay_buffer.offline["rewards"]), [-2.0, 0.0])
    with pytest.raises(TypeError, match="bogus"):
        QC("MlpPolicy", SparseChainEnv(), offline_dataset=str(path), offline_dataset_kwargs=dict(bogus=1), **SMALL)


def test_offline_pretraining_learns_from_the_data():
    """Noisy demonstrations reach the goal; random chunks do in ~2% of episodes. Pre-training alone suffices."""
    th.manual_seed(0)
    model = QC("MlpPolicy", SparseChainEnv(), **SMALL)
    model.load_dataset(chain_dataset(n_episodes=40))
    model.pretrain(1500)
    assert success_rate(model) >= 0.8
