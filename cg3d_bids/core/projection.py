"""Seeded Gaussian random projection (CoDeGraph3D Sec. 3.2.2, method.md §2).

One fixed matrix ``R`` of shape ``(D, k)`` with i.i.d. entries ``N(0, 1/k)`` projects every token
of every axis and layer: ``v = z @ R``. It is drawn on the CPU with numpy's ``PCG64`` generator
from the seed alone, so it is the same on every device, platform and run; device copies are
cached.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

__all__ = ["projection_matrix", "projection_tensor"]


@lru_cache(maxsize=16)
def _matrix(in_dim: int, out_dim: int, seed: int) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(seed))
    matrix = (rng.standard_normal((in_dim, out_dim)) / np.sqrt(out_dim)).astype(np.float32)
    matrix.setflags(write=False)
    return matrix


def projection_matrix(in_dim: int, out_dim: int = 128, seed: int = 0) -> np.ndarray:
    """The ``(in_dim, out_dim)`` float32 matrix, entries ``N(0, 1/out_dim)`` (read-only, cached)."""
    if int(in_dim) < 1 or int(out_dim) < 1:
        raise ValueError(f"projection sizes must be positive, got D={in_dim}, k={out_dim}")
    if int(seed) < 0:
        raise ValueError(f"projection seed must be >= 0, got {seed}")
    return _matrix(int(in_dim), int(out_dim), int(seed))


@lru_cache(maxsize=16)
def _tensor(in_dim: int, out_dim: int, seed: int, device: str) -> torch.Tensor:
    return torch.from_numpy(np.array(_matrix(in_dim, out_dim, seed))).to(device)


def projection_tensor(
    in_dim: int, out_dim: int = 128, seed: int = 0, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """:func:`projection_matrix` as a float32 tensor on ``device`` (cached; do not modify)."""
    projection_matrix(in_dim, out_dim, seed)  # validates
    return _tensor(int(in_dim), int(out_dim), int(seed), str(torch.device(device)))
