"""Report figures, drawn from arrays with matplotlib (headless: ``Figure`` objects, no pyplot; no nilearn).

Inputs are file paths, in-memory nibabel images (e.g. ``Nifti1Image(array, affine)``, so a caller
can pass the arrays it already holds) or :class:`Volume` objects; each is read once. The mosaics
sample every layer (image, anomaly map, masks) **once**, with trilinear interpolation, onto the
displayed planes of one display grid: RAS-aligned, isotropic (``step_mm``, 1 mm by default, coarser
when the brain's extent would exceed ``max_side`` samples) and bounded by the brain's world box.
Sampling goes through each image's affine, so oblique, LPS or otherwise stored images give the same
picture as their RAS copy. Orientation is **neurological**: the subject's left is on the left of
coronal and axial slices (labelled L/R), anterior on the right of sagittal slices (labelled P/A),
superior up. Cut coordinates are world (scanner) millimetres.

Figures are SVG (default) or PNG. In an SVG the image layers (anatomy, overlay, contours) are drawn
once with Agg (``FIG_DPI``) and embedded as one 256-colour palette PNG (Pillow) under the vector
layer; text stays text: a mosaic of a 1 mm brain is ~100-150 kB. The grey window is [0, 99.5th
percentile of the image's voxels > 0] for every slice. Files are written atomically; the same inputs
give the same bytes.

- :func:`plot_anomaly_mosaic`: three rows (sagittal ``x``, coronal ``y``, axial ``z``) of slices of
  the input image with the anomaly map (probseg) overlaid (transparent below a floor), the
  anomaly-mask contour and the brain-mask contour, and a colour bar. Each row contains the slice
  through the voxel of peak probseg (ringed) plus evenly spaced slices through the brain.
- :func:`plot_brain_mask`: the brain-mask contour on the image (mask QC).
- :func:`plot_score_distribution`: the group's subject scores as a binned swarm plot with the
  threshold line; returns SVG text for inlining, with a hover title on every point.
"""

from __future__ import annotations

import functools
import io
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import matplotlib
import nibabel as nib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from ..atomic import atomic_path
from ..core.boxes import bounding_box

#: Colours shared with the HTML legend (see the templates' CSS).
OVERLAY_CMAP = "hot"
ANOMALY_CONTOUR = "#00e5ff"   # cyan: binary anomaly mask
BRAIN_CONTOUR = "#7bd67b"     # green: brain mask
PEAK_MARK = "#ff4dff"         # magenta ring around the voxel of peak probseg
FLAGGED_COLOUR = "#d62728"
NORMAL_COLOUR = "#4c72b0"
FIG_DPI = 120                 #: resolution of the rasterised layers inside the SVGs
OVERLAY_ALPHA = 0.65          #: opacity of the anomaly map over the image
#: zlib level of the embedded palette PNGs: measured on a 1 mm mosaic layer (1115 x 453 px), level 3
#: takes 5 ms and 83 kB, level 6 15 ms and 77 kB (+7 % size for a third of the time).
PNG_COMPRESS_LEVEL = 3
#: Display convention: the subject's left is on the left of coronal and axial slices.
CONVENTION = "neurological"

#: (display mode, row name, cut axis, horizontal world axis, vertical world axis, (left, right) labels)
_ROWS = (
    ("x", "sagittal", 0, 1, 2, ("P", "A")),
    ("y", "coronal", 1, 0, 2, ("L", "R")),
    ("z", "axial", 2, 0, 1, ("L", "R")),
)
_MODES = tuple((mode, name) for mode, name, *_ in _ROWS)
#: Voxel coordinates are rounded to this many decimals before interpolation, so that the same
#: image stored in another orientation samples exactly the same values (no 1e-13 noise).
_COORD_DECIMALS = 6

ImageInput = Union[str, os.PathLike, nib.spatialimages.SpatialImage, "Volume"]


# --------------------------------------------------------------------------------------------------
# inputs
@dataclass(eq=False)
class Volume:
    """A 3D array and its voxel-to-world (mm) affine; figure inputs are converted to this once.

    :func:`load_volume` stores the array in the closest RAS order (flipped/transposed views, no
    copy), so the same image stored LPS, RAS or PIR gives the same array and affine, and hence the
    same figure bytes. Derived quantities (masks, grey window) are cached, so passing the same
    :class:`Volume` to several figure functions computes them once.
    """

    data: np.ndarray
    affine: np.ndarray

    @functools.cached_property
    def inverse(self) -> np.ndarray:
        return np.linalg.inv(self.affine)

    @functools.cached_property
    def nonzero(self) -> np.ndarray:
        """Boolean array of the voxels > 0."""
        return self.data > 0

    @functools.cached_property
    def mask_u8(self) -> np.ndarray:
        """The voxels > 0 as 0/1 ``uint8`` (what an oblique mask layer samples)."""
        return self.nonzero.view(np.uint8)

    @functools.cached_property
    def bbox(self) -> tuple[slice, slice, slice] | None:
        """Voxel box of the voxels > 0 (None when there are none)."""
        return bounding_box(self.nonzero)  # type: ignore[return-value]

    @functools.cached_property
    def any(self) -> bool:
        """Some voxel is > 0 (one cheap pass; no mask array)."""
        if "bbox" in self.__dict__:
            return self.bbox is not None
        return bool(self.data.max() > 0) if self.data.size else False

    @functools.cached_property
    def grey_max(self) -> float:
        """Upper end of the grey window: the 99.5th percentile of the voxels > 0 (1 when none),
        estimated on every second voxel along each axis for volumes over 4 M voxels (the RAS
        order makes the subsample independent of the storage order)."""
        if self.bbox is None:
            return 1.0
        stride = 2 if self.data.size > 4_000_000 else 1
        box = tuple(slice(b.start, b.stop, stride) for b in self.bbox)
        values = self.data[box]
        values = values[values > 0]
        top = float(np.percentile(values, 99.5)) if values.size else 0.0
        return top if top > 0 else 1.0

    @functools.cached_property
    def aligned(self) -> bool:
        """The affine is diagonal with positive zooms (voxel axis ``a`` runs along world axis ``a``,
        increasing): true for any axis-aligned image once in RAS order (not for oblique ones)."""
        rot = self.affine[:3, :3]
        off = rot - np.diag(np.diag(rot))
        return bool((np.diag(rot) > 0).all() and np.abs(off).max() <= 1e-6 * np.abs(rot).max())


