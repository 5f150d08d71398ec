"""Stop signals (:mod:`cg3d_bids.signals`) on real processes: the main process stops its workers and
exits 128 + signal; workers die with the main process even when it is SIGKILLed.

A small Python program stands in for cg3d: a ``concurrent.futures`` process pool (as nipype's
MultiProc) whose workers append to a file until stopped. End-to-end runs of ``cg3d`` itself:
``tests/test_e2e_signals.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cg3d_bids.signals import Interrupted, descendants

PROGRAM = textwrap.dedent("""
    import multiprocessing as mp, os, sys, time
    from concurrent.futures import ProcessPoolExecutor
    from cg3d_bids.signals import Interrupted, die_with_parent, stop_on_signals, worker_signals

    def work(path):
        while True:
            with open(path, "a") as fh:
                fh.write("x")
            time.sleep(0.02)

    def run(folder, guarded):
        pool = ProcessPoolExecutor(2, initializer=die_with_parent if guarded else None,
                                   initargs=(os.getpid(), worker_signals()) if guarded else (),
                                   mp_context=mp.get_context("fork"))
        for i in range(2):
            pool.submit(work, os.path.join(folder, f"w{i}.txt"))
        while len(os.listdir(folder)) < 2:
            time.sleep(0.01)
        print("ready", flush=True)
        time.sleep(120)

    folder, guarded = sys.argv[1], sys.argv[2] == "1"
    try:
        with stop_on_signals():
            run(folder, guarded)
    except Interrupted as exc:
        sys.exit(exc.exit_code)
""")


def start(tmp_path: Path, guarded: bool = True) -> subprocess.Popen:
    (tmp_path / "out").mkdir()
    proc = subprocess.Popen([sys.executable, "-c", PROGRAM, str(tmp_path / "out"), "1" if guarded else "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir()}


@pytest.fixture
def reaper():
    """Workers a test recorded are killed at its end if still alive (only when it fails)."""
    pids: list[int] = []
    yield pids.extend
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_stop_signal_stops_the_workers_and_exits_128_plus_n(tmp_path, signum, reaper):
    proc = start(tmp_path)
    workers = descendants(proc.pid)
    reaper(workers)
    assert len(workers) == 2
    t0 = time.monotonic()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signum, err
    assert time.monotonic() - t0 < 10
    assert not [pid for pid in workers if alive(pid)], "a worker outlived the main process"
    before = sizes(tmp_path / "out")
    time.sleep(0.5)
    assert sizes(tmp_path / "out") == before, "something wrote after the main process had gone"
    assert f"{signal.Signals(signum).name} received: stopping 2 worker process(es)" in err


def test_workers_die_when_the_main_process_is_killed(tmp_path, reaper):
    """SIGKILL cannot be handled: PR_SET_PDEATHSIG takes the workers down with the main process."""
    proc = start(tmp_path)
    workers = descendants(proc.pid)
    reaper(workers)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(pid) for pid in workers):
        time.sleep(0.05)
    assert not [pid for pid in workers if alive(pid)]
    before = sizes(tmp_path / "out")
    time.sleep(0.5)
    assert sizes(tmp_path / "out") == before


def test_without_the_worker_setup_a_killed_main_leaves_writing_workers(tmp_path, reaper):
    """The control: plain pool workers outlive a SIGKILLed parent (what the setup prevents)."""
    proc = start(tmp_path, guarded=False)
    workers = descendants(proc.pid)
    reaper(workers)
    proc.kill()
    proc.wait()
    time.sleep(0.5)
    assert any(alive(pid) for pid in workers)


def test_interrupted_carries_the_exit_code():
    assert Interrupted(signal.SIGTERM).exit_code == 143 and Interrupted(signal.SIGTERM).signame == "SIGTERM"
    assert isinstance(Interrupted(signal.SIGINT), KeyboardInterrupt)
