"""The main job (``make demo``) stays runnable: its tiny mode trains both agents and writes its report."""

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_smoke(tmp_path, play_data_dir):
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "sb3_qchunk.demo", "--smoke", "--out", str(out), "--data-dir", str(play_data_dir)]
    subprocess.run(command, check=True, cwd=ROOT)
    with open(out / "curves.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert {(row["method"], row["phase"]) for row in rows} == {
        (method, phase) for method in ("QC (h=5)", "BFN (h=1)") for phase in ("offline", "online")
    }
    summary = (out / "summary.md").read_text()
    assert all(f"| {name} |" in summary for name in ("random chunks", "QC (h=5)", "BFN (h=1)"))
    assert (out / "learning_curve.png").stat().st_size > 0
