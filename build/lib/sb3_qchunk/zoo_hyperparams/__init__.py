"""RL Zoo hyperparameter files of QC, shipped in the package as ``sb3_qchunk.zoo_hyperparams``."""
