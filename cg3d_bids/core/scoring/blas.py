"""Which BLAS library runs the CPU distance GEMMs, and keeping it single-threaded while it does.

Two libraries are at hand in every install: torch's (MKL in torch's x86 wheels) and numpy's
(OpenBLAS in numpy's wheels). MKL is tuned for Intel CPUs; on AMD ones OpenBLAS's AVX2 (Haswell)
kernels run the scoring GEMMs faster. Measured on a 2-core AMD EPYC (Zen 3, AVX2), one thread,
the tile shapes of :mod:`.tiles` (K = 386): OpenBLAS 85-90 GFLOP/s against 55-75 for MKL; a
B = 32 scoring call took 14-18 % less time (medians of 4 alternated rounds, two comparisons;
``benchmarks/bench_scoring.py --blas numpy,torch``). So the default (:func:`cpu_blas`) is
numpy's BLAS on AMD x86 CPUs when it is OpenBLAS, torch's everywhere else (on Intel, MKL's
speed was measured by earlier stops; OpenBLAS's was not).
``CG3D_CPU_BLAS=numpy`` or ``=torch`` overrides the choice.

Determinism. Each GEMM runs on one thread (the workers of :mod:`.workers` run the jobs in
parallel): OpenBLAS splits a multi-threaded GEMM across threads in a way that changes the last
bits of the products with the thread count, so :func:`single_threaded_blas` holds numpy's BLAS
at one thread while distance GEMMs run. The two libraries round differently, so CPU scores
depend in their last bits on the library, as they already do on the instruction set.
"""

from __future__ import annotations

import functools
import os
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

#: Environment variable overriding :func:`cpu_blas` (``numpy`` or ``torch``).
CPU_BLAS_ENV = "CG3D_CPU_BLAS"
BLAS_LIBRARIES = ("numpy", "torch")


@functools.cache
def cpu_vendor() -> str:
    """The CPU vendor string (``GenuineIntel``, ``AuthenticAMD``, ...; ``""`` if unknown)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() if platform.system() != "Linux" else ""


@functools.cache
def numpy_blas_is_openblas() -> bool:
    """True when numpy was built against OpenBLAS (numpy's wheels; numpy >= 1.26 says so)."""
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except Exception:  # older numpy: no machine-readable config
        return False
    return "openblas" in str(blas.get("name", "")).lower()


def cpu_blas() -> str:
    """``"numpy"`` or ``"torch"``: the library of the CPU distance GEMMs (module docstring).

    Raises ValueError for an unknown ``CG3D_CPU_BLAS`` value.
    """
    choice = os.environ.get(CPU_BLAS_ENV, "").strip().lower()
    if choice in BLAS_LIBRARIES:
        return choice
    if choice:
        raise ValueError(f"{CPU_BLAS_ENV}={os.environ[CPU_BLAS_ENV]!r} is not a BLAS choice: "
                         f"set it to 'numpy' or 'torch', or unset it for the default")
    return "numpy" if cpu_vendor() == "AuthenticAMD" and numpy_blas_is_openblas() else "torch"


def gemm_library(device: torch.device | str) -> str:
    """The library of the distance GEMMs on ``device``: :func:`cpu_blas` on CPU, torch on CUDA."""
    return cpu_blas() if torch.device(device).type == "cpu" else "torch"


def gemm_description(device: torch.device | str) -> str:
    """Where the distance GEMMs run, for the logs: ``"cpu, numpy's BLAS"``, ``"cuda:0"``, ..."""
    library = gemm_library(device)
    return f"cpu, {library}'s BLAS" if torch.device(device).type == "cpu" else str(device)


@functools.cache
def _controller():
    from threadpoolctl import ThreadpoolController  # finds numpy's BLAS once (~20 ms)

    return ThreadpoolController()


_lock = threading.Lock()
_holders = 0
_limiter = None


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Hold numpy's BLAS at one thread inside the block (re-entrant, from any thread).

    The thread count is process-wide: the first holder sets it, the last one restores it, so
    nested and concurrent holders (worker threads inside a scoring call) cost a counter only.
    """
    global _holders, _limiter
    with _lock:
        if _holders == 0:
            _limiter = _controller().limit(limits=1, user_api="blas")
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                _limiter.restore_original_limits()
                _limiter = None


def numpy_mm(lhs: torch.Tensor, rhs: torch.Tensor, out: torch.Tensor) -> None:
    """``out = lhs @ rhs`` (CPU float32 tensors, ``out`` written in place) with numpy's BLAS on
    one thread."""
    with single_threaded_blas():
        np.matmul(lhs.numpy(), rhs.numpy(), out=out.numpy())


def distance_mm(lhs: torch.Tensor, rhs: torch.Tensor, out: torch.Tensor, library: str) -> None:
    """``out = lhs @ rhs`` with ``library`` (:func:`gemm_library`)."""
    if library == "numpy":
        numpy_mm(lhs, rhs, out)
    else:
        torch.mm(lhs, rhs, out=out)
