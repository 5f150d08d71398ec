"""Locks on the output folder and the work dir (:mod:`cg3d_bids.locks`): modes, holder notes,
stale notes of dead processes, waiting, clean-up, and a real ``cg3d`` run finding its output
folder busy (exit 75, the holder named)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from bids_fixtures import make_bids_dataset
from cg3d_bids.cli.main import main
from cg3d_bids.errors import EXIT_TEMPFAIL
from cg3d_bids.locks import (EXCLUSIVE, LOCK_DIR, SHARED, FolderLock, LockedError, LockModes, hold,
                             lock_modes)
from cg3d_bids.settings import Settings


def settings_for(tmp_path, level="group", **execution) -> Settings:
    return Settings().replace(inputs={"output_dir": tmp_path / "out", "analysis_level": level},
                              execution={"work_dir": tmp_path / "work", **execution})


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_modes_follow_the_level_and_the_stage(tmp_path):
    assert lock_modes(settings_for(tmp_path, "participant")) == LockModes(SHARED, None)
    assert lock_modes(settings_for(tmp_path, "group")) == LockModes(EXCLUSIVE, SHARED)
    assert lock_modes(settings_for(tmp_path, "participant", clean_workdir=True)) == LockModes(SHARED, EXCLUSIVE)
    # the lead's --stage (read with getattr, so that both branches merge)
    for stage, expected in (("score", LockModes(SHARED, SHARED)), ("rescore", LockModes(SHARED, SHARED)),
                            ("graph", LockModes(SHARED, EXCLUSIVE)), ("outputs", LockModes(EXCLUSIVE, EXCLUSIVE)),
                            ("unknown", LockModes(EXCLUSIVE, EXCLUSIVE))):
        fake = SimpleNamespace(inputs=SimpleNamespace(analysis_level="group"),
                               execution=SimpleNamespace(stage=stage, clean_workdir=False))
        assert lock_modes(fake) == expected, stage


def test_shared_holders_coexist_and_exclusive_is_refused_naming_them(tmp_path):
    with FolderLock(tmp_path, SHARED, label="output folder"), FolderLock(tmp_path, SHARED, label="output folder"):
        with pytest.raises(LockedError) as info:
            FolderLock(tmp_path, EXCLUSIVE, label="output folder", command="cg3d b o group").acquire()
    error = info.value
    assert error.exit_code == EXIT_TEMPFAIL == 75
    text = error.render()
    assert f"pid {os.getpid()} on host {socket.gethostname()}, started " in text
    assert "--lock-wait" in text and str(tmp_path) in text
    assert not (tmp_path / LOCK_DIR).exists(), "the last holder removes the lock folder"


def test_exclusive_holder_blocks_shared_and_its_note_names_it(tmp_path):
    with FolderLock(tmp_path, EXCLUSIVE, label="output folder", command="cg3d /bids /out group") as lock:
        note = json.loads(lock.note_file.read_text())
        assert note["pid"] == os.getpid() and note["host"] == socket.gethostname()
        assert note["mode"] == EXCLUSIVE and note["command"] == "cg3d /bids /out group" and note["started"]
        with pytest.raises(LockedError, match="cg3d /bids /out group"):
            FolderLock(tmp_path, SHARED, label="output folder").acquire()


def test_stale_note_of_a_dead_process_is_reported_and_removed(tmp_path, caplog):
    folder = tmp_path / LOCK_DIR
    folder.mkdir()
    pid = dead_pid()
    stale = folder / f"{socket.gethostname()}_{pid}.json"
    stale.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2026-01-01 00:00:00",
                                 "mode": EXCLUSIVE, "command": "cg3d killed"}))
    with caplog.at_level(logging.WARNING, logger="cg3d"):
        with FolderLock(tmp_path, SHARED, label="output folder"):
            assert not stale.exists()
    assert f"pid {pid}" in caplog.text and "stale lock note" in caplog.text


def test_lock_wait_waits_for_the_holder(tmp_path):
    holder = FolderLock(tmp_path, EXCLUSIVE, label="output folder").acquire()
    threading.Timer(1.0, holder.release).start()
    start = time.monotonic()
    with FolderLock(tmp_path, EXCLUSIVE, label="output folder", wait_s=30):
        waited = time.monotonic() - start
    assert 0.8 < waited < 20


def test_a_killed_holder_releases_the_lock(tmp_path):
    """flock is released by the kernel: a SIGKILLed holder never blocks the next run."""
    code = ("import sys, time; from cg3d_bids.locks import FolderLock; "
            f"FolderLock({str(tmp_path)!r}, 'exclusive', label='output folder').acquire(); "
            "print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(LockedError, match=f"pid {proc.pid} "):
        FolderLock(tmp_path, SHARED, label="output folder").acquire()
    proc.kill()
    proc.wait()
    with FolderLock(tmp_path, EXCLUSIVE, label="output folder"):
        pass
    assert not (tmp_path / LOCK_DIR).exists()


def test_hold_takes_the_work_dir_lock_of_group_runs(tmp_path):
    settings = settings_for(tmp_path, "group")
    with hold(settings) as held:
        assert [(lock.folder, lock.mode) for lock in held] == [(tmp_path / "out", EXCLUSIVE),
                                                               (tmp_path / "work", SHARED)]
        with pytest.raises(LockedError, match="work directory"):
            FolderLock(tmp_path / "work", EXCLUSIVE, label="work directory").acquire()
    assert not (tmp_path / "out" / LOCK_DIR).exists() and not (tmp_path / "work" / LOCK_DIR).exists()


def test_second_group_run_into_a_busy_output_folder_stops_with_75(tmp_path, capsys):
    """Another run holds the output folder: cg3d stops at once, exit 75, naming the holder."""
    paths = make_bids_dataset(tmp_path / "bids", subjects=["01", "02", "03", "04", "05"], modalities=("T1w",),
                              seed=3)
    argv = [str(tmp_path / "bids"), str(tmp_path / "out"), "group", "-w", str(tmp_path / "work"),
            "--device", "cpu", "--encoder", "test-tiny-vit", "--cube-size", "28", "--nprocs", "1",
            "--skip-bids-validation", "--modality", "T1w", "-d", f"masks={paths['masks_dir']}"]
    with FolderLock(tmp_path / "out", EXCLUSIVE, label="output folder", command="cg3d first run"):
        status = main(argv)
    err = capsys.readouterr().err
    assert status == 75, err
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in err and "cg3d first run" in err
    assert "--lock-wait" in err
    assert not list((tmp_path / "out").glob("*")), "nothing written by the refused run"
