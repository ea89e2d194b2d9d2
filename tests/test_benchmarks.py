"""The benchmark scripts stay runnable: each has a tiny --smoke mode that runs here."""

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_smoke(tmp_path):
    out = tmp_path / "throughput.md"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--smoke", "--out", str(out)],
        check=True,
        timeout=300,
    )
    table = out.read_text()
    assert "| smoke | 16x16 | 2 | best_of_n |" in table and "| smoke | 16x16 | 2 | distill |" in table


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
