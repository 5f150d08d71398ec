#!/usr/bin/env python
"""Build the cg3d accuracy benchmark: a BIDS dataset with brain masks and lesion masks.

    python benchmarks/accuracy/build_dataset.py OUT [--resolution 2] [--n-synthetic 24] [--seed 0]

writes ``OUT/`` (raw BIDS), ``OUT/derivatives/masks`` (``sub-X_desc-brain_mask``) and
``OUT/derivatives/lesions`` (``sub-X_label-lesion_mask`` + ``participants.tsv`` with a ``lesion``
column for ``cg3d evaluate --patient-labels``), from the offline data in /work/shared/data.

Cohorts (``participants.tsv`` says which subject is which):

* real patients: open_ms_data (2 MS, expert lesion masks), brainles_tcga_lgg (2 gliomas, fused
  algorithm segmentation), brats2023_examples (2, no voxel ground truth), arc_m2265_t2 (1 stroke,
  T2w only, no voxel ground truth), niivue_demo FLAIR (1 lesion, FLAIR only; its rough drawing is
  NOT used as ground truth). Patients without a voxel mask are patient-level positives only.
* real healthy T1w: chris (niivue), IXI012, IXI015, Colin27, MNI152NLin6Asym, MNI152 2009a sym
  (the last three are averages/templates). Their T2w and FLAIR are SYNTHETIC (see below); an empty
  lesion mask marks them healthy.
* semi-synthetic (``syn01``...): one of the six healthy T1w bases per subject, each with its own
  smooth random deformation (random rotation <= 5 deg, scaling +-5 %, plus a smooth displacement of
  2-5 mm maximum drawn on a 5^3 control grid and upsampled cubically), and, for every other subject,
  a REAL acute-stroke lesion shape from soop_lesion_masks (MNI space) placed by matching the MNI152
  brain bounding box to the subject's brain bounding box (a per-axis affine), restricted to the
  brain. Lesion volumes are stratified over the SOOP range (masks > 200 mL are skipped).

Intensity models (documented, deterministic given ``--seed``):

* synthetic T2w/FLAIR contrast from T1w: tissue classes by 3-class k-means on the brain intensities
  (centres c_csf < c_gm < c_wm); with ``u = I_T1 / c_wm`` the new image is a piecewise-linear
  function of ``u`` through the class centres, linearly extrapolated and clipped to [0.02, 1.3]:
  T2w: (u_csf -> 1.00, u_gm -> 0.55, 1 -> 0.35), i.e. monotone decreasing (contrast inverted);
  FLAIR: (u_csf -> 0.12, u_gm -> 0.62, 1 -> 0.45) (dark CSF, GM > WM; not monotone). This is a
  crude synthetic contrast, NOT a real T2w/FLAIR: it has the T1w's anatomy, noise and partial
  volumes, and none of the real contrasts' physics.
* lesions (soft edge ``s`` = lesion mask smoothed by a Gaussian of sigma 1 mm, clipped to [0, 1],
  zero outside the brain): T2w and FLAIR hyperintense ``I * (1 + a s)``, ``a ~ U(0.4, 0.9)``; T1w
  hypointense ``I * (1 - b s)``, ``b ~ U(0.3, 0.6)``; drawn per subject and modality.
* every synthetic or semi-synthetic image then gets its own multiplicative bias field
  ``exp(f)`` (smooth, 4^3 control grid, max |f| ~ U(0.05, 0.2)) and Gaussian noise inside the brain
  (sigma ~ U(0.01, 0.03) x the 99th brain percentile); background stays 0.

Everything is resampled to ``--resolution`` mm isotropic (default 2 mm for CPU runs; 1 for full
resolution), RAS, cropped to the brain bounding box plus a margin. Images: linear interpolation;
masks: linear then >= 0.5.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.processing import resample_to_output
from scipy import ndimage

DATA = Path("/work/shared/data")
MODALITIES = ("T1w", "T2w", "FLAIR")
T2W_POINTS = (1.00, 0.55, 0.35)  # values at (csf, gm, wm) centres
FLAIR_POINTS = (0.12, 0.62, 0.45)
INTENSITY_SCALE = 1000.0
MAX_SOOP_ML = 200.0


# ------------------------------------------------------------------------------------------------
# inventory of the real data
@dataclass
class RealSubject:
    label: str
    group: str  # patient | healthy
    condition: str
    source: str
    images: dict[str, Path]
    brainmask: Path
    lesion: Path | None = None  # voxel ground truth
    licence: str = ""
    notes: str = ""
    synthetic_contrasts: list[str] = field(default_factory=list)


def real_subjects(data: Path = DATA) -> list[RealSubject]:
    """The real subjects of /work/shared/data (see the module docstring)."""
    subs = []
    for pid in ("07", "26"):
        d = data / "open_ms_data" / f"patient{pid}"
        subs.append(RealSubject(f"msp{pid}", "patient", "multiple sclerosis", f"open_ms_data/patient{pid}",
                                {m: d / f"{m}.nii.gz" for m in MODALITIES}, d / "brainmask.nii.gz",
                                d / "lesion.nii.gz", "CC-BY (Lesjak et al. 2017)"))
    for case in ("TCGA-DU-7294", "TCGA-FG-6692"):
        d = data / "brainles_tcga_lgg" / case
        subs.append(RealSubject("lgg" + case[5:].replace("-", "").lower(), "patient", "lower-grade glioma",
                                f"brainles_tcga_lgg/{case}", {m: d / f"{m}.nii.gz" for m in MODALITIES},
                                d / "brainmask.nii.gz", d / "lesion.nii.gz", "CC BY 3.0 (TCIA)",
                                "lesion = fused algorithm segmentation, not manual"))
    for case in ("BraTS-GLI-00001-000", "BraTS-MET-00110-000"):
        d = data / "brats2023_examples" / case
        subs.append(RealSubject("brats" + case.split("-")[1].lower() + case.split("-")[2], "patient",
                                "glioma" if "GLI" in case else "metastases", f"brats2023_examples/{case}",
                                {m: d / f"{m}.nii.gz" for m in MODALITIES}, d / "brainmask.nii.gz", None,
                                "BraTS 2023 terms (unverified)", "no voxel ground truth"))
    d = data / "arc_m2265_t2"
    subs.append(RealSubject("arcm2265", "patient", "chronic stroke", "arc_m2265_t2", {"T2w": d / "T2w.nii.gz"},
                            d / "brainmask.nii.gz", None, "CC0", "no voxel ground truth"))
    d = data / "niivue_demo"
    subs.append(RealSubject("niivueflair", "patient", "stroke-like lesion", "niivue_demo/FLAIR.nii.gz",
                            {"FLAIR": d / "FLAIR.nii.gz"}, d / "brainmask.nii.gz", None, "BSD-2-Clause",
                            "no voxel ground truth (the rough drawing is not used)"))
    for label, t1, mask, src, lic in healthy_bases(data):
        subs.append(RealSubject(label, "healthy", "healthy", src, {"T1w": t1}, mask, None, lic,
                                synthetic_contrasts=["T2w", "FLAIR"]))
    return subs


def healthy_bases(data: Path = DATA) -> list[tuple[str, Path, Path, str, str]]:
    """(label, T1w, brain mask, source, licence) of the healthy T1w scans and templates."""
    ht, ixi, nv = data / "healthy_templates", data / "ixi_small_t1", data / "niivue_demo"
    return [
        ("chris", nv / "chris_T1w.nii.gz", nv / "chris_brainmask.nii.gz", "niivue_demo/chris_T1w", "BSD-2-Clause"),
        ("ixi012", ixi / "IXI012-HH-1211_T1w.nii.gz", ixi / "IXI012-HH-1211_brainmask.nii.gz",
         "ixi_small_t1/IXI012", "CC BY-SA 3.0"),
        ("ixi015", ixi / "IXI015-HH-1258_T1w.nii.gz", ixi / "IXI015-HH-1258_brainmask.nii.gz",
         "ixi_small_t1/IXI015", "CC BY-SA 3.0"),
        ("colin27", ht / "Colin27_ch2_T1w.nii.gz", ht / "Colin27_ch2_brainmask.nii.gz",
         "healthy_templates/Colin27 (27-scan average)", "MNI notice"),
        ("mni152nlin6", ht / "MNI152NLin6Asym_1mm_T1w.nii.gz", ht / "MNI152NLin6Asym_1mm_brainmask.nii.gz",
         "healthy_templates/MNI152NLin6Asym (template)", "MNI notice"),
        ("mni152sym09a", ht / "MNI152_2009a_sym_1mm_T1w.nii.gz", ht / "MNI152_2009a_sym_1mm_brainmask.nii.gz",
         "healthy_templates/MNI152 2009a sym (template)", "MNI notice"),
    ]


# ------------------------------------------------------------------------------------------------
# grids
@dataclass
class Grid:
    shape: tuple[int, int, int]
    affine: np.ndarray


def _resample(img, res: float, order: int) -> nib.Nifti1Image:
    img = nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)
    return resample_to_output(img, voxel_sizes=(res, res, res), order=order, cval=0.0)


def subject_grid(mask_img, res: float, margin_mm: float) -> tuple[Grid, np.ndarray]:
    """RAS grid at ``res`` mm around the brain bounding box (+ margin) and the mask on it."""
    full = _resample(mask_img, res, 1)
    mask = np.asarray(full.dataobj) >= 0.5
    idx = np.argwhere(mask)
    pad = int(np.ceil(margin_mm / res))
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + pad + 1, mask.shape)
    affine = full.affine.copy()
    affine[:3, 3] = full.affine[:3, :3] @ lo + full.affine[:3, 3]
    return Grid(tuple(int(x) for x in hi - lo), affine), mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]


def to_grid(img, grid: Grid, order: int = 1) -> np.ndarray:
    """Resample ``img`` onto ``grid`` (world coordinates; 0 outside)."""
    from nibabel.processing import resample_from_to

    img = nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)
    return np.asarray(resample_from_to(img, (grid.shape, grid.affine), order=order, cval=0.0).dataobj,
                      dtype=np.float32)


# ------------------------------------------------------------------------------------------------
# random smooth fields
def smooth_noise(shape: tuple[int, ...], n_ctrl: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise on an ``n_ctrl``^3 grid, upsampled cubically to ``shape``, scaled to max |.| = 1."""
    coarse = rng.standard_normal((n_ctrl,) * 3)
    field_ = ndimage.zoom(coarse, [s / n_ctrl for s in shape], order=3, grid_mode=True, mode="reflect")
    field_ = field_[: shape[0], : shape[1], : shape[2]]
    if field_.shape != tuple(shape):
        field_ = np.pad(field_, [(0, s - f) for s, f in zip(shape, field_.shape)], mode="edge")
    return field_ / max(np.abs(field_).max(), 1e-6)


