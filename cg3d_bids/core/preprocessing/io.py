"""Load and validate NIfTI images and brain masks [method.md §1.1-1.2].

Images
    :func:`load_native` reads a file, checks it (readable to the last byte, 3D after dropping
    trailing singleton axes, finite, not all zero) and returns a ``Nifti1Image`` with float32 data
    on the file's own grid; :func:`load_image` returns the same image reoriented to RAS+ with
    ``nib.as_closest_canonical`` (axis flips/permutations only, no resampling). Outputs are written
    on the native grid, so the pipeline keeps both (:func:`load_image_pair` reads the file once).

Masks
    :func:`load_mask_for_image` puts a brain mask on an image's canonical grid: used as is on the
    same grid, nearest-neighbour resampled when the grids differ but share world space, refused
    (:class:`~cg3d_bids.errors.InputDataError`, exit 65) when it cannot be mapped. One warning
    (naming both files) when the mask had to be resampled from another grid or when more than
    :data:`WARN_MASK_ON_BACKGROUND` (10 %) of the mapped mask lies on background (voxels at most
    :data:`BACKGROUND_LEVEL` (2 %) of the image's 99th percentile): mask and image are probably
    not aligned, e.g. a mask of another shape written with the image's affine.
    :func:`nonzero_mask` derives a mask from an already skull-stripped image.

Every error names the file and the fix. The source path travels with the in-memory images in
``image.extra["cg3d_source"]`` so later errors can name it too.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from ...atomic import gzip_codec
from ...errors import InputDataError, NoInputError
from .resample import resample_mask

LOGGER = logging.getLogger("cg3d")

PathLike = str | os.PathLike

#: Key of ``image.extra`` that holds the path an image was read from.
SOURCE_KEY = "cg3d_source"
#: Affines that differ by less than this (mm, elementwise) describe the same grid.
AFFINE_ATOL_MM = 1e-3
#: A mapped mask must keep at least this fraction of its voxels inside the image's field of view.
MIN_INSIDE_FOV_FRACTION = 0.5
#: A mapped mask must cover at least this fraction of the image's voxels (a brain is 5-40 %).
MIN_MASK_COVERAGE = 1e-3
#: At most this fraction of a mapped mask may lie on exactly-zero image voxels (else misaligned).
MAX_MASK_ON_ZERO = 0.5
#: Warn when more than this fraction of a mapped mask lies on background.
WARN_MASK_ON_BACKGROUND = 0.10
#: Background: voxels at most this fraction of the image's 99th percentile (zero in skull-stripped
#: images; MRI background noise is a few percent of tissue, CSF well above this).
BACKGROUND_LEVEL = 0.02
#: ``nonzero_mask`` drops connected components smaller than this fraction of the largest one.
MIN_ISLAND_FRACTION = 0.05

_MASK_FIX = (
    "give a brain mask in the image's world space (coregister/resample it to the image), or use "
    "--mask-source nonzero (images already skull-stripped) or --mask-source skullstrip (deepbet)"
)


# ------------------------------------------------------------------------------------------------
# images
def source_name(image: nib.spatialimages.SpatialImage) -> str:
    """The file an image was read from, for messages (``'<in-memory image>'`` when unknown)."""
    extra = getattr(image, "extra", None) or {}
    return str(extra.get(SOURCE_KEY) or image.get_filename() or "<in-memory image>")


def load_native(path: PathLike) -> nib.Nifti1Image:
    """Read and validate an image on its own (native) grid; float32 data, header kept.

    Raises :class:`NoInputError` for a missing file and :class:`InputDataError` for an unreadable,
    corrupt or truncated file, a non-3D image, NaN/Inf values or an all-zero image.
    """
    path = Path(path)
    if not path.is_file():
        raise NoInputError("image file not found", path=path, fix="check the path / the BIDS dataset")
    raw = _read_image(path)
    data = _as_3d(_read_data(raw, path), path)
    _check_finite(data, path)
    if not np.any(data):
        raise InputDataError(
            "the image is all zeros", path=path, fix="replace the file with a valid image or exclude it"
        )
    return _float32_image(data, raw, path)


def to_canonical(image: nib.Nifti1Image, *, contiguous: bool = True) -> nib.Nifti1Image:
    """``image`` reoriented to RAS+ (closest canonical), float32, source kept; C-contiguous (one
    copy) unless ``contiguous=False`` (then a view of ``image``'s array where possible: for
    callers that read the voxels but do not resample them)."""
    canonical = nib.as_closest_canonical(image)
    data = np.asanyarray(canonical.dataobj)
    data = np.ascontiguousarray(data, dtype=np.float32) if contiguous else np.asarray(data, dtype=np.float32)
    out = nib.Nifti1Image(data, canonical.affine, header=canonical.header)
    out.header.set_data_dtype(np.float32)
    out.extra[SOURCE_KEY] = source_name(image)
    return out


def load_image(path: PathLike) -> nib.Nifti1Image:
    """Validated image reoriented to RAS+ (``nib.as_closest_canonical``) with float32 data.

    Raises like :func:`load_native`.
    """
    return to_canonical(load_native(path))


def from_canonical(data: np.ndarray, native: nib.spatialimages.SpatialImage) -> np.ndarray:
    """An array on ``native``'s RAS+ (closest canonical) grid put back on ``native``'s own grid.

    Undoes :func:`nibabel.as_closest_canonical` (axis flips and permutations only, exact).
    """
    native_ornt = nib.orientations.io_orientation(native.affine)
    ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
    return nib.orientations.apply_orientation(np.asarray(data), nib.orientations.ornt_transform(ras, native_ornt))


def load_image_pair(path: PathLike, *, contiguous: bool = True) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """``(native, canonical)`` images from one read of ``path`` (``contiguous``: see
    :func:`to_canonical`)."""
    native = load_native(path)
    return native, to_canonical(native, contiguous=contiguous)


def _read_image(path: Path) -> nib.spatialimages.SpatialImage:
    """The image of ``path``; a ``.gz`` file is inflated once, in memory, to its end, so that gzip
    verifies its length and CRC-32 (nibabel alone stops after the voxel data and would accept a
    damaged stream that still inflates) and the voxels are not inflated a second time."""
    if path.name.endswith(".gz"):
        return _from_bytes(_inflate(path), path)
    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises many types (ImageFileError, OSError, ValueError...)
        raise _unreadable(exc, path) from exc


def _inflate(path: Path) -> bytes:
    """The inflated bytes of a gzip file (:func:`cg3d_bids.atomic.gzip_codec`: ISA-L when it is
    installed)."""
    import zlib

    gzip, codec_errors = gzip_codec()
    data = path.read_bytes()
    if data[:2] != b"\x1f\x8b":
        raise _unreadable(ValueError("not a gzip stream (it does not start with the gzip magic bytes)"), path)
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error, *codec_errors) as exc:  # BadGzipFile is an OSError
        raise _corrupt(exc, path) from exc


def _from_bytes(data: bytes, path: Path) -> nib.spatialimages.SpatialImage:
    errors = []
    for kind in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            image = kind.from_bytes(data)
            image.set_filename(str(path))
            return image
        except Exception as exc:  # not this NIfTI flavour (or not NIfTI at all)
            errors.append(exc)
    raise _unreadable(errors[0], path) from errors[0]


def _unreadable(exc: BaseException, path: Path) -> InputDataError:
    return InputDataError(
        f"cannot read the image ({type(exc).__name__}: {exc})", path=path,
        fix="check that the file is a valid NIfTI-1/2 image (.nii or .nii.gz); re-export or re-download it",
    )


def _corrupt(exc: BaseException, path: Path) -> InputDataError:
    return InputDataError(
        f"the image data cannot be read: the file is truncated or corrupt ({type(exc).__name__}: {exc})",
        path=path, fix="re-copy or re-download the file (e.g. `gzip -t FILE` tests a .nii.gz)",
    )


def _read_data(image: nib.spatialimages.SpatialImage, path: Path) -> np.ndarray:
    """Read every voxel (detects truncated files), as float32."""
    try:
        return np.asarray(image.get_fdata(dtype=np.float32))
    except Exception as exc:  # EOFError, zlib.error, ValueError for short files
        raise _corrupt(exc, path) from exc


def _as_3d(data: np.ndarray, path: Path) -> np.ndarray:
    """Drop trailing singleton axes; refuse anything that is not then 3D."""
    shape = data.shape
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        what = f"{data.ndim}D image of shape {shape}"
        fix = ("pass a single 3D volume (extract one, e.g. `fslroi in out 0 1` or "
               "nilearn.image.index_img)") if data.ndim > 3 else "pass a 3D anatomical volume"
        raise InputDataError(f"expected a 3D image, got a {what}", path=path, fix=fix)
    return data


def _check_finite(data: np.ndarray, path: Path) -> None:
    bad = ~np.isfinite(data)
    if bad.any():
        n_nan = int(np.isnan(data).sum())
        raise InputDataError(
            f"the image contains {n_nan} NaN and {int(bad.sum()) - n_nan} infinite voxel values",
            path=path, fix="replace non-finite values (e.g. `fslmaths in -nan out`) or exclude the image",
        )


def _float32_image(data: np.ndarray, raw: nib.spatialimages.SpatialImage, path: Path) -> nib.Nifti1Image:
    affine = np.asarray(raw.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputDataError(
            "the image's voxel-to-world affine is singular or not finite", path=path,
            fix="repair the header (qform/sform), e.g. with `fslorient` or nibabel",
        )
    header = raw.header if isinstance(raw, nib.Nifti1Image) else None
    # the file's voxel order is kept (no copy): :func:`to_canonical` makes the one C-ordered copy
    image = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine, header=header)
    image.header.set_data_dtype(np.float32)
    if header is None:
        image.header.set_xyzt_units("mm")
    image.extra[SOURCE_KEY] = str(path)
    return image


# ------------------------------------------------------------------------------------------------
# masks
@dataclass(frozen=True)
class MappedMask:
    """A brain mask on an image's canonical grid, with how it got there."""

    mask: np.ndarray            # bool, image.shape
    resampled: bool             # True when nearest-neighbour resampled from another grid
    inside_fov_fraction: float  # fraction of the mask's voxels inside the image's field of view
    source: str                 # mask file
    background_fraction: float = 0.0  # fraction of the mapped mask on background (brain masks)
    grid: tuple[int, ...] = ()  # shape of the mask file (canonical orientation)

    def warning(self, image_name: str) -> str | None:
        """One line saying what is suspicious about this mask's geometry, or None."""
        notes = []
        if self.resampled:
            notes.append(f"it was resampled (nearest neighbour) from its own grid {self.grid}")
        if self.background_fraction > WARN_MASK_ON_BACKGROUND:
            notes.append(f"{self.background_fraction:.0%} of it lies on image background (more than "
                         f"{WARN_MASK_ON_BACKGROUND:.0%}): mask and image are probably not aligned")
        if not notes:
            return None
        return (f"brain mask {self.source} for image {image_name}: {'; '.join(notes)}; check that the mask was "
                "made from this image (same grid or coregistered)")


