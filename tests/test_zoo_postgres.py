"""RL Zoo's hyperparameter search for QC with several worker processes sharing one study in a real PostgreSQL server."""

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna")
pytest.importorskip("psycopg2", reason="the PostgreSQL driver (extra 'postgresql') is not installed")

ROOT = Path(__file__).resolve().parents[1]
CPU_CONF = str(ROOT / "zoo_hyperparams" / "qc_cpu.yml")
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    from scaleout import postgres_bin_dir, postgres_server, worker as scaleout_worker  # the server the scale-out benchmark runs, shared
finally:
    sys.path.remove(str(ROOT / "benchmarks"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server of its own (data and socket in a temp dir, trust auth, no TCP), stopped at the end."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL's server binaries (initdb, pg_ctl) are not installed")
    with postgres_server(bin_dir, port=free_port()) as url:
        yield url


def worker(url: str, study: str, logs: Path, seed: int, n_trials: int = 2, n_timesteps: int = 200, heartbeat_interval: int = 60) -> subprocess.Popen:
    """One worker process of the search, as on a machine of its own (no update: learning starts after the trial)."""
    return scaleout_worker(url, study, logs, seed, n_trials, n_timesteps, learning_starts=1000, heartbeat_interval=heartbeat_interval)


def test_two_workers_fill_one_study(postgres_url, tmp_path):
    workers = [worker(postgres_url, "qc_pg", tmp_path / f"logs{seed}", seed) for seed in (1, 2)]
    outputs = [process.communicate()[0] for process in workers]
    for process, output in zip(workers, outputs):
        assert process.returncode == 0, output
    study = optuna.load_study(study_name="qc_pg", storage=postgres_url)
    trials = study.get_trials()
    assert sorted(trial.number for trial in trials) == [0, 1, 2, 3]  # 2 workers x 2 trials, none lost or doubled
    assert all(trial.state == optuna.trial.TrialState.COMPLETE for trial in trials)
    assert all("chunk_size" in trial.params for trial in trials)
    # A trial's hyperparameters are loadable by RL Zoo (--trial-id), trial 0 included (RL Zoo itself skips it: it tests
    # `if trial_id:`); trained with: the config RL Zoo saves. Trial 0 and one whose chunk size differs from the file's
    # (5) where there is one, so that the check can fail.
    other = next((t for t in trials[1:] if t.params["chunk_size"] != 5), trials[1])
    for trial in (trials[0], other):
        logs = tmp_path / f"trial{trial.number}"
        result = subprocess.run(
            [
                sys.executable, "-m", "sb3_qchunk.zoo", "train", "--algo", "qc", "--env", "Pendulum-v1", "-conf", CPU_CONF,
                "-n", "20", "--storage", postgres_url, "--study-name", "qc_pg", "--trial-id", str(trial.number), "-f", str(logs),
                "-params", "learning_starts:1000", "--eval-freq", "-1", "--num-threads", "1",
            ],  # fmt: skip
            cwd=ROOT, capture_output=True, text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Loading from Optuna study" in result.stdout
        config = dict(yaml.unsafe_load((logs / "qc" / "Pendulum-v1_1" / "Pendulum-v1" / "config.yml").read_text()))
        assert config["chunk_size"] == trial.params["chunk_size"]
        assert config["learning_rate"] == trial.params["learning_rate"] and config["learning_starts"] == 1000  # -params last
        assert config["env_wrapper"] == [{"sb3_qchunk.ChunkedActionWrapper": {"chunk_size": trial.params["chunk_size"], "gamma": config["gamma"]}}]


def test_a_worker_killed_mid_trial_is_marked_failed_and_the_others_go_on(postgres_url, tmp_path):
    victim = worker(postgres_url, "qc_kill", tmp_path / "victim", seed=3, n_trials=5, n_timesteps=100_000, heartbeat_interval=1)
    study = None
    while victim.poll() is None:  # wait until its first trial runs, then kill the process
        try:
            study = optuna.load_study(study_name="qc_kill", storage=postgres_url)
        except KeyError:
            study = None
        if study is not None and study.get_trials(states=[optuna.trial.TrialState.RUNNING]):
            break
        time.sleep(0.5)
    assert victim.poll() is None, victim.communicate()[0]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    time.sleep(3)  # past the grace period (2 heartbeat intervals) after the last heartbeat: the trial is stale
    survivor = worker(postgres_url, "qc_kill", tmp_path / "survivor", seed=4, heartbeat_interval=1)
    output = survivor.communicate()[0]
    assert survivor.returncode == 0, output
    trials = optuna.load_study(study_name="qc_kill", storage=postgres_url).get_trials()
    states = {trial.number: trial.state for trial in trials}
    # the killed worker's trial was marked failed by the survivor, whose own two trials completed
    assert states == {0: optuna.trial.TrialState.FAIL, 1: optuna.trial.TrialState.COMPLETE, 2: optuna.trial.TrialState.COMPLETE}


def test_threads_inside_one_worker_are_refused(postgres_url, tmp_path):
    command = [
        sys.executable, "-m", "sb3_qchunk.zoo", "train", "--algo", "qc", "--env", "Pendulum-v1", "-conf", CPU_CONF,
        "-n", "50", "-optimize", "--n-trials", "2", "--n-jobs", "2", "--storage", postgres_url, "--study-name", "qc_jobs",
        "-f", str(tmp_path / "logs"), "--num-threads", "1",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert "--n-jobs 2: trials in threads of one process share torch's global RNG" in result.stderr


def test_scaleout_benchmark_smoke(tmp_path):
    if postgres_bin_dir() is None:
        pytest.skip("PostgreSQL's server binaries (initdb, pg_ctl) are not installed")
    out = tmp_path / "scaleout.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scaleout.py"), "--smoke", "--out", str(out)], check=True)
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert [(int(row[0]), int(row[1]), int(row[2]), row[3].strip()) for row in rows] == [(1, 2, 2, "yes"), (2, 2, 2, "yes")]
    assert all(float(row[5]) > 0 for row in rows)
