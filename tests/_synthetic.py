"""Synthetic cubes and a cached tiny test encoder for the encoder/token/map tests."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch

H, P, G = 56, 14, 4  # cube size, patch size, token grid


def structured_cube(size: int = H) -> np.ndarray:
    """A smooth, non-uniform, full-brain volume in [0.17, 0.53] (no symmetry along any axis)."""
    x, y, z = np.meshgrid(*[np.linspace(0.0, 1.0, size)] * 3, indexing="ij")
    cube = 0.35 + 0.1 * np.sin(6 * x) * np.cos(5 * y) + 0.08 * np.sin(7 * z + 1)
    return cube.astype(np.float32)


def brain_in_box(size: int = H, lo=(8, 16, 20), hi=(40, 48, 44), seed: int = 0):
    """A cube whose non-zero 'brain' is a box (so some slices are black), and its mask."""
    rng = np.random.default_rng(seed)
    cube = np.zeros((size,) * 3, dtype=np.float32)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    cube[box] = 0.3 + 0.4 * rng.random(tuple(b - a for a, b in zip(lo, hi)), dtype=np.float32)
    return cube, cube > 0


@lru_cache(maxsize=4)
def tiny_encoder(name: str = "test-tiny-vit", img_size: int = H):
    from cg3d_bids.core.models import create_encoder

    return create_encoder(name, img_size=img_size)


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    """One torch thread: the tiny ViT's ops are far too small to share (on a busy 2-core machine
    a 2-thread forward pass of one 28^2 slice took ~150 ms instead of ~3 ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
