"""CPU time of the encoder loop: the ``encode`` timing leaves out the helper threads that prepare
the next cube and store the last tokens."""

from __future__ import annotations

import threading
import time

from _synthetic import brain_in_box, tiny_encoder
from cg3d_bids.core.tokens import tokenize_volume
from cg3d_bids.stages.tokenize import ForegroundClock


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
