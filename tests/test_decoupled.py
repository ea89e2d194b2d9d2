"""Decoupled chunk lengths (``QC(critic_chunk_size=H > chunk_size=h)``): the long-chunk critic's H-step backup, the
partial-chunk critic's expectile distillation, and everything around them (windows, save/load, offline data)."""

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from scripted_envs import ScriptedEnv, episodes_dataset
from test_qc import SMALL, compiled_parts

from sb3_qchunk import QC
from sb3_qchunk.qc.qc import expectile_loss


def decoupled_qc(env=None, **kwargs):
    config = {**SMALL, "chunk_size": 2, "critic_chunk_size": 4, **kwargs}
    return QC("MlpPolicy", env if env is not None else gym.make("Pendulum-v1"), seed=0, **config)


def set_constant(critic, value):
    """Make every member of an ensemble critic output ``value`` for any input (zero output weights, bias = value)."""
    with th.no_grad():
        critic.body[-1].weight.zero_()
        critic.body[-1].bias.fill_(value)


def test_expectile_loss_by_hand():
    diff = th.tensor([2.0, -2.0, 0.0, 1.0])
    np.testing.assert_allclose(expectile_loss(diff, 0.8).numpy(), [0.8 * 4, 0.2 * 4, 0.0, 0.8])
    np.testing.assert_allclose(expectile_loss(diff, 0.5).numpy(), 0.5 * diff.numpy() ** 2)


def test_decoupled_backup_and_distillation_by_hand():
    """
    Scripted rewards r_j = j + 1 at step j, gamma 0.5, H = 4, h = 2, episodes of 12 steps. With constant critics
    (Qbar_h = 10, Q_H = 3, Q_h = 1) every number of the update is known: a window starting at step t has
    R = sum_{i<4} 0.5^i (t + i + 1), next observation t + 4, target y = R + 0.5^4 * 10 where the window stays in
    its episode (t <= 8), and the losses are mean(valid * (3 - y)^2) and mean(valid * 0.8 * (3 - 1)^2).
    """
    env = ScriptedEnv(truncate_at=12)
    model = decoupled_qc(env, gamma=0.5, learning_starts=1000, n_critics=3, q_aggregation="min")
    with pytest.warns(UserWarning, match="no gradient step"):
        model.learn(48)  # 4 episodes, no update (learning_starts)
    assert model._n_updates == 0 and model.replay_buffer.chunk_size == 4
    set_constant(model.critic_target, 10.0)
    set_constant(model.long_critic, 3.0)
    set_constant(model.critic, 1.0)
    data = model.replay_buffer.sample(64)
    t = data.observations[:, 0].numpy().astype(int)
    inside = t <= 8  # windows whose 4 steps stay in one 12-step episode
    expected_r = sum(0.5**i * (t + i + 1) for i in range(4))
    np.testing.assert_allclose(data.rewards.numpy()[inside], expected_r[inside], rtol=1e-6)
    np.testing.assert_array_equal(data.next_observations[:, 0].numpy()[inside], (t + 4)[inside])
    np.testing.assert_array_equal(data.valid[:, -1].numpy(), inside.astype(np.float32))
    assert data.actions.shape == (64, 4, 2)  # windows of H actions of the env (2-dim)
    y = expected_r + 0.5**4 * 10.0
    expected_critic = np.mean(inside * (3.0 - y) ** 2)
    expected_partial = np.mean(inside * 0.8 * (3.0 - 1.0) ** 2)
    stats = model._train_step(data)
    assert float(stats["critic_loss"]) == pytest.approx(expected_critic, rel=1e-5)
    assert float(stats["partial_critic_loss"]) == pytest.approx(expected_partial, rel=1e-5)
    assert float(stats["q_mean"]) == pytest.approx(3.0)  # the statistics of the TD-trained (long) critic


def test_decoupled_losses_match_the_equations():
    """The update's losses against the equations with the real networks (min over 3 critics, kappa 0.7)."""
    model = decoupled_qc(gamma=0.9, n_critics=3, q_aggregation="min", partial_critic_expectile=0.7, critic_chunk_size=5)
    model.learn(60)
    data = model.replay_buffer.sample(16)
    window = data.actions.flatten(1)
    th.manual_seed(123)
    with th.no_grad():
        next_chunks = model.policy.sample_chunks(data.next_observations)  # best of N under the partial critic
        assert next_chunks.shape == (16, 2)
        next_q = model.critic_target(data.next_observations, next_chunks).min(dim=0).values
        target = data.rewards + 0.9**5 * data.masks * next_q
        long_q = model.long_critic(data.observations, window)
        expected_critic = ((long_q - target) ** 2 * data.valid[:, -1]).mean()
        diff = long_q.min(dim=0).values - model.critic(data.observations, window[:, :2])
        weight = th.where(diff < 0, 0.3, 0.7)
        expected_partial = (weight * diff**2 * data.valid[:, -1]).mean()
    th.manual_seed(123)
    stats = model._train_step(data)
    assert float(stats["critic_loss"]) == pytest.approx(float(expected_critic), rel=1e-5)
    assert float(stats["partial_critic_loss"]) == pytest.approx(float(expected_partial), rel=1e-5)


