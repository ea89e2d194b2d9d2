"""sb3-qchunk: Q-chunking (Reinforcement Learning with Action Chunking) for Stable-Baselines3."""

from sb3_qchunk.common.buffers import ChunkReplayBuffer
from sb3_qchunk.qc import QC
from sb3_qchunk.wrappers import ChunkedActionWrapper

__version__ = "0.1.0"

__all__ = ["QC", "ChunkedActionWrapper", "ChunkReplayBuffer", "__version__"]
