"""The isotropic cube the encoder sees, and the way back to the native grid [method.md §1.3, §5].

Geometry: a cube of ``size**3`` voxels with spacing ``fov_mm / size`` (defaults 156 mm / 224 =
0.696 mm, as in the paper), axes aligned with world RAS+ (index ``[x, y, z]`` runs Left->Right,
Posterior->Anterior, Inferior->Superior), centred on the centre of the brain mask's bounding box
in world millimetres. Cube voxel ``i`` is centred at ``origin + spacing * i`` with
``origin = centre - spacing * (size - 1) / 2``; :attr:`Cube.affine` maps cube voxel -> world mm.

Sampling (scipy.ndimage.affine_transform with the voxel-to-voxel affine, so oblique images work
too): image trilinear (``order=1``), mask nearest neighbour, 0 outside the source field of view;
the image is then zeroed outside the cube's mask. Brain voxels that fall outside the cube are
counted (:attr:`Cube.outside_fraction`) and logged as a warning above 1 %.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from ...errors import InputDataError
from ..boxes import bounding_box
from .io import source_name
from .resample import axis_aligned, resample, resample_mask, resample_where, voxel_to_world

LOGGER = logging.getLogger("cg3d")

#: Warn when more than this fraction of the brain falls outside the cube.
OUTSIDE_WARN_FRACTION = 0.01


@dataclass
class Cube:
    """An image resampled into the cube (raw intensities, not yet standardised)."""

    data: np.ndarray            # (H, H, H) float32, 0 outside ``mask``
    mask: np.ndarray            # (H, H, H) bool
    affine: np.ndarray          # (4, 4) cube voxel -> world (RAS mm)
    outside_fraction: float     # fraction of the image's brain voxels outside the cube
    spacing: float = 0.0        # mm, fov_mm / size
    center: np.ndarray | None = None  # world mm of the cube centre (brain bbox centre)


def brain_bbox_center(mask: np.ndarray, affine: np.ndarray, *, ijk: np.ndarray | None = None) -> np.ndarray:
    """Centre (world mm) of the world-axis-aligned bounding box of the mask's voxel centres
    (``ijk``: ``np.argwhere(mask)`` when the caller has it already)."""
    if axis_aligned(affine):  # world x, y, z follow voxel i, j, k: the extremes are the index extremes
        box = bounding_box(mask)
        if box is None:
            raise ValueError("the mask is empty: it has no bounding box")
        ends = np.array([[b.start for b in box], [b.stop - 1 for b in box]], dtype=np.float64)
        world = voxel_to_world(ends, affine)
    else:
        world = voxel_to_world(np.argwhere(mask) if ijk is None else ijk, affine)
    return (world.min(axis=0) + world.max(axis=0)) / 2.0


def cube_affine(center: np.ndarray, size: int, fov_mm: float) -> np.ndarray:
    """Affine (cube voxel -> world) of a RAS-aligned cube of ``size`` voxels centred on ``center``."""
    spacing = fov_mm / size
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = np.asarray(center, dtype=np.float64) - spacing * (size - 1) / 2.0
    return affine


def fraction_outside(mask: np.ndarray, affine: np.ndarray, cube_aff: np.ndarray, size: int, *,
                     ijk: np.ndarray | None = None) -> float:
    """Fraction of the mask's voxel centres that fall outside the cube's extent (``ijk``: as in
    :func:`brain_bbox_center`)."""
    to_cube = np.linalg.inv(cube_aff) @ affine
    if axis_aligned(to_cube):  # the inside test separates by axis: count the mask in the inside box
        inside = []
        for h in range(3):
            c = np.arange(mask.shape[h], dtype=np.float64) * to_cube[h, h] + to_cube[h, 3]
            inside.append((c >= -0.5) & (c <= size - 0.5))
        kept = np.count_nonzero(mask & inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :])
        return float(1.0 - kept / np.count_nonzero(mask))
    ijk = np.argwhere(mask) if ijk is None else ijk
    coords = voxel_to_world(ijk, to_cube)
    inside = np.all((coords >= -0.5) & (coords <= size - 0.5), axis=1)
    return float(1.0 - inside.mean())


def make_cube(image: nib.Nifti1Image, mask: np.ndarray, *, size: int = 224, fov_mm: float = 156.0,
              order: int = 1, warn_outside: bool = True) -> Cube:
    """Resample ``image`` and its brain ``mask`` (bool, image grid) into the cube.

    ``warn_outside``: log a warning when more than 1 % of the brain falls outside the cube
    (the pipeline warns once per image, when it first builds the cube).

    Raises :class:`InputDataError` for an empty mask or one that misses the cube entirely,
    ``ValueError`` for a mask of the wrong shape or a non-positive size/fov.
    """
    if size < 1 or fov_mm <= 0:
        raise ValueError(f"size ({size}) and fov_mm ({fov_mm}) must be positive")
    data = np.asarray(image.dataobj, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != data.shape[:3] or data.ndim != 3:
        raise ValueError(f"mask shape {mask.shape} != image shape {data.shape} (3D expected)")
    if not mask.any():
        raise InputDataError("the brain mask is empty", path=source_name(image),
                             fix="check the brain mask (or use --mask-source nonzero / skullstrip)")
    ijk = None if axis_aligned(image.affine) else np.argwhere(mask)
    center = brain_bbox_center(mask, image.affine, ijk=ijk)
    affine = cube_affine(center, size, fov_mm)
    vox2vox = np.linalg.inv(image.affine) @ affine
    shape = (size, size, size)
    cube_mask = resample_mask(mask, vox2vox, shape)
    if not cube_mask.any():
        raise InputDataError("the brain mask vanishes in the cube (mask much smaller than a cube voxel)",
                             path=source_name(image), fix="check the brain mask and --fov-mm/--cube-size")
    cube_data = resample_where(data, vox2vox, cube_mask, order=order).astype(np.float32, copy=False)
    outside = fraction_outside(mask, image.affine, affine, size, ijk=ijk)
    if warn_outside and outside > OUTSIDE_WARN_FRACTION:
        LOGGER.warning("%.1f %% of the brain of %s falls outside the %g mm cube (increase --fov-mm?)",
                       100 * outside, source_name(image), fov_mm)
    return Cube(data=cube_data, mask=cube_mask, affine=affine, outside_fraction=outside,
                spacing=fov_mm / size, center=center)


def cube_to_native(cube_map: np.ndarray, cube_affine: np.ndarray, native_img: nib.spatialimages.SpatialImage,
                   mask_native: np.ndarray | None = None) -> np.ndarray:
    """A cube-space map on the native (original, non-canonical) grid of ``native_img``.

    Trilinear interpolation, 0 outside the cube; with ``mask_native`` (bool, native grid) also 0
    outside the brain. Returns float32 of shape ``native_img.shape[:3]``.
    """
    cube_map = np.asarray(cube_map, dtype=np.float32)
    if cube_map.ndim != 3:
        raise ValueError(f"cube_map must be 3D, got shape {cube_map.shape}")
    shape = tuple(int(n) for n in native_img.shape[:3])
    vox2vox = np.linalg.inv(np.asarray(cube_affine, dtype=np.float64)) @ native_img.affine
    if mask_native is None:
        return resample(cube_map, vox2vox, shape, order=1).astype(np.float32, copy=False)
    mask_native = np.asarray(mask_native, dtype=bool)
    if mask_native.shape != shape:
        raise ValueError(f"mask_native shape {mask_native.shape} != native shape {shape}")
    return resample_where(cube_map, vox2vox, mask_native, order=1).astype(np.float32, copy=False)