def load_mask_for_image(mask_path: PathLike, image: nib.Nifti1Image, *, warn: bool = True) -> np.ndarray:
    """Brain mask of ``mask_path`` as a bool array on ``image``'s (canonical) grid.

    See :func:`map_mask_to_image`, which also says whether the mask was resampled. ``warn``: the
    stage that first reads the pair (once per image) logs :meth:`MappedMask.warning` and checks the
    mapped mask against the image's values; later stages read a pair that passed (``warn=False``
    skips those checks, not the file and field-of-view ones).
    """
    mapped = map_mask_to_image(mask_path, image, background=warn, check=warn)
    message = mapped.warning(source_name(image)) if warn else None
    if message:
        LOGGER.warning("%s", message)
    return mapped.mask


def map_mask_to_image(mask_path: PathLike, image: nib.Nifti1Image, *, brain: bool = True,
                      background: bool = True, check: bool = True) -> MappedMask:
    """Put a brain mask on ``image``'s grid (same grid: as is; else nearest neighbour in world space).

    Mask values: ``> 0`` for integer files, ``>= 0.5`` for float files (probabilistic masks).
    Raises :class:`InputDataError` (naming both files) when the mask file is unreadable, not 3D,
    empty, mostly outside the image's field of view (< 50 %), empty or tiny (< 0.1 % of the image)
    once mapped, lies mostly (> 50 %) on zero-valued image voxels (misaligned), or when the image
    is all zero inside it. ``brain=False`` (e.g. lesion masks) keeps only the unreadable/not-3D and
    field-of-view checks, and allows an empty mask. ``background=False`` skips measuring
    :attr:`MappedMask.background_fraction` (only its warning uses it; left 0). ``check=False``
    skips the checks against the image's values (empty or tiny once mapped, all zero inside, on
    zero-valued voxels): for a pair that passed them already.
    """
    mask_path = Path(mask_path)
    if not mask_path.is_file():
        raise NoInputError("brain mask file not found", path=mask_path,
                           fix=f"check the mask path, or {_MASK_FIX.split(', or ', 1)[1]}")
    mask_img = _load_mask_native(mask_path)
    mask_can = nib.as_closest_canonical(mask_img)
    mask_data = np.asarray(mask_can.dataobj, dtype=bool)
    pair = f"mask {mask_path} for image {source_name(image)}"
    shape = image.shape[:3]
    if not mask_data.any():
        if not brain:
            return MappedMask(mask=np.zeros(shape, bool), resampled=mask_data.shape != shape,
                              inside_fov_fraction=1.0, source=str(mask_path))
        raise InputDataError(f"the brain mask is empty ({pair})", path=mask_path, fix=_MASK_FIX)
    same_grid = mask_data.shape == shape and np.allclose(
        mask_can.affine, image.affine, rtol=0, atol=AFFINE_ATOL_MM
    )
    if same_grid:
        mapped, inside = mask_data, 1.0
    else:
        inside = _fraction_inside(mask_data, mask_can.affine, image.affine, shape)
        if inside < MIN_INSIDE_FOV_FRACTION:
            raise InputDataError(
                f"the brain mask does not overlap the image in world space: only {inside:.1%} of its "
                f"voxels fall inside the image's field of view ({pair})", path=mask_path, fix=_MASK_FIX,
            )
        mapped = resample_mask(mask_data, np.linalg.inv(mask_can.affine) @ image.affine, shape)
        LOGGER.debug("mask %s resampled (nearest neighbour) from grid %s to the grid %s of %s",
                     mask_path, mask_data.shape, shape, source_name(image))
    fraction = 0.0
    if brain:
        data = np.asanyarray(image.dataobj)
        if data.flags.c_contiguous and not mapped.flags.c_contiguous:
            # the image's memory order: masked reads across two orders are ~8x slower
            mapped = np.ascontiguousarray(mapped)
        if check:
            _check_mapped_mask(mapped, data, mask_path, pair)
        if background:
            fraction = background_fraction(mapped, data)
    return MappedMask(mask=mapped, resampled=not same_grid, inside_fov_fraction=float(inside),
                      source=str(mask_path), background_fraction=fraction, grid=tuple(mask_data.shape))


