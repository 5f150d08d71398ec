"""``cg3d`` stopped by a signal mid-run, as SLURM does (SIGTERM at a time limit or ``scancel``),
with nipype MultiProc workers (``--nprocs 2``): the whole process tree stops within seconds, the
exit code is 143, nothing is written afterwards, the output folder validates (or does not exist),
a second run into the busy output folder is refused, and a rerun resumes to the outputs of an
uninterrupted run. SIGKILL of the main process alone takes its workers down too."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_fixtures import make_bids_dataset
from cg3d_bids.cli.main import main
from test_e2e import FAST, read_tsv

pytestmark = pytest.mark.slow

MULTIPROC = [*FAST, "--nprocs", "2"]  # the last --nprocs wins: nipype MultiProc with 2 workers


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Five T1w subjects and the outputs of an uninterrupted run (same options) to compare with."""
    root = tmp_path_factory.mktemp("signals")
    paths = make_bids_dataset(root / "bids", subjects=["01", "02", "03", "04", "05"], modalities=("T1w",),
                              seed=21, lesion_subjects=["03"])
    common = ["-d", f"masks={paths['masks_dir']}", "--modality", "T1w"]
    assert argv_run(root, "ref", "work_ref", common) == 0
    return {"root": root, "common": common}


def argv(root: Path, out: str, work: str, common: list[str]) -> list[str]:
    return [str(root / "bids"), str(root / out), "group", "-w", str(root / work), *MULTIPROC, *common]


def argv_run(root: Path, out: str, work: str, common: list[str]) -> int:
    return main(argv(root, out, work, common))


def start(cohort, out: str, work: str) -> subprocess.Popen:
    """The run as a subprocess; its console goes to files (a pipe would stay open as long as any
    worker that inherited it lives)."""
    root = cohort["root"]
    cmd = [sys.executable, "-m", "cg3d_bids", *argv(root, out, work, cohort["common"])]
    with open(root / f"{out}.stdout", "w") as stdout, open(root / f"{out}.stderr", "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, start_new_session=True)
    proc.console = root / f"{out}.stderr"  # type: ignore[attr-defined]
    return proc


@pytest.fixture
def cleanup():
    """Processes of the runs a test starts (by their unique work folders) that are still there at
    its end are killed (they exist only when the test fails)."""
    markers: list[str] = []
    yield markers.append
    for marker in markers:
        for pid in processes_of(marker):
            os.kill(pid, signal.SIGKILL)


def wait_for(proc: subprocess.Popen, ready, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            return
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    pytest.fail(f"the run ended (or hung) before the point to interrupt it: {proc.returncode}\n"
                f"{proc.console.read_text()[-3000:]}")


def processes_of(marker: str) -> list[int]:
    """Live processes whose command line mentions ``marker`` (the run's unique work folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in cmdline and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def snapshot(*folders: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for folder in folders if folder.exists()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_quiet_after_exit(*folders: Path) -> None:
    before = snapshot(*folders)
    time.sleep(2.0)
    assert snapshot(*folders) == before, "files were written after the main process had gone"


def assert_valid_or_absent(out: Path) -> None:
    if not out.exists():
        return
    from cg3d_bids.bids.validation import validate_derivatives

    n_errors, messages = validate_derivatives(out)
    assert n_errors == 0, messages


def assert_same_outputs(cohort, out: str) -> None:
    ref, new = cohort["root"] / "ref", cohort["root"] / out
    maps = sorted(ref.rglob("*.nii.gz"))
    assert maps
    for path in maps:
        other = new / path.relative_to(ref)
        np.testing.assert_array_equal(np.asarray(nib.load(other).dataobj), np.asarray(nib.load(path).dataobj))
    assert [r["score_max"] for r in read_tsv(ref / "group_T1w.tsv")] == \
        [r["score_max"] for r in read_tsv(new / "group_T1w.tsv")]


def stop(proc: subprocess.Popen, signum: int) -> tuple[float, str]:
    t0 = time.monotonic()
    proc.send_signal(signum)  # the main process only: no process-group kill
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"cg3d did not stop within 120 s of {signal.Signals(signum).name}")
    return time.monotonic() - t0, proc.console.read_text()


# ------------------------------------------------------------------------------------------------
def test_sigterm_during_tokenize_stops_everything_then_resumes(cohort, capsys, cleanup):
    root = cohort["root"]
    cleanup(str(root / "work_tok"))
    proc = start(cohort, "out_tok", "work_tok")
    wait_for(proc, lambda: any((root / "work_tok" / "tokens").rglob("*.npz")))
    workers = [pid for pid in processes_of(str(root / "work_tok")) if pid != proc.pid]
    assert workers, "MultiProc workers expected"

    # a second run into the same output folder is refused at once, naming the running one
    assert argv_run(root, "out_tok", "work_other", cohort["common"]) == 75
    err = capsys.readouterr().err
    assert f"pid {proc.pid} on host {socket.gethostname()}" in err and "started" in err

    elapsed, err = stop(proc, signal.SIGTERM)
    assert proc.returncode == 143, err
    assert elapsed < 20, f"took {elapsed:.1f} s to stop"
    assert not processes_of(str(root / "work_tok")), "a worker outlived the main process"
    assert "interrupted (SIGTERM)" in err and "Traceback" not in err
    assert_quiet_after_exit(root / "out_tok", root / "work_tok")
    assert_valid_or_absent(root / "out_tok")

    assert argv_run(root, "out_tok", "work_tok", cohort["common"]) == 0
    assert_same_outputs(cohort, "out_tok")


def test_sigterm_during_reports_leaves_a_valid_dataset(cohort, cleanup):
    """Killed once the group table exists: the folder already has its dataset-level files."""
    root = cohort["root"]
    cleanup(str(root / "work_rep"))
    shutil.copytree(root / "work_ref", root / "work_rep")  # tokens and scores cached: straight to outputs
    proc = start(cohort, "out_rep", "work_rep")
    wait_for(proc, lambda: (root / "out_rep" / "group_T1w.tsv").exists())
    elapsed, err = stop(proc, signal.SIGTERM)
    assert proc.returncode == 143, err
    assert elapsed < 20
    assert not processes_of(str(root / "work_rep"))
    assert_quiet_after_exit(root / "out_rep")
    for name in ("dataset_description.json", "README.md", ".bidsignore"):
        assert (root / "out_rep" / name).exists(), name
    assert_valid_or_absent(root / "out_rep")


def test_sigkill_of_the_main_process_takes_the_workers_down(cohort, cleanup):
    """Killed while its workers write reports into the output folder: they stop with it."""
    root = cohort["root"]
    cleanup(str(root / "work_kill"))
    shutil.copytree(root / "work_ref", root / "work_kill")
    proc = start(cohort, "out_kill", "work_kill")
    wait_for(proc, lambda: (root / "out_kill" / "group_T1w.tsv").exists())
    assert [pid for pid in processes_of(str(root / "work_kill")) if pid != proc.pid]
    proc.kill()  # SIGKILL, the main process only
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and processes_of(str(root / "work_kill")):
        time.sleep(0.05)
    assert not processes_of(str(root / "work_kill")), "workers outlived a SIGKILLed main process"
    assert_quiet_after_exit(root / "out_kill", root / "work_kill")
