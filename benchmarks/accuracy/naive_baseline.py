#!/usr/bin/env python
"""Naive baseline: per-voxel |z| of Nyul-standardised intensity against the batch, cg3d-style outputs.

    python benchmarks/accuracy/naive_baseline.py BIDS OUT --masks DERIV [--modality T1w T2w FLAIR]

Per modality (one batch, like cg3d):

1. common space: each image's brain bounding box (RAS voxel axes) is mapped linearly onto a fixed
   grid of ``--grid`` voxels (per-axis scale + translation, no rotation: a crude affine alignment;
   the build_dataset.py images are all RAS);
2. Nyul standardisation with landmarks learned from the batch (brain percentiles 1, 10, ..., 90,
   99; each image's landmarks rescaled to [0, 1] by its p1/p99 and averaged; piecewise-linear map
   with linear extrapolation beyond p1/p99 so that hyperintense lesions keep their contrast);
3. Gaussian smoothing (sigma 1 voxel of the common grid), then the batch's voxel-wise mean and
   standard deviation in the common grid (streaming sums; voxels covered by fewer than 3 brains get
   z = 0; std floored at 0.05);
4. each image's ``|z|`` is mapped back onto its native grid (linear) inside its brain mask and
   turned into ``probseg = |z| / (|z| + 3)`` (0.5 at 3 SD); binary mask = probseg > 0.5; subject
   score = max of the probseg (as cg3d's image score = max of the map).

The image itself is part of the batch statistics (no leave-one-out). Outputs use cg3d's names, so
``cg3d evaluate`` reads them unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

LANDMARKS = (1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99)
Z_CENTER = 3.0
MIN_STD = 0.05


def find_images(bids: Path, masks: Path, modality: str) -> list[dict]:
    """``{prefix, subject, session, image, mask}`` for every ``sub-*/[ses-*/]anat/*_<mod>.nii.gz``."""
    out = []
    for path in sorted([*bids.glob(f"sub-*/anat/*_{modality}.nii.gz"),
                        *bids.glob(f"sub-*/ses-*/anat/*_{modality}.nii.gz")]):
        prefix = path.name[: -len(f"_{modality}.nii.gz")]
        ents = dict(p.split("-", 1) for p in prefix.split("_") if "-" in p)
        rel = path.parent.relative_to(bids)
        subject_level = f"sub-{ents['sub']}" + (f"_ses-{ents['ses']}" if "ses" in ents else "")
        candidates = [masks / rel / f"{prefix}_desc-brain_mask.nii.gz",
                      masks / rel / f"{subject_level}_desc-brain_mask.nii.gz"]
        mask = next((c for c in candidates if c.is_file()), None)
        if mask is None:
            raise FileNotFoundError(f"no brain mask for {path.name} in {masks}")
        out.append({"prefix": prefix, "subject": ents["sub"], "session": ents.get("ses"), "image": path,
                    "mask": mask, "relpath": rel})
    return out


def load(rec: dict) -> tuple[nib.Nifti1Image, np.ndarray, np.ndarray]:
    img = nib.load(str(rec["image"]))
    data = np.asarray(img.dataobj, dtype=np.float32)
    mask_img = nib.load(str(rec["mask"]))
    if mask_img.shape != img.shape or not np.allclose(mask_img.affine, img.affine, atol=1e-3):
        from nibabel.processing import resample_from_to

        mask_img = resample_from_to(mask_img, img, order=0)
    return img, data, np.asarray(mask_img.dataobj) > 0


def landmarks(data: np.ndarray, brain: np.ndarray) -> np.ndarray:
    return np.percentile(data[brain], LANDMARKS)


def nyul(data: np.ndarray, own: np.ndarray, standard: np.ndarray) -> np.ndarray:
    """Piecewise-linear map of ``own`` landmarks onto ``standard``, linear beyond the ends."""
    own = np.maximum.accumulate(own + np.arange(len(own)) * 1e-6)
    out = np.interp(data, own, standard)
    lo = (standard[1] - standard[0]) / (own[1] - own[0])
    hi = (standard[-1] - standard[-2]) / (own[-1] - own[-2])
    out = np.where(data < own[0], standard[0] + lo * (data - own[0]), out)
    return np.where(data > own[-1], standard[-1] + hi * (data - own[-1]), out).astype(np.float32)


def bbox_map(brain: np.ndarray, grid: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset): common-grid voxel g <-> native voxel ``offset + g * scale``."""
    idx = np.argwhere(brain)
    lo, hi = idx.min(0).astype(float), idx.max(0).astype(float)
    scale = (hi - lo) / (np.asarray(grid) - 1)
    return scale, lo


def to_common(data: np.ndarray, brain: np.ndarray, grid: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    scale, offset = bbox_map(brain, grid)
    coords = np.indices(grid, dtype=np.float32).reshape(3, -1) * scale[:, None] + offset[:, None]
    img = ndimage.map_coordinates(data, coords, order=1, mode="constant").reshape(grid)
    msk = ndimage.map_coordinates(brain.astype(np.float32), coords, order=1, mode="constant").reshape(grid) >= 0.5
    return img, msk


def to_native(common: np.ndarray, brain: np.ndarray) -> np.ndarray:
    scale, offset = bbox_map(brain, common.shape)
    coords = (np.indices(brain.shape, dtype=np.float32).reshape(3, -1) - offset[:, None]) / scale[:, None]
    return ndimage.map_coordinates(common, coords, order=1, mode="nearest").reshape(brain.shape)


def run_modality(bids: Path, masks: Path, out: Path, modality: str, grid: tuple[int, int, int]) -> int:
    records = find_images(bids, masks, modality)
    if not records:
        return 0
    # pass 1: landmarks
    own_lm = []
    for rec in records:
        _, data, brain = load(rec)
        own_lm.append(landmarks(data, brain))
    scaled = [(lm - lm[0]) / max(lm[-1] - lm[0], 1e-6) for lm in own_lm]
    standard = np.mean(scaled, axis=0)
    # pass 2: batch statistics in the common grid
    total = np.zeros(grid, np.float64)
    total_sq = np.zeros(grid, np.float64)
    count = np.zeros(grid, np.int32)
    for rec, lm in zip(records, own_lm):
        img, msk = _standardised_common(rec, lm, standard, grid)
        total += np.where(msk, img, 0.0)
        total_sq += np.where(msk, img.astype(np.float64) ** 2, 0.0)
        count += msk
    n = np.maximum(count, 1)
    mean = total / n
    std = np.maximum(np.sqrt(np.maximum(total_sq / n - mean**2, 0.0)), MIN_STD)
    # pass 3: |z| maps, back on the native grid
    rows = []
    for rec, lm in zip(records, own_lm):
        img, msk = _standardised_common(rec, lm, standard, grid)
        z = np.where(msk & (count >= 3), np.abs(img - mean) / std, 0.0).astype(np.float32)
        native, _, brain = load(rec)
        zn = np.where(brain, np.maximum(to_native(z, brain), 0.0), 0.0)
        probseg = (zn / (zn + Z_CENTER)).astype(np.float32)
        rows.append(_write_outputs(out, rec, modality, native, probseg, brain))
    _write_group(out, modality, rows, standard)
    return len(records)


def _standardised_common(rec, lm, standard, grid):
    _, data, brain = load(rec)
    std_img = np.where(brain, nyul(data, lm, standard), 0.0)
    img, msk = to_common(std_img, brain, grid)
    img = ndimage.gaussian_filter(img, 1.0)
    weight = ndimage.gaussian_filter(msk.astype(np.float32), 1.0)
    img = np.where(weight > 1e-3, img / np.maximum(weight, 1e-3), 0.0)  # normalised smoothing at edges
    return img.astype(np.float32), msk


def _save(path: Path, data: np.ndarray, ref: nib.Nifti1Image, dtype) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data.astype(dtype), ref.affine)
    img.header.set_xyzt_units("mm")
    img.to_filename(str(path))


def _write_outputs(out: Path, rec: dict, modality: str, ref, probseg: np.ndarray, brain: np.ndarray) -> dict:
    base = out / rec["relpath"] / rec["prefix"]
    _save(Path(f"{base}_label-anomaly_desc-{modality}_probseg.nii.gz"), probseg, ref, np.float32)
    _save(Path(f"{base}_label-anomaly_desc-{modality}_mask.nii.gz"), (probseg > 0.5) & brain, ref, np.uint8)
    _save(Path(f"{base}_label-brain_desc-{modality}_mask.nii.gz"), brain, ref, np.uint8)
    return {"participant_id": f"sub-{rec['subject']}",
            "session_id": f"ses-{rec['session']}" if rec["session"] else "n/a",
            "bids_name": f"{rec['prefix']}_{modality}", "score_max": float(probseg.max()), "status": "ok"}


def _write_group(out: Path, modality: str, rows: list[dict], standard: np.ndarray) -> None:
    cols = ["participant_id", "session_id", "bids_name", "score_max", "status"]
    lines = ["\t".join(cols)] + ["\t".join(str(r[c]) for c in cols) for r in rows]
    (out / f"group_{modality}.tsv").write_text("\n".join(lines) + "\n")
    (out / f"group_{modality}.json").write_text(json.dumps({
        "Method": "naive baseline: |z| of Nyul-standardised intensity vs the batch (benchmarks/accuracy)",
        "NyulStandardLandmarks": standard.tolist(), "ZCenter": Z_CENTER, "MinStd": MIN_STD}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bids", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--masks", type=Path, required=True, help="derivatives folder with desc-brain_mask")
    parser.add_argument("--modality", nargs="+", default=["T1w", "T2w", "FLAIR"])
    parser.add_argument("--grid", type=int, nargs=3, default=[80, 96, 80], help="common grid (voxels)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dataset_description.json").write_text(json.dumps({
        "Name": "naive baseline", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "cg3d-benchmark-naive-baseline"}]}, indent=2) + "\n")
    (args.out / ".bidsignore").write_text("*.html\nfigures\ngroup_*\n")
    for mod in args.modality:
        t0 = time.time()
        n = run_modality(args.bids, args.masks, args.out, mod, tuple(args.grid))
        print(f"naive baseline {mod}: {n} images in {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
