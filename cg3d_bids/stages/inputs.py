"""An image, its canonical (RAS) copy and its brain mask, as every stage that reads pixels needs them."""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np

from ..atomic import write_nifti
from ..hashing import file_sha256
from ..records import ImageRecord
from .context import StageContext

__all__ = ["LoadedImage", "load_inputs"]


@dataclass(frozen=True)
class LoadedImage:
    """``native`` (the file's grid), ``canonical`` (RAS+) and ``mask`` (bool, canonical grid)."""

    native: nib.Nifti1Image
    canonical: nib.Nifti1Image
    mask: np.ndarray


def load_inputs(ctx: StageContext, image: ImageRecord, *, warn: bool = False, contiguous: bool = True) -> LoadedImage:
    """Read and check ``image`` and its brain mask from the configured mask source; ``warn``: log
    what is suspicious about the mask's geometry (the ``prepare`` stage, once per image);
    ``contiguous=False``: the canonical array need not be C-ordered (no resampling of it follows)."""
    from ..core.preprocessing import load_image_pair, load_mask_for_image, nonzero_mask

    native, canonical = load_image_pair(image.path, contiguous=contiguous)
    source = ctx.settings.inputs.mask_source
    if source == "derivatives":
        if image.mask_path is None:
            raise ValueError(f"{image.bids_name} has no mask path with --mask-source derivatives")
        mask = load_mask_for_image(image.mask_path, canonical, warn=warn)
    elif source == "nonzero":
        mask = nonzero_mask(canonical)
    else:
        mask = _skullstrip_cached(ctx, image, canonical)
    return LoadedImage(native, canonical, mask)


def _skullstrip_cached(ctx: StageContext, image: ImageRecord, canonical: nib.Nifti1Image) -> np.ndarray:
    """deepbet mask on the canonical grid, cached in the work dir by image content."""
    from ..core.preprocessing import skullstrip

    cache = ctx.cache.skullstrip_path(image, file_sha256(image.path))
    if cache.exists():
        return np.asarray(nib.load(cache).dataobj) > 0
    mask = np.asarray(skullstrip(canonical), dtype=bool)
    write_nifti(cache, nib.Nifti1Image(mask.astype(np.uint8), canonical.affine))
    return mask
