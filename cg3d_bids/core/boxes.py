"""Bounding boxes of masks (plain numpy)."""

from __future__ import annotations

import numpy as np

__all__ = ["bounding_box"]


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box (one slice per axis) that holds every true voxel of ``mask``; None when
    there is none. A 3D mask is read in two passes (its projection on the first two axes serves
    both of them)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim == 3:
        xy = mask.any(axis=2)
        hits = [xy.any(axis=1), xy.any(axis=0), mask.any(axis=(0, 1))]
    else:
        hits = [mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)) for axis in range(mask.ndim)]
    box = []
    for along in hits:
        index = np.flatnonzero(along)
        if index.size == 0:
            return None
        box.append(slice(int(index[0]), int(index[-1]) + 1))
    return tuple(box)
