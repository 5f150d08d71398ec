"""Token scores -> voxel maps, the probseg transform, and per-subject summary numbers
(CoDeGraph3D Sec. 3.2, method.md §5).

Plain functions on arrays. The coarse ``(G, G, G)`` map is resized trilinearly to the ``(H, H, H)``
cube (``torch.nn.functional.interpolate``, ``align_corners=False``: voxel centres of each
``p^3`` block sit symmetrically around the token centre) and mapped to the image's native grid
with the cube's affine (:func:`scores_to_native`); voxels outside the brain mask are 0.

The raw map is a distance (unbounded). ``probseg = logistic(z - z_center)`` with ``z`` the robust
z-score of the raw value against the batch's brain-token scores (median, 1.4826 MAD:
:func:`robust_stats`), so probseg 0.5 is ``z_center`` robust standard deviations above the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from .boxes import bounding_box

__all__ = [
    "Component", "SubjectSummary", "average_layers", "connected_components", "probseg_transform",
    "robust_stats", "scores_to_native", "subject_summary", "token_map_to_cube",
]

#: Components listed in a summary (largest first); ``n_components`` counts all of them.
MAX_COMPONENTS = 50
#: Consistency constant of the MAD for a normal distribution (scale = 1.4826 MAD).
MAD_TO_SD = 1.4826
#: Floor of the robust scale (a batch of identical scores would divide by zero).
MIN_SCALE = 1e-12


@dataclass(frozen=True)
class Component:
    """A connected component of an anomaly mask (26-connectivity). ``peak`` is the maximum of the
    map passed as ``values`` to :func:`connected_components` (the RAW score in the pipeline)."""

    label: int
    n_voxels: int
    volume_mm3: float
    centroid_voxel: tuple[float, ...]
    centroid_mm: tuple[float, ...] | None
    peak: float
    peak_voxel: tuple[int, ...]
    peak_mm: tuple[float, ...] | None


@dataclass(frozen=True)
class SubjectSummary:
    """Summary numbers of one anomaly map (see :func:`subject_summary`)."""

    score_max: float
    score_top1pct: float
    top_fraction: float
    brain_voxels: int
    brain_volume_mm3: float
    threshold: float | None
    anomaly_voxels: int
    anomaly_volume_mm3: float
    n_components: int
    components: tuple[Component, ...]


def robust_stats(scores: np.ndarray) -> tuple[float, float]:
    """``(median, 1.4826 * MAD)`` of ``scores`` (in their own dtype), the scale floored at 1e-12."""
    values = np.asarray(scores).ravel()
    if values.size == 0:
        raise ValueError("robust_stats needs at least one score")
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median)) * MAD_TO_SD)
    return median, max(mad, MIN_SCALE)


def probseg_transform(raw: np.ndarray, median: float, scale: float, z_center: float) -> np.ndarray:
    """Monotone map of raw scores to [0, 1]: ``logistic((raw - median) / scale - z_center)``, float32."""
    z = (np.asarray(raw) - median) / scale
    return (1.0 / (1.0 + np.exp(-(z - z_center)))).astype(np.float32)


def average_layers(scores_per_layer: np.ndarray) -> np.ndarray:
    """Mean over layers (axis 0): ``(L, N) -> (N,)`` (also ``(L, B, N) -> (B, N)``), float32."""
    scores = np.asarray(scores_per_layer, dtype=np.float64)
    if scores.ndim < 2 or scores.shape[0] < 1:
        raise ValueError(f"expected scores of shape (L, ...), got {scores.shape}")
    return scores.mean(axis=0).astype(np.float32)


def token_map_to_cube(
    scores: np.ndarray, grid: int, size: int, mask: np.ndarray | None = None
) -> np.ndarray:
    """``(N,)`` token scores (C order over ``(gx, gy, gz)``) -> ``(H, H, H)`` float32 voxel map.

    Trilinear upsampling of the ``(G, G, G)`` grid to ``size``; voxels outside ``mask`` are 0.
    """
    import torch
    import torch.nn.functional as F

    scores = np.asarray(scores, dtype=np.float32)
    grid, size = int(grid), int(size)
    if scores.shape != (grid**3,):
        raise ValueError(f"expected {grid ** 3} token scores for grid {grid}, got shape {scores.shape}")
    coarse = torch.from_numpy(np.ascontiguousarray(scores.reshape(grid, grid, grid)))[None, None]
    cube = F.interpolate(coarse, size=(size, size, size), mode="trilinear", align_corners=False)
    cube = cube[0, 0].numpy()
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != cube.shape:
            raise ValueError(f"mask shape {mask.shape} differs from the cube's {cube.shape}")
        cube[~mask] = 0.0
    return np.ascontiguousarray(cube, dtype=np.float32)


def _world(affine: np.ndarray | None, ijk: Any) -> tuple[float, ...] | None:
    if affine is None:
        return None
    affine = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in affine[:3, :3] @ np.asarray(ijk, dtype=np.float64) + affine[:3, 3])


def connected_components(
    binary: np.ndarray,
    values: np.ndarray,
    voxel_volume_mm3: float,
    affine: np.ndarray | None = None,
    max_components: int | None = MAX_COMPONENTS,
) -> tuple[int, list[Component]]:
    """26-connected components of ``binary``: (count, :class:`Component` records, largest first;
    world mm through ``affine``, None without it)."""
    binary = np.asarray(binary, dtype=bool)
    values = np.asarray(values)
    crop = bounding_box(binary)
    if crop is None:
        return 0, []
    # labelled within the region's bounding box: the same labels (raster order) for less work
    origin = np.array([sl.start for sl in crop])
    binary, values = binary[crop], values[crop]
    labels, count = ndimage.label(binary, structure=np.ones((3,) * binary.ndim, dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    order = np.argsort(-sizes, kind="stable")
    if max_components is not None:
        order = order[:max_components]
    boxes = ndimage.find_objects(labels)
    records = []
    for index in order:  # each component within its bounding box: work ~ its size, not the volume's
        label = int(index) + 1
        box = boxes[index]
        inside = labels[box] == label
        offset = np.array([sl.start for sl in box]) + origin
        points = np.argwhere(inside)
        centroid = tuple(float(v) for v in points.mean(axis=0) + offset)
        local = np.where(inside, values[box], -np.inf)
        peak_local = np.unravel_index(int(np.argmax(local)), local.shape)
        peak_voxel = tuple(int(v) for v in np.asarray(peak_local) + offset)
        n_vox = int(sizes[index])
        records.append(Component(
            label=label, n_voxels=n_vox, volume_mm3=float(n_vox * voxel_volume_mm3),
            centroid_voxel=centroid, centroid_mm=_world(affine, centroid), peak=float(local[peak_local]),
            peak_voxel=peak_voxel, peak_mm=_world(affine, peak_voxel),
        ))
    return int(count), records


def subject_summary(
    native_map: np.ndarray,
    brain_mask: np.ndarray,
    voxel_volume_mm3: float,
    threshold: float | None = None,
    *,
    anomaly_mask: np.ndarray | None = None,
    affine: np.ndarray | None = None,
    top_fraction: float = 0.01,
    max_components: int | None = MAX_COMPONENTS,
) -> SubjectSummary:
    """Summary numbers of one anomaly map.

    Over brain voxels: ``score_max`` (the subject score), ``score_top1pct`` (mean of the top
    ``top_fraction`` of brain voxels, at least one), ``brain_volume_mm3``. The anomalous region is
    ``anomaly_mask`` when given, else ``native_map > threshold`` (no region without either),
    always within the brain: ``anomaly_volume_mm3``, ``n_components`` and ``components``
    (26-connectivity, largest first, at most ``max_components``; see
    :func:`connected_components`; world mm through ``affine``, voxel -> mm).
    """
    values = np.asarray(native_map, dtype=np.float32)
    brain = np.asarray(brain_mask, dtype=bool)
    if brain.shape != values.shape:
        raise ValueError(f"brain mask shape {brain.shape} differs from the map's {values.shape}")
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    inside = values[brain]
    n_brain = int(inside.size)
    if n_brain:
        k = max(1, math.ceil(top_fraction * n_brain))
        top = np.partition(inside, n_brain - k)[n_brain - k:]
        score_max, score_top = float(inside.max()), float(top.astype(np.float64).mean())
    else:
        score_max = score_top = 0.0
    if anomaly_mask is not None:
        region = np.asarray(anomaly_mask, dtype=bool)
        if region.shape != values.shape:
            raise ValueError(f"anomaly mask shape {region.shape} differs from the map's {values.shape}")
        region = region & brain
    elif threshold is not None:
        region = (values > threshold) & brain
    else:
        region = None
    if region is not None:
        n_components, components = connected_components(region, values, voxel_volume_mm3, affine, max_components)
        anomaly_voxels = int(region.sum())
    else:
        n_components, components, anomaly_voxels = 0, [], 0
    return SubjectSummary(
        score_max=score_max, score_top1pct=score_top, top_fraction=float(top_fraction),
        brain_voxels=n_brain, brain_volume_mm3=float(n_brain * voxel_volume_mm3),
        threshold=None if threshold is None else float(threshold), anomaly_voxels=anomaly_voxels,
        anomaly_volume_mm3=float(anomaly_voxels * voxel_volume_mm3), n_components=n_components,
        components=tuple(components),
    )


def scores_to_native(token_scores: np.ndarray, grid: int, cube_mask: np.ndarray, cube_affine: np.ndarray,
                     native_image, brain_native: np.ndarray) -> np.ndarray:
    """Raw token scores ``(N,)`` -> float32 map on the native grid of ``native_image``.

    Trilinear upsampling to the cube (0 outside ``cube_mask``), then trilinear resampling to the
    native grid through ``cube_affine`` (cube voxel -> world mm); 0 outside ``brain_native``.
    """
    from .preprocessing import cube_to_native

    size = int(np.asarray(cube_mask).shape[0])
    cube_map = token_map_to_cube(token_scores, grid, size, cube_mask)
    brain = np.asarray(brain_native, dtype=bool)
    return cube_to_native(cube_map, cube_affine, native_image, brain)  # 0 outside the brain
