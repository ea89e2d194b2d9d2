"""``python -m sb3_qchunk.datasets generate ...``: see :mod:`sb3_qchunk.datasets.generation`."""

from sb3_qchunk.datasets.generation import main

main()
