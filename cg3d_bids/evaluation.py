"""Evaluation of cg3d outputs against lesion masks: the logic behind ``cg3d evaluate``.

Inputs
    * cg3d outputs in OUTPUT_DIR: ``sub-<l>[/ses-<l>]/anat/<src>_label-anomaly_desc-<mod>_probseg.nii.gz``
      (+ its ``.json`` sidecar) with ``<src>_label-brain_desc-<mod>_mask.nii.gz`` (required: the
      voxels evaluated) and ``<src>_label-anomaly_desc-<mod>_mask.nii.gz`` (optional: the run's own
      binary mask), and ``group_<mod>.tsv`` (subject score ``score_max``; otherwise the maximum of
      the probseg) with its data dictionary ``group_<mod>.json``. ``<src>`` = the *source
      entities*: the source image name without its suffix (``sub-01_ses-02_acq-ax`` for
      ``sub-01_ses-02_acq-ax_T2w``).
    * lesion masks in a BIDS derivatives folder: ``sub-<l>/[ses-<l>/]**/<entities>_<pattern>.nii[.gz]``
      (``gt_pattern``, default ``label-lesion_mask``); any value > 0 is lesion.

Matching rule (ground-truth mask -> cg3d output of modality ``<mod>``): :data:`MATCHING_RULE`
    1. ``sub`` must be equal, and ``ses`` must be equal (both absent, or the same label);
    2. every other entity of the mask (``acq``, ``run``, ``rec``, ...) must be in the output's source
       entities with the same value; so ``sub-01_label-lesion_mask`` matches every modality of
       ``sub-01``, while ``sub-01_acq-ax_label-lesion_mask`` matches only sources with ``acq-ax``;
    3. ``desc-<mod>`` in the mask name restricts it to that modality; other ``desc``, ``space``,
       ``res`` and ``label`` values are ignored;
    4. the most specific match (most entities) wins; two equally specific matches are an error.

Which images count
    * a matched mask gives the voxel truth; patient label = lesioned when the mask (on the probseg
      grid) has any lesion voxel, healthy when it is empty;
    * a patient-labels TSV (columns ``participant_id`` [, ``session_id``] or ``bids_name``, and
      ``lesion`` = 1/0) gives patient labels to images without a mask: lesioned ones enter the
      patient-level metrics only, healthy ones also count as lesion-free at voxel level;
    * images with neither count as healthy only with ``healthy_without_mask``; otherwise they are
      excluded from every metric and listed. Images whose ``status`` in the group TSV is not ``ok``
      are excluded.

Metrics (per modality, :mod:`cg3d_bids.core.metrics`): patient AUROC/AP; voxel AUROC, AP, Dice-max,
its threshold and IoU over the pooled brain voxels (label-brain masks) of all evaluated images, one
threshold for the batch; lesion-wise TPR by lesion volume (lesions = 26-connected components of
mask ∩ brain on the probseg grid; detected when any voxel is predicted), at the Dice-max threshold
and at the run's own binary mask. Masks on another grid are resampled (nearest neighbour, by the
affines) onto the probseg grid. Volumes are streamed one at a time.

Voxel weighting (``voxel_weighting``, default ``volume``): each image keeps its native grid, so a
voxel of a 0.9 mm image covers 0.73 mm^3 and one of a 2 mm image 8 mm^3. With ``volume`` each voxel
counts by its volume in mm^3 (the determinant of the probseg affine), which equals pooling the same
cohort resampled to one common grid (the paper's setting: every image registered to a 1 mm atlas);
``count`` pools plain voxel counts (the behaviour before this option existed), which lets the
finest images dominate. The own binary masks' pooled Dice/IoU are weighted the same way.
Patient-level and lesion-wise metrics do not depend on the weighting.

Test encoder: when any map of a modality was made with the random-weight test encoder (its sidecar
says ``ModelIsTestEncoder: true``, or ``group_<mod>.json`` says ``Provenance.is_test_encoder``),
``is_test_encoder`` is true in the result and every output carries a warning that the numbers mean
nothing.

Outputs: ``eval_<mod>.tsv`` and ``eval_<mod>.json`` (atomic), ``eval_*`` added to an existing
``.bidsignore``, and an evaluation section in ``group_<mod>.html`` when it exists (template
``reports/templates/evaluation.html``).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .atomic import write_json, write_text
from .bids.naming import parse_name
from .settings import MODALITIES
from .bids.group_table import read_group_table
from .core.metrics import (
    DEFAULT_N_BINS,
    DEFAULT_SIZE_EDGES,
    LesionRecord,
    MetricWarning,
    VoxelHistogram,
    dice_iou_from_counts,
    lesion_records,
    lesionwise_tpr,
    patient_metrics,
    voxel_metrics,
)
from .errors import InputDataError, NoInputError, NoMatchError, UsageError
from .reports import insert_evaluation_section
from .reports.subject import render

LOGGER = logging.getLogger("cg3d.evaluate")

#: lesion-mask names end in ``_<pattern>.nii[.gz]`` (BIDS derivatives lesion-mask convention)
DEFAULT_GT_PATTERN = "label-lesion_mask"
#: ``volume``: voxels weighted by their volume in mm^3 (= pooling on one common grid, as in the
#: paper, whose images are all registered to a 1 mm atlas); ``count``: plain voxel counts
VOXEL_WEIGHTINGS = ("volume", "count")
DEFAULT_VOXEL_WEIGHTING = "volume"
#: warn when the Dice-max threshold marks more than this share of the brain as anomalous
DEGENERATE_FRACTION = 0.5
#: pattern added to an existing ``.bidsignore`` of OUTPUT_DIR (eval tables are not BIDS files)
BIDSIGNORE_PATTERN = "eval_*"
#: entities of a lesion-mask name that say what the mask is, not which source image it belongs to
NON_SOURCE_ENTITIES = ("desc", "space", "res", "label")
MATCHING_RULE = (
    "sub and ses equal; every other entity of the lesion mask present with the same value in the "
    "output's source entities (a mask without acq/run/... matches all modalities of that "
    "subject/session); desc-<modality> restricts a mask to that modality; most specific match wins"
)
NIFTI_EXT = (".nii.gz", ".nii")
#: what each voxel counts under each weighting (recorded in the outputs)
WEIGHTING_TEXT = {
    "volume": "each voxel weighted by its volume in mm^3 (as if all images were on one common grid)",
    "count": "each voxel counted once, whatever its size (finer images weigh more)",
}


# ------------------------------------------------------------------------------------------------
# settings
@dataclass(frozen=True)
class EvaluationSettings:
    """What to evaluate and how; every default is that of ``cg3d evaluate``.

    ``eval_dir`` (default: OUTPUT_DIR) receives the tables; the group report and ``.bidsignore``
    are updated only when the tables go into OUTPUT_DIR (and the report only with ``update_report``).
    """

    gt_pattern: str = DEFAULT_GT_PATTERN  #: lesion masks are ``<entities>_<gt_pattern>.nii[.gz]``
    healthy_without_mask: bool = False  #: False: images without ground truth are excluded, not healthy
    patient_labels: Path | None = None  #: optional TSV of patient labels (module docstring)
    modalities: tuple[str, ...] = ()  #: empty = every modality found
    participants: tuple[str, ...] = ()  #: empty = every subject
    n_bins: int = DEFAULT_N_BINS  #: histogram bins (cg3d_bids.core.metrics: quantisation < 1e-3)
    size_edges: tuple[float, ...] = DEFAULT_SIZE_EDGES  #: lesion size bins in mm^3 (paper §4.2)
    voxel_weighting: str = DEFAULT_VOXEL_WEIGHTING  #: "volume" or "count" (module docstring)
    update_report: bool = True  #: add the section to ``group_<mod>.html`` when it exists
    eval_dir: Path | None = None  #: None = OUTPUT_DIR

    def __post_init__(self) -> None:
        if self.n_bins < 2:
            raise UsageError(f"--n-bins must be >= 2, got {self.n_bins}", fix="e.g. --n-bins 10000")
        edges = list(self.size_edges)
        if not edges or sorted(edges) != edges or min(edges) <= 0:
            raise UsageError(f"--size-edges must be positive and increasing, got {edges}",
                             fix="e.g. --size-edges 100 1000")
        if self.voxel_weighting not in VOXEL_WEIGHTINGS:
            raise UsageError(f"--voxel-weighting must be one of {', '.join(VOXEL_WEIGHTINGS)}",
                             fix="use --voxel-weighting volume (default) or count")


# ------------------------------------------------------------------------------------------------
# names and discovery
def prefix_entities(prefix: str) -> dict[str, str]:
    """``sub-01_ses-02_acq-ax`` -> ``{'sub': '01', 'ses': '02', 'acq': 'ax'}`` (parts without a
    value are ignored). A placeholder suffix is added because :func:`parse_name` reads a full name."""
    entities, _suffix = parse_name(f"{prefix}_suffix")
    return {key: value for key, value in entities.items() if key and value}


def _split_nifti(name: str) -> tuple[str, str] | None:
    """``(stem, extension)`` of a NIfTI file name; None for other files."""
    for ext in NIFTI_EXT:
        if name.endswith(ext):
            return name[: -len(ext)], ext
    return None


@dataclass(frozen=True)
class OutputImage:
    """One cg3d output image of a modality."""

    prefix: str  #: source entities, e.g. ``sub-01_ses-02``
    modality: str
    probseg: Path
    brain_mask: Path
    anomaly_mask: Path
    entities: dict[str, str] = field(default_factory=dict)

    @property
    def bids_name(self) -> str:
        """Source image name without extension, e.g. ``sub-01_ses-02_T2w``."""
        return f"{self.prefix}_{self.modality}"

    @property
    def sidecar(self) -> Path:
        """The probseg's JSON sidecar."""
        split = _split_nifti(self.probseg.name)
        stem = split[0] if split else self.probseg.stem
        return self.probseg.with_name(stem + ".json")


