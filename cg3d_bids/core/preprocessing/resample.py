"""Resampling between voxel grids, exactly as ``scipy.ndimage.affine_transform`` does it, for less work.

:func:`resample` is ``affine_transform`` (constant 0 outside, no prefilter). :func:`resample_where`
computes the same values at the output voxels of a mask only, and :func:`resample_mask` a
nearest-neighbour mask only in the box of output voxels that can reach it. Oblique grids feed
``map_coordinates`` with input coordinates computed in the same order of operations as
``affine_transform``'s own loop. Axis-aligned grids (the common case: every axis of the output
maps to one axis of the input) are computed axis by axis with numpy, repeating scipy's arithmetic
(its order-1 spline weights, the corner order and the float64 products and sums of
``NI_GeometricTransform``). Either way the results are equal bit for bit
(tests/test_preprocessing.py checks it on oblique, axis-aligned, flipped and edge-touching grids)
while the work shrinks to the brain.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..boxes import bounding_box

__all__ = ["axis_aligned", "resample", "resample_mask", "resample_where", "voxel_to_world"]


def voxel_to_world(ijk: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World coordinates (N, 3) of voxel coordinates (N, 3) under a 4x4 affine."""
    return np.asarray(ijk, dtype=np.float64) @ affine[:3, :3].T + affine[:3, 3]


def axis_aligned(affine: np.ndarray) -> bool:
    """Whether the 3x3 part of ``affine`` is diagonal (exact zeros elsewhere): then each output axis
    maps to one input axis and every coordinate computation separates by axis, exactly."""
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    return bool(np.all(linear[~np.eye(3, dtype=bool)] == 0.0))


def _axis_coordinates(vox2vox: np.ndarray, starts, stops) -> list[np.ndarray]:
    """Per axis ``h``, the input coordinates of output indices ``starts[h]..stops[h]-1`` of an
    axis-aligned ``vox2vox``: ``i * m_hh + shift_h``, what ``affine_transform`` computes (the
    other terms of its sum are exact zeros)."""
    return [np.arange(a, b, dtype=np.float64) * vox2vox[h, h] + vox2vox[h, 3]
            for h, (a, b) in enumerate(zip(starts, stops))]


