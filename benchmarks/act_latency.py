"""
Latency of one chunk choice (``QC.predict`` on one observation) on the eager path, with and without the small-batch
oneDNN switch (:meth:`~sb3_qchunk.qc.policies.QCPolicy.small_eager_sampling`, on by default), paired: the two take
turns block by block, the median block kept. Small config (256x256, N=8) and paper config (4x512, N=32), both actors,
``sampling_precision="auto"`` (float32 for one observation).

    python benchmarks/act_latency.py --out benchmarks/results/act_latency_<machine>.md
    python benchmarks/act_latency.py --smoke --out /tmp/act.md   # tiny, for the tests
"""

import argparse

import numpy as np

from throughput import CONFIGS, OBS_DIM, SMOKE_CONFIG, interleaved_rates, make_qc, report_header, write_report  # benchmarks/ is the script's directory


def predicts(model, n: int, onednn_switch: bool) -> None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed blocks of each (the median is kept)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=str, default=None)
    args = parser.parse_args()
    configs = SMOKE_CONFIG if args.smoke else CONFIGS
    repeats = 2 if args.smoke else args.repeats
    lines = [
        *report_header("Chunk choice latency, eager path: oneDNN switched off for small batches or not", "cpu"),
        "",
        "| config | actor | oneDNN on, ms | shipped (off below 256 rows), ms | on / shipped |",
        "|---|---|---|---|---|",
    ]
    for name, config in configs.items():
        for actor in ("best_of_n", "distill"):
            model = make_qc(actor, config["net_arch"], config["num_samples"], 8 if args.smoke else 256, "auto", "cpu")
            n = 2 if args.smoke else (20 if actor == "best_of_n" else 200)
            rates = interleaved_rates(  # chunks per second, the two taking turns
                {
                    "on": (lambda k, m=model: predicts(m, k, onednn_switch=False), n),
                    "shipped": (lambda k, m=model: predicts(m, k, onednn_switch=True), n),
                },
                repeats,
            )
            on, shipped = 1000 / rates["on"], 1000 / rates["shipped"]
            lines.append(f"| {name} | {actor} | {on:.3f} | {shipped:.3f} | {on / shipped:.2f} |")
            print(lines[-1], flush=True)
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
