"""Stage ``outputs``: the maps, masks and sidecars of one image on its native grid [method.md §5].

``*_label-anomaly_desc-<mod>_probseg`` (probseg in [0, 1]), ``*_label-anomaly_desc-<mod>_mask``
(probseg > threshold) and ``*_label-brain_desc-<mod>_mask`` (the brain mask used), each with its
JSON sidecar, written atomically into the output dataset. A failure is recorded as the image's
``failed`` result (the other images go on) unless ``--stop-on-first-crash``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np

from ..atomic import write_json, write_nifti
from ..records import BatchScores, FigureSet, ImageResult, PreparedImage
from .context import Ref, StageContext, stage
from .inputs import load_inputs

LOGGER = logging.getLogger("cg3d")

__all__ = ["outputs"]


@stage("outputs")
def outputs(ctx: StageContext, prepared: PreparedImage, scores: list[Ref[BatchScores]]) -> ImageResult:
    """Write the outputs of one image (scored in one of the modality's batches ``scores``); its
    :class:`ImageResult` (``ok``, ``skipped`` or ``failed``)."""
    if not prepared.usable:
        return ImageResult(image=prepared.image, status="skipped", error=prepared.error)
    try:
        return _write(ctx, prepared, batch_of(prepared.name, scores).load())
    except Exception as exc:
        if ctx.settings.execution.stop_on_first_crash:
            raise
        LOGGER.error("writing the outputs of %s failed: %s: %s", prepared.name, type(exc).__name__, exc,
                     exc_info=True)
        return ImageResult(image=prepared.image, status="failed", error=f"{type(exc).__name__}: {exc}")


def batch_of(bids_name: str, scores: list[Ref[BatchScores]]) -> Ref[BatchScores]:
    """The batch that scored ``bids_name`` (its names are read without the score arrays)."""
    from ..records import load_fields

    for ref in scores:
        if bids_name in load_fields(ref.path, ("names",))["names"]:
            return ref
    raise KeyError(f"{bids_name} is in none of the {len(scores)} scoring batch(es)")


def _write(ctx: StageContext, prepared: PreparedImage, scores: BatchScores) -> ImageResult:
    from ..bids.derivatives import anomaly_mask_sidecar, brain_mask_sidecar, probseg_sidecar
    from ..bids.naming import output_paths
    from ..core.maps import probseg_transform, scores_to_native, subject_summary
    from ..core.preprocessing import from_canonical

    method, image = ctx.settings.method, prepared.image
    row = scores.index(image.bids_name)
    loaded = load_inputs(ctx, image, contiguous=False)  # maps are resampled from the cube, not the image
    # The mask in the file's voxel order (written as is), and one C-ordered copy for the maps: the
    # maps are C-ordered, and masked reads and writes across two memory orders are ~8x slower.
    brain_file = from_canonical(loaded.mask, loaded.native)
    brain = np.ascontiguousarray(brain_file, dtype=bool)
    token_scores = np.where(scores.valid[row], scores.scores[row], 0.0)
    raw = scores_to_native(token_scores, scores.grid, prepared.cube_mask(), prepared.cube_affine,
                           loaded.native, brain)
    probseg = np.zeros(raw.shape, dtype=np.float32)
    probseg[brain] = probseg_transform(raw[brain], scores.median, scores.scale, method.z_center)
    anomaly = (probseg > method.threshold) & brain

    paths = output_paths(image, ctx.settings.inputs.output_dir)
    header = loaded.native.header.copy()
    header.set_xyzt_units("mm")
    _write_map(paths["probseg"], probseg, loaded.native, header, np.float32)
    _write_map(paths["anomaly_mask"], anomaly.astype(np.uint8), loaded.native, header, np.uint8)
    _write_map(paths["brain_mask"], brain_file.astype(np.uint8), loaded.native, header, np.uint8)
    provenance = ctx.settings.provenance()
    transform = {
        "ScoreTransform": "logistic((raw - BatchMedian) / BatchScale - ZCenter)",
        "BatchMedian": float(scores.median), "BatchScale": float(scores.scale), "ZCenter": method.z_center,
    }
    write_json(paths["probseg_json"], probseg_sidecar(image, transform=transform, model=provenance))
    write_json(paths["anomaly_mask_json"], anomaly_mask_sidecar(image, threshold=method.threshold,
                                                                model=provenance))
    write_json(paths["brain_mask_json"], brain_mask_sidecar(image, model=provenance))

    voxel_volume = float(np.prod(loaded.native.header.get_zooms()[:3]))
    summary = subject_summary(raw, brain, voxel_volume, anomaly_mask=anomaly, affine=loaded.native.affine)
    figures = _figures(ctx, image, loaded.native, probseg, anomaly, brain)
    return ImageResult(
        image=image, status="ok", score_max=summary.score_max, score_top1pct=summary.score_top1pct,
        brain_volume_mm3=summary.brain_volume_mm3, anomaly_volume_mm3=summary.anomaly_volume_mm3,
        n_components=summary.n_components, components=summary.components,
        outside_fraction=prepared.outside_fraction, batch=scores.batch, figures=figures,
    )


def _figures(ctx: StageContext, image, native: nib.Nifti1Image, probseg: np.ndarray, anomaly: np.ndarray,
             brain: np.ndarray) -> FigureSet:
    """The subject report's figures of this image, drawn now from the arrays in memory."""
    from ..reports.data import report_image
    from ..reports.subject import draw_figures

    affine = native.affine
    volumes = {
        "image": native, "probseg": nib.Nifti1Image(probseg, affine),
        "anomaly_mask": nib.Nifti1Image(anomaly.astype(np.uint8), affine),
        "brain_mask": nib.Nifti1Image(brain.astype(np.uint8), affine),
    }
    out_dir = ctx.settings.inputs.output_dir
    view = report_image(ImageResult(image=image, status="ok"), out_dir, 0)
    drawn = draw_figures(view, out_dir, volumes, threshold=ctx.settings.method.threshold)
    cuts = {k: [float(v) for v in values] for k, values in (drawn["cuts"] or {}).items()} or None
    peak = tuple(float(v) for v in drawn["peak_mm"]) if drawn["peak_mm"] is not None else None
    return FigureSet(anomaly=drawn["anomaly"], mask=drawn["mask"], peak_mm=peak,
                     peak_value=None if drawn["peak_value"] is None else float(drawn["peak_value"]), cuts=cuts,
                     anomaly_error=drawn["anomaly_error"], mask_error=drawn["mask_error"])


def _write_map(path: Path, data: np.ndarray, native: nib.Nifti1Image, header, dtype) -> None:
    hdr = header.copy()
    hdr.set_data_dtype(dtype)
    hdr["scl_slope"] = 1.0
    hdr["scl_inter"] = 0.0
    write_nifti(path, nib.Nifti1Image(data.astype(dtype, copy=False), native.affine, hdr))
