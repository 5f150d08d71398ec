"""SIGTERM, SIGINT and SIGHUP stop the whole cg3d process tree within seconds.

SLURM sends SIGTERM at a time limit or on ``scancel``; a terminal sends SIGINT (Ctrl-C) and
SIGHUP (closed session). Inside :func:`stop_on_signals` such a signal, in the main process:

1. stops every descendant process (nipype MultiProc workers, the BIDS validator): SIGTERM, then
   SIGKILL for any still there after :data:`GRACE_S` seconds, and waits until they are gone, so
   nothing writes into the output folder once the main process has gone;
2. raises :class:`Interrupted` (a ``KeyboardInterrupt``) in the main thread: the run unwinds as on
   Ctrl-C (locks released, an output folder it created and left empty removed) and the command
   exits ``128 + signal`` (143, 130, 129), the shell convention for "killed by a signal". nipype
   turns any exception inside a node (the serial plugin runs nodes in the main process) into a
   node failure: whatever leaves the block after a stop signal is re-raised as
   :class:`Interrupted`.

Workers die with the main process even when it is killed outright (SIGKILL, the OOM killer):
:func:`die_with_parent` (called in each worker) asks Linux for ``PR_SET_PDEATHSIG`` = SIGKILL, or
elsewhere starts a thread that exits when the parent is gone. Every intermediate is written
atomically, so a rerun of the same command resumes from the work directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["GRACE_S", "Interrupted", "STOP_SIGNALS", "descendants", "die_with_parent", "stop_on_signals",
           "stop_processes", "worker_signals"]

LOGGER = logging.getLogger("cg3d")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: Seconds a process gets to end after SIGTERM before SIGKILL.
GRACE_S = 3.0


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal; :attr:`exit_code` is ``128 + signum``."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(self.signame)

    @property
    def signame(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


# ------------------------------------------------------------------------------------------------
# processes
def _parents() -> dict[int, int]:
    """``{pid: parent pid}`` of every live (not zombie) process, from /proc."""
    out: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] not in ("Z", "X"):
            out[int(entry.name)] = int(fields[1])
    return out


def descendants(pid: int | None = None) -> list[int]:
    """Live descendants of ``pid`` (default: this process), children first. Linux (/proc) only."""
    root = os.getpid() if pid is None else pid
    if not Path("/proc/self/stat").exists():
        return []
    parents = _parents()
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [root]
    while todo:
        for child in sorted(children.get(todo.pop(0), [])):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def stop_processes(pids: Iterable[int], grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM ``pids``, SIGKILL those still alive after ``grace_s``; wait until all are gone.

    Returns the pids that needed SIGKILL."""
    pids = list(pids)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    killed = [p for p in pids if _alive(p)]
    for pid in killed:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(_alive(p) for p in killed):
        time.sleep(0.05)
    return killed


# ------------------------------------------------------------------------------------------------
# the main process
@contextlib.contextmanager
def stop_on_signals(signals: Iterable[int] = STOP_SIGNALS) -> Iterator[None]:
    """Within: a stop signal stops the process tree and raises :class:`Interrupted` (see above).

    Signals ignored when cg3d started (``nohup`` ignores SIGHUP) stay ignored. Outside the main
    thread (where Python cannot handle signals) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        if received:  # already stopping: a second signal changes nothing
            return
        received.append(signum)
        pids = descendants()
        LOGGER.warning("%s received: stopping%s; rerun the same command to resume", signal.Signals(signum).name,
                       f" {len(pids)} worker process(es)" if pids else "")
        stop_processes(pids)
        raise Interrupted(signum)

    previous = {}
    for signum in signals:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    except BaseException as exc:
        if received and not isinstance(exc, Interrupted):
            raise Interrupted(received[0]) from exc
        raise
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


# ------------------------------------------------------------------------------------------------
# worker processes
def worker_signals() -> tuple[int, ...]:
    """The stop signals a worker should die of (those the main process does not ignore)."""
    return tuple(s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN)


def die_with_parent(parent: int, signals: Iterable[int] = STOP_SIGNALS) -> None:
    """In a worker: default dispositions for ``signals`` (die at once, never run a task on after
    the main process asked to stop), and be killed as soon as ``parent`` ends."""
    for signum in signals:
        signal.signal(signum, signal.SIG_DFL)
    if not _pdeathsig():
        threading.Thread(target=_watch_parent, args=(parent,), name="cg3d-parent-watch", daemon=True).start()
    if os.getppid() != parent:  # the parent died before we were set up
        os._exit(128 + signal.SIGKILL)


def _pdeathsig() -> bool:
    """Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; False where unavailable."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(128 + signal.SIGKILL)
