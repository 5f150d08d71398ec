"""Stage ``landmarks``: Nyul standard landmarks of a modality, learned from its usable images [method.md §1.4]."""

from __future__ import annotations

import numpy as np

from ..errors import NoInputError
from ..hashing import short_hash
from ..records import Landmarks, PreparedImage
from .context import StageContext, stage

__all__ = ["landmarks"]


@stage("landmarks")
def landmarks(ctx: StageContext, prepared: list[PreparedImage], modality: str) -> Landmarks:
    """Landmarks from every usable prepared image (skipped ones left out), cached by their keys."""
    from ..core.preprocessing import PERCENTILES, landmarks_from_percentiles

    usable = sorted((p for p in prepared if p.usable), key=lambda p: p.image.bids_name)
    if not usable:
        raise NoInputError(f"no usable {modality} image: every one was skipped as bad data",
                           fix="see the warnings above and group_<mod>.tsv; fix or replace the images")
    key = short_hash([p.key for p in usable], list(PERCENTILES))

    def make() -> Landmarks:
        values = landmarks_from_percentiles(np.array([p.percentiles for p in usable]),
                                            names=[p.image.bids_name for p in usable])
        return Landmarks(modality=modality, key=key, percentiles=tuple(float(p) for p in PERCENTILES),
                         landmarks=tuple(float(v) for v in values),
                         images=tuple(p.image.bids_name for p in usable))

    return ctx.cache.cached(ctx.cache.landmarks_path(modality, key), Landmarks, make)
