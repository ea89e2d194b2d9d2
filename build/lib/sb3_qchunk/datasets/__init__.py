"""
Offline datasets for Q-chunking: loaders into one in-memory form, a validator, and local generation of
OGBench manipulation "play" datasets (OGBench's own downloads are not needed).

The common form is a plain ``dict[str, np.ndarray]`` of N consecutive primitive transitions:

- ``observations``: (N, *obs_shape), float32 (integer observations such as uint8 images keep their dtype); may
  be a dict of such arrays for dict observation spaces. The replay buffer stores them in the dtype of the
  observation space (float32 for float spaces) and refuses a cast that would change a value.
- ``actions``: (N, A) float32
- ``rewards``: (N,) float32
- ``terminals``: (N,) float32, 1 at the last transition of each episode (episode end, whatever the reason)
- ``terminated``: (N,) float32, 1 only at true terminal states (no bootstrapping from ``next_observations``)
- ``next_observations``: same layout as ``observations``

In OGBench single-task data, ``terminated`` (= 1 - OGBench's ``masks``) can be 1 in the middle of an
episode: the play data go on after the task is solved, so ``terminals`` stays 0 there.

Modules: :mod:`~sb3_qchunk.datasets.loaders` (the loaders), :mod:`~sb3_qchunk.datasets.validation` (the checks,
made once, by :func:`load_dataset`), :mod:`~sb3_qchunk.datasets.generation` (local OGBench play data).

Command line (generation of a dataset in the official OGBench npz layout)::

    python -m sb3_qchunk.datasets generate --env cube-single --size 1000000 --out data/cube-single-play.npz --seed 0
"""

from sb3_qchunk.datasets.generation import cached_play_dataset, generate_ogbench_dataset, main
from sb3_qchunk.datasets.loaders import load_dataset, load_minari, load_npz, load_ogbench_npz, sparsify_rewards
from sb3_qchunk.datasets.validation import REQUIRED_KEYS, cast_lossless, validate_dataset

__all__ = [
    "REQUIRED_KEYS",
    "cached_play_dataset",
    "cast_lossless",
    "generate_ogbench_dataset",
    "load_dataset",
    "load_minari",
    "load_npz",
    "load_ogbench_npz",
    "main",
    "sparsify_rewards",
    "validate_dataset",
]
