"""
RL Zoo's hyperparameter search for QC scaled out over worker processes sharing one study in PostgreSQL: trials per
minute with 1 and with 2 workers, the same trials in both (Pendulum, CPU scale, a few hundred steps each).

The script starts a PostgreSQL server of its own (``initdb`` / ``pg_ctl`` from ``pg_config --bindir`` or
``/usr/lib/postgresql/*/bin``; data and socket in a temp dir, no TCP; as the ``postgres`` user when run as root)
and stops it at the end. Each worker is a ``python -m sb3_qchunk.zoo train ... -optimize --storage URL`` process,
as it would be on a machine of its own.

    python benchmarks/scaleout.py --out benchmarks/results/scaleout_<machine>.md
    python benchmarks/scaleout.py --smoke
"""

import argparse
import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_CONF = str(ROOT / "zoo_hyperparams" / "qc_cpu.yml")


def postgres_bin_dir() -> Path | None:
    """The directory of initdb / pg_ctl: ``pg_config --bindir``, else Debian's /usr/lib/postgresql/<version>/bin."""
    try:
        candidate = Path(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip())
        if (candidate / "initdb").exists():
            return candidate
    except (OSError, subprocess.CalledProcessError):
        pass
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@contextlib.contextmanager
def postgres_server(bin_dir: Path, port: int = 5433) -> Iterator[str]:
    """
    A PostgreSQL server of its own (trust auth, Unix socket in a temp dir, no TCP) with a database ``optuna``.

    :param bin_dir: where initdb / pg_ctl / createdb are
    :param port: the port number in the socket's name
    :return: (yields) the SQLAlchemy URL of the database
    """
    root = tempfile.mkdtemp(prefix="qc-postgres-")
    data, sockets = os.path.join(root, "data"), os.path.join(root, "sockets")
    os.makedirs(sockets)
    prefix: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as the postgres user
        user = pwd.getpwnam("postgres")
        for path in (root, sockets):
            os.chown(path, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]

    def run(*command: str) -> None:
        subprocess.run([*prefix, *command], check=True, capture_output=True, cwd=root)

    run(str(bin_dir / "initdb"), "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8")
    options = f"-c listen_addresses='' -k {sockets} -p {port}"
    run(str(bin_dir / "pg_ctl"), "-D", data, "-o", options, "-l", os.path.join(root, "server.log"), "-w", "start")
    try:
        run(str(bin_dir / "createdb"), "-h", sockets, "-p", str(port), "-U", "postgres", "optuna")
        yield f"postgresql+psycopg2://postgres@/optuna?host={sockets}&port={port}"
    finally:
        run(str(bin_dir / "pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def worker(
    url: str,
    study: str,
    logs: Path,
    seed: int,
    n_trials: int,
    n_timesteps: int,
    learning_starts: int = 100,
    heartbeat_interval: int = 60,
    max_total_trials: int | None = None,
) -> subprocess.Popen:
    """
    One worker process of the search: ``n_trials`` trials of ``n_timesteps`` primitive steps each (with
    ``max_total_trials``: trials until the study holds that many).
    """
    command = [
        sys.executable, "-m", "sb3_qchunk.zoo", "train", "--algo", "qc", "--env", "Pendulum-v1", "-conf", CPU_CONF,
        "-n", str(n_timesteps), "-optimize", "--n-trials", str(n_trials), "--n-evaluations", "1", "--eval-episodes", "1",
        "--sampler", "random", "--pruner", "none", "--no-optim-plots", "--storage", url, "--study-name", study,
        "-f", str(logs), "-params", f"learning_starts:{learning_starts}", "--num-threads", "1", "--seed", str(seed),
        "--heartbeat-interval", str(heartbeat_interval),
    ]  # fmt: skip
    if max_total_trials is not None:
        command += ["--max-total-trials", str(max_total_trials)]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def search_space_sample(n_trials: int, seed: int = 0) -> list[dict]:
    """``n_trials`` hyperparameter sets drawn from QC's search space (``sb3_qchunk.zoo.sample_qc_params``) by a seeded random sampler."""
    import optuna

    from sb3_qchunk.zoo import sample_qc_params

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    sample = []
    for _ in range(n_trials):
        trial = study.ask()
        sample_qc_params(trial, 1, 1, {})
        sample.append(trial.params)
    return sample


def run_search(url: str, study: str, n_workers: int, params: list[dict], n_timesteps: int, logs: Path) -> float:
    """
    Wall-clock seconds for ``n_workers`` workers to run the trials ``params`` (enqueued in the study first, so that
    every search runs the same trials; each worker takes the next waiting one until all have run).
    """
    import optuna

    enqueued = optuna.create_study(storage=url, study_name=study, direction="maximize")
    for trial_params in params:
        enqueued.enqueue_trial(trial_params)
    start = time.perf_counter()
    processes = [
        worker(url, study, logs / f"{study}-{i}", 10 * n_workers + i, len(params), n_timesteps, max_total_trials=len(params))
        for i in range(n_workers)
    ]
    for process in processes:
        output = process.communicate()[0]
        if process.returncode != 0:
            raise RuntimeError(f"a worker failed:\n{output[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8, help="trials per search (split over the workers)")
    parser.add_argument("--n-timesteps", type=int, default=600, help="primitive steps per trial")
    parser.add_argument("--out", type=Path, default=None, help="markdown report")
    parser.add_argument("--smoke", action="store_true", help="tiny (2 trials of 50 steps)")
    args = parser.parse_args()
    if args.smoke:
        args.trials, args.n_timesteps = 2, 50
    import optuna

    from throughput import report_header, write_report  # benchmarks/ is the script's directory

    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise SystemExit("PostgreSQL's server binaries (initdb, pg_ctl) are not installed")
    rows = []
    params = search_space_sample(args.trials)
    with postgres_server(bin_dir) as url, tempfile.TemporaryDirectory() as logs:
        for n_workers in (1, 2):
            study = f"scaleout-{n_workers}"
            seconds = run_search(url, study, n_workers, params, args.n_timesteps, Path(logs))
            trials = optuna.load_study(study_name=study, storage=url).get_trials()
            complete = [trial for trial in trials if trial.state == optuna.trial.TrialState.COMPLETE]
            same = sorted(map(str, (t.params for t in complete))) == sorted(map(str, params))
            rows.append((n_workers, len(trials), len(complete), same, seconds, 60 * len(complete) / seconds))
    lines = [
        *report_header("Hyperparameter search over worker processes sharing one PostgreSQL study", "cpu"),
        "",
        f"Pendulum-v1, `zoo_hyperparams/qc_cpu.yml`, {args.trials} trials of {args.n_timesteps} primitive steps per "
        "search: the same hyperparameter sets in each search (drawn once from QC's search space by a seeded random "
        "sampler and enqueued in the study; each worker takes the next waiting trial, `--max-total-trials`), one "
        "torch thread per worker; the wall clock includes each worker's start-up.",
        "",
        "| workers | trials in the study | complete | the enqueued trials | wall s | trials per minute |",
        "|---|---|---|---|---|---|",
        *(f"| {w} | {n} | {c} | {'yes' if same else 'NO'} | {s:.0f} | {r:.2f} |" for w, n, c, same, s, r in rows),
        "",
        f"2 workers / 1 worker: {rows[1][5] / rows[0][5]:.2f}x the trials per minute.",
        "",
    ]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
