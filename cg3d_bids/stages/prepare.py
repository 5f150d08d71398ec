"""Stage ``prepare``: load and check one image and its mask, place it in the cube [method.md §1.1-1.3].

The cube's brain-intensity percentiles feed the batch's Nyul landmarks; the cube's geometry
(affine, brain mask) maps scores back to the native grid later. Cached by the content of the
image and mask files and the cube settings.
"""

from __future__ import annotations

import logging

import numpy as np

from ..atomic import atomic_path
from ..errors import InputDataError
from ..hashing import file_sha256
from ..records import ImageRecord, PreparedImage
from ..settings import Affects
from .context import StageContext, stage
from .inputs import load_inputs

LOGGER = logging.getLogger("cg3d")

__all__ = ["prepare", "prepare_key", "save_cube_values"]


def save_cube_values(path, values: np.ndarray) -> None:
    """The cube's brain intensities (mask order), so that ``tokenize`` does not build the cube again."""
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, np.asarray(values, dtype=np.float32))


def prepare_key(ctx: StageContext, image: ImageRecord) -> str:
    """Content key of an image and its mask under the cube settings."""
    mask = file_sha256(image.mask_path) if image.mask_path else image.mask_source
    return ctx.settings.key(Affects.CUBE, file_sha256(image.path), mask)


@stage("prepare")
def prepare(ctx: StageContext, image: ImageRecord) -> PreparedImage:
    """The image's :class:`PreparedImage` (cached). With ``--skip-bad-images`` an image whose
    data cannot be used (:class:`InputDataError`: corrupt, 4D, NaN/Inf, constant, empty or
    unmappable mask) is returned as ``skipped`` with the reason instead of stopping the run."""
    key = prepare_key(ctx, image)
    try:
        return ctx.cache.cached(ctx.cache.prep_path(image, key), PreparedImage,
                                lambda: _prepare(ctx, image, key))
    except InputDataError as exc:
        if not ctx.settings.execution.skip_bad_images:
            raise
        message = exc.render()
        LOGGER.warning("skipping %s (--skip-bad-images): %s", image.bids_name, message)
        ctx.cache.record_skipped(image, message)
        return PreparedImage(image=image, key=key, status="skipped", error=message)


def _prepare(ctx: StageContext, image: ImageRecord, key: str) -> PreparedImage:
    from ..core.preprocessing import PERCENTILES, make_cube
    from ..core.preprocessing.nyul import check_landmarks, image_landmarks

    method = ctx.settings.method
    loaded = load_inputs(ctx, image, warn=True)
    cube = make_cube(loaded.canonical, loaded.mask, size=method.cube_size, fov_mm=method.fov_mm)
    brain = cube.data[cube.mask]
    if brain.size == 0:
        raise InputDataError("the brain mask is empty inside the cube", path=image.path,
                             fix="check the brain mask (or use --mask-source nonzero / skullstrip)")
    percentiles = image_landmarks(brain, PERCENTILES)
    check_landmarks(percentiles, image.bids_name, str(image.path))
    save_cube_values(ctx.cache.cube_path(image, key), brain)
    return PreparedImage(
        image=image, key=key, percentiles=tuple(float(v) for v in percentiles),
        cube_size=method.cube_size, cube_affine=np.asarray(cube.affine, dtype=np.float64),
        cube_mask_bits=np.packbits(cube.mask), outside_fraction=float(cube.outside_fraction),
        brain_voxels_cube=int(cube.mask.sum()),
    )