def load_volume(img: ImageInput) -> Volume:
    """A :class:`Volume` in RAS voxel order from a path, a nibabel image or a Volume (returned as is).

    The array keeps its stored type (scaled images become float); NaN/Inf become 0; a trailing
    4th dimension of length 1 is dropped; anything else that is not 3D is a ``ValueError``.
    """
    if isinstance(img, Volume):
        return img
    if isinstance(img, (str, os.PathLike)):
        img = nib.load(os.fspath(img))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3D image, got shape {data.shape}")
    if data.dtype == bool:
        data = data.view(np.uint8)
    elif data.dtype.kind == "f" and not np.isfinite(data).all():
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    return _closest_ras(np.asarray(data), np.asarray(img.affine, dtype=np.float64))


def _closest_ras(data: np.ndarray, affine: np.ndarray) -> Volume:
    """The same image with its voxel axes flipped/permuted to the closest RAS order (array views)."""
    ornt = nib.orientations.io_orientation(affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return Volume(data, affine)
    ras = nib.orientations.apply_orientation(data, ornt)
    return Volume(ras, affine @ nib.orientations.inv_ornt_aff(ornt, data.shape))


def same_grid(a: Volume, b: Volume) -> bool:
    return a.data.shape == b.data.shape and np.allclose(a.affine, b.affine, atol=1e-4)


def _world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return nib.affines.apply_affine(affine, ijk)


def peak_coordinates(prob_img: ImageInput, mask_img: ImageInput | None = None
                     ) -> tuple[tuple[float, float, float] | None, float | None]:
    """World coordinates (mm) and value of the anomaly map's maximum (inside the mask if given and on
    the same grid). Ties go to the smallest (x, y, z) world position, whatever the storage order."""
    prob = load_volume(prob_img)
    mask = load_volume(mask_img) if mask_img is not None else None
    box: tuple[slice, ...] = (slice(None),) * 3
    inside = None
    if mask is not None and same_grid(prob, mask):
        if mask.bbox is None:
            return None, None
        box, inside = mask.bbox, mask.nonzero[mask.bbox]
    values = prob.data[box]
    top = values.max(where=inside, initial=-np.inf) if inside is not None else values.max(initial=-np.inf)
    if not np.isfinite(top) or top <= 0:
        return None, None
    hits = values == top
    ijk = np.argwhere(hits & inside if inside is not None else hits) + [b.start or 0 for b in box]
    xyz = np.round(_world(prob.affine, ijk.astype(float)), 4)
    best = xyz[np.lexsort(xyz.T[::-1])[0]]
    return (float(best[0]), float(best[1]), float(best[2])), float(top)


def world_bounds(extent: ImageInput) -> tuple[np.ndarray, np.ndarray]:
    """World box (mm; min and max corners) of the voxel centres > 0 (all voxels when none)."""
    vol = load_volume(extent)
    if vol.bbox is not None:
        lo = np.array([b.start for b in vol.bbox])
        hi = np.array([b.stop - 1 for b in vol.bbox])
    else:
        lo, hi = np.zeros(3, int), np.array(vol.data.shape) - 1
    # world box of the corners of the voxel box (exact for axis-aligned affines, a superset if oblique)
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])],
                       dtype=float)
    world = _world(vol.affine, corners)
    return world.min(axis=0), world.max(axis=0)


def cut_coordinates(extent_img: ImageInput, n_cuts: int, peak_mm: Sequence[float] | None
                    ) -> dict[str, list[float]]:
    """Per display mode: ``n_cuts - 1`` evenly spaced cuts through the (mask) extent plus the peak
    (``n_cuts`` evenly spaced ones without a peak).

    ``extent_img`` is a mask (non-zero voxels) whose world bounding box bounds the cuts; evenly
    spaced cuts too close to the peak (under half a spacing) are dropped. World mm, rounded to 0.01.
    """
    lo, hi = world_bounds(extent_img)
    cuts: dict[str, list[float]] = {}
    n_even = max(n_cuts - (1 if peak_mm is not None else 0), 1)
    for axis, (mode, _) in enumerate(_MODES):
        a, b = float(lo[axis]), float(hi[axis])
        # evenly spaced inside the extent, leaving a margin of half a step at both ends
        step = (b - a) / n_even
        even = [a + step * (k + 0.5) for k in range(n_even)]
        if peak_mm is not None:
            p = float(peak_mm[axis])
            even = [c for c in even if abs(c - p) >= step / 2] + [p]
        cuts[mode] = sorted(round(c, 2) for c in even)
    return cuts


