"""The benchmark scripts stay runnable: each has a tiny --smoke mode that runs here."""

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def table_rows(text, first_cell):
    """The cells of the markdown table rows that start with ``first_cell``."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith(f"| {first_cell} |")]


def test_throughput_smoke(tmp_path):
    out = tmp_path / "throughput.md"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--smoke", "--out", str(out)],
        check=True,
        timeout=300,
    )
    report = out.read_text()
    updates = table_rows(report, "smoke")
    paths = ["fp32", "auto", "auto + bf16 training"]
    assert [(row[1], row[2].split(":")[0] + (" + bf16 training" if "bf16 training" in row[2] else "")) for row in updates] == [
        (actor, path) for actor in ("best_of_n", "distill") for path in paths
    ]
    for row in updates:
        qc, sac, ratio = float(row[3]), float(row[4]), float(row[5])
        assert qc > 0 and sac > 0 and abs(ratio - qc / sac) < 0.01
    (wrapper,) = table_rows(report, "Pendulum-v1")
    assert float(wrapper[1]) > 0 and float(wrapper[2]) > 0
    (dataset,) = table_rows(report, "3000")  # 3 copies of a 1001-row episode: 1000 transitions each
    assert float(dataset[1]) > 0 and 1.0 < float(dataset[4]) < 2.5  # buffer bytes / raw bytes used


def test_learning_smoke(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "learning.py"), "--smoke", "--out", str(tmp_path)],
        check=True,
        timeout=300,
    )
    with open(tmp_path / "curves.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    for method in ("QC", "RLPD"):
        assert {row["phase"] for row in rows if row["method"] == method} == {"offline", "online"}
    assert all(0.0 <= float(row["success_rate"]) <= 1.0 for row in rows)
    assert (tmp_path / "summary.md").exists() and (tmp_path / "cube-single.png").exists()
