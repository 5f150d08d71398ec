"""The prepared GPU check (``benchmarks/gpu_check.sh``) and its preparation script stay runnable.

A GPU machine is lent rarely and for minutes: the scripts must not fail there on something a CPU
machine can catch (a syntax error, a package cg3d no longer needs and the machine lacks).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "benchmarks" / "gpu_check.sh"
PREPARE = ROOT / "benchmarks" / "gpu_prepare.sh"
DATA = ROOT.parent / "shared" / "data"


@pytest.mark.parametrize("script", [CHECK, PREPARE], ids=lambda p: p.name)
def test_scripts_parse(script):
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def checked_modules() -> list[str]:
    """The modules gpu_check.sh imports to check the installed wheels."""
    match = re.search(r'for name in (\(.*?\)):', CHECK.read_text())
    assert match, "gpu_check.sh no longer lists the modules it checks"
    return list(ast.literal_eval(match.group(1)))


def carried_wheels() -> list[str]:
    """The ``name==version`` entries of gpu_prepare.sh's wheel list."""
    match = re.search(r"^WHEELS=\((.*?)^\)", PREPARE.read_text(), flags=re.S | re.M)
    assert match, "gpu_prepare.sh no longer lists its wheels"
    return match.group(1).split()


def test_checked_modules_are_installed_with_cg3d():
    """Every module the check imports is installed by ``pip install -e .[test]`` (a module cg3d
    dropped, e.g. nilearn, would stop the check on the GPU machine)."""
    missing = [name for name in checked_modules() if importlib.util.find_spec(name) is None]
    assert not missing, f"gpu_check.sh imports {missing}, which cg3d's install does not provide"


def test_carried_wheels_are_pinned_and_not_dropped_dependencies():
    wheels = carried_wheels()
    assert wheels and "nilearn" not in [w.split("==")[0].lower() for w in wheels]
    assert all("==" in w for w in wheels), "pin every carried wheel (name==version)"


@pytest.mark.slow  # ~30 s: 6 volumes at cube 56 through the whole check
@pytest.mark.skipif(not (DATA / "manifest.tsv").is_file(), reason="needs ../shared/data")
def test_cpu_smoke_mode_runs_end_to_end(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"))
    out = subprocess.run(["bash", str(CHECK), "--cpu-smoke"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| total wall s (cg3d process)" in report and "PASS" in report
    assert (tmp_path / "out" / "timings.tsv").read_text().startswith("stage\tmodality\timages")