# --------------------------------------------------------------------------------------------------
# display grid and sampling
@dataclass(frozen=True)
class DisplayGrid:
    """RAS-aligned isotropic grid: sample ``i`` along world axis ``a`` is at ``start[a] + i * step``."""

    start: tuple[float, float, float]
    step: float
    shape: tuple[int, int, int]

    def coords(self, axis: int) -> np.ndarray:
        return self.start[axis] + self.step * np.arange(self.shape[axis])


def display_grid(extent: ImageInput, *, step_mm: float = 1.0, max_side: int = 256,
                 margin_mm: float = 4.0) -> DisplayGrid:
    """The display grid around the world box of ``extent``'s non-zero voxels plus ``margin_mm``.

    The step is ``step_mm`` or coarser, so that no side exceeds ``max_side`` samples (pixel budget).
    The grid is centred on the box, so it depends only on world geometry, not on storage order.
    """
    lo, hi = world_bounds(extent)
    size = hi - lo + 2 * margin_mm
    step = max(float(step_mm), float(size.max()) / max(int(max_side) - 1, 1))
    shape = tuple(int(n) for n in np.floor(size / step + 1e-9).astype(int) + 1)
    centre = (lo + hi) / 2
    start = tuple(round(float(c - (n - 1) * step / 2), 6) for c, n in zip(centre, shape))
    return DisplayGrid(start=start, step=round(step, 6), shape=shape)  # type: ignore[arg-type]


def _plane_points(grid: DisplayGrid, axis: int, u_axis: int, v_axis: int, coord: float) -> np.ndarray:
    """World points (3, nv * nu) of one plane of the grid; rows go up along ``v``, columns along ``u``."""
    u, v = grid.coords(u_axis), grid.coords(v_axis)
    points = np.empty((3, v.size, u.size))
    points[axis] = coord
    points[u_axis] = u[None, :]
    points[v_axis] = v[:, None]
    return points.reshape(3, -1)


def _voxel_index(volume: Volume, axis: int, coords: np.ndarray) -> np.ndarray:
    """Fractional voxel index along ``axis`` of world ``coords`` (aligned volumes only)."""
    index = (np.asarray(coords, float) - volume.affine[axis, 3]) / volume.affine[axis, axis]
    return np.round(index, _COORD_DECIMALS)


