"""CPU time and memory of the encoder loop: freed memory is reused (glibc), and the ``encode``
timing leaves out the helper threads that prepare the next cube and store the last tokens."""

from __future__ import annotations

import resource
import threading
import time

import pytest
import torch

from _synthetic import brain_in_box, tiny_encoder
from cg3d_bids.core.tokens import tokenize_volume
from cg3d_bids.heap import _glibc, reuse_freed_memory
from cg3d_bids.stages.tokenize import ForegroundClock

BIG = 96 * 2**20  # above glibc's largest mmap threshold (32 MB)


def _faults_per_allocation(rounds: int = 10) -> list[int]:
    """Page faults of allocating, touching and freeing ``BIG`` bytes, ``rounds`` times."""
    faults = []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.empty(BIG // 4, dtype=torch.float32)
        block.fill_(1.0)
        del block
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults


def _rss() -> int:
    """Resident memory of this process now, bytes."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))


@pytest.mark.skipif(_glibc() is None, reason="mallopt is glibc's")
def test_freed_memory_is_reused_inside_the_block_and_handed_back_after():
    """Outside the block every allocation maps fresh pages; inside, once the heap has grown
    enough (torch's aligned allocations leave gaps that a few frees coalesce), the same memory
    serves every later allocation and stays resident; leaving the block hands it back."""
    pages = BIG // 4096
    outside = _faults_per_allocation()
    before = _rss()
    with reuse_freed_memory() as applies:
        assert applies
        inside = _faults_per_allocation()
        kept = _rss()
    after = _rss()
    assert min(outside) > pages // 2
    assert max(inside[-3:]) < pages // 10
    assert sum(inside) < sum(outside) * 0.8
    assert kept - before > BIG // 2          # freed, but kept for the next allocation
    assert after - before < BIG // 2         # handed back (malloc_trim)


def test_the_foreground_clock_leaves_registered_threads_out():
    clock = ForegroundClock()
    started, done, release = threading.Event(), threading.Event(), threading.Event()

    def helper() -> None:
        clock.register()
        started.set()
        end = time.thread_time() + 0.3
        while time.thread_time() < end:   # burn 0.3 s of CPU in the helper only
            pass
        done.set()
        release.wait()                    # alive until the clock has been read

    c0, p0 = clock(), time.process_time()
    thread = threading.Thread(target=helper)
    thread.start()
    started.wait()
    done.wait()
    c1, p1 = clock(), time.process_time()
    release.set()
    thread.join()
    assert p1 - p0 >= 0.25                 # the process clock counts the helper's work
    assert c1 - c0 < 0.1                   # the foreground clock does not


def test_tokenize_volume_times_the_forward_passes_on_the_given_clock():
    """Each forward pass reads the clock before and after it: a clock that advances by 1 per
    reading charges 1 per pass."""
    cube, mask = brain_in_box()
    encoder = tiny_encoder()
    calls = []
    forward = encoder.forward_slices

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    encoder.forward_slices = counted
    ticks = iter(range(10**6))
    tok = tokenize_volume(cube, mask, encoder, projection_dim=8, slice_batch=14,
                          cpu_clock=lambda: float(next(ticks)))
    assert len(calls) > 3
    assert tok.info["encode_cpu_seconds"] == float(len(calls))