def output_image(path: Path) -> OutputImage | None:
    """The :class:`OutputImage` of a ``<src>_label-anomaly_desc-<mod>_probseg.nii[.gz]``; None otherwise."""
    split = _split_nifti(path.name)
    if split is None:
        return None
    stem, ext = split
    entities, suffix = parse_name(path.name)
    modality = entities.get("desc")
    tail = f"_label-anomaly_desc-{modality}_probseg"
    if suffix != "probseg" or not modality or not stem.endswith(tail):
        return None
    prefix = stem[: -len(tail)]
    source = prefix_entities(prefix)
    if not prefix.startswith("sub-") or "sub" not in source:
        return None
    base = path.parent / prefix
    return OutputImage(
        prefix=prefix, modality=modality, probseg=path,
        brain_mask=Path(f"{base}_label-brain_desc-{modality}_mask{ext}"),
        anomaly_mask=Path(f"{base}_label-anomaly_desc-{modality}_mask{ext}"),
        entities=source,
    )


def find_outputs(output_dir: Path) -> dict[str, list[OutputImage]]:
    """cg3d probseg outputs per modality under ``sub-*/[ses-*/]anat/``, sorted by path."""
    found: dict[str, list[OutputImage]] = {}
    candidates = [*output_dir.glob("sub-*/anat/*_probseg.nii*"),
                  *output_dir.glob("sub-*/ses-*/anat/*_probseg.nii*")]
    for path in sorted(candidates):
        image = output_image(path)
        if image is not None:
            found.setdefault(image.modality, []).append(image)
    return found


@dataclass(frozen=True)
class GroundTruth:
    """One lesion mask of the ground-truth derivatives."""

    path: Path
    prefix: str
    entities: dict[str, str]
    modality: str | None  #: from desc-<modality>, else None (all modalities)

    @property
    def source_entities(self) -> dict[str, str]:
        """The entities that must match the output's source entities."""
        return {k: v for k, v in self.entities.items() if k not in NON_SOURCE_ENTITIES}