def _lerp_axis(values: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of ``values`` at fractional ``index`` along ``axis``; 0 outside [0, n - 1]."""
    n = values.shape[axis]
    inside = (index >= 0) & (index <= n - 1)
    i0 = np.clip(np.floor(index).astype(int), 0, n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    w = np.where(inside, index - i0, 0.0).astype(np.float32)
    shape = [1] * values.ndim
    shape[axis] = -1
    w = w.reshape(shape)
    out = np.take(values, i0, axis=axis) * (1 - w) + np.take(values, i1, axis=axis) * w
    return out * inside.reshape(shape)


def _slab(data: np.ndarray, axis: int, index: float, mask: bool = False) -> np.ndarray:
    """The 2D slice of ``data`` at fractional ``index`` along ``axis`` (linear; 0 outside);
    ``mask``: of ``data > 0`` (0/1) instead of the values."""
    n = data.shape[axis]
    if not 0 <= index <= n - 1:
        shape = list(data.shape)
        del shape[axis]
        return np.zeros(shape, np.float32)

    def plane(i: int) -> np.ndarray:
        take = [slice(None)] * 3
        take[axis] = i
        values = data[tuple(take)]
        return (values > 0 if mask else values).astype(np.float32)

    i0 = int(np.floor(index))
    w = index - i0
    out = plane(i0)
    if w > 0:
        out = out * np.float32(1 - w) + plane(i0 + 1) * np.float32(w)
    return out


def _sample_plane_aligned(volume: Volume, grid: DisplayGrid, axis: int, u_axis: int, v_axis: int,
                          coords: Sequence[float], mask: bool) -> np.ndarray:
    """Planes (n, nv, nu) of an aligned volume at world ``coords`` along ``axis``: trilinear
    interpolation done axis by axis (the cut axis per plane, then both in-plane axes at once)."""
    index = _voxel_index(volume, axis, np.asarray(coords, float))
    slabs = np.stack([_slab(volume.data, axis, float(i), mask) for i in index])
    # each slab's axes are the two remaining world axes in increasing order; put v first
    planes = slabs if v_axis < u_axis else slabs.transpose(0, 2, 1)
    planes = _lerp_axis(planes, _voxel_index(volume, u_axis, grid.coords(u_axis)), 2)
    return _lerp_axis(planes, _voxel_index(volume, v_axis, grid.coords(v_axis)), 1).astype(np.float32)


def sample_planes(volume: Volume, points: np.ndarray, *, mask: bool = False) -> np.ndarray:
    """Trilinear interpolation of ``volume`` at world ``points`` (3, N); 0 outside the image.

    ``mask``: sample the voxels > 0 as 0/1 (contours are then drawn at 0.5).
    """
    from scipy import ndimage

    data = volume.mask_u8 if mask else volume.data
    voxels = volume.inverse[:3, :3] @ points + volume.inverse[:3, 3:]
    voxels = np.round(voxels, _COORD_DECIMALS)
    return ndimage.map_coordinates(data, voxels, order=1, mode="constant", cval=0.0, prefilter=False,
                                   output=np.float32)


@dataclass
class MosaicData:
    """What a mosaic shows, sampled on the display grid (input of :func:`draw_mosaic`)."""

    grid: DisplayGrid
    cuts: dict[str, list[float]]                     #: display mode -> cut coordinates (world mm)
    peak_mm: tuple[float, float, float] | None       #: voxel of peak probseg; None below the floor
    peak_value: float | None                         #: peak probseg inside the brain
    grey_max: float                                  #: upper end of the grey window
    #: display mode -> layer (``image``, ``probseg``, ``anomaly_mask``, ``brain_mask``) -> planes
    #: ``(n_cuts, nv, nu)``; ``[k, j, i]`` is at horizontal world coordinate ``grid.coords(u)[i]``
    #: and vertical ``grid.coords(v)[j]`` of the row's in-plane axes (see ``_ROWS``)
    planes: dict[str, dict[str, np.ndarray]] = field(repr=False, default_factory=dict)


def prepare_mosaic(
    image: ImageInput,
    probseg: ImageInput | None = None,
    *,
    anomaly_mask: ImageInput | None = None,
    brain_mask: ImageInput | None = None,
    floor: float = 0.2,
    n_cuts: int = 7,
    step_mm: float = 1.0,
    max_side: int = 256,
) -> MosaicData:
    """Read the inputs once, choose the cuts and sample every layer on the display grid's planes."""
    img = load_volume(image)
    prob = load_volume(probseg) if probseg is not None else None
    brain = load_volume(brain_mask) if brain_mask is not None else None
    amask = load_volume(anomaly_mask) if anomaly_mask is not None else None
    peak, peak_value = (None, None)
    if prob is not None:
        peak, peak_value = peak_coordinates(prob, brain)
        if peak_value is not None and peak_value < floor:
            peak = None          # nothing is shown: evenly spaced slices, no peak mark
    extent = brain if brain is not None and brain.any else img
    cuts = cut_coordinates(extent, n_cuts, peak)
    grid = display_grid(extent, step_mm=step_mm, max_side=max_side)
    layers: dict[str, tuple[Volume, bool]] = {"image": (img, False)}
    if prob is not None:
        layers["probseg"] = (prob, False)
    if amask is not None and amask.any:
        layers["anomaly_mask"] = (amask, True)
    if brain is not None and brain.any:
        layers["brain_mask"] = (brain, True)
    planes = _sample_rows(layers, grid, cuts)
    return MosaicData(grid=grid, cuts=cuts, peak_mm=peak, peak_value=peak_value,
                      grey_max=img.grey_max, planes=planes)


def _sample_rows(layers: Mapping[str, tuple[Volume, bool]], grid: DisplayGrid,
                 cuts: Mapping[str, list[float]]) -> dict[str, dict[str, np.ndarray]]:
    """Each layer interpolated once at the grid points of all displayed planes, split into rows.

    Axis-aligned volumes are interpolated axis by axis (the same trilinear values, much faster);
    oblique ones in one ``scipy.ndimage.map_coordinates`` call over all planes.
    """
    out: dict[str, dict[str, np.ndarray]] = {mode: {} for mode, *_ in _ROWS}
    for name, (volume, is_mask) in layers.items():
        sampled = (_sample_aligned if volume.aligned else _sample_oblique)(volume, grid, cuts, is_mask)
        for mode, planes in sampled.items():
            out[mode][name] = planes
    return out


def _sample_aligned(volume: Volume, grid: DisplayGrid, cuts: Mapping[str, list[float]], mask: bool
                    ) -> dict[str, np.ndarray]:
    return {mode: _sample_plane_aligned(volume, grid, axis, u_axis, v_axis, cuts[mode], mask)
            for mode, _, axis, u_axis, v_axis, _ in _ROWS}


def _sample_oblique(volume: Volume, grid: DisplayGrid, cuts: Mapping[str, list[float]], mask: bool
                    ) -> dict[str, np.ndarray]:
    points = np.concatenate([_plane_points(grid, axis, u_axis, v_axis, coord)
                             for mode, _, axis, u_axis, v_axis, _ in _ROWS for coord in cuts[mode]], axis=1)
    values = sample_planes(volume, points, mask=mask)
    out, offset = {}, 0
    for mode, _, _, u_axis, v_axis, _ in _ROWS:
        shape = (len(cuts[mode]), grid.shape[v_axis], grid.shape[u_axis])
        size = int(np.prod(shape))
        out[mode] = values[offset:offset + size].reshape(shape)
        offset += size
    return out


# --------------------------------------------------------------------------------------------------
# drawing
@dataclass
class MosaicInfo:
    """What a mosaic shows (for the caption)."""

    peak_mm: tuple[float, float, float] | None   #: world mm of the voxel of peak probseg; None below the floor
    peak_value: float | None                      #: peak probseg (maximum of the map inside the brain)
    cuts: dict[str, list[float]]                  #: display mode -> cut coordinates (world mm)
    convention: str = CONVENTION                  #: left-right display convention


def _strip(planes: np.ndarray, gap: int, fill: float) -> np.ndarray:
    """Slices ``(n, nv, nu)`` side by side, ``gap`` columns of ``fill`` between them: ``(nv, width)``."""
    n, nv, nu = planes.shape
    out = np.full((nv, n * nu + (n - 1) * gap), fill, dtype=np.float32)
    for k in range(n):
        out[:, k * (nu + gap): k * (nu + gap) + nu] = planes[k]
    return out


@dataclass(frozen=True)
class _Row:
    """Where one row goes: figure inches of its slice strip and the mm -> inch mapping."""

    mode: str
    name: str
    axis: int                   #: world axis of the cuts
    u_axis: int                 #: world axis that runs left -> right
    v_axis: int                 #: world axis that runs bottom -> top
    labels: tuple[str, str]     #: orientation letters at the left and right of a slice
    left: float                 #: inches
    bottom: float
    width: float
    height: float
    scale: float                #: inches per mm
    u0: float                   #: world mm of the first column of every slice
    v0: float                   #: world mm of the bottom row
    pitch: float                #: mm from one slice's first column to the next one's
    step: float                 #: mm per grid sample

    def x(self, k: int, u: float | np.ndarray) -> float | np.ndarray:
        """Figure inches of world coordinate ``u`` in slice ``k`` (sample centres)."""
        return self.left + (k * self.pitch + (u - self.u0) + self.step / 2) * self.scale

    def y(self, v: float | np.ndarray) -> float | np.ndarray:
        """Figure inches of world coordinate ``v`` (sample centres)."""
        return self.bottom + (v - self.v0 + self.step / 2) * self.scale


@dataclass(frozen=True)
class _Layout:
    """Figure geometry in inches: rows top to bottom, one mm scale for all of them."""

    width: float
    height: float
    gap: int                     #: grid samples between slices
    rows: tuple[_Row, ...]


def _layout(data: MosaicData, *, row_height: float, colorbar: bool, width: float = 10.5) -> _Layout:
    grid = data.grid
    gap = max(2, int(round(0.04 * max(grid.shape))))
    gutter, right = 0.26, (0.95 if colorbar else 0.06)
    label_h, legend_h, top = 0.2, 0.3, 0.06
    available = width - gutter - right
    sizes = []
    for mode, _, _, u_axis, v_axis, _ in _ROWS:
        n = len(data.cuts[mode])
        sizes.append(((n * grid.shape[u_axis] + (n - 1) * gap) * grid.step, grid.shape[v_axis] * grid.step))
    scale = min(min(available / w for w, _ in sizes), row_height / max(h for _, h in sizes))
    height = top + sum(h * scale + label_h for _, h in sizes) + legend_h
    rows, y = [], height - top
    for (w, h), (mode, name, axis, u_axis, v_axis, labels) in zip(sizes, _ROWS):
        y -= h * scale
        rows.append(_Row(mode=mode, name=name, axis=axis, u_axis=u_axis, v_axis=v_axis, labels=labels,
                         left=gutter + (available - w * scale) / 2, bottom=y, width=w * scale,
                         height=h * scale, scale=scale, u0=float(grid.coords(u_axis)[0]),
                         v0=float(grid.coords(v_axis)[0]), pitch=(grid.shape[u_axis] + gap) * grid.step,
                         step=grid.step))
        y -= label_h
    return _Layout(width, height, gap, tuple(rows))


def _row_rgb(planes: Mapping[str, np.ndarray], grey_max: float, floor: float, gap: int) -> np.ndarray:
    """The row's pixels (nv, width, 3) uint8: grey image, anomaly map blended above ``floor``."""
    grey = np.clip(_strip(planes["image"], gap, 0.0) / grey_max, 0.0, 1.0)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if "probseg" in planes:
        prob = _strip(planes["probseg"], gap, 0.0)
        shown = prob >= floor
        colours = matplotlib.colormaps[OVERLAY_CMAP](np.clip(prob[shown], 0.0, 1.0))[:, :3]
        rgb[shown] = (1 - OVERLAY_ALPHA) * rgb[shown] + OVERLAY_ALPHA * colours
    return np.round(rgb * 255).astype(np.uint8)


def _contour_lines(row: _Row, strip: np.ndarray, level: float = 0.5) -> list[np.ndarray]:
    """Contour lines (figure inches) of a strip of mask planes at ``level`` (contourpy)."""
    import contourpy

    nv, ncol = strip.shape
    x = row.x(0, row.u0 + np.arange(ncol) * row.step)
    y = row.y(row.v0 + np.arange(nv) * row.step)
    gen = contourpy.contour_generator(x, y, strip, line_type=contourpy.LineType.Separate)
    return [line for line in gen.lines(level) if len(line) > 1]


def _draw_row(ax: Axes, data: MosaicData, row: _Row, gap: int, floor: float) -> None:
    """One row in the figure-inch axes: the slices as one image, mask contours, peak ring, labels."""
    planes, nu = data.planes[row.mode], data.grid.shape[row.u_axis]
    rgb = _row_rgb(planes, data.grey_max, floor, gap)
    ax.imshow(rgb, origin="lower", extent=(row.left, row.left + row.width, row.bottom, row.bottom + row.height),
              aspect="auto", interpolation="nearest")
    for layer, colour, lw in (("brain_mask", BRAIN_CONTOUR, 0.7), ("anomaly_mask", ANOMALY_CONTOUR, 0.9)):
        if layer in planes:
            lines = _contour_lines(row, _strip(planes[layer], gap, 0.0))
            ax.add_collection(LineCollection(lines, colors=colour, linewidths=lw), autolim=False)
    text = dict(fontsize=7, color="white")
    slice_w = nu * row.step * row.scale
    for k, coord in enumerate(data.cuts[row.mode]):
        left = row.x(k, row.u0) - row.step * row.scale / 2
        ax.text(left + slice_w / 2, row.bottom - 0.04, f"{row.mode}={coord:.0f}", ha="center", va="top", **text)
        if data.peak_mm is not None and coord == round(data.peak_mm[row.axis], 2):
            ax.plot(row.x(k, data.peak_mm[row.u_axis]), row.y(data.peak_mm[row.v_axis]), marker="o", ms=11,
                    mfc="none", mec=PEAK_MARK, mew=1.2, ls="none")
    top = row.bottom + row.height
    for xpos, label, ha in ((row.left + 0.02, row.labels[0], "left"),
                            (row.left + slice_w - 0.02, row.labels[1], "right")):
        ax.text(xpos, top - 0.02, label, ha=ha, va="top", **dict(text, color="#dddddd"))
    ax.text(0.13, row.bottom + row.height / 2, row.name, color="#dddddd", fontsize=8, rotation=90,
            ha="center", va="center")


def draw_mosaic(data: MosaicData, out_path: str | Path, *, floor: float = 0.2, threshold: float | None = 0.5,
                row_height: float = 1.55, dpi: int = FIG_DPI) -> Path:
    """Draw a prepared mosaic (three rows, legend, colour bar when there is a map) and save it.

    One axes covers the figure with data coordinates in inches, so every row, contour and label is
    placed by the same mm -> inch mapping (:class:`_Row`).
    """
    has_map = "probseg" in data.planes["x"]
    lay = _layout(data, row_height=row_height, colorbar=has_map)
    fig = Figure(figsize=(lay.width, lay.height), facecolor="black")
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    for row in lay.rows:
        _draw_row(ax, data, row, lay.gap, floor)
    ax.set_xlim(0, lay.width)
    ax.set_ylim(0, lay.height)
    handles = []
    if "brain_mask" in data.planes["x"]:
        handles.append(Line2D([], [], color=BRAIN_CONTOUR, lw=1.2, label="brain mask"))
    if "anomaly_mask" in data.planes["x"]:
        handles.append(Line2D([], [], color=ANOMALY_CONTOUR, lw=1.2, label="anomaly mask"))
    if data.peak_mm is not None:
        p = data.peak_mm
        handles.append(Line2D([], [], ls="none", marker="o", ms=7, mfc="none", mec=PEAK_MARK,
                              label=f"peak probseg {data.peak_value:.2f} at ({p[0]:.0f}, {p[1]:.0f}, {p[2]:.0f}) mm"))
    _legend(fig, handles, 0.0)
    ax.text(lay.width - 0.08, 0.1, f"{CONVENTION} view: subject's left on the left", color="#aaaaaa",
            fontsize=6.5, ha="right", va="bottom")
    if has_map:
        bottom = lay.rows[-1].bottom
        top = lay.rows[0].bottom + lay.rows[0].height
        _overlay_colorbar(ax, (lay.width - 0.72, bottom, 0.14, top - bottom), floor, threshold)
    return _save(fig, Path(out_path), dpi)


def _raster_artists(fig: Figure) -> list[matplotlib.artist.Artist]:
    """The image-like layers (images, contours) of the figure, in drawing order; the colour bar's
    gradient (``gid`` ``cg3d-colorbar``) is left to the SVG backend."""
    layers = [a for ax in fig.axes for a in (*ax.images, *ax.collections)
              if a.get_visible() and a.get_gid() != "cg3d-colorbar"]
    return sorted(layers, key=lambda a: a.get_zorder())


def _save(fig: Figure, out_path: Path, dpi: int = FIG_DPI) -> Path:
    """Save atomically: SVG via :func:`_svg_bytes`, PNG as a 256-colour palette PNG."""
    out_path = Path(out_path)
    fmt = out_path.suffix.lstrip(".").lower() or "svg"
    if fmt == "svg":
        data = _svg_bytes(fig, dpi)
    else:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=dpi, facecolor=fig.get_facecolor())
        data = shrink_png(buf.getvalue()) if fmt == "png" else buf.getvalue()
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(data)
    return out_path


