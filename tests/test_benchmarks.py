"""The benchmark scripts stay runnable: each has a tiny --smoke mode that runs here."""

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
