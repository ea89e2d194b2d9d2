from sb3_qchunk.qc.policies import MlpPolicy, MultiInputPolicy, QCPolicy
from sb3_qchunk.qc.qc import QC

__all__ = ["QC", "QCPolicy", "MlpPolicy", "MultiInputPolicy"]