def _svg_bytes(fig: Figure, dpi: int) -> bytes:
    """SVG with one raster layer: the image-like artists are drawn once with Agg at ``dpi`` and
    embedded as a single palette PNG under the vector layer (text, lines, patches) that the SVG
    backend writes. Same bytes for the same figure (no date, fixed hash salt). The figure is
    consumed: its raster artists are removed."""
    artists = _raster_artists(fig)
    layer = _raster_layer(fig, artists, dpi)
    for artist in artists:
        artist.remove()     # (hidden images would still be composited by matplotlib)
    fig.patch.set_gid("cg3d-background")
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "cg3d"}):
        # text as <text> (not glyph paths) and no date: smaller, reproducible SVGs
        fig.savefig(buf, format="svg", dpi=dpi, facecolor=fig.get_facecolor(), metadata={"Date": None})
    svg = buf.getvalue()
    if layer is not None:
        svg = _insert_after_background(svg, layer)
    return svg.encode("utf-8")


def _raster_layer(fig: Figure, artists: list[matplotlib.artist.Artist], dpi: int) -> str | None:
    """``<image>`` element of ``artists`` drawn with Agg (transparent elsewhere, cropped), or None."""
    import base64

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not artists:
        return None
    fig.set_dpi(dpi)
    renderer = FigureCanvasAgg(fig).get_renderer()
    renderer.clear()
    for artist in artists:
        artist.draw(renderer)
    rgba = np.asarray(renderer.buffer_rgba())
    rows, cols = np.flatnonzero(rgba[..., 3].any(axis=1)), np.flatnonzero(rgba[..., 3].any(axis=0))
    if rows.size == 0:
        return None
    crop = rgba[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    png = base64.b64encode(_palette_png(crop)).decode("ascii")
    pt = 72.0 / dpi
    return (f'<image x="{cols[0] * pt:.3f}" y="{rows[0] * pt:.3f}" width="{crop.shape[1] * pt:.3f}" '
            f'height="{crop.shape[0] * pt:.3f}" preserveAspectRatio="none" '
            f'xlink:href="data:image/png;base64,{png}"/>')


def _insert_after_background(svg: str, element: str) -> str:
    """Insert ``element`` right after the figure background (the group ``cg3d-background``)."""
    start = svg.find('<g id="cg3d-background">')
    end = svg.find("</g>", start) if start >= 0 else -1
    if end < 0:
        raise RuntimeError("figure background not found in the SVG")
    end += len("</g>")
    return svg[:end] + "\n  " + element + svg[end:]


def _palette_png(rgba: np.ndarray, colours: int = 256) -> bytes:
    """PNG of an RGBA array with an adaptive palette of ``colours`` (Pillow, fast octree, no dither)."""
    from PIL import Image

    opaque = bool((rgba[..., 3] == 255).all())
    img = Image.fromarray(np.ascontiguousarray(rgba[..., :3] if opaque else rgba), mode="RGB" if opaque else "RGBA")
    quant = img.quantize(colors=colours, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    out = io.BytesIO()
    quant.save(out, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return out.getvalue()


def shrink_png(png: bytes, colours: int = 256) -> bytes:
    """Re-encode a PNG with an adaptive palette of ``colours`` (Pillow); keep it if not smaller.

    Greyscale anatomy plus a colour-mapped overlay survives 256 colours with little visible loss
    and the file shrinks 3-5x, which keeps reports with many images well under 5 MB.
    """
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(png))
        img.load()
        small = _palette_png(np.asarray(img.convert("RGBA")), colours)
    except Exception:  # never lose a figure over an optimisation
        return png
    return small if len(small) < len(png) else png


def _overlay_colorbar(ax: Axes, box: tuple[float, float, float, float], floor: float,
                      threshold: float | None) -> None:
    """The probseg colour bar in the figure-inch axes ``ax``: ``box`` = (left, bottom, width, height).

    The gradient is a 256 x 1 image kept out of the mosaic's raster layer (``gid`` ``cg3d-colorbar``),
    so the SVG embeds it unresampled and its colours are not quantised with the slices'.
    """
    left, bottom, width, height = box

    def y(value: float) -> float:
        return bottom + value * height

    ax.imshow(np.linspace(0.0, 1.0, 256)[:, None], cmap=OVERLAY_CMAP, vmin=0.0, vmax=1.0, origin="lower",
              extent=(left, left + width, bottom, bottom + height), aspect="auto", interpolation="none",
              gid="cg3d-colorbar")
    ax.add_patch(Rectangle((left, bottom), width, y(floor) - bottom, color="#222222", zorder=3))
    ax.add_patch(Rectangle((left, bottom), width, height, fill=False, ec="white", lw=0.5, zorder=4))
    ax.text(left + width / 2, y(floor / 2), "clear", color="#bbbbbb", fontsize=6, ha="center", va="center",
            rotation=90, zorder=4)
    ticks = sorted({0.0, round(floor, 3), 1.0} | ({round(threshold, 3)} if threshold is not None else set()))
    for tick in ticks:
        ax.plot([left + width, left + width + 0.03], [y(tick)] * 2, color="white", lw=0.6)
        ax.text(left + width + 0.06, y(tick), f"{tick:g}", color="white", fontsize=7, ha="left", va="center")
    if threshold is not None:
        ax.plot([left, left + width], [y(threshold)] * 2, color=ANOMALY_CONTOUR, lw=1.2, zorder=5)
    ax.text(left + width + 0.38, bottom + height / 2, "anomaly map (probseg)", color="white", fontsize=7,
            rotation=90, ha="center", va="center")


def _legend(fig: Figure, handles: list[Line2D], y: float) -> None:
    leg = fig.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.005, y), ncol=len(handles),
                     frameon=False, fontsize=7, handlelength=1.6, columnspacing=1.2)
    for text in leg.get_texts():
        text.set_color("white")


