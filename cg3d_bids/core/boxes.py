"""Bounding boxes of masks (plain numpy)."""

from __future__ import annotations

import numpy as np

__all__ = ["axis_occupancy", "bounding_box"]


def axis_occupancy(mask: np.ndarray) -> list[np.ndarray]:
    """Per axis, whether each index along it holds a true voxel of ``mask``: ``(n_axis,)`` bool
    each. A 3D mask is read in two passes (its projection on the first two axes serves both)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim == 3:
        xy = mask.any(axis=2)
        return [xy.any(axis=1), xy.any(axis=0), mask.any(axis=(0, 1))]
    return [mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)) for axis in range(mask.ndim)]


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box (one slice per axis) that holds every true voxel of ``mask``; None when
    there is none."""
    box = []
    for along in axis_occupancy(mask):
        index = np.flatnonzero(along)
        if index.size == 0:
            return None
        box.append(slice(int(index[0]), int(index[-1]) + 1))
    return tuple(box)
