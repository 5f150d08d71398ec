"""Test session set-up: never touch the network (the brief's rule for every test)."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub (it reads the variable once, at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


def _blas_params() -> list:
    """Both BLAS libraries; the one this machine does not use by default only in the full suite
    (``-m "not slow"`` keeps the default)."""
    from cg3d_bids.core.scoring.blas import BLAS_LIBRARIES, cpu_blas

    default = cpu_blas()
    return [lib if lib == default else pytest.param(lib, marks=pytest.mark.slow)
            for lib in BLAS_LIBRARIES]


@pytest.fixture(params=_blas_params())
def blas(request, monkeypatch):
    """Run the test with each BLAS library of the CPU distance GEMMs
    (:mod:`cg3d_bids.core.scoring.blas`; the machine's default is only one of them)."""
    monkeypatch.setenv("CG3D_CPU_BLAS", request.param)
    return request.param