def plot_anomaly_mosaic(
    image: ImageInput,
    probseg: ImageInput | None,
    out_path: str | Path,
    *,
    anomaly_mask: ImageInput | None = None,
    brain_mask: ImageInput | None = None,
    floor: float = 0.2,
    threshold: float | None = 0.5,
    n_cuts: int = 7,
    row_height: float = 1.55,
    dpi: int = FIG_DPI,
    step_mm: float = 1.0,
    max_side: int = 256,
) -> MosaicInfo:
    """Three-row mosaic (sagittal, coronal, axial) of ``image`` with the anomaly map overlaid.

    Inputs are paths, nibabel images or :class:`Volume` objects, on any grids. Values of
    ``probseg`` below ``floor`` are transparent; the anomaly-mask contour is cyan, the brain-mask
    contour green; the slice through the voxel of peak probseg is in every row, ringed in magenta.
    ``row_height`` bounds the tallest row (inches); ``step_mm``/``max_side`` set the display grid.
    With ``probseg=None`` only the image and the contours are drawn (used by :func:`plot_brain_mask`).
    """
    data = prepare_mosaic(image, probseg, anomaly_mask=anomaly_mask, brain_mask=brain_mask, floor=floor,
                          n_cuts=n_cuts, step_mm=step_mm, max_side=max_side)
    draw_mosaic(data, out_path, floor=floor, threshold=threshold, row_height=row_height, dpi=dpi)
    return MosaicInfo(peak_mm=data.peak_mm, peak_value=data.peak_value, cuts=data.cuts)