def find_ground_truth(gt_dir: Path, pattern: str = DEFAULT_GT_PATTERN) -> list[GroundTruth]:
    """Lesion masks ``sub-*/**/<entities>_<pattern>.nii[.gz]`` under ``gt_dir``, sorted by path."""
    masks = []
    for path in sorted(gt_dir.glob("sub-*/**/*")):
        split = _split_nifti(path.name)
        if split is None or not split[0].endswith("_" + pattern) or not path.is_file():
            continue
        prefix = split[0][: -len(pattern) - 1]
        entities = prefix_entities(prefix)
        if "sub" not in entities:
            continue
        desc = entities.get("desc")
        masks.append(GroundTruth(path, prefix, entities, desc if desc in MODALITIES else None))
    return masks


def _specificity(gt: GroundTruth) -> tuple[int, bool]:
    return len(gt.source_entities), gt.modality is not None


def match_ground_truth(image: OutputImage, masks: Sequence[GroundTruth]) -> GroundTruth | None:
    """The lesion mask of ``image`` under :data:`MATCHING_RULE`; None if none matches."""
    ents = image.entities
    candidates = []
    for gt in masks:
        src = gt.source_entities
        if src.get("sub") != ents.get("sub") or src.get("ses") != ents.get("ses"):
            continue
        if gt.modality is not None and gt.modality != image.modality:
            continue
        if all(ents.get(k) == v for k, v in src.items()):
            candidates.append(gt)
    if not candidates:
        return None
    candidates.sort(key=_specificity, reverse=True)
    best = candidates[0]
    if len(candidates) > 1 and _specificity(candidates[1]) == _specificity(best):
        raise InputDataError(
            f"two lesion masks match {image.bids_name} equally well: {best.path.name} and "
            f"{candidates[1].path.name}",
            path=best.path.parent,
            fix="give the masks the source entities (acq-, run-, ...) or desc-<modality> that "
            "tell them apart, or remove one",
        )
    return best