def resample(data: np.ndarray, vox2vox: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """Sample ``data`` at ``vox2vox @ output_voxel`` (0 outside); order 0 nearest, 1 linear."""
    return ndimage.affine_transform(
        data, vox2vox[:3, :3], offset=vox2vox[:3, 3], output_shape=tuple(shape), order=order,
        mode="constant", cval=0.0, prefilter=False,
    )


def _input_coordinates(vox2vox: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``vox2vox @ index`` for output voxel indices ``index`` (3, n), float64, with the operations in
    the order of scipy's ``affine_transform`` (``((0 + i0 m0) + i1 m1) + i2 m2 + shift``), so that
    sampling at these coordinates gives the very values ``affine_transform`` gives there."""
    index = np.asarray(index, dtype=np.float64)
    out = np.empty(index.shape, dtype=np.float64)
    for h in range(3):
        acc = np.zeros(index.shape[1:], dtype=np.float64)
        for ll in range(3):
            acc += index[ll] * vox2vox[h, ll]
        out[h] = acc + vox2vox[h, 3]
    return out


def resample_where(data: np.ndarray, vox2vox: np.ndarray, where: np.ndarray, order: int) -> np.ndarray:
    """:func:`resample` computed only at the output voxels of ``where`` (bool, the output shape),
    0 elsewhere: the same values there, bit for bit, for the work of those voxels only."""
    if order == 1 and axis_aligned(vox2vox) and data.dtype in (np.float32, np.float64) and data.ndim == 3:
        return _linear_separable(data, vox2vox, where)
    out = np.zeros(where.shape, dtype=data.dtype)
    index = np.nonzero(where)
    if index[0].size:
        if axis_aligned(vox2vox):
            axes = _axis_coordinates(vox2vox, (0, 0, 0), where.shape)
            coordinates = np.stack([axes[h][index[h]] for h in range(3)])
        else:
            coordinates = _input_coordinates(vox2vox, np.stack(index))
        out[index] = ndimage.map_coordinates(data, coordinates, order=order, mode="constant", cval=0.0,
                                             prefilter=False)
    return out


def _linear_taps(coords: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """Per output index along one axis: whether it is inside the input (scipy's ``constant`` mode
    gives 0 for a coordinate outside ``[0, n - 1]``), its two input taps (the upper one mirrored
    at the last voxel, where its weight is 0, as scipy does) and their order-1 spline weights
    (``w0 = 1 - frac``, ``w1 = 1 - w0``: ``get_spline_interpolation_weights``)."""
    inside = (coords >= 0) & (coords <= n - 1)
    c = np.where(inside, coords, 0.0)
    start = np.floor(c)
    w0 = 1.0 - (c - start)
    w1 = 1.0 - w0
    lo = start.astype(np.intp)
    hi = np.where(lo + 1 < n, lo + 1, max(n - 2, 0))
    return inside, (lo, hi), (w0, w1)


def _linear_separable(data: np.ndarray, vox2vox: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Trilinear values (mode ``constant``, 0 outside) of an axis-aligned ``vox2vox`` at the output
    voxels of ``where``, slab by slab along the first axis. Each value is scipy's: the 8 corners in
    C order (last axis fastest), each ``float64(value) * wx * wy * wz`` added to a float64 sum from
    0, stored in ``data``'s dtype.

    Each slab is computed on the box of its ``where`` voxels, as whole rows and columns gathered
    along one axis at a time (``take``), which is faster than gathering voxel by voxel although the
    box also holds voxels outside ``where`` (computed, then dropped)."""
    axes = _axis_coordinates(vox2vox, (0, 0, 0), where.shape)
    (in_x, xs, wxs), (in_y, ys, wys), (in_z, zs, wzs) = (
        _linear_taps(c, n) for c, n in zip(axes, data.shape))
    where = np.ascontiguousarray(where)  # slabs along the first axis are read one at a time
    out = np.zeros(where.shape, dtype=data.dtype)
    rows_any, cols_any = where.any(axis=2) & in_y, where.any(axis=1) & in_z
    for i in np.flatnonzero(in_x & rows_any.any(axis=1) & cols_any.any(axis=1)):
        rows, cols = np.flatnonzero(rows_any[i]), np.flatnonzero(cols_any[i])
        y, z = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
        y_weights = [w[y, None] for w in wys]
        z_taps, z_weights = [t[z] for t in zs], [w[None, z] for w in wzs]
        total = np.zeros((y.stop - y.start, z.stop - z.start), dtype=np.float64)
        coeff = np.empty_like(total)
        for x_tap, x_weight in zip(xs, wxs):
            plane, wx = data[x_tap[i]], x_weight[i]
            for y_tap, wy in zip(ys, y_weights):
                rows_of_plane = plane.take(y_tap[y], axis=0)
                for z_tap, wz in zip(z_taps, z_weights):
                    np.multiply(rows_of_plane.take(z_tap, axis=1), wx, out=coeff, dtype=np.float64)
                    coeff *= wy
                    coeff *= wz
                    total += coeff
        keep = where[i, y, z] & in_y[y, None] & in_z[None, z]
        out[i, y, z][keep] = total[keep]
    return out


def _mask_box(mask_shape: tuple[int, ...], lo: np.ndarray, hi: np.ndarray, vox2vox: np.ndarray,
              shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The box of output voxels whose nearest input voxel can lie in the input box [lo, hi]: the
    output image of the box's corners (half a voxel out), plus one voxel of margin, clipped."""
    corners = np.array([[a, b, c] for a in (lo[0] - 0.5, hi[0] + 0.5) for b in (lo[1] - 0.5, hi[1] + 0.5)
                        for c in (lo[2] - 0.5, hi[2] + 0.5)], dtype=np.float64)
    back = voxel_to_world(corners, np.linalg.inv(vox2vox))
    start = np.clip(np.floor(back.min(axis=0)).astype(int) - 1, 0, shape)
    stop = np.clip(np.ceil(back.max(axis=0)).astype(int) + 2, 0, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))


def resample_mask(mask: np.ndarray, vox2vox: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour :func:`resample` of a bool mask, computed only in the box of output voxels
    that can reach the mask (bit for bit the same result)."""
    out = np.zeros(shape, dtype=bool)
    extent = bounding_box(mask)
    if extent is None:
        return out
    box = _mask_box(mask.shape, np.array([s.start for s in extent]), np.array([s.stop - 1 for s in extent]),
                    vox2vox, shape)
    if axis_aligned(vox2vox):
        out[box] = _nearest_separable(mask, vox2vox, box)
        return out
    grid = np.mgrid[box]
    if grid[0].size == 0:
        return out
    coordinates = _input_coordinates(vox2vox, grid.reshape(3, -1))
    values = ndimage.map_coordinates(mask.astype(np.uint8), coordinates, order=0, mode="constant", cval=0,
                                     prefilter=False)
    out[box] = values.reshape(grid.shape[1:]).astype(bool)
    return out


def _nearest_separable(mask: np.ndarray, vox2vox: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """Nearest-neighbour values of an axis-aligned resampling in ``box``, axis by axis: scipy takes
    voxel ``floor(c + 0.5)`` for a coordinate ``0 <= c <= n - 1`` and the constant 0 elsewhere."""
    axes = _axis_coordinates(vox2vox, [b.start for b in box], [b.stop for b in box])
    index, valid = [], []
    for h, c in enumerate(axes):
        ok = (c >= 0) & (c <= mask.shape[h] - 1)
        index.append(np.where(ok, np.floor(c + 0.5), 0).astype(np.intp))
        valid.append(ok)
    values = mask.take(index[0], axis=0).take(index[1], axis=1).take(index[2], axis=2)
    if all(v.all() for v in valid):
        return values
    return values & valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :]