def plot_brain_mask(image: ImageInput, brain_mask: ImageInput, out_path: str | Path, *, n_cuts: int = 6,
                    dpi: int = FIG_DPI, step_mm: float = 1.0, max_side: int = 256) -> MosaicInfo:
    """Brain-mask QC figure: the mask contour on the image in three orientations (evenly spaced)."""
    return plot_anomaly_mosaic(image, None, out_path, brain_mask=brain_mask, n_cuts=n_cuts, threshold=None,
                               row_height=1.45, dpi=dpi, step_mm=step_mm, max_side=max_side)


# --------------------------------------------------------------------------------------------------
def swarm_offsets(values: Sequence[float], bin_width: float, step: float = 1.0) -> np.ndarray:
    """Vertical offsets of a binned swarm: points in the same bin stack 0, +1, -1, +2 … (x ``step``)."""
    values = np.asarray(values, dtype=float)
    offsets = np.zeros(len(values))
    if len(values) == 0 or bin_width <= 0:
        return offsets
    bins = np.floor((values - values.min()) / bin_width).astype(int)
    for b in np.unique(bins):
        idx = np.flatnonzero(bins == b)
        idx = idx[np.argsort(values[idx], kind="stable")]
        for k, i in enumerate(idx):
            offsets[i] = ((k + 1) // 2) * (1 if k % 2 else -1) * step
    return offsets


def _x_range(scores: np.ndarray, threshold: float | None) -> tuple[float, float]:
    """Axis range covering the scores and the threshold, padded by 5 %."""
    values = list(scores) + ([threshold] if threshold is not None else [])
    if not values:
        return -0.05, 1.05
    lo, hi = float(min(values)), float(max(values))
    span = hi - lo or max(abs(hi), 1.0) * 0.2
    return lo - 0.05 * span, hi + 0.05 * span


def plot_score_distribution(
    names: Sequence[str],
    scores: Sequence[float],
    flagged: Sequence[bool],
    *,
    threshold: float | None,
    xlabel: str = "subject score (peak raw score)",
    out_path: str | Path | None = None,
    threshold_label: str | None = None,
) -> str:
    """Binned swarm plot of the subject scores with the threshold line; returns the SVG text.

    ``threshold`` must be in the units of ``scores`` (None: no line). ``threshold_label`` is the
    line's label (default ``threshold <value>``). Flagged images are red, the others blue; every
    point carries an SVG ``<title>`` (name and score) shown on hover. The SVG is also written to
    ``out_path`` when given.
    """
    scores = np.asarray(scores, dtype=float)
    keep = np.isfinite(scores)
    names = [n for n, k in zip(names, keep) if k]
    flags = [bool(f) for f, k in zip(flagged, keep) if k]
    scores = scores[keep]
    lo, hi = _x_range(scores, threshold)
    fig = Figure(figsize=(9.0, 2.3))
    ax = fig.subplots()
    offsets = swarm_offsets(scores, bin_width=(hi - lo) / 70.0)
    ymax = max(3.0, float(np.abs(offsets).max()) + 1.0) if len(offsets) else 3.0
    for i, (s, f, dy) in enumerate(zip(scores, flags, offsets)):
        (line,) = ax.plot([s], [dy], ls="none", marker="o", ms=7 if f else 6,
                          mfc=FLAGGED_COLOUR if f else NORMAL_COLOUR, mec="white", mew=0.6,
                          alpha=0.95, zorder=3)
        line.set_gid(f"cg3d-pt-{i}")
    if threshold is not None:
        line = ax.axvline(threshold, color="#444444", ls="--", lw=1.0, zorder=2)
        line.set_gid("cg3d-threshold")
        label = threshold_label or f"threshold {threshold:g}"
        right_half = threshold > lo + 0.6 * (hi - lo)         # keep the label inside the axes
        ax.text(threshold, ymax * 0.92, f"{label} " if right_half else f" {label}", color="#444444",
                fontsize=8, va="top", ha="right" if right_half else "left")
    ax.set_xlim(lo, hi)
    ax.set_ylim(-ymax, ymax)
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(axis="x", color="#e5e5e5", lw=0.6, zorder=0)
    handles = [
        Line2D([], [], ls="none", marker="o", mfc=FLAGGED_COLOUR, mec="white", ms=7,
               label=f"flagged ({sum(flags)})"),
        Line2D([], [], ls="none", marker="o", mfc=NORMAL_COLOUR, mec="white", ms=6,
               label=f"not flagged ({len(flags) - sum(flags)})"),
    ]
    ax.legend(handles=handles, loc="upper left", fontsize=8, frameon=False, ncol=2,
              bbox_to_anchor=(0.0, 1.18))
    fig.tight_layout()
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "cg3d"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = _svg_add_titles(buf.getvalue(), [f"{n}: {s:.3f}" for n, s in zip(names, scores)])
    if out_path is not None:
        with atomic_path(out_path) as tmp:
            tmp.write_text(svg, encoding="utf-8")
    return svg


def _svg_add_titles(svg: str, titles: list[str]) -> str:
    """Insert ``<title>`` (hover text) into the groups ``cg3d-pt-<i>`` of a matplotlib SVG."""
    from xml.sax.saxutils import escape

    def repl(match: re.Match) -> str:
        i = int(match.group(1))
        title = escape(titles[i]) if i < len(titles) else ""
        return f'{match.group(0)}<title>{title}</title>'

    svg = re.sub(r'<g id="cg3d-pt-(\d+)">', repl, svg)
    # drop the XML prolog / DOCTYPE so the SVG can be inlined in HTML
    return svg[svg.find("<svg"):]
