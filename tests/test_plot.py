"""``python -m sb3_qchunk.plot``: learning curves from the TensorBoard runs of pretrain and learn."""

import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
from scripted_envs import episodes_dataset
from stable_baselines3.common.callbacks import EvalCallback

from sb3_qchunk import QC
from sb3_qchunk.common.env_util import wrap_chunked
from sb3_qchunk.plot import read_curves

pytest.importorskip("tensorboard")


def test_curves_of_the_offline_and_online_runs(tmp_path):
    logs = tmp_path / "tb"
    model = QC("MlpPolicy", "Pendulum-v1", chunk_size=5, num_samples=2, flow_steps=2, batch_size=8, learning_starts=0,
               policy_kwargs=dict(net_arch=[8]), tensorboard_log=str(logs), seed=0)  # fmt: skip
    model.load_dataset(episodes_dataset([50] * 4))
    eval_env = wrap_chunked(gym.make("Pendulum-v1"), 5, model.gamma)
    model.pretrain(20, callback=EvalCallback(eval_env, eval_freq=10, n_eval_episodes=1), log_interval=10)
    model.pretrain(10, callback=EvalCallback(eval_env, eval_freq=10, n_eval_episodes=1), log_interval=10)  # same run
    model.learn(400, callback=EvalCallback(eval_env, eval_freq=200, n_eval_episodes=1))
    key, curves = read_curves(logs)
    assert key == "eval/mean_reward"
    assert sorted(curves) == ["QC_1", "QC_offline_1"]  # one run per phase, the offline one across both calls
    np.testing.assert_array_equal(curves["QC_offline_1"][0], [10, 20, 30])  # x: offline updates
    np.testing.assert_array_equal(curves["QC_1"][0], [200, 400])  # x: primitive env steps
    assert all(-16.3 * 200 <= value < 0 for value in curves["QC_1"][1])  # undiscounted Pendulum returns

    out = tmp_path / "curves.png"
    result = subprocess.run([sys.executable, "-m", "sb3_qchunk.plot", str(logs), "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(KeyError, match="'nothing/here' is not logged .*train/critic_loss"):
        read_curves(logs, "nothing/here")
    with pytest.raises(FileNotFoundError, match="no TensorBoard run"):
        read_curves(tmp_path / "empty")
