"""The BLAS library of the CPU distance GEMMs: the choice, single-threaded GEMMs, and results that
do not depend on the thread count."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

from cg3d_bids.core.scoring import blas, mutual_scores


def numpy_blas_threads() -> list[int]:
    """Thread counts of the BLAS libraries threadpoolctl sees (numpy's among them)."""
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_the_choice_follows_the_vendor_and_the_override(monkeypatch):
    monkeypatch.delenv(blas.CPU_BLAS_ENV, raising=False)
    monkeypatch.setattr(blas, "numpy_blas_is_openblas", lambda: True)
    for vendor, expected in [("AuthenticAMD", "numpy"), ("GenuineIntel", "torch"), ("", "torch")]:
        monkeypatch.setattr(blas, "cpu_vendor", lambda vendor=vendor: vendor)
        assert blas.cpu_blas() == expected
    monkeypatch.setattr(blas, "numpy_blas_is_openblas", lambda: False)  # e.g. numpy with MKL
    monkeypatch.setattr(blas, "cpu_vendor", lambda: "AuthenticAMD")
    assert blas.cpu_blas() == "torch"
    for value, expected in [("numpy", "numpy"), (" Torch ", "torch")]:
        monkeypatch.setenv(blas.CPU_BLAS_ENV, value)
        assert blas.cpu_blas() == expected
    monkeypatch.setenv(blas.CPU_BLAS_ENV, "openblas")
    with pytest.raises(ValueError, match="CG3D_CPU_BLAS='openblas'.*'numpy' or 'torch'"):
        blas.cpu_blas()
    assert blas.gemm_library("cuda") == "torch"
    assert blas.gemm_description("cuda:1") == "cuda:1"
    monkeypatch.setenv(blas.CPU_BLAS_ENV, "numpy")
    assert blas.gemm_description("cpu") == "cpu, numpy's BLAS"


def test_this_install_has_what_the_choice_reads():
    assert blas.numpy_blas_is_openblas()  # numpy's wheels (the README's install)
    assert numpy_blas_threads(), "threadpoolctl sees no BLAS library in numpy"


def test_blas_is_single_threaded_inside_nested_and_concurrent_holders():
    with threadpool_limits(2, user_api="blas"):
        assert set(numpy_blas_threads()) == {2}
        seen, ready = [], threading.Barrier(3)

        def hold() -> None:
            with blas.single_threaded_blas():
                ready.wait()  # all three hold it at once
                seen.extend(numpy_blas_threads())
                ready.wait()

        with blas.single_threaded_blas():
            with blas.single_threaded_blas():
                assert set(numpy_blas_threads()) == {1}
            assert set(numpy_blas_threads()) == {1}  # the inner exit keeps the outer's limit
            workers = [threading.Thread(target=hold) for _ in range(2)]
            for w in workers:
                w.start()
            ready.wait()
            ready.wait()
            for w in workers:
                w.join()
            assert set(seen) == {1}
        assert set(numpy_blas_threads()) == {2}  # the last holder restores the caller's setting


def test_numpy_mm_writes_the_product_in_place():
    gen = torch.Generator().manual_seed(0)
    lhs, rhs = torch.randn(70, 386, generator=gen), torch.randn(386, 900, generator=gen)[:, 100:400]
    buffer = torch.full((70 * 300 + 5,), np.nan)
    out = buffer[: 70 * 300].view(70, 300)
    blas.numpy_mm(lhs, rhs, out)
    torch.testing.assert_close(out, lhs.double().mm(rhs.double()).float(), rtol=1e-5, atol=1e-4)
    assert bool(torch.isnan(buffer[70 * 300:]).all())


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_scores_do_not_depend_on_the_thread_count(library, monkeypatch):
    """Each GEMM runs on one thread (a multi-threaded OpenBLAS GEMM changes the last bits with
    the thread count), also when the caller allowed numpy's BLAS more threads."""
    monkeypatch.setenv(blas.CPU_BLAS_ENV, library)
    rng = np.random.default_rng(4)
    tokens = rng.standard_normal((8, 700, 96), dtype=np.float32)
    valid = rng.random((8, 700)) > 0.2
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with threadpool_limits(threads, user_api="blas"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results.append(mutual_scores(tokens, valid))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert np.array_equal(other, results[0])
