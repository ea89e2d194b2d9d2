"""SB3's EvalCallback / CheckpointCallback with QC: frequencies in primitive steps (learn) and updates (pretrain)."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
from scripted_envs import ScriptedEnv, episodes_dataset
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, CheckpointCallback, EvalCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import KVWriter, Logger, configure

from sb3_qchunk import QC, ChunkedActionWrapper
from sb3_qchunk.common.env_util import wrap_chunked

EPISODE = 100  # primitive steps of the scripted env's episodes, reward 1 each


def scripted(**kwargs):
    return ScriptedEnv(rewards=[1.0] * EPISODE, truncate_at=EPISODE, action_space=gym.spaces.Box(-1, 1, (1,), np.float32), **kwargs)


def qc(env, chunk_size=5, **kwargs):
    config = dict(num_samples=2, flow_steps=2, batch_size=8, learning_starts=100_000, policy_kwargs=dict(net_arch=[8]))
    model = QC("MlpPolicy", env, chunk_size=chunk_size, gamma=0.9, seed=0, **{**config, **kwargs})
    model.set_logger(configure(None, []))
    return model


def learn(model, steps, callback):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will do no gradient step")  # learning_starts: no updates here
        model.learn(steps, callback=callback)


class CountCalls(BaseCallback):
    def _on_step(self) -> bool:
        return True


def test_eval_and_checkpoint_frequencies_count_primitive_steps(tmp_path):
    model = qc(scripted())
    evaluation = EvalCallback(wrap_chunked(scripted(), 5, 0.9), eval_freq=500, n_eval_episodes=1, log_path=str(tmp_path / "eval"))
    checkpoint = CheckpointCallback(save_freq=1000, save_path=str(tmp_path / "checkpoints"), name_prefix="qc")
    count = CountCalls()
    user_list = CallbackList([evaluation, checkpoint, count])
    learn(model, 3000, user_list)
    assert evaluation.evaluations_timesteps == [500, 1000, 1500, 2000, 2500, 3000]  # not every 500 chunks
    assert evaluation.n_calls == 3000  # the primitive step it evaluated at
    # Monitor inside the chunk wrapper: primitive episode lengths and undiscounted returns (not 20 chunks, sum 0.9^k)
    np.testing.assert_array_equal(evaluation.evaluations_length, [[EPISODE]] * 6)
    np.testing.assert_array_equal(evaluation.evaluations_results, [[float(EPISODE)]] * 6)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["qc_1000_steps.zip", "qc_2000_steps.zip", "qc_3000_steps.zip"]
    assert count.n_calls == 600  # other callbacks: once per chunk
    assert user_list.callbacks == [evaluation, checkpoint, count]  # what the user passed is not changed


def test_frequencies_with_truncated_chunks_several_envs_and_resumed_learn(tmp_path):
    # chunk_size 3 in 100-step episodes: the last chunk of each episode has 1 step; 2 envs: one env's clock
    env = make_vec_env(scripted, n_envs=2, wrapper_class=ChunkedActionWrapper, wrapper_kwargs=dict(chunk_size=3, gamma=0.9))
    model = qc(env, chunk_size=3)
    evaluation = EvalCallback(wrap_chunked(scripted(), 3, 0.9), eval_freq=100, n_eval_episodes=1, log_path=str(tmp_path))
    learn(model, 600, evaluation)
    steps_per_env = [t // 2 for t in evaluation.evaluations_timesteps]
    assert len(steps_per_env) == 3
    for multiple, steps in zip((100, 200, 300), steps_per_env):
        assert multiple <= steps < multiple + 3  # the first chunk end at or after each multiple
    # A resumed learn goes on from the step count: no evaluation for multiples already passed
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will do no gradient step")
        model.learn(200, callback=evaluation, reset_num_timesteps=False)
    assert len(evaluation.evaluations_timesteps) == 4 and 400 <= evaluation.evaluations_timesteps[-1] // 2 < 403


def test_pretrain_frequencies_count_updates(tmp_path):
    model = qc(gym.make("Pendulum-v1"), learning_starts=0)
    model.load_dataset(episodes_dataset([50] * 4))
    evaluation = EvalCallback(wrap_chunked(gym.make("Pendulum-v1"), 5, 0.9), eval_freq=20, n_eval_episodes=1, log_path=str(tmp_path))
    model.pretrain(60, callback=evaluation, log_interval=10)
    assert len(evaluation.evaluations_timesteps) == 3  # after 20, 40 and 60 updates (not every 20 blocks of 10)
    assert evaluation.n_calls == 60
    np.testing.assert_array_equal(evaluation.evaluations_length, [[200]] * 3)  # primitive steps of Pendulum


def test_eval_env_that_would_report_chunks_is_refused():
    model = qc(scripted())
    with pytest.raises(ValueError, match="not chunk-level .*wrap_chunked"):
        learn(model, 10, EvalCallback(scripted(), eval_freq=5))
    with pytest.raises(ValueError, match="no Monitor: evaluate_policy would report chunk counts"):
        learn(model, 10, [EvalCallback(ChunkedActionWrapper(scripted(), chunk_size=5, gamma=0.9), eval_freq=5)])
    with pytest.raises(ValueError, match="chunk_size=3, but QC expects 5"):
        learn(model, 10, EvalCallback(wrap_chunked(scripted(), 3, 0.9), eval_freq=5))


class RecordSteps(KVWriter):
    """An SB3 logger output that keeps the step of every dump and the keys written."""

    def __init__(self):
        self.dumps = []

    def write(self, key_values, key_excluded, step=0):
        self.dumps.append((step, set(key_values)))


def test_offline_logs_share_the_offline_update_axis(tmp_path):
    model = qc(gym.make("Pendulum-v1"), learning_starts=0)
    model.load_dataset(episodes_dataset([50] * 4))
    writer = RecordSteps()
    model.set_logger(Logger(None, [writer]))
    evaluation = EvalCallback(wrap_chunked(gym.make("Pendulum-v1"), 5, 0.9), eval_freq=20, n_eval_episodes=1)
    model.pretrain(40, callback=evaluation, log_interval=10)
    model.pretrain(20, callback=evaluation, log_interval=10)
    # the losses every 10 updates, and the evaluations (which SB3 dumps at num_timesteps, 0 here) at the update count
    eval_steps = [step for step, keys in writer.dumps if "eval/mean_reward" in keys]
    assert eval_steps == [20, 40, 60]
    assert [step for step, keys in writer.dumps if "time/offline_updates" in keys] == [10, 20, 30, 40, 50, 60]
    writer.dumps.clear()
    model.learn(400, log_interval=1)  # online: SB3's axis, primitive env steps
    assert [step for step, _ in writer.dumps] == [200, 400]
