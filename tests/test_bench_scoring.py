"""benchmarks/bench_scoring.py runs and prints its comparison table (tiny shapes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two 4096^3 matmuls per round (a few seconds)
def test_comparison_table_times_each_blas_library(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_scoring.py"), "--compare-shape", "6,40,16",
         "--rounds", "1", "--no-sizes", "--blas", "numpy,torch", "--musc-repo", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    table = out.stdout
    for row in ("cg3d `mutual_scores`, numpy's BLAS", "cg3d `mutual_scores`, torch's BLAS",
                "fp32 matmul 4096^3, torch", "fp32 matmul 4096^3, numpy"):
        assert f"| {row} |" in table
    assert "official MuSc scorer NOT AVAILABLE" in table  # tmp_path holds no MuSc copy
    bad = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_scoring.py"), "--compare-shape", "6,40,16",
         "--rounds", "1", "--no-sizes", "--blas", "openblas"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert bad.returncode != 0 and "--blas: unknown ['openblas']" in bad.stdout + bad.stderr