def background_fraction(mask: np.ndarray, data: np.ndarray) -> float:
    """Fraction of ``mask`` on background voxels of ``data`` (at most :data:`BACKGROUND_LEVEL`
    of its 99th percentile, estimated on every 2nd voxel per axis)."""
    # sorted first (our own copy, partitioned in place): the same percentile, faster than unsorted
    level = BACKGROUND_LEVEL * float(np.percentile(np.sort(np.abs(data[::2, ::2, ::2]), axis=None), 99,
                                                   overwrite_input=True))
    inside = data[mask]
    return float(np.mean(np.abs(inside) <= level)) if inside.size else 0.0


def _load_mask_native(mask_path: Path) -> nib.Nifti1Image:
    raw = _read_image(mask_path)
    data = _as_3d(np.asanyarray(_read_raw_data(raw, mask_path)), mask_path)
    if np.issubdtype(data.dtype, np.floating):
        binary = np.nan_to_num(data.astype(np.float32)) >= 0.5
    else:
        binary = data > 0
    return nib.Nifti1Image(binary.astype(np.uint8), raw.affine)


def _read_raw_data(image: nib.spatialimages.SpatialImage, path: Path) -> np.ndarray:
    """Voxel values with scaling applied only when the file asks for it (keeps integer masks integer)."""
    try:
        return np.asanyarray(image.dataobj)
    except Exception as exc:
        raise InputDataError(
            f"the mask data cannot be read: the file is truncated or corrupt ({type(exc).__name__}: "
            f"{exc})", path=path, fix="re-copy or regenerate the mask file",
        ) from exc


