"""
Learning curves from the TensorBoard logs of QC runs, in one command::

    python -m sb3_qchunk.plot logs/ --key eval/mean_reward --out curves.png

Every TensorBoard run under the folder is one curve of the key: the offline runs (``<name>_offline_<k>``, written by
``pretrain``; x: offline gradient updates) on the left, the online runs (``<name>_<k>``, written by ``learn``; x:
primitive env steps) on the right. Needs ``tensorboard`` and ``matplotlib`` (extra ``plots``).
"""

import argparse
import os
import re
from pathlib import Path

import numpy as np

#: keys tried, in order, when none is given
DEFAULT_KEYS = ("eval/success_rate", "eval/mean_reward", "rollout/success_rate", "rollout/ep_rew_mean")


def find_runs(log_dir: str | os.PathLike) -> list[Path]:
    """The TensorBoard run folders under ``log_dir`` (folders holding ``events.out.tfevents.*`` files), sorted."""
    return sorted({path.parent for path in Path(log_dir).rglob("events.out.tfevents.*")})


def read_curves(log_dir: str | os.PathLike, key: str | None = None) -> tuple[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """
    The scalar ``key`` of every TensorBoard run under ``log_dir``.

    :param log_dir: a folder of TensorBoard runs (a model's ``tensorboard_log``)
    :param key: the scalar, e.g. ``"eval/mean_reward"``; None: the first of :data:`DEFAULT_KEYS` that a run has
    :return: the key, and ``{run name (relative to log_dir): (steps, values)}`` for the runs that have it
    :raises FileNotFoundError: if there is no run under ``log_dir``
    :raises KeyError: if no run has the key (the message lists the keys there are)
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = find_runs(log_dir)
    if not runs:
        raise FileNotFoundError(f"no TensorBoard run (events.out.tfevents.* files) under {log_dir}")
    scalars = {}
    for run in runs:
        accumulator = EventAccumulator(str(run), size_guidance={"scalars": 0})  # 0: keep every point
        accumulator.Reload()
        scalars[str(run.relative_to(log_dir))] = accumulator
    available = sorted({tag for accumulator in scalars.values() for tag in accumulator.Tags()["scalars"]})
    if key is None:
        key = next((candidate for candidate in DEFAULT_KEYS if candidate in available), None)
        if key is None:
            raise KeyError(f"none of {DEFAULT_KEYS} is logged under {log_dir}; pass --key, one of: {', '.join(available)}")
    curves = {}
    for name, accumulator in scalars.items():
        if key in accumulator.Tags()["scalars"]:
            events = accumulator.Scalars(key)
            curves[name] = (np.array([event.step for event in events]), np.array([event.value for event in events]))
    if not curves:
        raise KeyError(f"{key!r} is not logged under {log_dir}; the keys there: {', '.join(available)}")
    return key, curves


def is_offline_run(name: str) -> bool:
    """Whether a run name is one of ``pretrain``'s (``<name>_offline_<k>``)."""
    return re.search(r"_offline_\d+$", name) is not None


def plot_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], key: str, out: str | os.PathLike) -> None:
    """
    Plot the curves (offline runs left, online runs right; one panel if there is only one kind) into ``out``.

    :param curves: ``{run name: (steps, values)}``, as :func:`read_curves` returns
    :param key: the scalar plotted (the y label)
    :param out: the image file
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [
        (label, {name: curve for name, curve in curves.items() if is_offline_run(name) == offline})
        for label, offline in (("offline gradient updates", True), ("online env steps (primitive)", False))
    ]
    phases = [(label, runs) for label, runs in phases if runs]
    fig, axes = plt.subplots(1, len(phases), figsize=(5 * len(phases), 3.8), sharey=True, squeeze=False)
    for ax, (label, runs) in zip(axes[0], phases):
        for name, (steps, values) in runs.items():
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=name)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0][0].set_ylabel(key)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sb3_qchunk.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("log_dir", help="folder of TensorBoard runs (the model's tensorboard_log)")
    parser.add_argument("--key", default=None, help=f"scalar to plot (default: the first logged of {', '.join(DEFAULT_KEYS)})")
    parser.add_argument("--out", default="learning_curves.png", help="image file")
    args = parser.parse_args(argv)
    key, curves = read_curves(args.log_dir, args.key)
    plot_curves(curves, key, args.out)
    print(f"{key} of {len(curves)} runs ({', '.join(curves)}) -> {args.out}")


if __name__ == "__main__":
    main()
