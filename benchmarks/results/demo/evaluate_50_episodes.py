import gymnasium as gym, torch as th, ogbench  # noqa: F401 (registers the OGBench env ids)
from sb3_qchunk import QC
from sb3_qchunk.common.evaluation import evaluate_success
from sb3_qchunk.common.env_util import wrap_chunked
from sb3_qchunk.demo import RandomChunks
env_id = "cube-single-singletask-task1-v0"
env = wrap_chunked(gym.make(env_id), 5, 0.99)
th.manual_seed(1)
model = QC.load("runs/demo/qc_model.zip")
print("QC final model, 50 episodes:", evaluate_success(model, env, 50))
print("random chunks, 50 episodes:", evaluate_success(RandomChunks(env.action_space, 1), env, 50))
