"""
The C allocator's share of an update: QC's updates/s in fresh processes with glibc's default ``malloc`` heuristics
against the same processes with freed memory kept in the process (``GLIBC_TUNABLES``, see ``RETAIN_FREED``), or any
other environment a user gives (``--env``, e.g. ``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2``).

Why: an update allocates and frees its intermediate tensors (MBs each: 2048 x 256 float32 is 2 MiB) every time.
glibc hands such blocks back to the kernel when they are freed (``mmap``/``munmap`` above its mmap threshold, a heap
trim above its trim threshold), so the next update faults the same amount of fresh zeroed pages in again: thousands
of minor page faults and milliseconds of kernel time per update. Whether it does depends on the heap's history
(glibc raises both thresholds to the largest block freed so far), so a fresh process with one model on a synthetic
buffer can fault many times more than a process that built several models first (``throughput.py``, ``levers.py``:
fewer, not none) or one that loaded a dataset (``--dataset``, as a training run does: none). Each measurement here is
a fresh process with one model,
the settings in turns (A B B A ...), and the table shows the paired ratio of each round.

    python benchmarks/allocator.py --out benchmarks/results/allocator_<machine>.md   # small config, both actors, eager and compiled
    python benchmarks/allocator.py --configs paper --paths compiled --rounds 3       # a part
    python benchmarks/allocator.py --dataset data/cube-single-play-100000-seed0.npz   # a process as a training run holds it
    python benchmarks/allocator.py --env LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2
    python benchmarks/allocator.py --smoke --out /tmp/allocator.md                   # tiny, for the tests
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch as th
from throughput import (  # benchmarks/ is the script's directory
    ACTORS,
    CONFIGS,
    RETAIN_FREED_TUNABLES,
    SMOKE_CONFIG,
    make_qc,
    report_header,
    write_report,
)

RETAIN_FREED = f"GLIBC_TUNABLES={RETAIN_FREED_TUNABLES}"  # freed memory kept in the process (see throughput.py)
PATHS = {"eager": False, "compiled": True}  # the model's compile_update (and compile_sampling)
SECONDS_PER_MEASUREMENT = 4.0  # timed updates per process: about this long at the rate of the warm-up


def worker(actor: str, config_name: str, path: str, threads: int, dataset: str | None, env_id: str) -> dict[str, float]:
    """One fresh process's measurement: updates/s, minor page faults and kernel (system) time per update, peak RSS."""
    th.set_num_threads(threads)
    config = {**CONFIGS, **SMOKE_CONFIG}[config_name]
    loaded = None if dataset is None else (dataset, env_id)
    model = make_qc(actor, config["net_arch"], config["num_samples"], 256, "auto", "cpu", PATHS[path], dataset=loaded)
    start = time.perf_counter()
    model.train(3, 256)  # compilation (from the on-disk cache after the warm-up process) and first touches
    model.train(2, 256)
    rate = 2 / (time.perf_counter() - start)
    n_updates = max(2, int(rate * SECONDS_PER_MEASUREMENT)) if config_name != "smoke" else 2
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    model.train(n_updates, 256)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "updates_per_s": n_updates / seconds,
        "faults_per_update": (after.ru_minflt - before.ru_minflt) / n_updates,
        "system_ms_per_update": 1e3 * (after.ru_stime - before.ru_stime) / n_updates,
        "peak_rss_mib": after.ru_maxrss / 1024,
    }


def measure(job: list, env: dict[str, str], unset: set[str]) -> dict[str, float]:
    """:func:`worker` (``job``: its arguments) in a fresh Python process: this one's environment without ``unset``, with ``env``."""
    command = [sys.executable, __file__, "--worker", json.dumps(job)]
    environment = {name: value for name, value in os.environ.items() if name not in unset}
    result = subprocess.run(command, env={**environment, **env}, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the worker {job} with {env} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def parse_env(assignments: list[str]) -> dict[str, str]:
    """``NAME=VALUE`` words as a dict (a clear error for a word without ``=``)."""
    env = {}
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        if not sep or not name:
            raise SystemExit(f"--env takes NAME=VALUE words, got {assignment!r}")
        env[name] = value
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--actors", nargs="+", default=list(ACTORS), choices=list(ACTORS))
    parser.add_argument("--configs", nargs="+", default=["small"], choices=list(CONFIGS))
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--env", nargs="+", default=[RETAIN_FREED], help="the environment measured against the defaults")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument("--dataset", default=None, help="an OGBench npz to train on (on --dataset-env) instead of the synthetic buffer")
    parser.add_argument("--dataset-env", default="cube-single-singletask-task1-v0", help="the single-task env of --dataset")
    parser.add_argument("--rounds", type=int, default=6, help="paired measurements per row")
    parser.add_argument("--smoke", action="store_true", help="tiny networks, one round (for the tests)")
    parser.add_argument("--out", type=str, default=None, help="write the markdown report to this file")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return
    env = parse_env(args.env)
    configs, rounds = (["smoke"], 1) if args.smoke else (args.configs, args.rounds)
    if rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {rounds}")
    settings = {"default": {}, "set": env}  # "default": this environment without the names --env sets
    lines = report_header("Updates/s with glibc's default malloc heuristics and with another environment", "cpu") + [
        f"Environment measured against the defaults: `{' '.join(args.env)}`; {rounds} rounds, each a fresh process per "
        f"setting (A B B A ...), torch {args.threads} threads, batch 256, "
        + (f"the dataset `{args.dataset}` loaded on `{args.dataset_env}`." if args.dataset else "synthetic buffer (`throughput.py`'s)."),
        "",
        "| config | actor | path | default updates/s | set updates/s | set / default (median of paired ratios) | q1 | q3 | "
        "default faults/update | set faults/update | default system ms/update | set system ms/update | "
        "default peak RSS MiB | set peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config in configs:
        for actor in args.actors:
            for path in args.paths:
                job = [actor, config, path, args.threads, args.dataset, args.dataset_env]
                measure(job, {}, set(env))  # warm-up: fills the inductor cache
                runs: dict[str, list[dict[str, float]]] = {name: [] for name in settings}
                for i in range(rounds):
                    for name in list(settings)[:: 1 if i % 2 == 0 else -1]:
                        runs[name].append(measure(job, settings[name], set(env)))
                ratios = [s["updates_per_s"] / d["updates_per_s"] for s, d in zip(runs["set"], runs["default"])]
                q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3

                def median(name: str, key: str) -> float:
                    return statistics.median(run[key] for run in runs[name])

                row = (
                    f"| {config} | {actor} | {path} | {median('default', 'updates_per_s'):.2f} | {median('set', 'updates_per_s'):.2f} | "
                    f"{statistics.median(ratios):.3f} | {q1:.3f} | {q3:.3f} | {median('default', 'faults_per_update'):.0f} | "
                    f"{median('set', 'faults_per_update'):.0f} | {median('default', 'system_ms_per_update'):.2f} | "
                    f"{median('set', 'system_ms_per_update'):.2f} | {median('default', 'peak_rss_mib'):.0f} | "
                    f"{median('set', 'peak_rss_mib'):.0f} |"
                )
                print(row, flush=True)
                lines.append(row)
    lines += [
        "",
        "`faults/update`: minor page faults per update (`getrusage`), pages the kernel had to zero and map afresh; "
        "`system ms/update`: kernel time per update, summed over threads; `peak RSS`: the process's largest resident "
        "set, what keeping freed memory costs.",
    ]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
