"""Builders of tiny synthetic BIDS datasets (raw + brain-mask derivatives) for the tests.

Images look vaguely like a head: an ellipsoid of "tissue" with a smooth texture, a brighter (T1w) or
darker (T2w/FLAIR) inner "white matter" ellipsoid, two "ventricles", optionally a bright lesion blob
and a skull shell. Brain masks are the tissue ellipsoid. Everything is deterministic in ``seed``.

Main entry point::

    paths = make_bids_dataset(tmp_path / "bids", subjects=["01", "02"], sessions=["a", "b"],
                              modalities=("T1w", "T2w"), with_masks=True, lesion_subjects=["02"])
    paths["bids_dir"], paths["masks_dir"], paths["images"]["T2w"], paths["masks"]["sub-01_ses-a"]
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

BIDS_VERSION = "1.10.0"
ORIENTATIONS = {"RAS": (1, 1, 1), "LAS": (-1, 1, 1), "LPS": (-1, -1, 1)}
# tissue intensities (background, cortex-like, white-matter-like, CSF-like, lesion) per contrast
CONTRASTS = {
    "T1w": (0.0, 600.0, 850.0, 200.0, 1100.0),
    "T2w": (0.0, 700.0, 500.0, 1200.0, 1500.0),
    "FLAIR": (0.0, 650.0, 500.0, 150.0, 1300.0),
}


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path


def make_affine(shape: Sequence[int], voxel_size: Sequence[float], orientation: str = "RAS") -> np.ndarray:
    """Voxel -> world (mm) affine, centred on the grid, with axis flips for ``orientation``."""
    signs = np.array(ORIENTATIONS[orientation], float)
    zooms = np.asarray(voxel_size, float)
    affine = np.diag([*(signs * zooms), 1.0])
    affine[:3, 3] = -signs * zooms * (np.asarray(shape) - 1) / 2.0
    return affine


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Save with scanner-coded qform/sform and mm/s units (no NIFTI_UNIT warning)."""
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def _grid(shape: Sequence[int]) -> np.ndarray:
    """Normalised coordinates in [-1, 1] per axis, shape (3, *shape)."""
    axes = [np.linspace(-1.0, 1.0, n) for n in shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def _ellipsoid(coords: np.ndarray, center: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    c = np.asarray(center, float).reshape(3, 1, 1, 1)
    r = np.asarray(radii, float).reshape(3, 1, 1, 1)
    return (((coords - c) / r) ** 2).sum(axis=0) <= 1.0


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int]) -> np.ndarray:
    """Low-frequency texture in about [-1, 1] (coarse noise, upsampled, box-blurred)."""
    coarse = rng.standard_normal([max(2, n // 3) for n in shape])
    fine = coarse
    for axis, n in enumerate(shape):
        index = np.minimum((np.arange(n) * coarse.shape[axis]) // n, coarse.shape[axis] - 1)
        fine = np.take(fine, index, axis=axis)
    for axis in range(3):
        fine = (np.roll(fine, 1, axis) + fine + np.roll(fine, -1, axis)) / 3.0
    return fine / (np.abs(fine).max() + 1e-6)


def subject_anatomy(shape: Sequence[int], rng: np.random.Generator, lesion: bool) -> dict[str, Any]:
    """Random-ish head geometry shared by every image of one session."""
    coords = _grid(shape)
    jitter = rng.uniform(-0.04, 0.04, 3)
    radii = np.array([0.72, 0.78, 0.70]) * rng.uniform(0.95, 1.05, 3)
    brain = _ellipsoid(coords, jitter, radii)
    wm = _ellipsoid(coords, jitter, radii * 0.6)
    ventricles = _ellipsoid(coords, jitter + [0.14, 0.05, 0.05], radii * [0.12, 0.3, 0.15]) | _ellipsoid(
        coords, jitter + [-0.14, 0.05, 0.05], radii * [0.12, 0.3, 0.15]
    )
    skull = _ellipsoid(coords, jitter, radii * 1.18) & ~brain
    lesion_mask = np.zeros(shape, bool)
    center = None
    if lesion:
        # a blob in the "white matter", off the midline, away from the ventricles
        direction = np.array([rng.choice([-1.0, 1.0]) * 0.45, rng.uniform(-0.3, 0.3), rng.uniform(0.1, 0.4)])
        center = jitter + direction * radii
        lesion_mask = _ellipsoid(coords, center, [0.16, 0.14, 0.16]) & brain & ~ventricles
    texture = _smooth_noise(rng, shape)
    return {"brain": brain, "wm": wm & brain, "csf": ventricles & brain, "skull": skull,
            "lesion": lesion_mask, "texture": texture, "lesion_center": center,
            "gain": float(rng.uniform(0.85, 1.15))}


def render(anatomy: Mapping[str, Any], modality: str, rng: np.random.Generator, skull: bool) -> np.ndarray:
    """int16 image of one contrast; background exactly 0 (unless ``skull``)."""
    _bg, gm, wm, csf, lesion = CONTRASTS[modality]
    data = np.zeros(anatomy["brain"].shape, np.float32)
    data[anatomy["brain"]] = gm
    data[anatomy["wm"]] = wm
    data[anatomy["csf"]] = csf
    data[anatomy["lesion"]] = lesion
    noise = rng.standard_normal(data.shape).astype(np.float32)
    data = np.where(anatomy["brain"], data * (1 + 0.12 * anatomy["texture"]) + 15.0 * noise, 0.0)
    if skull:
        data[anatomy["skull"]] = 900.0 + 40.0 * noise[anatomy["skull"]]
    return np.clip(data * anatomy["gain"], 0, 32000).round().astype(np.int16)


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    for axis in range(3):
        out |= np.roll(mask, 1, axis) | np.roll(mask, -1, axis)
    return out


def _acq_for(acq: str | Mapping[str, str] | None, modality: str) -> str | None:
    if isinstance(acq, Mapping):
        return acq.get(modality)
    return acq


def image_name(subject: str, session: str | None, modality: str, acq: str | None = None,
               run: int | None = None) -> str:
    parts = [f"sub-{subject}"]
    if session:
        parts.append(f"ses-{session}")
    if acq:
        parts.append(f"acq-{acq}")
    if run is not None:
        parts.append(f"run-{run}")
    return "_".join([*parts, modality])


def write_raw_metadata(root: Path, subjects: Sequence[str], sessions: Sequence[str] | None,
                       doi: str | None = None, license: str | None = "CC0") -> None:
    description = {"Name": "cg3d synthetic test dataset", "BIDSVersion": BIDS_VERSION, "DatasetType": "raw",
                   "Authors": ["cg3d tests", "synthetic data"]}
    if license:
        description["License"] = license
    if doi:
        description["DatasetDOI"] = doi
    write_json(root / "dataset_description.json", description)
    (root / "README").write_text("Synthetic BIDS dataset written by cg3d's tests (tests/bids_fixtures.py).\n")
    rows = ["participant_id\tage\tsex"] + [f"sub-{s}\t{30 + i}\t{'MF'[i % 2]}" for i, s in enumerate(subjects)]
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    write_json(root / "participants.json", {
        "participant_id": {"Description": "Participant identifier"},
        "age": {"Description": "Age at first session", "Units": "year"},
        "sex": {"Description": "Sex", "Levels": {"M": "male", "F": "female"}},
    })
    if sessions:
        for subject in subjects:
            lines = ["session_id"] + [f"ses-{ses}" for ses in sessions]
            (root / f"sub-{subject}" / f"sub-{subject}_sessions.tsv").parent.mkdir(parents=True, exist_ok=True)
            (root / f"sub-{subject}" / f"sub-{subject}_sessions.tsv").write_text("\n".join(lines) + "\n")


def write_derivative_description(root: Path, name: str, raw_link: str = "../..") -> None:
    write_json(root / "dataset_description.json", {
        "Name": f"{name} (synthetic)", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
        "GeneratedBy": [{"Name": name, "Version": "0.0.0"}], "DatasetLinks": {"raw": raw_link},
    })


def make_bids_dataset(
    root: str | Path,
    subjects: Sequence[str] = ("01", "02", "03"),
    sessions: Sequence[str] | None = None,
    modalities: Sequence[str] = ("T1w", "T2w"),
    with_masks: bool = True,
    shape: Sequence[int] = (20, 24, 20),
    seed: int = 0,
    lesion_subjects: Sequence[str] = (),
    *,
    voxel_size: Sequence[float] = (7.0, 7.0, 7.0),
    orientation: str = "RAS",
    acq: str | Mapping[str, str] | None = None,
    runs: int | None = None,
    mask_level: str = "auto",
    masks_dir: str | Path | None = None,
    masks_name: str = "masks",
    with_lesion_masks: bool = False,
    skull: bool = False,
    doi: str | None = None,
    license: str | None = "CC0",
) -> dict[str, Any]:
    """Write a raw BIDS dataset (and a brain-mask derivative) under ``root``; return its paths.

    Parameters (beyond the obvious)
    -------------------------------
    sessions : ``None`` for a session-less layout, else labels (every subject gets every session).
    modalities : suffixes among T1w, T2w, FLAIR; all images of a session share grid and anatomy.
    lesion_subjects : subjects whose images carry a bright lesion blob (in every session).
    acq : an ``acq`` label for every image, or a dict modality -> label (missing = no acq).
    runs : ``None`` (no run entity) or a number of runs (``run-1`` ... ``run-<runs>``).
    mask_level : where ``desc-brain_mask`` files go in the derivative: ``"session"`` (one per
        session), ``"subject"`` (one per subject, no ``ses``), ``"both"`` (session-specific ones
        plus a subject-level one, dilated by one voxel so the two are distinguishable), or
        ``"auto"`` (session-specific when there are sessions).
    masks_dir : the mask derivative folder (default ``<root>/derivatives/<masks_name>``).
    with_lesion_masks : also write ``derivatives/lesions`` with ``<sub>[_ses]_label-lesion_mask``
        ground truth for every session (empty for healthy subjects).
    skull : add a bright skull shell outside the brain (then ``nonzero`` masks are too large).

    Returns
    -------
    dict with ``bids_dir`` (Path), ``masks_dir`` (Path or None), ``lesions_dir`` (Path or None),
    ``images`` (modality -> list of Paths, sorted), ``masks`` / ``subject_masks`` / ``lesion_masks``
    (``"sub-01[_ses-a]"`` -> Path), ``brain`` (same keys -> bool array of the brain) and
    ``lesion_centers`` (same keys -> normalised centre or None).
    """
    root = Path(root)
    subjects = [s.removeprefix("sub-") for s in subjects]
    sessions = [s.removeprefix("ses-") for s in sessions] if sessions else None
    lesion_subjects = {s.removeprefix("sub-") for s in lesion_subjects}
    if mask_level == "auto":
        mask_level = "session" if sessions else "subject"
    if mask_level not in {"session", "subject", "both"}:
        raise ValueError(f"mask_level {mask_level!r}")
    masks_root = Path(masks_dir) if masks_dir else root / "derivatives" / masks_name
    lesions_root = root / "derivatives" / "lesions"
    affine = make_affine(shape, voxel_size, orientation)

    write_raw_metadata(root, subjects, sessions, doi=doi, license=license)
    if with_masks:
        write_derivative_description(masks_root, "synthstrip")
    if with_lesion_masks:
        write_derivative_description(lesions_root, "manual")

    result: dict[str, Any] = {
        "bids_dir": root, "masks_dir": masks_root if with_masks else None,
        "lesions_dir": lesions_root if with_lesion_masks else None,
        "images": {m: [] for m in modalities}, "masks": {}, "subject_masks": {}, "lesion_masks": {},
        "brain": {}, "lesion_centers": {},
    }
    run_labels = [None] if runs is None else list(range(1, runs + 1))
    for s_index, subject in enumerate(subjects):
        for ses_index, session in enumerate(sessions or [None]):
            rng = np.random.default_rng([seed, s_index, ses_index])
            anatomy = subject_anatomy(shape, rng, lesion=subject in lesion_subjects)
            key = f"sub-{subject}" + (f"_ses-{session}" if session else "")
            anat = root / f"sub-{subject}" / (f"ses-{session}" if session else "") / "anat"
            for modality in modalities:
                for run in run_labels:
                    name = image_name(subject, session, modality, _acq_for(acq, modality), run)
                    data = render(anatomy, modality, rng, skull)
                    result["images"][modality].append(save_nifti(anat / f"{name}.nii.gz", data, affine))
                    write_json(anat / f"{name}.json", {"MagneticFieldStrength": 3, "Manufacturer": "Synthetic"})
            result["brain"][key] = anatomy["brain"]
            result["lesion_centers"][key] = anatomy["lesion_center"]
            if with_masks and (mask_level in {"session", "both"} or session is None):
                rel = Path(f"sub-{subject}") / (f"ses-{session}" if session else "") / "anat"
                path = masks_root / rel / f"{key}_desc-brain_mask.nii.gz"
                result["masks"][key] = save_nifti(path, anatomy["brain"].astype(np.uint8), affine)
                write_json(path.with_name(path.name.replace(".nii.gz", ".json")), {"Type": "Brain"})
            if with_lesion_masks:
                rel = Path(f"sub-{subject}") / (f"ses-{session}" if session else "") / "anat"
                path = lesions_root / rel / f"{key}_label-lesion_mask.nii.gz"
                result["lesion_masks"][key] = save_nifti(path, anatomy["lesion"].astype(np.uint8), affine)
                write_json(path.with_name(path.name.replace(".nii.gz", ".json")), {"Type": "Lesion"})
        if with_masks and sessions and mask_level in {"subject", "both"}:
            first = result["brain"][f"sub-{subject}_ses-{sessions[0]}"]
            brain = _dilate(first) if mask_level == "both" else first
            path = masks_root / f"sub-{subject}" / "anat" / f"sub-{subject}_desc-brain_mask.nii.gz"
            result["subject_masks"][f"sub-{subject}"] = save_nifti(path, brain.astype(np.uint8), affine)
            write_json(path.with_name(path.name.replace(".nii.gz", ".json")), {"Type": "Brain"})
    for modality in modalities:
        result["images"][modality].sort()
    if not sessions:
        result["subject_masks"] = dict(result["masks"])
    return result


def add_image(bids_dir: str | Path, subject: str, modality: str, *, session: str | None = None,
              acq: str | None = None, run: int | None = None, shape: Sequence[int] = (20, 24, 20),
              voxel_size: Sequence[float] = (7.0, 7.0, 7.0), seed: int = 0) -> Path:
    """Add one more image (e.g. an extra run or a new subject) to an existing dataset."""
    rng = np.random.default_rng([seed, 999])
    anatomy = subject_anatomy(shape, rng, lesion=False)
    name = image_name(subject, session, modality, acq, run)
    anat = Path(bids_dir) / f"sub-{subject}" / (f"ses-{session}" if session else "") / "anat"
    write_json(anat / f"{name}.json", {"MagneticFieldStrength": 3})
    return save_nifti(anat / f"{name}.nii.gz", render(anatomy, modality, rng, False),
                      make_affine(shape, voxel_size))


def make_fake_outputs(out_dir: str | Path, records: Sequence[Any], *, bids_dir: str | Path,
                      derivatives: Mapping[str, str | Path] | None = None, version: str = "0.1.0",
                      threshold: float = 0.5, seed: int = 0) -> dict[str, Any]:
    """A complete cg3d output tree written with cg3d's own writers, without running the method.

    Per record: random probseg in [0, 1] inside the brain, its thresholded mask, the brain mask
    (all built from the source header), the three sidecars, SVG figures, ``sub-<l>.html``; per
    modality the group table/dictionary/HTML; dataset files and ``logs/CITATION.md``. Returns
    ``{"out_dir", "outputs": {bids_name: output_paths}, "groups": {modality: (tsv, json)}}``.
    """
    from cg3d_bids.atomic import write_json as atomic_json
    from cg3d_bids.atomic import write_nifti, write_text
    from cg3d_bids.bids.derivatives import (anomaly_mask_sidecar, brain_mask_sidecar, probseg_sidecar,
                                            write_bidsignore, write_dataset_description, write_readme)
    from cg3d_bids.bids.group_table import write_group_table
    from cg3d_bids.bids.naming import group_paths, output_paths

    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    model = {"version": version, "encoder": "test-tiny-vit", "weights_sha256": "0" * 64,
             "config_hash": "abc123", "threshold": threshold, "run_id": "x"}
    outputs, rows = {}, {}
    svg = '<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"><rect width="4" height="4"/></svg>\n'
    for rec in records:
        source = nib.load(str(rec.path))
        brain = np.asarray(nib.load(str(rec.mask_path)).dataobj) > 0 if rec.mask_path else (
            np.asarray(source.dataobj) > 0)
        probseg = np.where(brain, rng.uniform(0, 1, brain.shape), 0).astype(np.float32)
        paths = output_paths(rec, out_dir)
        for key, data in (("probseg", probseg), ("anomaly_mask", (probseg > threshold).astype(np.uint8)),
                          ("brain_mask", brain.astype(np.uint8))):
            header = source.header.copy()
            header.set_data_dtype(data.dtype)
            header.set_xyzt_units("mm")
            write_nifti(paths[key], nib.Nifti1Image(data, source.affine, header))
        atomic_json(paths["probseg_json"], probseg_sidecar(rec, transform={"ScoreTransform": "identity"}, model=model))
        atomic_json(paths["anomaly_mask_json"], anomaly_mask_sidecar(rec, threshold, model=model))
        atomic_json(paths["brain_mask_json"], brain_mask_sidecar(rec, model=model))
        for key in ("figure_probseg", "figure_brain_mask"):
            write_text(paths[key], svg)
        write_text(paths["subject_report"], f"<html><body>sub-{rec.subject}</body></html>\n")
        outputs[rec.bids_name] = paths
        rows.setdefault(rec.modality, []).append({
            "participant_id": f"sub-{rec.subject}", "session_id": f"ses-{rec.session}" if rec.session else None,
            "bids_name": rec.bids_name, "source": f"bids:raw:{rec.relpath}", "mask_source": rec.mask_source,
            "score_max": float(probseg.max()), "score_top1pct": float(np.quantile(probseg[brain], 0.99)),
            "anomaly_volume_mm3": float((probseg > threshold).sum() * np.prod(source.header.get_zooms()[:3])),
            "n_components": 1, "brain_volume_mm3": float(brain.sum() * np.prod(source.header.get_zooms()[:3])),
            "flagged": bool(probseg.max() > 0.99), "status": "ok", "error": None,
        })
    groups = {}
    for modality, mod_rows in rows.items():
        groups[modality] = write_group_table(out_dir, modality, mod_rows, model)
        write_text(group_paths(modality, out_dir)["html"], f"<html><body>{modality}</body></html>\n")
    write_dataset_description(out_dir, bids_dir=bids_dir, version=version, derivatives=derivatives)
    write_bidsignore(out_dir)
    write_readme(out_dir, version=version)
    write_text(out_dir / "logs" / "CITATION.md", "Cite cg3d.\n")
    return {"out_dir": out_dir, "outputs": outputs, "groups": groups}
