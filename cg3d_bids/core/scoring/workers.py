"""Per-core worker threads for the scoring kernels.

On CPU, a scoring call runs its work as independent single-threaded jobs (one row image's
tiles, one image's gathering or sorting, one image pair's re-scoring) on as many threads as
torch had intra-op threads, instead of letting every operation split itself over all cores.
A job never waits for another thread: on a machine shared with other processes, a
multi-threaded operation waits at its barrier for its slowest thread (one descheduled thread
stalled each small operation by ~16 ms on a busy 2-core machine), and each job's tile stays in
its own core's cache. Inside :func:`core_workers` torch's thread count is 1 (restored on exit).
Results do not depend on the scheduling: every job writes its own outputs, and everything
combined across jobs is combined in a fixed order by the caller. When the distance GEMMs run
with numpy's BLAS (:mod:`.blas`), it too is held at one thread for the call. On CUDA, jobs run
in order on the calling thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import torch

from .blas import cpu_blas, single_threaded_blas

T = TypeVar("T")
R = TypeVar("R")
_ACTIVE: ContextVar[CoreWorkers | None] = ContextVar("cg3d_core_workers", default=None)


class CoreWorkers:
    """Jobs on ``n`` single-threaded worker threads (``pool`` None: in order, here)."""

    def __init__(self, pool: ThreadPoolExecutor | None, n: int):
        self.pool = pool
        self.n = n
        self._objects: dict[tuple[int, Any], Any] = {}
        self._lock = threading.Lock()

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``[fn(x) for x in items]``, run by the workers; results in ``items`` order."""
        if self.pool is None:
            return [fn(x) for x in items]
        return list(self.pool.map(fn, items))

    def local(self, key: Any, factory: Callable[[], T]) -> T:
        """The calling thread's object for ``key`` (made by ``factory`` on first use)."""
        slot = (threading.get_ident(), key)
        with self._lock:
            obj = self._objects.get(slot)
        if obj is None:
            obj = factory()
            with self._lock:
                self._objects[slot] = obj
        return obj

    def locals_of(self, key: Any) -> list[Any]:
        """Every thread's object for ``key``."""
        with self._lock:
            return [obj for (_, k), obj in self._objects.items() if k == key]

    def release(self, key: Any = None) -> None:
        """Drop the per-thread objects for ``key`` (all by default), freeing their buffers."""
        with self._lock:
            for slot in [s for s in self._objects if key is None or s[1] == key]:
                del self._objects[slot]


@contextmanager
def core_workers(device: torch.device | str = "cpu") -> Iterator[CoreWorkers]:
    """Worker threads for one scoring call (reused by nested calls)."""
    active = _ACTIVE.get()
    if active is not None:
        yield active
        return
    threads = torch.get_num_threads()
    cpu = torch.device(device).type == "cpu"
    parallel = cpu and threads > 1
    pool = None
    stack = ExitStack()
    if cpu and cpu_blas() == "numpy":
        stack.enter_context(single_threaded_blas())  # once for all the call's GEMMs
    if parallel:
        torch.set_num_threads(1)
        pool = ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,),
                                  thread_name_prefix="cg3d-scoring")
    workers = CoreWorkers(pool, threads if parallel else 1)
    token = _ACTIVE.set(workers)
    try:
        yield workers
    finally:
        _ACTIVE.reset(token)
        workers.release()
        if pool is not None:
            pool.shutdown(wait=True)
            torch.set_num_threads(threads)
        stack.close()
