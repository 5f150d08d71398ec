"""Locks on the output folder and the work directory, held for the whole run.

Each locked folder has a hidden ``.cg3d-lock/`` (the BIDS validator ignores dot folders) with

- ``lock``: the file locked with :func:`fcntl.flock`; the kernel releases the lock when its
  process ends, however it ends (SIGKILL included), so a dead run never blocks a new one;
- ``<host>_<pid>.json``: one note per holder (pid, host, start time, command, mode), read only to
  name the holder in the message of a run that finds the folder busy.

Modes (:func:`lock_modes`): runs that may share a folder take a **shared** lock, runs that must be
alone in it an **exclusive** one.

=============================================  =====================  =====================
run                                            output folder          work directory
=============================================  =====================  =====================
``participant`` (many at once: HPC arrays)     shared                 --
``group`` (``--stage all``)                    exclusive              shared
``group --stage score|rescore --shard i/n``    shared                 shared
``group --stage graph``                        shared                 exclusive
``group --stage outputs``                      exclusive              exclusive
any run with ``--clean-workdir``               (as above)             exclusive
=============================================  =====================  =====================

A busy folder stops the run at once with exit 75 (EX_TEMPFAIL) and a message naming the holder
(pid, host, start time, command); ``--lock-wait SECONDS`` waits for it instead. Notes of holders
that are gone (a killed run) are stale: they are reported and removed. On a file system without
``flock`` support (some network mounts) cg3d warns and runs unlocked. The last holder to leave
removes ``.cg3d-lock/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import write_json
from .errors import EXIT_TEMPFAIL, Cg3dError

__all__ = ["EXCLUSIVE", "FolderLock", "LOCK_DIR", "LockModes", "LockedError", "SHARED", "clear_folder",
           "hold", "lock_modes"]

LOGGER = logging.getLogger("cg3d")

SHARED = "shared"
EXCLUSIVE = "exclusive"
LOCK_DIR = ".cg3d-lock"
#: Seconds between two tries while waiting for a busy folder.
POLL_S = 0.5
#: ``flock`` errors meaning "this file system cannot lock": run unlocked, with a warning.
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class LockedError(Cg3dError):
    """The output folder or work directory is held by another cg3d run (exit 75, EX_TEMPFAIL)."""

    exit_code = EXIT_TEMPFAIL


@dataclass(frozen=True)
class LockModes:
    """The lock a run takes on the output folder and on the work directory (None: no lock)."""

    output: str
    work: str | None = None


#: ``group --stage`` -> modes (the lead's batch/shard stages; an unknown stage locks everything).
STAGE_MODES: dict[str, LockModes] = {
    "all": LockModes(EXCLUSIVE, SHARED),
    "score": LockModes(SHARED, SHARED),
    "rescore": LockModes(SHARED, SHARED),
    "graph": LockModes(SHARED, EXCLUSIVE),
    "outputs": LockModes(EXCLUSIVE, EXCLUSIVE),
}


def lock_modes(settings: Any) -> LockModes:
    """The modes of a run from its settings (see the module docstring's table)."""
    if settings.inputs.analysis_level == "participant":
        modes = LockModes(SHARED, None)
    else:
        stage = getattr(settings.execution, "stage", "all") or "all"
        modes = STAGE_MODES.get(stage, LockModes(EXCLUSIVE, EXCLUSIVE))
    if settings.execution.clean_workdir:
        modes = dataclasses.replace(modes, work=EXCLUSIVE)
    return modes


# ------------------------------------------------------------------------------------------------
def _process_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(note: dict[str, Any]) -> bool | None:
    """Whether the holder of ``note`` still runs (None: on another host, cannot tell)."""
    if note.get("host") != socket.gethostname():
        return None
    pid = int(note.get("pid", 0))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = note.get("proc_start")
    return started is None or _process_start(pid) in (None, started)


def describe(note: dict[str, Any]) -> str:
    """``pid 1234 on host h, started 2026-11-30 22:31:05 (exclusive; cg3d /bids /out group)``."""
    return (f"pid {note.get('pid', '?')} on host {note.get('host', '?')}, started {note.get('started', '?')} "
            f"({note.get('mode', '?')} lock; command: {note.get('command', '?')})")


class FolderLock:
    """A shared or exclusive lock on one folder (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, mode: str, *, label: str, wait_s: float = 0.0,
                 command: str | None = None):
        if mode not in (SHARED, EXCLUSIVE):
            raise ValueError(f"lock mode {mode!r}: use {SHARED!r} or {EXCLUSIVE!r}")
        self.folder = Path(folder)
        self.mode = mode
        self.label = label
        self.wait_s = float(wait_s)
        self.command = command or " ".join(["cg3d", *sys.argv[1:]])
        self.fd: int | None = None

    @property
    def lock_dir(self) -> Path:
        return self.folder / LOCK_DIR

    @property
    def lock_file(self) -> Path:
        return self.lock_dir / "lock"

    @property
    def note_file(self) -> Path:
        return self.lock_dir / f"{socket.gethostname()}_{os.getpid()}.json"

    # -- acquiring -------------------------------------------------------------------------------
    def acquire(self) -> FolderLock:
        """Take the lock, waiting up to ``wait_s`` seconds; :class:`LockedError` when still busy."""
        deadline = time.monotonic() + self.wait_s
        announced = False
        operation = (fcntl.LOCK_EX if self.mode == EXCLUSIVE else fcntl.LOCK_SH) | fcntl.LOCK_NB
        while True:
            fd = self._open()
            if fd is None:
                continue
            try:
                fcntl.flock(fd, operation)
            except BlockingIOError:
                os.close(fd)
                holders = self.holders()
                if time.monotonic() >= deadline:
                    raise self._busy_error(holders) from None
                if not announced:
                    LOGGER.warning("the %s %s is in use by %s; waiting up to %g s (--lock-wait)", self.label,
                                   self.folder, self._who(holders), self.wait_s)
                    announced = True
                time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
                continue
            except OSError as exc:
                os.close(fd)
                if exc.errno not in _UNSUPPORTED:
                    raise
                LOGGER.warning("the file system of %s cannot lock files (%s): running without a lock; do "
                               "not start two runs on this %s at once", self.folder, exc.strerror, self.label)
                return self
            if not self._is_current(fd):  # the last holder removed the lock file meanwhile: retry
                os.close(fd)
                continue
            self.fd = fd
            self._remove_stale_notes()
            write_json(self.note_file, self._note())
            return self

    def _open(self) -> int | None:
        try:
            self.lock_dir.mkdir(parents=True, exist_ok=True)
            return os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:  # removed by a holder leaving at this very moment
            return None

    def _is_current(self, fd: int) -> bool:
        try:
            path = os.stat(self.lock_file)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (mine.st_dev, mine.st_ino) == (path.st_dev, path.st_ino)

    def _note(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(), "host": socket.gethostname(), "mode": self.mode, "command": self.command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "proc_start": _process_start(os.getpid()),
            "folder": str(self.folder),
        }

    # -- holders ---------------------------------------------------------------------------------
    def notes(self) -> dict[Path, dict[str, Any]]:
        """The holder notes in the lock folder (unreadable ones left out)."""
        out = {}
        for path in sorted(self.lock_dir.glob("[!.]*.json")):
            try:
                note = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(note, dict):
                out[path] = note
        return out

    def holders(self) -> list[dict[str, Any]]:
        """Notes of the runs holding the lock now; stale notes of dead processes are removed."""
        live = []
        for path, note in self.notes().items():
            if _alive(note) is False:
                self._drop_stale(path, note)
            else:
                live.append(note)
        return live

    def _remove_stale_notes(self) -> None:
        """Once the lock is ours: drop notes of holders that are gone (all others when exclusive)."""
        for path, note in self.notes().items():
            if path == self.note_file:
                continue
            if self.mode == EXCLUSIVE or _alive(note) is False:
                self._drop_stale(path, note)

    def _drop_stale(self, path: Path, note: dict[str, Any]) -> None:
        LOGGER.warning("stale lock note removed from %s: %s no longer holds it (that run was interrupted; "
                       "rerun it to complete its outputs)", self.folder, describe(note))
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def _who(self, holders: list[dict[str, Any]]) -> str:
        if not holders:
            return "another process (it has not written its lock note yet, or runs on a host whose " \
                   "notes are unreadable)"
        return "; ".join(describe(note) for note in holders)

    def _busy_error(self, holders: list[dict[str, Any]]) -> LockedError:
        why = ("two runs writing one output folder would mix their outputs" if self.label == "output folder"
               else "the group stages of one work directory must not overlap")
        return LockedError(
            f"the {self.label} is in use by another cg3d run: {self._who(holders)}", path=self.folder,
            fix=f"wait for that run to finish and rerun, or add --lock-wait SECONDS to wait for it ({why}); "
            f"a run that was killed releases its lock by itself",
        )

    # -- releasing -------------------------------------------------------------------------------
    def release(self) -> None:
        """Drop the lock; the last holder removes the lock folder."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            with contextlib.suppress(FileNotFoundError):
                self.note_file.unlink()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return  # others still hold it
            if self._is_current(fd):
                for path in self.lock_dir.iterdir():  # notes (all stale now), leftovers, the lock file
                    with contextlib.suppress(OSError):
                        path.unlink()
                with contextlib.suppress(OSError):
                    self.lock_dir.rmdir()
        finally:
            os.close(fd)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def hold(settings: Any, modes: LockModes | None = None) -> Iterator[list[FolderLock]]:
    """Hold the run's locks (``modes``, default :func:`lock_modes`) on the output folder and the
    work directory, in that order; :class:`LockedError` (exit 75) when one is busy."""
    modes = modes or lock_modes(settings)
    wait_s = float(getattr(settings.execution, "lock_wait", 0.0) or 0.0)
    targets = [(settings.inputs.output_dir, modes.output, "output folder")]
    if modes.work:
        targets.append((settings.execution.work_dir, modes.work, "work directory"))
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(FolderLock(folder, mode, label=label, wait_s=wait_s))
                for folder, mode, label in targets]
        yield held


def clear_folder(folder: str | os.PathLike) -> None:
    """Remove everything in ``folder`` but its lock (``--clean-workdir`` under the work-dir lock)."""
    import shutil

    for path in Path(folder).iterdir():
        if path.name == LOCK_DIR:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
