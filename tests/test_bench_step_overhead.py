"""Smoke test: the P4 CPU benchmark still runs (its figures live in benchmarks/results/, not here)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_step_overhead_quick(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step_overhead.py"), "--quick",
                          "--rounds", "2", "--steps", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    table = (tmp_path / "step_overhead_quick.md").read_text()
    assert "ratio" in table and "GradESOptimizer" in table
    rows = (tmp_path / "step_overhead_quick.csv").read_text().splitlines()
    assert rows[0].startswith("provider,round,ms_per_step") and len(rows) == 1 + 2 * 2