def test_each_critic_gets_the_gradient_of_its_own_loss():
    """The long critic's gradient is that of the TD loss alone, the partial critic's that of the distillation alone."""
    model = decoupled_qc(partial_critic_expectile=0.9)
    model.learn(40)
    data = model.replay_buffer.sample(16)
    window = model._chunks(data)
    noise = model._update_noise(16)[0]
    inputs = (data.observations, data.next_observations, window, data.rewards, data.masks, data.valid, *noise, False)
    long_params, partial_params = list(model.long_critic.parameters()), list(model.critic.parameters())
    loss, _ = model._losses(*inputs)
    long_grads = th.autograd.grad(loss, long_params, retain_graph=True)
    partial_grads = th.autograd.grad(loss, partial_params)

    with th.no_grad():
        next_q = model.critic_target(data.next_observations, model.policy.sample_chunks_from_noise(data.next_observations, noise[0])).mean(0)
        target = data.rewards + model.gamma**4 * data.masks * next_q
    long_q = model.long_critic(data.observations, window)
    td_loss = ((long_q - target) ** 2 * data.valid[:, -1]).mean()
    diff = long_q.mean(0).detach() - model.critic(data.observations, window[:, :2])
    distill = (th.where(diff < 0, 0.1, 0.9) * diff**2 * data.valid[:, -1]).mean()
    for got, expected in zip(long_grads, th.autograd.grad(td_loss, long_params)):
        th.testing.assert_close(got, expected)
    for got, expected in zip(partial_grads, th.autograd.grad(distill, partial_params)):
        th.testing.assert_close(got, expected)
    assert any(g.abs().sum() > 0 for g in partial_grads)


def test_equal_lengths_are_qc_bit_for_bit():
    runs = []
    for critic_chunk_size in (None, 3):
        model = QC("MlpPolicy", gym.make("Pendulum-v1"), seed=0, **{**SMALL, "chunk_size": 3}, critic_chunk_size=critic_chunk_size)
        model.learn(60)
        assert model.long_critic is None and not model.decoupled and model.stat_names == QC.STATS
        runs.append(model)
    for (name, a), b in zip(runs[0].policy.state_dict().items(), runs[1].policy.state_dict().values()):
        assert th.equal(a, b), name


@pytest.mark.parametrize("actor_type", ["best_of_n", "distill"])
def test_decoupled_acts_short_chunks_and_round_trips(tmp_path, actor_type):
    model = decoupled_qc(actor_type=actor_type, compile_update=actor_type == "distill")
    model.learn(60)
    assert model.env.get_attr("chunk_size") == [2] and model.replay_buffer.chunk_size == 4
    assert model.long_critic.action_space.shape == (4,) and model.critic.action_space.shape == (2,)
    assert (compiled_parts(model)[0] is not None) == (actor_type == "distill")
    # The long critic is stepped by the critic's optimizer.
    stepped = {id(p) for group in model.critic.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in stepped for p in model.long_critic.parameters())
    model.save(tmp_path / "dqc.zip")
    model.save_replay_buffer(tmp_path / "buffer.pkl")
    obs = np.array([0.5, -0.5, 0.1], dtype=np.float32)
    expected, _ = model.predict(obs, deterministic=True)
    assert expected.shape == (2,)

    loaded = QC.load(tmp_path / "dqc.zip", env=gym.make("Pendulum-v1"))
    assert loaded.critic_chunk_size == 4 and loaded.chunk_size == 2 and loaded.long_critic is not None
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], expected)
    for (name, a), b in zip(model.policy.state_dict().items(), loaded.policy.state_dict().values()):
        assert th.equal(a, b), name
    loaded.load_replay_buffer(tmp_path / "buffer.pkl")
    loaded.learn(20, reset_num_timesteps=False)
    assert loaded.num_timesteps == 80 and loaded._n_updates == model._n_updates + 20

    plain = QC("MlpPolicy", gym.make("Pendulum-v1"), **{**SMALL, "chunk_size": 2})
    with pytest.raises(ValueError, match="chunk_size \\(window length\\) is 4, the model's is 2"):
        plain.load_replay_buffer(tmp_path / "buffer.pkl")


def test_offline_windows_are_critic_chunks():
    """Offline data are cut into windows of the critic's length: episodes shorter than H cannot train it."""
    model = decoupled_qc(critic_chunk_size=6)
    with pytest.raises(ValueError, match="No window of critic_chunk_size=6 steps.*Use a smaller critic_chunk_size"):
        model.load_dataset(episodes_dataset([4, 5, 5]))
    model.load_dataset(episodes_dataset([30, 30]))
    model.pretrain(5)
    assert model.offline_updates_done == 5 and model.replay_buffer.sample(8).actions.shape == (8, 6, 1)


def test_bad_decoupled_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="critic_chunk_size=2 is shorter than chunk_size=3"):
        QC("MlpPolicy", "Pendulum-v1", chunk_size=3, critic_chunk_size=2)
    with pytest.raises(ValueError, match="needs action_chunking=True"):
        QC("MlpPolicy", "Pendulum-v1", chunk_size=3, critic_chunk_size=6, action_chunking=False)
    for bad in (0.0, 1.0, True, "0.8"):
        with pytest.raises(ValueError, match="partial_critic_expectile must be a number in \\(0, 1\\)"):
            QC("MlpPolicy", "Pendulum-v1", critic_chunk_size=10, partial_critic_expectile=bad)
    with pytest.raises(ValueError, match="chunk_size"):
        QC("MlpPolicy", "Pendulum-v1", critic_chunk_size=0)