def _fraction_inside(mask: np.ndarray, mask_affine: np.ndarray, target_affine: np.ndarray,
                     target_shape: tuple[int, ...], max_points: int = 200_000) -> float:
    """Fraction of the mask's voxel centres that land inside the target grid's field of view."""
    ijk = np.argwhere(mask)
    if len(ijk) > max_points:  # deterministic subsample
        ijk = ijk[:: len(ijk) // max_points + 1]
    vox2vox = np.linalg.inv(target_affine) @ mask_affine
    coords = ijk @ vox2vox[:3, :3].T + vox2vox[:3, 3]
    upper = np.asarray(target_shape, dtype=float) - 0.5
    inside = np.all((coords >= -0.5) & (coords <= upper), axis=1)
    return float(inside.mean())


def _check_mapped_mask(mapped: np.ndarray, data: np.ndarray, mask_path: Path, pair: str) -> None:
    n = int(mapped.sum())
    if n == 0:
        raise InputDataError(f"the brain mask is empty once mapped onto the image grid ({pair})",
                             path=mask_path, fix=_MASK_FIX)
    if n < MIN_MASK_COVERAGE * mapped.size:
        raise InputDataError(
            f"the brain mask covers only {n} of {mapped.size} image voxels ({n / mapped.size:.3%}); "
            f"a brain covers 5-40 % of an anatomical image ({pair})", path=mask_path, fix=_MASK_FIX,
        )
    inside = data[mapped]
    if not np.any(inside):
        raise InputDataError(f"the image is all zeros inside the brain mask ({pair})",
                             path=mask_path, fix=_MASK_FIX)
    on_zero = float(np.mean(inside == 0))
    if on_zero > MAX_MASK_ON_ZERO:
        raise InputDataError(
            f"{on_zero:.0%} of the brain mask lies on zero-valued image voxels: mask and image are "
            f"probably not aligned ({pair})", path=mask_path, fix=_MASK_FIX,
        )


def nonzero_mask(image: nib.spatialimages.SpatialImage | np.ndarray, *,
                 min_island_fraction: float = MIN_ISLAND_FRACTION) -> np.ndarray:
    """Brain mask of an already skull-stripped image: ``image != 0``, cleaned up.

    Cleanup (scipy.ndimage): connected components (26-connectivity) smaller than
    ``min_island_fraction`` of the largest are dropped (``1.0`` keeps only the largest; the default
    5 % removes specks but keeps e.g. a cerebellum cut off by the skull-stripping), then enclosed
    holes are filled (``binary_fill_holes``). Raises :class:`InputDataError` for an all-zero image.
    """
    data = np.asanyarray(image.dataobj) if hasattr(image, "dataobj") else np.asarray(image)
    name = source_name(image) if hasattr(image, "dataobj") else "<array>"
    mask = data != 0
    if not mask.any():
        raise InputDataError("the image is all zeros: no brain for --mask-source nonzero", path=name,
                             fix="check the image, or use --mask-source derivatives / skullstrip")
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        keep = np.flatnonzero(sizes >= min_island_fraction * sizes.max()) + 1
        if min_island_fraction >= 1.0:
            keep = np.array([int(np.argmax(sizes)) + 1])
        mask = np.isin(labels, keep)
    return ndimage.binary_fill_holes(mask)