def random_deformation(shape: tuple[int, int, int], res: float, rng: np.random.Generator) -> np.ndarray:
    """Source voxel coordinates (3, *shape) of a small random affine + smooth elastic deformation."""
    angles = np.deg2rad(rng.uniform(-5, 5, 3))
    rot = np.eye(3)
    for axis, a in enumerate(angles):
        c, s = np.cos(a), np.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = rot @ r
    matrix = rot @ np.diag(rng.uniform(0.95, 1.05, 3))
    centre = (np.asarray(shape) - 1) / 2.0
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1)
    coords = matrix @ (grid - centre[:, None]) + centre[:, None]
    amplitude = rng.uniform(2.0, 5.0) / res  # max displacement in voxels
    for k in range(3):
        coords[k] += amplitude * smooth_noise(shape, 5, rng).ravel()
    return coords.reshape(3, *shape).astype(np.float32)


def warp(data: np.ndarray, coords: np.ndarray, order: int) -> np.ndarray:
    return ndimage.map_coordinates(data, coords, order=order, mode="constant", cval=0.0).astype(np.float32)


def bias_field(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Multiplicative bias ``exp(f)``, f smooth with max |f| ~ U(0.05, 0.2)."""
    return np.exp(rng.uniform(0.05, 0.2) * smooth_noise(shape, 4, rng)).astype(np.float32)


def add_noise(img: np.ndarray, brain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise inside the brain, sigma ~ U(0.01, 0.03) x the 99th brain percentile; >= 0."""
    sigma = rng.uniform(0.01, 0.03) * float(np.percentile(img[brain], 99))
    out = img + sigma * rng.standard_normal(img.shape).astype(np.float32)
    return np.where(brain, np.maximum(out, 0.0), 0.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# contrasts and lesions
def tissue_centres(t1: np.ndarray, brain: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float]:
    """3-class k-means centres (csf, gm, wm) of the brain intensities of a T1w."""
    from sklearn.cluster import KMeans

    values = t1[brain]
    sample = rng.choice(values, size=min(20_000, values.size), replace=False).reshape(-1, 1)
    km = KMeans(n_clusters=3, n_init=3, random_state=int(rng.integers(1 << 31))).fit(sample)
    c = np.sort(km.cluster_centers_.ravel())
    return float(c[0]), float(c[1]), float(c[2])


def synth_contrast(t1: np.ndarray, brain: np.ndarray, centres: tuple[float, float, float],
                   points: tuple[float, float, float]) -> np.ndarray:
    """Piecewise-linear map of ``u = T1 / c_wm`` through the class centres (module docstring)."""
    xs = np.array(centres) / centres[2]
    ys = np.array(points)
    u = t1 / centres[2]
    lo_slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
    hi_slope = (ys[2] - ys[1]) / (xs[2] - xs[1])
    out = np.interp(u, xs, ys)
    out = np.where(u < xs[0], ys[0] + lo_slope * (u - xs[0]), out)
    out = np.where(u > xs[2], ys[2] + hi_slope * (u - xs[2]), out)
    return np.where(brain, np.clip(out, 0.02, 1.3) * INTENSITY_SCALE, 0.0).astype(np.float32)


def soft_lesion(lesion: np.ndarray, brain: np.ndarray, res: float) -> np.ndarray:
    """Soft lesion edge: Gaussian-smoothed mask (sigma 1 mm), clipped to [0, 1], 0 outside the brain."""
    soft = ndimage.gaussian_filter(lesion.astype(np.float32), sigma=1.0 / res)
    soft = np.maximum(soft, 0.5 * lesion)  # keep tiny lesions visible
    return np.where(brain, np.clip(soft / max(soft.max(), 1e-6), 0, 1), 0).astype(np.float32)


def apply_lesion(img: np.ndarray, soft: np.ndarray, modality: str,
                 rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """T2w/FLAIR: ``I (1 + a s)``, a ~ U(0.4, 0.9); T1w: ``I (1 - b s)``, b ~ U(0.3, 0.6)."""
    if modality == "T1w":
        b = rng.uniform(0.3, 0.6)
        return (img * (1.0 - b * soft)).astype(np.float32), -b
    a = rng.uniform(0.4, 0.9)
    return (img * (1.0 + a * soft)).astype(np.float32), a


def soop_candidates(data: Path = DATA) -> list[tuple[Path, float]]:
    """SOOP masks with their volume in mL (<= MAX_SOOP_ML), sorted by volume."""
    out = []
    for path in sorted((data / "soop_lesion_masks" / "masks").glob("*.nii.gz")):
        img = nib.load(str(path))
        vol = float(np.count_nonzero(np.asarray(img.dataobj))) * abs(np.linalg.det(img.affine[:3, :3])) / 1000
        if 0 < vol <= MAX_SOOP_ML:
            out.append((path, vol))
    return sorted(out, key=lambda t: t[1])


def world_bbox(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argwhere(mask)
    corners = np.array([idx.min(0), idx.max(0)], dtype=float)
    world = nib.affines.apply_affine(affine, corners)
    return world.min(0), world.max(0)


def place_lesion(soop_path: Path, brain: np.ndarray, grid: Grid, mni_bbox) -> np.ndarray:
    """SOOP lesion on the subject grid: subject brain bbox -> MNI brain bbox (per axis) -> SOOP voxel."""
    soop = nib.load(str(soop_path))
    s_lo, s_hi = world_bbox(brain, grid.affine)
    m_lo, m_hi = mni_bbox
    vox = np.indices(grid.shape, dtype=np.float32).reshape(3, -1)
    world = grid.affine[:3, :3] @ vox + grid.affine[:3, 3:4]
    mni = m_lo[:, None] + (world - s_lo[:, None]) / (s_hi - s_lo)[:, None] * (m_hi - m_lo)[:, None]
    inv = np.linalg.inv(soop.affine)
    src = inv[:3, :3] @ mni + inv[:3, 3:4]
    data = np.asarray(soop.dataobj, dtype=np.float32)
    lesion = ndimage.map_coordinates(data, src, order=1, mode="constant", cval=0.0).reshape(grid.shape) >= 0.5
    return lesion & brain


# ------------------------------------------------------------------------------------------------
# writing
def save(path: Path, data: np.ndarray, affine: np.ndarray, dtype=np.float32, sidecar: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.header.set_xyzt_units("mm")
    img.to_filename(str(path))
    if sidecar is not None:
        path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(sidecar, indent=2) + "\n")


def _description(name: str, derivative: bool) -> dict:
    out = {"Name": name, "BIDSVersion": "1.10.0",
           "DatasetType": "derivative" if derivative else "raw",
           "License": "mixed: see participants.tsv (licence column)"}
    if derivative:
        out["GeneratedBy"] = [{"Name": "cg3d-benchmark-build",
                               "Description": "benchmarks/accuracy/build_dataset.py"}]
    return out


class Writer:
    """Writes images and masks of one subject into the three datasets."""

    def __init__(self, root: Path):
        self.root = root
        self.masks = root / "derivatives" / "masks"
        self.lesions = root / "derivatives" / "lesions"
        self.participants: list[dict] = []

    def image(self, label: str, mod: str, data: np.ndarray, grid: Grid, sidecar: dict) -> None:
        save(self.root / f"sub-{label}" / "anat" / f"sub-{label}_{mod}.nii.gz", data, grid.affine,
             sidecar=sidecar)

    def brain(self, label: str, mask: np.ndarray, grid: Grid) -> None:
        save(self.masks / f"sub-{label}" / "anat" / f"sub-{label}_desc-brain_mask.nii.gz", mask, grid.affine,
             np.uint8, {"Type": "Brain"})

    def lesion(self, label: str, mask: np.ndarray, grid: Grid, description: str) -> None:
        save(self.lesions / f"sub-{label}" / "anat" / f"sub-{label}_label-lesion_mask.nii.gz", mask,
             grid.affine, np.uint8, {"Type": "Lesion", "Description": description})

    def finish(self, argv: list[str]) -> None:
        for name, path, deriv in (("cg3d accuracy benchmark", self.root, False),
                                  ("brain masks", self.masks, True), ("lesion masks", self.lesions, True)):
            path.mkdir(parents=True, exist_ok=True)
            (path / "dataset_description.json").write_text(json.dumps(_description(name, deriv), indent=2) + "\n")
        cols = ["participant_id", "group", "cohort", "lesion", "voxel_ground_truth", "condition", "source",
                "modalities", "synthetic_contrasts", "licence", "notes"]
        for path in (self.root / "participants.tsv", self.lesions / "participants.tsv"):
            with open(path, "w", newline="") as fh:
                w = csv.DictWriter(fh, cols, delimiter="\t", lineterminator="\n", extrasaction="ignore")
                w.writeheader()
                for row in self.participants:
                    w.writerow({k: ("n/a" if row.get(k) in (None, "") else row[k]) for k in cols})
        (self.root / "README").write_text(
            "cg3d accuracy benchmark, built by benchmarks/accuracy/build_dataset.py\n"
            f"command: {' '.join(argv)}\n\n"
            "Real patients and real healthy T1w scans from /work/shared/data, plus a semi-synthetic cohort\n"
            "(sub-syn*: deformed healthy T1w bases with real SOOP stroke lesion shapes).\n"
            "ALL healthy T2w and FLAIR images here are SYNTHETIC (computed from T1w by a tissue-class\n"
            "intensity map); see the docstring of build_dataset.py and participants.tsv.\n")


# ------------------------------------------------------------------------------------------------
def build_real(subject: RealSubject, writer: Writer, res: float, rng: np.random.Generator) -> None:
    grid, brain = subject_grid(nib.load(str(subject.brainmask)), res, margin_mm=8.0)
    writer.brain(subject.label, brain, grid)
    t1 = None
    for mod, path in subject.images.items():
        data = np.where(brain, np.maximum(to_grid(nib.load(str(path)), grid, 1), 0.0), 0.0)
        if mod == "T1w":
            t1 = data
        writer.image(subject.label, mod, data, grid, {"Description": f"real {mod} from {subject.source}",
                                                        "Synthetic": False})
    if subject.synthetic_contrasts and t1 is not None:
        centres = tissue_centres(t1, brain, rng)
        for mod in subject.synthetic_contrasts:
            img = synth_contrast(t1, brain, centres, T2W_POINTS if mod == "T2w" else FLAIR_POINTS)
            img = add_noise(img * bias_field(grid.shape, rng), brain, rng)
            writer.image(subject.label, mod, img, grid, {
                "Description": f"SYNTHETIC {mod}-like contrast computed from the real T1w of "
                f"{subject.source} (tissue-class piecewise-linear map, bias, noise); not a real {mod}",
                "Synthetic": True, "TissueCentresT1": centres})
    if subject.lesion is not None:
        lesion = (to_grid(nib.load(str(subject.lesion)), grid, 1) >= 0.5) & brain
        writer.lesion(subject.label, lesion, grid, f"resampled lesion mask of {subject.source}")
    elif subject.group == "healthy":
        writer.lesion(subject.label, np.zeros(grid.shape, np.uint8), grid, "healthy: empty lesion mask")
    writer.participants.append({
        "participant_id": f"sub-{subject.label}", "group": subject.group, "cohort": "real",
        "lesion": int(subject.group == "patient"), "voxel_ground_truth": int(subject.lesion is not None
                                                                             or subject.group == "healthy"),
        "condition": subject.condition, "source": subject.source,
        "modalities": ",".join([*subject.images, *subject.synthetic_contrasts]),
        "synthetic_contrasts": ",".join(subject.synthetic_contrasts), "licence": subject.licence,
        "notes": subject.notes,
    })


def build_synthetic(index: int, base: tuple, lesion_srcs: list[tuple[Path, float]], writer: Writer,
                    res: float, rng: np.random.Generator, mni_bbox) -> None:
    """One semi-synthetic subject; ``lesion_srcs`` = SOOP masks to try in order (empty = healthy)."""
    label = f"syn{index:02d}"
    base_label, t1_path, mask_path, source, licence = base
    grid, brain0 = subject_grid(nib.load(str(mask_path)), res, margin_mm=14.0)
    t10 = np.where(brain0, to_grid(nib.load(str(t1_path)), grid, 1), 0.0).astype(np.float32)
    coords = random_deformation(grid.shape, res, rng)
    brain = warp(brain0.astype(np.float32), coords, 1) >= 0.5
    t1 = np.where(brain, np.maximum(warp(t10, coords, 1), 0.0), 0.0).astype(np.float32)
    lesion, lesion_src = np.zeros(grid.shape, bool), None
    for lesion_src in lesion_srcs:  # a mask can fall outside this brain: take the next one
        lesion = place_lesion(lesion_src[0], brain, grid, mni_bbox)
        if lesion.sum() >= 4:
            break
    soft = soft_lesion(lesion, brain, res) if lesion.any() else None
    centres = tissue_centres(t1, brain, rng)
    strengths = {}
    for mod in MODALITIES:
        img = t1 if mod == "T1w" else synth_contrast(t1, brain, centres, T2W_POINTS if mod == "T2w" else FLAIR_POINTS)
        if soft is not None:
            img, strengths[mod] = apply_lesion(img, soft, mod, rng)
        img = add_noise(img * bias_field(grid.shape, rng), brain, rng)
        writer.image(label, mod, img, grid, {
            "Description": f"SEMI-SYNTHETIC: deformed {base_label} T1w"
            + ("" if mod == "T1w" else f" with a synthetic {mod}-like contrast")
            + (f", real SOOP lesion shape {lesion_src[0].name}" if soft is not None else ", no lesion"),
            "Synthetic": True, "LesionStrength": strengths.get(mod)})
    writer.brain(label, brain, grid)
    writer.lesion(label, lesion, grid, "placed SOOP lesion" if lesion.any() else "healthy: empty lesion mask")
    writer.participants.append({
        "participant_id": f"sub-{label}", "group": "patient" if lesion.any() else "healthy",
        "cohort": "semisynthetic", "lesion": int(lesion.any()), "voxel_ground_truth": 1,
        "condition": "synthetic stroke lesion" if lesion.any() else "healthy",
        "source": f"{source} (deformed)" + (f" + soop {lesion_src[0].name}" if lesion.any() else ""),
        "modalities": ",".join(MODALITIES), "synthetic_contrasts": "T2w,FLAIR", "licence": licence,
        "notes": f"lesion {float(lesion.sum()) * res**3 / 1000:.1f} mL at {res:g} mm" if lesion.any() else "",
    })


def build(out: Path, res: float = 2.0, n_synthetic: int = 24, seed: int = 0, argv: list[str] | None = None) -> Path:
    """Build the whole benchmark dataset into ``out``; returns ``out``."""
    rng = np.random.default_rng(seed)
    writer = Writer(out)
    t0 = time.time()
    for subject in real_subjects():
        build_real(subject, writer, res, rng)
        print(f"  real {subject.label} ({time.time() - t0:.0f} s)", file=sys.stderr)
    mni_mask = nib.load(str(DATA / "healthy_templates" / "MNI152NLin6Asym_1mm_brainmask.nii.gz"))
    mni_bbox = world_bbox(np.asarray(mni_mask.dataobj) > 0, mni_mask.affine)
    candidates = soop_candidates()
    n_lesioned = (n_synthetic + 1) // 2
    picks = [candidates[int(round(q))] for q in np.linspace(0, len(candidates) - 1, max(n_lesioned, 1))]
    rng.shuffle(picks)
    bases = healthy_bases()
    for i in range(n_synthetic):
        srcs = []
        if i % 2 == 0:  # the stratified pick, then its neighbours in volume order
            k = candidates.index(picks[i // 2])
            srcs = [candidates[j] for j in sorted(range(len(candidates)), key=lambda j: abs(j - k))[:10]]
        build_synthetic(i + 1, bases[i % len(bases)], srcs, writer, res, rng, mni_bbox)
        print(f"  synthetic syn{i + 1:02d} ({time.time() - t0:.0f} s)", file=sys.stderr)
    writer.finish(argv or sys.argv)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("out", type=Path, help="folder of the BIDS dataset to create")
    parser.add_argument("--resolution", type=float, default=2.0, help="isotropic voxel size in mm (1 = full)")
    parser.add_argument("--n-synthetic", type=int, default=24, help="semi-synthetic subjects (half lesioned)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} exists and is not empty")
    build(args.out, args.resolution, args.n_synthetic, args.seed, ["build_dataset.py", *(argv or sys.argv[1:])])
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
