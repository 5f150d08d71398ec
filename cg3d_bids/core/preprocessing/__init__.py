"""Preprocessing [method.md §1]: load and validate, brain mask, cube, Nyul standardisation.

Works on nibabel images and numpy arrays only (no pybids, no nipype). Skull-stripping
(:func:`skullstrip`) imports the optional dependency deepbet lazily.
"""

from __future__ import annotations

from .cube import Cube, cube_to_native, make_cube
from .io import (
    MappedMask,
    from_canonical,
    load_image,
    load_image_pair,
    load_mask_for_image,
    load_native,
    map_mask_to_image,
    nonzero_mask,
    to_canonical,
)
from .nyul import PERCENTILES, landmarks_from_percentiles, learn_landmarks, standardise

# The submodule imports deepbet only when called. Importing it here, *then* binding the function,
# keeps ``cg3d_bids.core.preprocessing.skullstrip`` the function (a lazy first import of the submodule
# would rebind the package attribute to the module).
from .skullstrip import SkullstripUnavailableError, require_deepbet, skullstrip  # noqa: E402


__all__ = [
    "Cube", "MappedMask", "from_canonical", "PERCENTILES", "cube_to_native", "landmarks_from_percentiles",
    "learn_landmarks", "load_image", "load_image_pair", "load_mask_for_image", "load_native",
    "make_cube", "map_mask_to_image", "nonzero_mask", "require_deepbet", "skullstrip",
    "SkullstripUnavailableError", "standardise", "to_canonical",
]