# ------------------------------------------------------------------------------------------------
# tables
def _read_tsv(path: Path, fix: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and non-blank rows of a BIDS TSV (``n/a`` -> None), via ``read_group_table``."""
    try:
        header = path.read_text(encoding="utf-8").splitlines()[:1]
        rows = read_group_table(path) if header else []
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputDataError(f"cannot read {path.name}: {exc}", path=path, fix=fix) from exc
    if not header:
        raise InputDataError(f"{path.name} is empty", path=path, fix=fix)
    rows = [r for r in rows if any(v not in (None, "") for v in r.values())]
    return header[0].split("\t"), rows


@dataclass(frozen=True)
class GroupScore:
    """One row of ``group_<mod>.tsv``: the image's status and subject score."""

    status: str
    score_max: float  #: NaN when missing


def read_group_scores(output_dir: Path, modality: str) -> dict[str, GroupScore] | None:
    """``{source prefix: GroupScore}`` from ``group_<mod>.tsv``; None when the file is absent."""
    path = output_dir / f"group_{modality}.tsv"
    if not path.is_file():
        return None
    fix = "pass the output folder of a cg3d group run, or rerun 'cg3d BIDS OUTPUT_DIR group'"
    columns, rows = _read_tsv(path, fix)
    if "bids_name" not in columns:
        raise InputDataError(f"{path.name} has no bids_name column", path=path, fix=fix)
    out = {}
    for row in rows:
        name = str(row.get("bids_name") or "")
        prefix = name.removesuffix("_" + modality)
        status = str(row.get("status") or "").strip() or "ok"
        score = row.get("score_max")
        out[prefix] = GroupScore(status, float(score) if score is not None else math.nan)
    return out


@dataclass(frozen=True)
class PatientLabel:
    """One row of a ``--patient-labels`` TSV."""

    participant: str | None  #: without ``sub-``
    session: str | None  #: without ``ses-``; None = every session
    bids_name: str | None
    lesion: bool


_TRUE = {"1", "true", "yes", "y", "lesion", "lesioned", "patient"}
_FALSE = {"0", "false", "no", "n", "healthy", "control"}
_UNKNOWN = {"", "nan", "none", "n/a"}


def read_patient_labels(path: Path) -> list[PatientLabel]:
    """Rows of a patient-labels TSV (``participant_id`` [``session_id``] or ``bids_name``, ``lesion``)."""
    fix = "columns: participant_id [session_id] lesion (1 = lesioned, 0 = healthy, n/a = unknown)"
    if not path.is_file():
        raise NoInputError(f"patient-labels file not found: {path}", path=path, fix=fix)
    columns, rows = _read_tsv(path, fix)
    if "lesion" not in columns or not {"participant_id", "bids_name"} & set(columns):
        raise InputDataError(
            f"{path.name} needs a 'lesion' column and 'participant_id' or 'bids_name'", path=path, fix=fix)
    labels = []
    for row in rows:
        value = str(row.get("lesion") or "").strip().lower()
        if value in _UNKNOWN:
            continue
        if value not in _TRUE | _FALSE:
            raise InputDataError(f"{path.name}: lesion value {row['lesion']!r} is not 1/0", path=path,
                                 fix="use 1 (lesioned) or 0 (healthy), or n/a for unknown")
        participant, session = row.get("participant_id"), row.get("session_id")
        labels.append(PatientLabel(
            participant=str(participant).strip().removeprefix("sub-") if participant else None,
            session=str(session).strip().removeprefix("ses-") if session else None,
            bids_name=str(row["bids_name"]).strip() if row.get("bids_name") else None,
            lesion=value in _TRUE,
        ))
    return labels


def lookup_patient_label(image: OutputImage, labels: Sequence[PatientLabel]) -> bool | None:
    """Label of ``image``: a ``bids_name`` row wins over a participant [session] row; None if none."""
    for row in labels:
        if row.bids_name and row.bids_name in (image.bids_name, image.prefix):
            return row.lesion
    for row in labels:
        if row.bids_name or row.participant != image.entities.get("sub"):
            continue
        if row.session is None or row.session == image.entities.get("ses"):
            return row.lesion
    return None


# ------------------------------------------------------------------------------------------------
# which image counts how
@dataclass
class ImagePlan:
    """How one image enters the metrics."""

    image: OutputImage
    gt: GroundTruth | None
    patient_label: bool | None  #: from the patient-labels TSV
    role: str  #: "mask", "labelled" (lesioned, patient level only), "healthy" or "excluded"
    reason: str = ""


def plan_image(image: OutputImage, masks: Sequence[GroundTruth], labels: Sequence[PatientLabel],
               healthy_without_mask: bool) -> ImagePlan:
    """Decide how ``image`` enters the metrics (module docstring, "Which images count")."""
    gt = match_ground_truth(image, masks)
    label = lookup_patient_label(image, labels)
    if gt is not None:
        return ImagePlan(image, gt, label, "mask")
    if label is not None:
        return ImagePlan(image, None, label, "labelled" if label else "healthy")
    if healthy_without_mask:
        return ImagePlan(image, None, False, "healthy", "no lesion mask: healthy (--healthy-without-mask)")
    return ImagePlan(image, None, None, "excluded", "no lesion mask and no patient label (use "
                     "--healthy-without-mask to count such images as healthy)")


def plan_images(images: Sequence[OutputImage], masks: Sequence[GroundTruth],
                labels: Sequence[PatientLabel], healthy_without_mask: bool) -> list[ImagePlan]:
    """:func:`plan_image` for each image."""
    return [plan_image(image, masks, labels, healthy_without_mask) for image in images]


def exclude_failed(plans: Sequence[ImagePlan], group: dict[str, GroupScore] | None, modality: str) -> None:
    """Exclude images whose ``status`` in ``group_<mod>.tsv`` is not ``ok`` (in place)."""
    for plan in plans:
        row = (group or {}).get(plan.image.prefix)
        if plan.role != "excluded" and row is not None and row.status != "ok":
            plan.role, plan.reason = "excluded", f"status {row.status!r} in group_{modality}.tsv"


# ------------------------------------------------------------------------------------------------
# provenance: the random test encoder
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class EncoderProvenance:
    """Whether the maps of a modality were made with the random-weight test encoder."""

    flagged_images: tuple[str, ...]  #: images whose sidecar says ``ModelIsTestEncoder: true``
    unchecked_images: tuple[str, ...]  #: images without a readable ``ModelIsTestEncoder``
    group_json: bool | None  #: ``Provenance.is_test_encoder`` of ``group_<mod>.json`` (None: absent)

    @property
    def is_test_encoder(self) -> bool:
        """True when any image (or the group table) says so: one such map taints the batch."""
        return bool(self.flagged_images) or self.group_json is True

    def to_dict(self) -> dict[str, Any]:
        return {"is_test_encoder": self.is_test_encoder, "flagged_images": list(self.flagged_images),
                "unchecked_images": list(self.unchecked_images), "group_json": self.group_json}


def encoder_provenance(output_dir: Path, modality: str, images: Sequence[OutputImage]) -> EncoderProvenance:
    """Read ``ModelIsTestEncoder`` from every probseg sidecar and ``Provenance.is_test_encoder``
    from ``group_<mod>.json``."""
    flagged, unchecked = [], []
    for image in images:
        value = (_read_json(image.sidecar) or {}).get("ModelIsTestEncoder")
        if value is True:
            flagged.append(image.bids_name)
        elif value is not False:
            unchecked.append(image.bids_name)
    provenance = (_read_json(output_dir / f"group_{modality}.json") or {}).get("Provenance")
    group_flag = provenance.get("is_test_encoder") if isinstance(provenance, dict) else None
    return EncoderProvenance(tuple(flagged), tuple(unchecked),
                             bool(group_flag) if isinstance(group_flag, bool) else None)


# ------------------------------------------------------------------------------------------------
# volumes
def _same_grid(a: Any, b: Any) -> bool:
    return a.shape[:3] == b.shape[:3] and np.allclose(a.affine, b.affine, atol=1e-3)


def load_on_grid(path: Path, reference: Any) -> tuple[np.ndarray, bool]:
    """Boolean mask (> 0) of ``path`` on the grid of ``reference``, and whether it was resampled
    (nearest neighbour, by the affines)."""
    import nibabel as nib
    from nibabel.processing import resample_from_to

    try:
        img = nib.load(str(path))
        if img.ndim > 3:
            img = img.slicer[..., 0]
        if _same_grid(img, reference):
            return np.asarray(img.dataobj) > 0, False
        moved = resample_from_to(img, (reference.shape[:3], reference.affine), order=0, cval=0)
        return np.asarray(moved.dataobj) > 0, True
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise InputDataError(f"cannot read {path.name}: {exc}", path=path,
                             fix="check that the file is a valid 3D NIfTI") from exc


def load_probseg(path: Path) -> tuple[Any, np.ndarray]:
    """The probseg image and its data (float32, 3D, finite)."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise InputDataError(f"cannot read {path.name}: {exc}", path=path,
                             fix="rerun cg3d to rewrite the output") from exc
    if data.ndim != 3:
        raise InputDataError(f"{path.name} is not 3D (shape {data.shape})", path=path,
                             fix="rerun cg3d to rewrite the output")
    if not np.isfinite(data).all():
        raise InputDataError(f"{path.name} contains NaN or Inf", path=path, fix="rerun cg3d")
    return img, data


def voxel_volume_mm3(affine: np.ndarray) -> float:
    """Volume of one voxel in mm^3: ``|det|`` of the affine's 3x3 part."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))


def voxel_weight(voxel_volume: float, weighting: str) -> float:
    """What each voxel of an image counts in the pooled voxel metrics (see :data:`WEIGHTING_TEXT`)."""
    if weighting == "volume":
        return voxel_volume
    if weighting == "count":
        return 1.0
    raise ValueError(f"unknown voxel weighting {weighting!r}; one of {VOXEL_WEIGHTINGS}")


# ------------------------------------------------------------------------------------------------
# streaming the images of one modality
@dataclass
class VoxelAccumulator:
    """Everything kept across images of one modality: bounded state, no voxel arrays."""

    hist: VoxelHistogram
    weighting: str = DEFAULT_VOXEL_WEIGHTING
    lesions: list[LesionRecord] = field(default_factory=list)
    own_counts: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  #: weighted tp, fp, fn
    own_images: int = 0
    resampled: list[str] = field(default_factory=list)
    out_of_range: list[str] = field(default_factory=list)


def _brain_mask(image: OutputImage, ref: Any, acc: VoxelAccumulator) -> np.ndarray:
    if not image.brain_mask.is_file():
        raise NoInputError(
            f"brain mask of {image.bids_name} not found (the voxels to evaluate)", path=image.brain_mask,
            fix="rerun 'cg3d BIDS OUTPUT_DIR group' so that the label-brain mask is written")
    brain, moved = load_on_grid(image.brain_mask, ref)
    if moved:
        acc.resampled.append(image.brain_mask.name)
    return brain


def _truth(plan: ImagePlan, ref: Any, acc: VoxelAccumulator) -> np.ndarray:
    if plan.gt is None:
        return np.zeros(ref.shape[:3], dtype=bool)
    truth, moved = load_on_grid(plan.gt.path, ref)
    if moved:
        acc.resampled.append(plan.gt.path.name)
    return truth


def _confusion(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int]:
    return (int(np.count_nonzero(pred & truth)), int(np.count_nonzero(pred & ~truth)),
            int(np.count_nonzero(~pred & truth)))


def evaluate_image(plan: ImagePlan, acc: VoxelAccumulator) -> dict[str, Any]:
    """Add one image to ``acc``; returns its per-image facts. Its arrays are dropped after."""
    image = plan.image
    ref, probseg = load_probseg(image.probseg)
    if probseg.min() < 0 or probseg.max() > 1:
        acc.out_of_range.append(image.bids_name)
    brain = _brain_mask(image, ref, acc)
    voxel_volume = voxel_volume_mm3(ref.affine)
    facts: dict[str, Any] = {
        "probseg_max": float(probseg[brain].max()) if brain.any() else float(probseg.max()),
        "voxel_volume_mm3": voxel_volume,
    }
    if plan.role == "labelled":  # lesioned, no voxel truth: patient level only
        facts["lesioned"] = True
        return facts
    truth = _truth(plan, ref, acc)
    inside = truth & brain
    weight = voxel_weight(voxel_volume, acc.weighting)
    pred = None
    if image.anomaly_mask.is_file():
        pred, _ = load_on_grid(image.anomaly_mask, ref)
        pred &= brain
        tp, fp, fn = _confusion(pred, inside)
        acc.own_counts = [a + weight * b for a, b in zip(acc.own_counts, (tp, fp, fn))]
        acc.own_images += 1
        facts["mask_dice"], facts["mask_iou"] = dice_iou_from_counts(tp, fp, fn)
    acc.hist.update(probseg, inside, mask=brain, weight=weight)
    records = lesion_records(inside, probseg, voxel_volume, pred_mask=pred, n_bins=acc.hist.n_bins)
    acc.lesions.extend(records)
    facts.update({
        "lesioned": bool(truth.any()),
        "lesion_volume_mm3": float(np.count_nonzero(inside)) * voxel_volume,
        "lesion_voxels_outside_brain": int(np.count_nonzero(truth & ~brain)),
        "n_lesions": len(records),
    })
    return facts


def _image_row(plan: ImagePlan) -> dict[str, Any]:
    return {"bids_name": plan.image.bids_name, "role": plan.role,
            "ground_truth": str(plan.gt.path) if plan.gt else None, "reason": plan.reason or None}


def _listing(names: Sequence[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def _slug(name: str) -> str:
    return name.replace("<", "lt").replace(">", "gt").replace("-", "to").replace(".", "p")


def stream_images(plans: Sequence[ImagePlan], group: dict[str, GroupScore] | None,
                  acc: VoxelAccumulator) -> tuple[list[dict[str, Any]], list[str]]:
    """Per-image rows (every image, excluded ones too) and notes; fills ``acc``."""
    rows, notes = [], []
    for plan in plans:
        row = _image_row(plan)
        rows.append(row)
        if plan.role == "excluded":
            continue
        row.update(evaluate_image(plan, acc))
        if plan.patient_label is not None and plan.gt is not None and plan.patient_label != row["lesioned"]:
            notes.append(f"{plan.image.bids_name}: --patient-labels says lesion={int(plan.patient_label)} "
                         f"but the mask is {'non-' if row['lesioned'] else ''}empty; the label is used")
        if plan.patient_label is not None:
            row["lesioned"] = bool(plan.patient_label)
        entry = (group or {}).get(plan.image.prefix)
        row["score_max"] = entry.score_max if entry else math.nan
    if acc.resampled:
        notes.append(f"{len(acc.resampled)} mask(s) resampled (nearest) onto the probseg grid: "
                     + _listing(acc.resampled, 5))
    if acc.out_of_range:
        notes.append("probseg values outside [0, 1] clipped for the voxel metrics: "
                     + _listing(acc.out_of_range, 5))
    return rows, notes


def subject_scores(evaluated: Sequence[dict[str, Any]]) -> str:
    """Set ``subject_score`` of each row: ``score_max`` of the group TSV when every row has one,
    else the probseg maximum for all; returns the source used."""
    use_group = bool(evaluated) and all(math.isfinite(r["score_max"]) for r in evaluated)
    for row in evaluated:
        row["subject_score"] = row["score_max"] if use_group else row["probseg_max"]
    return "score_max (group TSV)" if use_group else "max of probseg"


def lesionwise_metrics(lesions: Sequence[LesionRecord], threshold_bin: int,
                       size_edges: Sequence[float]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Lesion-wise TPR per size bin at the Dice-max threshold bin and at the own binary masks."""
    volumes = [rec.volume_mm3 for rec in lesions]
    hits = [rec.detected_at(threshold_bin) if threshold_bin >= 0 else False for rec in lesions]
    at_thr = lesionwise_tpr(volumes, hits, size_edges)
    with_mask = [rec for rec in lesions if rec.detected_by_mask is not None]
    at_mask = lesionwise_tpr([r.volume_mm3 for r in with_mask], [bool(r.detected_by_mask) for r in with_mask],
                             size_edges)
    return at_thr, at_mask


# ------------------------------------------------------------------------------------------------
# one modality
def _test_encoder_notes(provenance: EncoderProvenance) -> list[str]:
    if provenance.is_test_encoder:
        where = (_listing(list(provenance.flagged_images), 5) if provenance.flagged_images
                 else "group_<mod>.json Provenance")
        return [f"TEST ENCODER: the maps were made with the random-weight test encoder ({where}); "
                "these numbers mean nothing"]
    if provenance.unchecked_images:
        return [f"{len(provenance.unchecked_images)} image(s) have no ModelIsTestEncoder in their probseg "
                "sidecar, so the encoder could not be checked: "
                + _listing(list(provenance.unchecked_images), 5)]
    return []


def _coverage_notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    notes = []
    labelled = [r["bids_name"] for r in rows if r["role"] == "labelled"]
    if labelled:
        notes.append(f"{len(labelled)} lesioned image(s) without a lesion mask (--patient-labels) count at "
                     "patient level only: " + _listing(labelled))
    excluded = [r for r in rows if r["role"] == "excluded"]
    if excluded:
        notes.append(f"{len(excluded)} image(s) excluded from all metrics: "
                     + "; ".join(f"{r['bids_name']} ({r['reason']})" for r in excluded[:10])
                     + (" ..." if len(excluded) > 10 else ""))
    return notes


def _degenerate_note(voxel: dict[str, Any]) -> list[str]:
    fraction = voxel["voxel_predicted_fraction"]
    if not (isinstance(fraction, float) and fraction > DEGENERATE_FRACTION):
        return []
    return [f"the Dice-max threshold ({voxel['voxel_threshold']:.4g}) marks {100 * fraction:.0f} % of the "
            "brain as anomalous: the map barely separates lesions, and the lesion-wise TPR at this "
            "threshold is trivially high"]


def _settings_record(settings: EvaluationSettings, gt_dir: Path) -> dict[str, Any]:
    record = {
        "ground_truth": str(gt_dir), "gt_pattern": settings.gt_pattern, "matching_rule": MATCHING_RULE,
        "healthy_without_mask": settings.healthy_without_mask, "n_bins": settings.n_bins,
        "lesion_size_edges_mm3": list(settings.size_edges), "lesion_connectivity": 26,
        "lesion_detection": "a lesion (26-connected component of mask ∩ brain on the probseg grid) "
        "is detected when any of its voxels is predicted anomalous",
        "threshold_rule": "predicted = probseg >= threshold (threshold = lower bin edge)",
        "voxels": "brain voxels (label-brain mask) of all images with voxel ground truth, pooled; "
        + WEIGHTING_TEXT[settings.voxel_weighting],
        "voxel_weighting": settings.voxel_weighting,
    }
    if settings.patient_labels is not None:
        record["patient_labels"] = str(settings.patient_labels)
    if settings.participants:
        record["participants"] = sorted({p.removeprefix("sub-") for p in settings.participants})
    return record


def evaluate_modality(output_dir: Path, modality: str, plans: Sequence[ImagePlan],
                      settings: EvaluationSettings, gt_dir: Path,
                      provenance: EncoderProvenance | None = None) -> dict[str, Any]:
    """All metrics of one modality (JSON-ready dict), streaming the volumes one at a time."""
    provenance = provenance or EncoderProvenance((), (), None)
    notes = _test_encoder_notes(provenance)
    group = read_group_scores(output_dir, modality)
    if group is None:
        notes.append(f"group_{modality}.tsv not found: subject score = max of the probseg")
    exclude_failed(plans, group, modality)
    acc = VoxelAccumulator(VoxelHistogram(settings.n_bins), settings.voxel_weighting)
    rows, stream_notes = stream_images(plans, group, acc)
    notes += stream_notes
    evaluated = [r for r in rows if r["role"] != "excluded"]
    score_source = subject_scores(evaluated)
    if evaluated and score_source != "score_max (group TSV)" and group is not None:
        notes.append("score_max missing for some images in group TSV: subject score = max of the probseg for all")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MetricWarning)
        patient = patient_metrics([r["subject_score"] for r in evaluated], [int(r["lesioned"]) for r in evaluated])
        voxel = voxel_metrics(acc.hist)
    notes += [str(w.message) for w in caught if issubclass(w.category, MetricWarning)]
    notes += _degenerate_note(voxel)
    at_thr, at_mask = lesionwise_metrics(acc.lesions, voxel["voxel_threshold_bin"], settings.size_edges)
    notes += _coverage_notes(rows)
    mask_dice, mask_iou = dice_iou_from_counts(*acc.own_counts) if acc.own_images else (math.nan, math.nan)
    metrics = {
        "is_test_encoder": provenance.is_test_encoder,
        **patient, **voxel,
        "voxel_weighting": settings.voxel_weighting,
        "mask_dice": mask_dice, "mask_iou": mask_iou,
        "n_images_evaluated": len(evaluated),
        "n_images_voxel": sum(r["role"] in ("mask", "healthy") for r in evaluated),
        "n_images_excluded": len(rows) - len(evaluated), "n_lesions": len(acc.lesions),
        "subject_score_source": score_source,
    }
    for entry in at_thr:
        metrics[f"ltpr_{_slug(entry['bin'])}"] = entry["tpr"]
        metrics[f"n_lesions_{_slug(entry['bin'])}"] = entry["n_lesions"]
    for entry in at_mask:
        metrics[f"ltpr_mask_{_slug(entry['bin'])}"] = entry["tpr"]
    for note in notes:
        LOGGER.warning("%s: %s", modality, note)
    return {
        "modality": modality,
        "is_test_encoder": provenance.is_test_encoder,
        "encoder_provenance": provenance.to_dict(),
        "metrics": metrics,
        "lesionwise": {"at_dice_max_threshold": at_thr, "at_binary_mask": at_mask},
        "images": rows,
        "warnings": notes,
        "settings": _settings_record(settings, gt_dir),
        "GeneratedBy": {"Name": "cg3d evaluate", "Version": __version__},
    }


# ------------------------------------------------------------------------------------------------
# the whole command
def select_outputs(outputs: dict[str, list[OutputImage]], settings: EvaluationSettings,
                   output_dir: Path) -> dict[str, list[OutputImage]]:
    """Outputs of the requested modalities and participants; errors when nothing is left."""
    if not outputs:
        raise NoInputError(
            f"no cg3d outputs (sub-*/[ses-*/]anat/*_label-anomaly_desc-<mod>_probseg.nii.gz) in {output_dir}",
            path=output_dir,
            fix="pass the output folder of a finished 'cg3d BIDS OUTPUT_DIR group' run "
            "(the folder that holds group_<mod>.tsv)")
    if settings.modalities:
        for mod in settings.modalities:
            if mod not in outputs:
                LOGGER.warning("no %s outputs in %s: skipped", mod, output_dir)
        outputs = {m: outputs[m] for m in settings.modalities if m in outputs}
        if not outputs:
            raise NoInputError(f"no cg3d outputs of {', '.join(settings.modalities)} in {output_dir}",
                               path=output_dir, fix="check --modality against the group_<mod>.tsv files")
    if settings.participants:
        wanted = {p.removeprefix("sub-") for p in settings.participants}
        outputs = {m: [i for i in imgs if i.entities.get("sub") in wanted] for m, imgs in outputs.items()}
        if not any(outputs.values()):
            raise NoMatchError(f"--participant-label {' '.join(sorted(wanted))} selected no outputs",
                               path=output_dir, fix="check the labels against the sub-* folders")
    return outputs


def _check_ground_truth(gt_dir: Path, masks: Sequence[GroundTruth], labels: Sequence[PatientLabel],
                        plans: dict[str, list[ImagePlan]], pattern: str) -> None:
    """Error when there are no lesion masks, or when no mask and no label matches any output."""
    if not masks and not labels:
        raise NoMatchError(
            f"no lesion masks sub-*/**/*_{pattern}.nii[.gz] in {gt_dir}", path=gt_dir,
            fix="check --ground-truth and --gt-pattern (e.g. label-lesion_mask, desc-lesion_mask)")
    if any(p.role in ("mask", "labelled") or (p.role == "healthy" and p.patient_label is not None)
           for ps in plans.values() for p in ps):
        return
    looked_for = sorted({p.image.prefix for ps in plans.values() for p in ps})
    have = sorted({g.prefix for g in masks})
    raise NoMatchError(
        "no lesion mask matches any cg3d output; looked for masks of "
        f"{_listing(looked_for)} (named <source entities>_{pattern}.nii[.gz]); found masks for "
        f"{_listing(have) or 'nothing'} in {gt_dir}",
        path=gt_dir, fix="matching rule: " + MATCHING_RULE)


def run_evaluation(output_dir: Path, gt_dir: Path,
                   settings: EvaluationSettings = EvaluationSettings()) -> list[dict[str, Any]]:
    """Evaluate every requested modality and write its outputs (:func:`write_results`); returns the
    results, one dict per modality evaluated."""
    output_dir, gt_dir = Path(output_dir), Path(gt_dir)
    found = find_outputs(output_dir) if output_dir.is_dir() else {}
    outputs = select_outputs(found, settings, output_dir)
    if not gt_dir.is_dir():
        raise NoInputError(f"ground-truth folder not found: {gt_dir}", path=gt_dir,
                           fix="pass the BIDS derivatives folder that holds the lesion masks")
    masks = find_ground_truth(gt_dir, settings.gt_pattern)
    labels = read_patient_labels(settings.patient_labels) if settings.patient_labels else []
    plans = {mod: plan_images(imgs, masks, labels, settings.healthy_without_mask) for mod, imgs in outputs.items()}
    _check_ground_truth(gt_dir, masks, labels, plans, settings.gt_pattern)
    results = []
    for mod, mod_plans in plans.items():
        if all(p.role == "excluded" for p in mod_plans):
            LOGGER.warning("%s: no image has a lesion mask or a patient label: skipped", mod)
            continue
        provenance = encoder_provenance(output_dir, mod, found[mod])  # the whole batch, not a subset
        result = evaluate_modality(output_dir, mod, mod_plans, settings, gt_dir, provenance)
        write_results(output_dir, result, settings)
        results.append(result)
    return results


# ------------------------------------------------------------------------------------------------
# outputs
METRIC_DESCRIPTIONS = {
    "is_test_encoder": "true when any map was made with the random-weight test encoder: then every "
    "number here means nothing",
    "patient_auroc": "patient-level AUROC of subject scores (lesioned vs healthy)",
    "patient_ap": "patient-level average precision",
    "n_lesioned": "images with lesions (patient level)",
    "n_healthy": "healthy images (patient level)",
    "voxel_auroc": "voxel AUROC over the pooled brain voxels (see voxel_weighting)",
    "voxel_ap": "voxel average precision over the pooled brain voxels (see voxel_weighting)",
    "voxel_dice_max": "best Dice over thresholds, one threshold for the batch (see voxel_weighting)",
    "voxel_iou": "IoU at the Dice-max threshold",
    "voxel_threshold": "Dice-max threshold: predicted = probseg >= threshold",
    "voxel_predicted_fraction": "share of the brain (weighted as voxel_weighting) at or above the "
    "Dice-max threshold",
    "voxel_threshold_bin": "Dice-max threshold as a bin index (threshold = bin / n_bins)",
    "voxel_weighting": "how the pooled voxels are weighted: volume = by voxel volume in mm^3 (as on one "
    "common grid), count = each voxel once (--voxel-weighting)",
    "mask_dice": "Dice of cg3d's own binary anomaly masks, pooled (weighted as voxel_weighting)",
    "mask_iou": "IoU of cg3d's own binary anomaly masks, pooled (weighted as voxel_weighting)",
    "n_lesion_voxels": "lesion voxels inside the brain masks (count)",
    "n_brain_voxels": "brain voxels evaluated (count)",
    "n_images_evaluated": "images in the patient-level metrics",
    "n_images_voxel": "images in the voxel-level metrics",
    "n_images_excluded": "images excluded (no ground truth or failed)",
    "n_lesions": "lesions (26-connected components)",
    "subject_score_source": "where the subject scores come from",
}


def describe(key: str) -> str:
    """Meaning of a metric key of the results table."""
    if key in METRIC_DESCRIPTIONS:
        return METRIC_DESCRIPTIONS[key]
    if key.startswith("ltpr_mask_"):
        return "lesion-wise TPR at cg3d's binary mask, lesions of " + key[len("ltpr_mask_"):] + " mm^3"
    if key.startswith("ltpr_"):
        return "lesion-wise TPR at the Dice-max threshold, lesions of " + key[len("ltpr_"):] + " mm^3"
    if key.startswith("n_lesions_"):
        return "number of lesions of " + key[len("n_lesions_"):] + " mm^3"
    return key


def format_value(value: Any) -> str:
    """A table cell: ``n/a`` for None/NaN, ``true``/``false``, floats to 6 significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def results_tsv(result: dict[str, Any]) -> str:
    """``metric  value  description`` table (``n/a`` for undefined values)."""
    lines = ["metric\tvalue\tdescription"]
    lines += [f"{k}\t{format_value(v)}\t{describe(k)}" for k, v in result["metrics"].items()]
    return "\n".join(lines) + "\n"


def json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats as None (JSON has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def html_section(result: dict[str, Any]) -> str:
    """The group report's evaluation section (``reports/templates/evaluation.html``, autoescaped)."""
    lesionwise = result["lesionwise"]
    return render(
        "evaluation.html",
        modality=result["modality"],
        is_test_encoder=result["is_test_encoder"],
        flagged_images=result["encoder_provenance"]["flagged_images"],
        settings=result["settings"],
        weighting_text=WEIGHTING_TEXT[result["settings"]["voxel_weighting"]],
        metric_rows=[(k, format_value(v), describe(k)) for k, v in result["metrics"].items()],
        lesion_rows=[(a["bin"], a["n_lesions"], format_value(a["tpr"]), format_value(b["tpr"]))
                     for a, b in zip(lesionwise["at_dice_max_threshold"], lesionwise["at_binary_mask"])],
        notes=result["warnings"],
    )


TEST_ENCODER_WARNING = ("**WARNING: TEST ENCODER.** These maps were made with the random-weight test "
                        "encoder: the numbers below mean nothing.")
SUMMARY_KEYS = ("patient_auroc", "patient_ap", "voxel_auroc", "voxel_ap", "voxel_dice_max", "voxel_iou",
                "voxel_threshold")


def markdown_summary(result: dict[str, Any]) -> str:
    """Short Markdown summary (printed on stdout)."""
    m = result["metrics"]
    keys = [*SUMMARY_KEYS, *[k for k in m if k.startswith("ltpr_") and not k.startswith("ltpr_mask_")]]
    lines = [TEST_ENCODER_WARNING, ""] if result["is_test_encoder"] else []
    lines += ["| modality | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1),
              f"| {result['modality']} | " + " | ".join(format_value(m.get(k)) for k in keys) + " |",
              "", f"Voxel metrics: {WEIGHTING_TEXT[result['settings']['voxel_weighting']]}."]
    return "\n".join(lines)


def add_to_bidsignore(output_dir: Path, pattern: str = BIDSIGNORE_PATTERN) -> bool:
    """Add ``pattern`` to an existing ``.bidsignore`` (idempotent); True when the file changed."""
    path = output_dir / ".bidsignore"
    if not path.is_file():
        return False
    lines = path.read_text(encoding="utf-8").splitlines()
    if pattern in (line.strip() for line in lines):
        return False
    write_text(path, "\n".join([*lines, pattern]) + "\n")
    return True


def write_results(output_dir: Path, result: dict[str, Any],
                  settings: EvaluationSettings = EvaluationSettings()) -> list[Path]:
    """``eval_<mod>.tsv`` + ``.json`` (into ``settings.eval_dir`` or OUTPUT_DIR), and, in OUTPUT_DIR,
    ``.bidsignore`` and the ``group_<mod>.html`` section; returns the files written or changed."""
    mod = result["modality"]
    target = Path(settings.eval_dir) if settings.eval_dir is not None else Path(output_dir)
    written = [write_text(target / f"eval_{mod}.tsv", results_tsv(result)),
               write_json(target / f"eval_{mod}.json", json_safe(result))]
    if target.resolve() != Path(output_dir).resolve():
        return written
    if add_to_bidsignore(output_dir):
        written.append(output_dir / ".bidsignore")
    report = output_dir / f"group_{mod}.html"
    if settings.update_report and report.is_file():
        try:
            written.append(insert_evaluation_section(report, html_section(result)))
        except (OSError, ValueError) as exc:
            LOGGER.warning("could not update %s: %s", report.name, exc)
    return written
