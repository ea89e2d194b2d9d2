"""
Latency of one chunk choice (``QC.predict`` on one observation): the eager path as shipped, the eager path with
oneDNN left on for small batches (what :meth:`~sb3_qchunk.qc.policies.QCPolicy.small_eager_sampling` switches off),
``compile_sampling=True``, and with ``--reference-src`` the authors' ``sample_actions`` (set-up:
``benchmarks/reference.py``), all taking turns block by block, the median block kept; ours over the reference as the
median (and quartiles) of the ratios of the blocks of one round, which the host's drift between rounds does not move.
Small config (256x256, N=8) and paper config (4x512, N=32), both actors, ``sampling_precision="auto"``.

    python benchmarks/act_latency.py --out benchmarks/results/act_latency_<machine>.md
    python benchmarks/act_latency.py --reference-src ../qc --reference-python ../qc-venv/bin/python --out ...
    python benchmarks/act_latency.py --smoke --out /tmp/act.md   # tiny, for the tests
"""

import argparse
import statistics
from pathlib import Path

import numpy as np

from throughput import (  # benchmarks/ is the script's directory
    ACTION_DIM,
    CHUNK,
    CONFIGS,
    OBS_DIM,
    SMOKE_CONFIG,
    ReferenceProcess,
    interleaved_blocks,
    make_qc,
    report_header,
    retain_freed_memory,
    write_report,
)


def predicts(model, n: int, onednn_switch: bool = True) -> None:
    """``n`` predicts on one observation; ``onednn_switch=False`` keeps oneDNN on (the instance's switch overridden)."""
    policy, obs = model.policy, np.zeros(OBS_DIM, dtype=np.float32)
    if not onednn_switch:
        policy.small_eager_sampling = lambda batch_size: False
    try:
        for _ in range(n):
            model.predict(obs)
    finally:
        if not onednn_switch:
            del policy.small_eager_sampling


def paired(ours: list[float], reference: list[float]) -> str:
    """The median of the rounds' ratios ours / reference, with their quartiles (interpolated within the ratios seen)."""
    ratios = [a / b for a, b in zip(ours, reference)]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return f"{statistics.median(ratios):.2f} ({q1:.2f}-{q3:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=21, help="rounds of timed blocks (medians are kept)")
    parser.add_argument("--reference-src", type=Path, default=None, help="a checkout of the authors' code, timed in turns")
    parser.add_argument("--reference-python", type=str, default=None, help="the Python of the reference's venv")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=str, default=None)
    args = parser.parse_args()
    if (args.reference_src is None) != (args.reference_python is None):
        parser.error("--reference-src and --reference-python go together")
    configs = SMOKE_CONFIG if args.smoke else CONFIGS
    repeats = 2 if args.smoke else args.repeats
    retained = retain_freed_memory()
    worker = ReferenceProcess(args.reference_python, args.reference_src) if args.reference_src is not None else None
    lines = [
        *report_header("Chunk choice latency (one observation): eager, compiled and the reference's", "cpu", retained),
        "",
        f"Milliseconds per `predict`, median of {repeats} rounds of blocks, the jobs taking turns in each round. `eager, "
        "oneDNN on`: the eager path without the small-batch oneDNN switch; `eager`: as shipped; `compiled`: "
        "`compile_sampling=True`; `reference`: the authors' jitted `sample_actions` followed by `np.array` (with "
        "`--reference-src`). `/ reference`: the median of the rounds' ratios of our block's time per choice to the "
        "reference's (quartiles in brackets).",
        "",
        "| config | actor | eager, oneDNN on | eager | compiled | reference | eager / reference | compiled / reference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    batch_size = 8 if args.smoke else 256
    for name, config in configs.items():
        eager = {
            actor: make_qc(actor, config["net_arch"], config["num_samples"], batch_size, "auto", "cpu") for actor in ("best_of_n", "distill")
        }
        compiled = {
            actor: make_qc(actor, config["net_arch"], config["num_samples"], batch_size, "auto", "cpu", compiled=True)
            for actor in ("best_of_n", "distill")
        }
        jobs = {}
        for actor in ("best_of_n", "distill"):
            n = 2 if args.smoke else ((100 if name == "small" else 20) if actor == "best_of_n" else 500)
            jobs[f"on {actor}"] = (lambda k, m=eager[actor]: predicts(m, k, onednn_switch=False), n)
            jobs[f"eager {actor}"] = (lambda k, m=eager[actor]: predicts(m, k), n)
            jobs[f"compiled {actor}"] = (lambda k, m=compiled[actor]: predicts(m, k), n)
            if worker is not None:
                worker.request("build", key=f"{name} {actor}", actor=actor, hidden=config["net_arch"], num_samples=config["num_samples"],
                               batch_size=batch_size, obs_dim=OBS_DIM, action_dim=ACTION_DIM, chunk=CHUNK)
                jobs[f"reference {actor}"] = (lambda k, key=f"{name} {actor}": worker.request("act", key=key, n=k), n)
        # (interleaved_rates' warm-up call of each job compiles the compiled models' sampling before any block is timed)
        blocks = {job: [1000 / rate for rate in rates] for job, rates in interleaved_blocks(jobs, repeats).items()}  # ms
        ms = {job: statistics.median(values) for job, values in blocks.items()}
        for actor in ("best_of_n", "distill"):
            reference = ms.get(f"reference {actor}")
            eager_ms, compiled_ms = ms[f"eager {actor}"], ms[f"compiled {actor}"]
            ratios = (
                " | ".join(paired(blocks[f"{path} {actor}"], blocks[f"reference {actor}"]) for path in ("eager", "compiled"))
                if reference
                else "- | -"
            )
            lines.append(
                f"| {name} | {actor} | {ms[f'on {actor}']:.3f} | {eager_ms:.3f} | {compiled_ms:.3f} | "
                f"{f'{reference:.3f}' if reference else '-'} | {ratios} |"
            )
            print(lines[-1], flush=True)
    if worker is not None:
        worker.close()
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
