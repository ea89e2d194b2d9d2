"""Execution modes of chunk policies on primitive-step envs (ChunkExecutor) and deterministic chunks."""

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from scripted_envs import ScriptedEnv

from sb3_qchunk import QC
from sb3_qchunk.common.evaluation import evaluate_success
from sb3_qchunk.common.execution import ChunkExecutor


class CountingChunks:
    """A chunk policy (h=3, 1-d actions) whose k-th call (0-based) returns the chunk [10k, 10k + 1, 10k + 2] for each env."""

    observation_space = spaces.Box(0.0, 1000.0, (1,), np.float32)
    env_chunk_size = 3

    def __init__(self):
        self.calls, self.deterministic = 0, []

    def predict(self, observation, state=None, episode_start=None, deterministic=False):
        self.deterministic.append(deterministic)
        chunk = 10.0 * self.calls + np.arange(3, dtype=np.float32)
        self.calls += 1
        return np.tile(chunk, (len(observation), 1)), None


def run(executor, steps, **kwargs):
    return [float(executor.predict(np.zeros(1), **kwargs)[0][0]) for _ in range(steps)]


def test_temporal_ensemble_mean_of_the_overlapping_predictions():
    # m = 0: the plain mean of what the chunks of the last 3 steps planned for this step
    # step 0: c0[0]=0; step 1: c0[1]=1, c1[0]=10; step 2: 2, 11, 20; step 3: c1[2]=12, c2[1]=21, c3[0]=30; ...
    assert run(ChunkExecutor(CountingChunks(), temporal_ensemble=0.0), 5) == pytest.approx([0, 5.5, 11, 21, 31])


def test_temporal_ensemble_weights_older_predictions_by_exp_minus_m_i():
    executor = ChunkExecutor(CountingChunks(), temporal_ensemble=float(np.log(2)))  # weights 1, 1/2, 1/4, oldest first
    np.testing.assert_allclose(executor.ensemble_weights(3), np.array([4, 2, 1]) / 7)
    expected = [0, (1 + 10 / 2) / 1.5, (2 + 11 / 2 + 20 / 4) / 1.75, (12 + 21 / 2 + 30 / 4) / 1.75]
    assert run(executor, 4) == pytest.approx(expected)
    # a new episode forgets every prediction: the next action is the new chunk's first
    assert run(executor, 1, episode_start=np.array([True])) == [40.0]


def test_every_mode_queries_as_documented_and_passes_deterministic():
    policy = CountingChunks()
    run(ChunkExecutor(policy, temporal_ensemble=0.01), 6, deterministic=True)
    assert policy.calls == 6 and all(policy.deterministic)  # a chunk per step
    receding = CountingChunks()
    assert run(ChunkExecutor(receding, replan_every=2), 6) == [0, 1, 10, 11, 20, 21] and receding.calls == 3
    open_loop = CountingChunks()
    assert run(ChunkExecutor(open_loop), 6) == [0, 1, 2, 10, 11, 12] and open_loop.calls == 2


def test_bad_execution_settings_are_refused():
    with pytest.raises(ValueError, match="exclude each other"):
        ChunkExecutor(CountingChunks(), replan_every=2, temporal_ensemble=0.01)
    for bad in (float("nan"), float("inf"), "0.1", True):
        with pytest.raises(ValueError, match="temporal_ensemble must be a finite number"):
            ChunkExecutor(CountingChunks(), temporal_ensemble=bad)


def small_qc(env, **kwargs):
    config = dict(num_samples=4, flow_steps=2, batch_size=8, learning_starts=10, policy_kwargs=dict(net_arch=[16]))
    return QC("MlpPolicy", env, chunk_size=3, seed=0, **{**config, **kwargs})


@pytest.mark.parametrize("actor_type", ["best_of_n", "distill"])
def test_deterministic_predict_gives_the_same_chunk_without_using_the_global_rng(tmp_path, actor_type):
    model = small_qc(gym.make("Pendulum-v1"), actor_type=actor_type)
    model.learn(30)
    obs = np.array([[0.5, -0.2, 0.1], [-1.0, 0.3, 2.0]], dtype=np.float32)
    state = th.get_rng_state()
    first, _ = model.predict(obs, deterministic=True)
    second, _ = model.predict(obs, deterministic=True)
    assert th.equal(th.get_rng_state(), state)  # the global RNG was not used
    np.testing.assert_array_equal(first, second)
    single, _ = model.predict(obs[1], deterministic=True)
    np.testing.assert_allclose(single, first[1], atol=1e-5)  # the same chunk in another batch
    sampled = [model.predict(obs, deterministic=False)[0] for _ in range(2)]
    assert not np.array_equal(sampled[0], sampled[1])  # stochastic chunks otherwise
    model.save(tmp_path / "model")
    loaded = QC.load(tmp_path / "model")
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], first)


def test_evaluate_success_runs_an_executor_on_the_primitive_env():
    model = small_qc(ScriptedEnv(truncate_at=7, success_at=7))
    for executor in (ChunkExecutor(model), ChunkExecutor(model, replan_every=1), ChunkExecutor(model, temporal_ensemble=0.01)):
        env = ScriptedEnv(truncate_at=7, success_at=7)
        result = evaluate_success(executor, env, n_eval_episodes=2)
        assert result == {"success_rate": 1.0, "mean_return": 28.0, "mean_length": 7.0}  # rewards 1..7, success at 7
        assert len(env.actions_seen) == 14 and all(np.shape(a) == (2,) for a in env.actions_seen)
    with pytest.raises(ValueError, match="evaluate it on the env without ChunkedActionWrapper"):
        evaluate_success(ChunkExecutor(model), model.env, n_eval_episodes=1)
