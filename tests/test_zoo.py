"""End-to-end tests of ``python -m sb3_qchunk.zoo`` (RL Zoo train / enjoy / optimize) on a tiny CPU budget."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from sb3_qchunk import QC

ROOT = Path(__file__).resolve().parents[1]
CPU_CONF = str(ROOT / "zoo_hyperparams" / "qc_cpu.yml")
# Tiny online run: a few gradient steps on small batches, single-threaded
TINY = ["-params", "learning_starts:100", "batch_size:16", "--num-threads", "1", "--seed", "0"]


def run_zoo(*args: str) -> str:
    """Run ``python -m sb3_qchunk.zoo ARGS`` from the repo root, check its exit code and return its output."""
    result = subprocess.run(
        [sys.executable, "-m", "sb3_qchunk.zoo", *args], check=False, cwd=ROOT, capture_output=True, text=True
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_train_then_enjoy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")  # headless pygame for record-video
    logs = tmp_path / "logs"
    out = run_zoo(
        "train", "--algo", "qc", "--env", "Pendulum-v1", "-conf", CPU_CONF, "-n", "400",
        "--eval-freq", "200", "--eval-episodes", "2", "-f", str(logs), *TINY,
    )  # fmt: skip
    assert "Overwriting n_timesteps with n=400" in out
    exp = logs / "qc" / "Pendulum-v1_1"
    assert (exp / "Pendulum-v1.zip").is_file()
    # --eval-freq counts primitive steps: 400 steps give 2 evaluations
    evaluations = np.load(exp / "evaluations.npz")
    assert list(evaluations["timesteps"]) == [200, 400]
    config = dict(yaml.unsafe_load((exp / "Pendulum-v1" / "config.yml").read_text()))
    assert config["env_wrapper"] == [{"sb3_qchunk.ChunkedActionWrapper": {"chunk_size": 5, "gamma": 0.99}}]

    out = run_zoo(
        "enjoy", "--algo", "qc", "--env", "Pendulum-v1", "-f", str(logs), "--exp-id", "1",
        "--no-render", "-n", "400", "--num-threads", "1",
    )  # fmt: skip
    assert "Loading" in out and "Pendulum-v1.zip" in out
    # -n counts primitive steps: Pendulum's 200-step episodes, twice (not 400 chunks, "Episode Length 40")
    assert out.count("Episode Length 200") == 2 and "2 Episodes" in out, out
    rewards = [float(line.split(":")[1]) for line in out.splitlines() if line.startswith("Episode Reward:")]
    assert len(rewards) == 2 and all(-16.3 * 200 <= r < 0 for r in rewards)  # undiscounted sums of Pendulum's rewards

    # the other execution modes of the executor, from the command line
    out = run_zoo(
        "enjoy", "--algo", "qc", "--env", "Pendulum-v1", "-f", str(logs), "--exp-id", "1",
        "--no-render", "-n", "200", "--num-threads", "1", "--temporal-ensemble", "0.01",
    )  # fmt: skip
    assert out.count("Episode Length 200") == 1, out

    # RL Zoo's plot scripts read what train wrote (evaluations at primitive steps)
    plots = subprocess.run(
        [sys.executable, "-m", "rl_zoo3.plots.all_plots", "-a", "qc", "-e", "Pendulum-v1", "-f", str(logs),
         "--no-display", "-o", str(tmp_path / "plots")],
        check=False, cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "MPLBACKEND": "Agg"},
    )  # fmt: skip
    assert plots.returncode == 0, plots.stdout + plots.stderr
    with open(tmp_path / "plots.pkl", "rb") as file:
        post_processed = pickle.load(file)
    (curve,) = post_processed["Pendulum-v1"].values()  # one run: algorithm "QC", label = the folder
    assert list(curve["timesteps"]) == [200, 400]

    pytest.importorskip("pygame")  # Pendulum renders with pygame (the "zoo" extra)
    run_zoo(
        "record-video", "--algo", "qc", "--env", "Pendulum-v1", "-f", str(logs), "--exp-id", "1",
        "-n", "20",
    )  # fmt: skip
    videos = list((exp / "videos").glob("*.mp4"))
    assert len(videos) == 1 and videos[0].stat().st_size > 0


def test_chunk_size_override_resizes_wrapper(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    run_zoo(
        "train", "--algo", "qc", "--env", "Pendulum-v1", "-conf", CPU_CONF, "-n", "50", "--eval-freq", "-1",
        "-f", str(logs), "-params", "chunk_size:2", "learning_starts:1000", "--num-threads", "1",
    )  # fmt: skip
    config = dict(yaml.unsafe_load((logs / "qc" / "Pendulum-v1_1" / "Pendulum-v1" / "config.yml").read_text()))
    assert config["chunk_size"] == 2
    assert config["env_wrapper"] == [{"sb3_qchunk.ChunkedActionWrapper": {"chunk_size": 2, "gamma": 0.99}}]


def test_decoupled_chunk_lengths_through_the_zoo(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    run_zoo(
        "train", "--algo", "qc", "--env", "Pendulum-v1", "-conf", CPU_CONF, "-n", "60", "--eval-freq", "-1",
        "-f", str(logs), "-params", "chunk_size:2", "critic_chunk_size:6", "partial_critic_expectile:0.7",
        "learning_starts:20", "batch_size:16", "--num-threads", "1",
    )  # fmt: skip
    exp = logs / "qc" / "Pendulum-v1_1"
    config = dict(yaml.unsafe_load((exp / "Pendulum-v1" / "config.yml").read_text()))
    assert config["env_wrapper"] == [{"sb3_qchunk.ChunkedActionWrapper": {"chunk_size": 2, "gamma": 0.99}}]
    model = QC.load(exp / "Pendulum-v1.zip")
    assert (model.chunk_size, model.critic_chunk_size, model.partial_critic_expectile) == (2, 6, 0.7)
    assert model.long_critic is not None and model._n_updates == 40


def test_missing_dataset_says_how_to_generate(tmp_path: Path) -> None:
    missing = tmp_path / "missing.npz"
    result = subprocess.run(
        [
            sys.executable, "-m", "sb3_qchunk.zoo", "train", "--algo", "qc",
            "--env", "cube-single-play-singletask-task2-v0", "-conf", CPU_CONF, "-f", str(tmp_path),
            "-params", f"offline_dataset:'{missing}'",
        ],
        check=False, cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"python -m sb3_qchunk.datasets generate --env cube-single --size 1000000 --out {missing}" in result.stderr


def test_optimize_two_trials(tmp_path: Path) -> None:
    pytest.importorskip("pandas", reason="RL Zoo writes its optimization report with pandas (rl_zoo3[plots])")
    storage = tmp_path / "optuna.log"
    out = run_zoo(
        "train", "--algo", "qc", "--env", "Pendulum-v1", "-conf", CPU_CONF, "-n", "200", "-optimize",
        "--n-trials", "2", "--n-evaluations", "1", "--eval-episodes", "1", "--sampler", "random", "--pruner", "none",
        "--no-optim-plots", "--storage", str(storage), "--study-name", "qc_test", "-f", str(tmp_path / "logs"),
        "-params", "learning_starts:1000", "--num-threads", "1", "--seed", "0",
    )  # fmt: skip
    assert out.count("finished with value") == 2
    assert "Number of finished trials:  2" in out
    assert "chunk_size:" in out
    assert storage.is_file()
    assert len(list((tmp_path / "logs" / "qc").glob("report_Pendulum-v1_2-trials-200-random-none_*.csv"))) == 1


def test_train_outside_the_repo_uses_the_shipped_hyperparameters(tmp_path: Path) -> None:
    """No -conf (or a -conf path that does not exist here): the files shipped in the package are used."""

    def train(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "sb3_qchunk.zoo", "train", "--algo", "qc", "-f", str(tmp_path / "logs"), *args]
        return subprocess.run(command, check=False, cwd=tmp_path, capture_output=True, text=True)

    common = ("-n", "20", "--eval-freq", "-1", "--num-threads", "1", "-params", "learning_starts:1000")
    default = train("--env", "Pendulum-v1", *common)
    assert default.returncode == 0, default.stdout + default.stderr
    assert f"Loading hyperparameters from: {ROOT / 'zoo_hyperparams' / 'qc.yml'}" in default.stdout  # editable install
    cpu = train("--env", "Pendulum-v1", "-conf", "zoo_hyperparams/qc_cpu.yml", *common)
    assert cpu.returncode == 0, cpu.stdout + cpu.stderr
    assert "qc_cpu.yml" in cpu.stdout and "('num_samples', 8)" in cpu.stdout
    unknown = train("--env", "MountainCarContinuous-v0", *common)
    assert unknown.returncode != 0
    assert "has no entry for MountainCarContinuous-v0; its envs: cube-single-play-singletask-task1-v0," in unknown.stderr
    assert "Pendulum-v1" in unknown.stderr
