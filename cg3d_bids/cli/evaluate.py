"""``cg3d evaluate OUTPUT_DIR --ground-truth DERIV``: metrics of cg3d outputs against lesion masks.

Inputs
    * cg3d outputs in OUTPUT_DIR: ``sub-<l>[/ses-<l>]/anat/<src>_label-anomaly_desc-<mod>_probseg.nii.gz``
      with ``<src>_label-brain_desc-<mod>_mask.nii.gz`` (required: the voxels evaluated) and
      ``<src>_label-anomaly_desc-<mod>_mask.nii.gz`` (optional: the run's own binary mask), and
      ``group_<mod>.tsv`` (subject score ``score_max``; otherwise the maximum of the probseg).
      ``<src>`` = the *source entities*: the source image name without its suffix
      (``sub-01_ses-02_acq-ax`` for ``sub-01_ses-02_acq-ax_T2w``).
    * lesion masks in a BIDS derivatives folder: ``sub-<l>/[ses-<l>/]**/<entities>_<pattern>.nii[.gz]``
      (``--gt-pattern``, default ``label-lesion_mask``); any value > 0 is lesion.

Matching rule (ground-truth mask -> cg3d output of modality ``<mod>``)
    1. ``sub`` must be equal, and ``ses`` must be equal (both absent, or the same label);
    2. every other entity of the mask (``acq``, ``run``, ``rec``, ...) must be in the output's source
       entities with the same value; so ``sub-01_label-lesion_mask`` matches every modality of
       ``sub-01`` (``sub-01_T2w``, ``sub-01_acq-mprage_T1w``, ...), while
       ``sub-01_acq-ax_label-lesion_mask`` matches only sources with ``acq-ax``;
    3. ``desc-<mod>`` in the mask name (e.g. ``sub-01_desc-FLAIR_label-lesion_mask``) restricts it
       to that modality; other ``desc``, ``space`` and ``res`` values are ignored;
    4. the most specific match (most entities) wins; two equally specific matches are an error.

Which images count
    * a matched mask gives the voxel truth; patient label = lesioned when the mask (on the probseg
      grid) has any lesion voxel, healthy when it is empty;
    * ``--patient-labels TSV`` (columns ``participant_id`` [, ``session_id``] or ``bids_name``, and
      ``lesion`` = 1/0) gives patient labels to images without a mask: lesioned ones enter the
      patient-level metrics only, healthy ones also count as lesion-free at voxel level;
    * images with neither count as healthy (patient label 0, every brain voxel negative) only with
      ``--healthy-without-mask``; otherwise they are excluded from every metric and listed.

Metrics (per modality, :mod:`cg3d_bids.core.metrics`): patient AUROC/AP; voxel AUROC, AP, Dice-max,
its threshold and IoU over the pooled brain voxels (label-brain masks) of all evaluated images, one
threshold for the batch; lesion-wise TPR by lesion volume (< 100, 100-1000, > 1000 mm^3, lesions =
26-connected components of mask ∩ brain on the probseg grid; detected when any voxel is predicted),
at the Dice-max threshold and at the run's own binary mask. Masks on another grid are resampled
(nearest neighbour, by the affines) onto the probseg grid. Volumes are streamed one at a time.

Outputs: ``eval_<mod>.tsv`` and ``eval_<mod>.json`` in OUTPUT_DIR (atomic), ``eval_*`` added to an
existing ``.bidsignore``, and an evaluation section in ``group_<mod>.html`` when it exists.
"""

from __future__ import annotations

import argparse
import html
import logging
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..atomic import write_json, write_text
from ..errors import Cg3dError, InputDataError, NoInputError, NoMatchError
from ..core.metrics import (
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
from .parser import MODALITIES, Cg3dArgumentParser

LOGGER = logging.getLogger("cg3d.evaluate")

REPORT_START = "<!-- cg3d:evaluation:start -->"
REPORT_END = "<!-- cg3d:evaluation:end -->"
NON_SOURCE_ENTITIES = ("desc", "space", "res", "label")
MATCHING_RULE = (
    "sub and ses equal; every other entity of the lesion mask present with the same value in the "
    "output's source entities (a mask without acq/run/... matches all modalities of that "
    "subject/session); desc-<modality> restricts a mask to that modality; most specific match wins"
)
NIFTI_EXT = (".nii.gz", ".nii")
#: warn when the Dice-max threshold marks more than this share of the brain voxels
DEGENERATE_FRACTION = 0.5


# ------------------------------------------------------------------------------------------------
# command line
def build_parser() -> Cg3dArgumentParser:
    """Parser of ``cg3d evaluate`` (usage errors exit 64)."""
    parser = Cg3dArgumentParser(
        prog="cg3d evaluate",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Evaluate cg3d anomaly maps against lesion masks (patient AUROC/AP; voxel AUROC, "
        "AP, Dice-max, IoU; lesion-wise TPR by size). Writes eval_<mod>.tsv/.json into OUTPUT_DIR.",
        epilog="Matching rule: " + MATCHING_RULE + ". Exit codes: 0 ok, 18 no ground truth matched, "
        "64 usage, 65 bad data, 66 no cg3d outputs / missing input.",
    )
    parser.add_argument("output_dir", type=lambda s: Path(s).expanduser().absolute(),
                        help="output folder of a finished 'cg3d BIDS OUTPUT_DIR group' run")
    parser.add_argument("--ground-truth", "--ground_truth", dest="ground_truth", required=True,
                        type=lambda s: Path(s).expanduser().absolute(), metavar="PATH",
                        help="BIDS derivatives folder with the lesion masks")
    parser.add_argument("--gt-pattern", "--gt_pattern", dest="gt_pattern", default="label-lesion_mask",
                        help="end of the lesion-mask names: <entities>_<PATTERN>.nii[.gz]")
    parser.add_argument("--healthy-without-mask", "--healthy_without_mask", dest="healthy_without_mask",
                        action="store_true",
                        help="images without a lesion mask (and without a --patient-labels entry) are "
                        "healthy; default: they are excluded from all metrics")
    parser.add_argument("--patient-labels", "--patient_labels", dest="patient_labels", metavar="TSV",
                        type=lambda s: Path(s).expanduser().absolute(),
                        help="TSV with participant_id [session_id] or bids_name, and lesion (1/0): "
                        "patient-level labels for images without a lesion mask")
    parser.add_argument("--modality", "--modalities", "-m", dest="modality", nargs="+",
                        choices=MODALITIES, help="modalities to evaluate (default: all found)")
    parser.add_argument("--participant-label", "--participant_label", dest="participant_label",
                        nargs="+", metavar="LABEL",
                        help="evaluate only these subjects (the maps still come from the whole batch)")
    parser.add_argument("--n-bins", dest="n_bins", type=int, default=DEFAULT_N_BINS,
                        help="histogram bins over [0, 1] for the voxel metrics")
    parser.add_argument("--size-edges", dest="size_edges", type=float, nargs="+",
                        default=list(DEFAULT_SIZE_EDGES), metavar="MM3",
                        help="lesion volume bin edges for the lesion-wise TPR, in mm^3")
    parser.add_argument("--eval-dir", dest="eval_dir", type=lambda s: Path(s).expanduser().absolute(),
                        metavar="DIR",
                        help="write eval_<mod>.tsv/.json here instead of OUTPUT_DIR (then neither "
                        "the group report nor .bidsignore is touched); e.g. for a subset of subjects")
    parser.add_argument("--no-report", dest="report", action="store_false",
                        help="do not add the evaluation section to group_<mod>.html")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``cg3d evaluate``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.n_bins < 2:
        parser.error("--n-bins must be >= 2")
    if sorted(args.size_edges) != list(args.size_edges) or min(args.size_edges) <= 0:
        parser.error("--size-edges must be positive and increasing")
    logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO,
                        format="%(levelname)s: %(message)s", stream=sys.stderr)
    try:
        results = run_evaluation(
            args.output_dir, args.ground_truth, gt_pattern=args.gt_pattern,
            healthy_without_mask=args.healthy_without_mask, patient_labels=args.patient_labels,
            modalities=args.modality, participants=args.participant_label, n_bins=args.n_bins,
            size_edges=tuple(args.size_edges), update_report=args.report, eval_dir=args.eval_dir,
        )
    except Cg3dError as exc:
        print(f"cg3d evaluate: error: {exc.render()}", file=sys.stderr)
        return exc.exit_code
    for result in results:
        print(markdown_summary(result))
    return 0


# ------------------------------------------------------------------------------------------------
# names and discovery
def parse_entities(prefix: str) -> dict[str, str]:
    """``sub-01_ses-02_acq-ax`` -> ``{'sub': '01', 'ses': '02', 'acq': 'ax'}`` (non key-value parts ignored)."""
    out: dict[str, str] = {}
    for part in prefix.split("_"):
        key, sep, value = part.partition("-")
        if sep and key and value:
            out[key] = value
    return out


def _strip_nifti(name: str) -> str | None:
    for ext in NIFTI_EXT:
        if name.endswith(ext):
            return name[: -len(ext)]
    return None


@dataclass
class OutputImage:
    """One cg3d output image of a modality."""

    prefix: str
    modality: str
    probseg: Path
    brain_mask: Path
    anomaly_mask: Path
    entities: dict[str, str] = field(default_factory=dict)

    @property
    def bids_name(self) -> str:
        return f"{self.prefix}_{self.modality}"


_PROBSEG_RE = re.compile(r"^(?P<prefix>sub-[^_]+.*?)_label-anomaly_desc-(?P<mod>[A-Za-z0-9]+)_probseg$")


def find_outputs(output_dir: Path) -> dict[str, list[OutputImage]]:
    """cg3d probseg outputs per modality under ``sub-*/[ses-*/]anat/``, sorted by name."""
    found: dict[str, list[OutputImage]] = {}
    candidates = [*output_dir.glob("sub-*/anat/*_probseg.nii*"),
                  *output_dir.glob("sub-*/ses-*/anat/*_probseg.nii*")]
    for path in sorted(candidates):
        stem = _strip_nifti(path.name)
        match = _PROBSEG_RE.match(stem or "")
        if not match:
            continue
        prefix, mod = match["prefix"], match["mod"]
        ext = path.name[len(stem):]
        base = path.parent / prefix
        found.setdefault(mod, []).append(OutputImage(
            prefix=prefix, modality=mod, probseg=path,
            brain_mask=Path(f"{base}_label-brain_desc-{mod}_mask{ext}"),
            anomaly_mask=Path(f"{base}_label-anomaly_desc-{mod}_mask{ext}"),
            entities=parse_entities(prefix),
        ))
    return found


@dataclass
class GroundTruth:
    """One lesion mask of the ground-truth derivatives."""

    path: Path
    prefix: str
    entities: dict[str, str]
    modality: str | None  #: from desc-<modality>, else None (all modalities)

    @property
    def source_entities(self) -> dict[str, str]:
        return {k: v for k, v in self.entities.items() if k not in NON_SOURCE_ENTITIES}


def find_ground_truth(gt_dir: Path, pattern: str) -> list[GroundTruth]:
    """Lesion masks ``sub-*/**/<entities>_<pattern>.nii[.gz]`` under ``gt_dir``."""
    masks = []
    for path in sorted(gt_dir.glob("sub-*/**/*")):
        stem = _strip_nifti(path.name)
        if stem is None or not stem.endswith("_" + pattern) or not path.is_file():
            continue
        prefix = stem[: -len(pattern) - 1]
        entities = parse_entities(prefix)
        if "sub" not in entities:
            continue
        desc = entities.get("desc")
        masks.append(GroundTruth(path, prefix, entities, desc if desc in MODALITIES else None))
    return masks


def match_ground_truth(image: OutputImage, masks: list[GroundTruth]) -> GroundTruth | None:
    """The lesion mask of ``image`` under the matching rule (module docstring); None if none."""
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
    candidates.sort(key=lambda g: (len(g.source_entities), g.modality is not None), reverse=True)
    best = candidates[0]
    if len(candidates) > 1:
        second = candidates[1]
        if (len(second.source_entities), second.modality is not None) == (
                len(best.source_entities), best.modality is not None):
            raise InputDataError(
                f"two lesion masks match {image.bids_name} equally well: {best.path.name} and "
                f"{second.path.name}",
                path=best.path.parent,
                fix="give the masks the source entities (acq-, run-, ...) or desc-<modality> that "
                "tell them apart, or remove one",
            )
    return best


# ------------------------------------------------------------------------------------------------
# tables
def _read_tsv(path: Path):
    import pandas as pd

    return pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False, dtype=str)


def read_group_scores(output_dir: Path, modality: str) -> dict[str, tuple[str, float]] | None:
    """``{source prefix: (status, score_max)}`` from ``group_<mod>.tsv`` (None if there is none)."""
    path = output_dir / f"group_{modality}.tsv"
    if not path.is_file():
        return None
    table = _read_tsv(path)
    if "bids_name" not in table.columns:
        raise InputDataError(f"{path.name} has no bids_name column", path=path,
                             fix="pass the output folder of a cg3d group run")
    out = {}
    for _, row in table.iterrows():
        name = str(row["bids_name"])
        prefix = name[: -len(modality) - 1] if name.endswith("_" + modality) else name
        status = row.get("status")
        status = "ok" if not isinstance(status, str) or not status.strip() else status.strip()
        try:
            score = float(row.get("score_max"))
        except (TypeError, ValueError):
            score = math.nan
        out[prefix] = (status, score)
    return out


_TRUE = {"1", "true", "yes", "y", "lesion", "lesioned", "patient"}
_FALSE = {"0", "false", "no", "n", "healthy", "control"}


def read_patient_labels(path: Path) -> list[dict[str, Any]]:
    """Rows ``{participant, session, bids_name, lesion}`` of a ``--patient-labels`` TSV."""
    if not path.is_file():
        raise NoInputError(f"patient-labels file not found: {path}", path=path,
                           fix="give a TSV with participant_id (or bids_name) and lesion columns")
    table = _read_tsv(path)
    if "lesion" not in table.columns or not {"participant_id", "bids_name"} & set(table.columns):
        raise InputDataError(
            f"{path.name} needs a 'lesion' column and 'participant_id' or 'bids_name'", path=path,
            fix="columns: participant_id [session_id] lesion (1 = lesioned, 0 = healthy)")
    rows = []
    for _, row in table.iterrows():
        value = str(row["lesion"]).strip().lower()
        if value in ("nan", "none", ""):
            continue
        if value not in _TRUE | _FALSE:
            raise InputDataError(f"{path.name}: lesion value {row['lesion']!r} is not 1/0", path=path,
                                 fix="use 1 (lesioned) or 0 (healthy), or n/a for unknown")
        def _get(col: str) -> str | None:
            val = row.get(col) if col in table.columns else None
            return None if val is None or (isinstance(val, float) and math.isnan(val)) else str(val)
        participant = _get("participant_id")
        session = _get("session_id")
        rows.append({
            "participant": participant.removeprefix("sub-") if participant else None,
            "session": session.removeprefix("ses-") if session else None,
            "bids_name": _get("bids_name"),
            "lesion": value in _TRUE,
        })
    return rows


def lookup_patient_label(image: OutputImage, rows: list[dict[str, Any]]) -> bool | None:
    """Label of ``image`` from ``--patient-labels`` rows: a bids_name row wins over a participant row."""
    for row in rows:
        if row["bids_name"] and row["bids_name"] in (image.bids_name, image.prefix):
            return bool(row["lesion"])
    for row in rows:
        if row["bids_name"] or row["participant"] != image.entities.get("sub"):
            continue
        if row["session"] is None or row["session"] == image.entities.get("ses"):
            return bool(row["lesion"])
    return None


# ------------------------------------------------------------------------------------------------
# volumes
def _same_grid(a, b) -> bool:
    return a.shape[:3] == b.shape[:3] and np.allclose(a.affine, b.affine, atol=1e-3)


def load_on_grid(path: Path, reference) -> tuple[np.ndarray, bool]:
    """Boolean mask (> 0) of ``path`` on the grid of ``reference``; resampled (nearest) if needed."""
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


def _load_probseg(path: Path):
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise InputDataError(f"cannot read {path.name}: {exc}", path=path,
                             fix="rerun cg3d to rewrite the output") from exc
    if data.ndim != 3:
        raise InputDataError(f"{path.name} is not 3D (shape {data.shape})", path=path)
    if not np.isfinite(data).all():
        raise InputDataError(f"{path.name} contains NaN or Inf", path=path, fix="rerun cg3d")
    return img, data


# ------------------------------------------------------------------------------------------------
# evaluation of one modality
@dataclass
class _Plan:
    image: OutputImage
    gt: GroundTruth | None
    patient_label: bool | None  #: from --patient-labels
    role: str  #: "mask", "labelled", "healthy", or "excluded"
    reason: str = ""


def plan_images(
    images: list[OutputImage], masks: list[GroundTruth], label_rows: list[dict[str, Any]],
    healthy_without_mask: bool,
) -> list[_Plan]:
    """Decide for each image how it enters the metrics (see module docstring)."""
    plans = []
    for image in images:
        gt = match_ground_truth(image, masks)
        label = lookup_patient_label(image, label_rows)
        if gt is not None:
            plans.append(_Plan(image, gt, label, "mask"))
        elif label is not None:
            plans.append(_Plan(image, None, label, "healthy" if not label else "labelled"))
        elif healthy_without_mask:
            plans.append(_Plan(image, None, False, "healthy", "no lesion mask: healthy (--healthy-without-mask)"))
        else:
            plans.append(_Plan(image, None, None, "excluded",
                               "no lesion mask and no patient label (use --healthy-without-mask to "
                               "count such images as healthy)"))
    return plans


def evaluate_modality(
    output_dir: Path, modality: str, images: list[OutputImage], masks: list[GroundTruth], *,
    label_rows: list[dict[str, Any]], healthy_without_mask: bool, n_bins: int,
    size_edges: tuple[float, ...], gt_dir: Path, gt_pattern: str,
) -> dict[str, Any]:
    """All metrics of one modality, streaming the volumes one at a time."""
    notes: list[str] = []
    group = read_group_scores(output_dir, modality)
    if group is None:
        notes.append(f"group_{modality}.tsv not found: subject score = max of the probseg")
    plans = plan_images(images, masks, label_rows, healthy_without_mask)
    for plan in plans:
        status = group.get(plan.image.prefix, ("ok", math.nan))[0] if group else "ok"
        if plan.role != "excluded" and status != "ok":
            plan.role, plan.reason = "excluded", f"status {status!r} in group_{modality}.tsv"

    hist = VoxelHistogram(n_bins)
    lesions: list[LesionRecord] = []
    own = {"tp": 0, "fp": 0, "fn": 0, "n_images": 0}
    rows: list[dict[str, Any]] = []
    resampled, out_of_range = [], []
    for plan in plans:
        row: dict[str, Any] = {"bids_name": plan.image.bids_name, "role": plan.role,
                               "ground_truth": str(plan.gt.path) if plan.gt else None,
                               "reason": plan.reason or None}
        rows.append(row)
        if plan.role == "excluded":
            continue
        row.update(_stream_image(plan, hist, lesions, own, n_bins, resampled, out_of_range))
        if plan.patient_label is not None and plan.gt is not None and plan.patient_label != row["lesioned"]:
            notes.append(f"{plan.image.bids_name}: --patient-labels says lesion={int(plan.patient_label)} "
                         f"but the mask is {'non-' if row['lesioned'] else ''}empty; the label is used")
        if plan.patient_label is not None:
            row["lesioned"] = bool(plan.patient_label)
        group_score = group.get(plan.image.prefix, ("ok", math.nan))[1] if group else math.nan
        row["score_max"] = group_score
    if resampled:
        notes.append(f"{len(resampled)} mask(s) resampled (nearest) onto the probseg grid: "
                     + ", ".join(resampled[:5]) + (" ..." if len(resampled) > 5 else ""))
    if out_of_range:
        notes.append(f"probseg values outside [0, 1] clipped for the voxel metrics: {', '.join(out_of_range[:5])}")

    evaluated = [r for r in rows if r["role"] != "excluded"]
    use_group = bool(evaluated) and all(math.isfinite(r["score_max"]) for r in evaluated)
    if evaluated and not use_group:
        notes.append("score_max missing for some images in group TSV: subject score = max of the probseg for all")
    for r in evaluated:
        r["subject_score"] = r["score_max"] if use_group else r["probseg_max"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MetricWarning)
        patient = patient_metrics([r["subject_score"] for r in evaluated],
                                  [int(r["lesioned"]) for r in evaluated])
        voxel = voxel_metrics(hist)
    notes.extend(str(w.message) for w in caught if issubclass(w.category, MetricWarning))
    if voxel["voxel_predicted_fraction"] > DEGENERATE_FRACTION:
        notes.append(
            f"the Dice-max threshold ({voxel['voxel_threshold']:.4g}) marks "
            f"{100 * voxel['voxel_predicted_fraction']:.0f} % of the brain voxels as anomalous: the "
            "map barely separates lesions, and the lesion-wise TPR at this threshold is trivially high")
    mask_dice, mask_iou = (dice_iou_from_counts(own["tp"], own["fp"], own["fn"])
                           if own["n_images"] else (math.nan, math.nan))
    volumes = [rec.volume_mm3 for rec in lesions]
    at_thr = lesionwise_tpr(volumes, [rec.detected_at(voxel["voxel_threshold_bin"]) for rec in lesions]
                            if voxel["voxel_threshold_bin"] >= 0 else [False] * len(lesions), size_edges)
    with_mask = [rec for rec in lesions if rec.detected_by_mask is not None]
    at_mask = lesionwise_tpr([r.volume_mm3 for r in with_mask], [bool(r.detected_by_mask) for r in with_mask],
                             size_edges)
    labelled = [r["bids_name"] for r in rows if r["role"] == "labelled"]
    if labelled:
        notes.append(f"{len(labelled)} lesioned image(s) without a lesion mask (--patient-labels) count at "
                     "patient level only: " + _listing(labelled))
    excluded = [r for r in rows if r["role"] == "excluded"]
    if excluded:
        notes.append(f"{len(excluded)} image(s) excluded from all metrics: "
                     + "; ".join(f"{r['bids_name']} ({r['reason']})" for r in excluded[:10])
                     + (" ..." if len(excluded) > 10 else ""))
    n_voxel_images = sum(r["role"] in ("mask", "healthy") for r in evaluated)
    metrics = {
        **patient, **voxel,
        "mask_dice": mask_dice, "mask_iou": mask_iou,
        "n_images_evaluated": len(evaluated), "n_images_voxel": n_voxel_images,
        "n_images_excluded": len(excluded), "n_lesions": len(lesions),
        "subject_score_source": "score_max (group TSV)" if use_group else "max of probseg",
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
        "metrics": metrics,
        "lesionwise": {"at_dice_max_threshold": at_thr, "at_binary_mask": at_mask},
        "images": rows,
        "warnings": notes,
        "settings": {
            "ground_truth": str(gt_dir), "gt_pattern": gt_pattern, "matching_rule": MATCHING_RULE,
            "healthy_without_mask": healthy_without_mask, "n_bins": n_bins,
            "lesion_size_edges_mm3": list(size_edges), "lesion_connectivity": 26,
            "lesion_detection": "a lesion (26-connected component of mask ∩ brain on the probseg grid) "
            "is detected when any of its voxels is predicted anomalous",
            "threshold_rule": "predicted = probseg >= threshold (threshold = lower bin edge)",
            "voxels": "brain voxels (label-brain mask) of all images with voxel ground truth, pooled",
        },
        "GeneratedBy": {"Name": "cg3d evaluate", "Version": __version__},
    }


def _slug(name: str) -> str:
    return name.replace("<", "lt").replace(">", "gt").replace("-", "to").replace(".", "p")


def _stream_image(plan: _Plan, hist: VoxelHistogram, lesions: list[LesionRecord], own: dict[str, int],
                  n_bins: int, resampled: list[str], out_of_range: list[str]) -> dict[str, Any]:
    """Add one image to the accumulators; returns its per-image facts. Arrays are dropped after."""
    image = plan.image
    ref, probseg = _load_probseg(image.probseg)
    if probseg.min() < 0 or probseg.max() > 1:
        out_of_range.append(image.bids_name)
    if not image.brain_mask.is_file():
        raise NoInputError(
            f"brain mask of {image.bids_name} not found (the voxels to evaluate)", path=image.brain_mask,
            fix="rerun 'cg3d BIDS OUTPUT_DIR group' so that the label-brain mask is written")
    brain, moved = load_on_grid(image.brain_mask, ref)
    if moved:
        resampled.append(image.brain_mask.name)
    voxel_volume = float(abs(np.linalg.det(ref.affine[:3, :3])))
    facts: dict[str, Any] = {"probseg_max": float(probseg[brain].max()) if brain.any() else float(probseg.max())}
    if plan.role == "labelled":  # lesioned, no voxel truth: patient level only
        facts["lesioned"] = True
        return facts
    if plan.gt is not None:
        truth, moved = load_on_grid(plan.gt.path, ref)
        if moved:
            resampled.append(plan.gt.path.name)
    else:
        truth = np.zeros(probseg.shape, dtype=bool)
    inside = truth & brain
    pred = None
    if image.anomaly_mask.is_file():
        pred, _ = load_on_grid(image.anomaly_mask, ref)
        pred &= brain
        own["tp"] += int(np.count_nonzero(pred & inside))
        own["fp"] += int(np.count_nonzero(pred & ~inside))
        own["fn"] += int(np.count_nonzero(~pred & inside))
        own["n_images"] += 1
    hist.update(probseg, inside, mask=brain)
    records = lesion_records(inside, probseg, voxel_volume, pred_mask=pred, n_bins=n_bins)
    lesions.extend(records)
    facts.update({
        "lesioned": bool(truth.any()),
        "lesion_volume_mm3": float(np.count_nonzero(inside)) * voxel_volume,
        "lesion_voxels_outside_brain": int(np.count_nonzero(truth & ~brain)),
        "n_lesions": len(records),
    })
    if pred is not None:
        facts["mask_dice"], facts["mask_iou"] = dice_iou_from_counts(
            int(np.count_nonzero(pred & inside)), int(np.count_nonzero(pred & ~inside)),
            int(np.count_nonzero(~pred & inside)))
    return facts


# ------------------------------------------------------------------------------------------------
# the whole command
def run_evaluation(
    output_dir: Path, gt_dir: Path, *, gt_pattern: str = "label-lesion_mask",
    healthy_without_mask: bool = False, patient_labels: Path | None = None,
    modalities: list[str] | None = None, participants: list[str] | None = None,
    n_bins: int = DEFAULT_N_BINS, size_edges: tuple[float, ...] = DEFAULT_SIZE_EDGES,
    update_report: bool = True, eval_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Evaluate every requested modality and write ``eval_<mod>.tsv/.json``; returns the results.

    ``eval_dir`` (default OUTPUT_DIR) receives the tables; the group report and ``.bidsignore``
    are updated only when the tables go into OUTPUT_DIR.
    """
    output_dir, gt_dir = Path(output_dir), Path(gt_dir)
    outputs = find_outputs(output_dir) if output_dir.is_dir() else {}
    if not outputs:
        raise NoInputError(
            f"no cg3d outputs (sub-*/[ses-*/]anat/*_label-anomaly_desc-<mod>_probseg.nii.gz) in {output_dir}",
            path=output_dir,
            fix="pass the output folder of a finished 'cg3d BIDS OUTPUT_DIR group' run "
            "(the folder that holds group_<mod>.tsv)")
    if modalities:
        missing = [m for m in modalities if m not in outputs]
        for mod in missing:
            LOGGER.warning("no %s outputs in %s: skipped", mod, output_dir)
        outputs = {m: outputs[m] for m in modalities if m in outputs}
        if not outputs:
            raise NoInputError(f"no cg3d outputs of {', '.join(modalities)} in {output_dir}",
                               path=output_dir, fix="check --modality against the group_<mod>.tsv files")
    if participants:
        wanted = {p.removeprefix("sub-") for p in participants}
        outputs = {m: [i for i in imgs if i.entities.get("sub") in wanted] for m, imgs in outputs.items()}
        if not any(outputs.values()):
            raise NoMatchError(f"--participant-label {' '.join(sorted(wanted))} selected no outputs",
                               path=output_dir, fix="check the labels against the sub-* folders")
    if not gt_dir.is_dir():
        raise NoInputError(f"ground-truth folder not found: {gt_dir}", path=gt_dir,
                           fix="pass the BIDS derivatives folder that holds the lesion masks")
    masks = find_ground_truth(gt_dir, gt_pattern)
    label_rows = read_patient_labels(patient_labels) if patient_labels else []
    if not masks and not label_rows:
        raise NoMatchError(
            f"no lesion masks sub-*/**/*_{gt_pattern}.nii[.gz] in {gt_dir}", path=gt_dir,
            fix="check --ground-truth and --gt-pattern (e.g. label-lesion_mask, desc-lesion_mask)")
    plans = {mod: plan_images(imgs, masks, label_rows, healthy_without_mask) for mod, imgs in outputs.items()}
    if not any(p.role in ("mask", "labelled") or (p.role == "healthy" and p.patient_label is not None)
               for ps in plans.values() for p in ps):
        looked_for = sorted({p.image.prefix for ps in plans.values() for p in ps})
        have = sorted({g.prefix for g in masks})
        raise NoMatchError(
            "no lesion mask matches any cg3d output; looked for masks of "
            f"{_listing(looked_for)} (named <source entities>_{gt_pattern}.nii[.gz]); found masks for "
            f"{_listing(have) or 'nothing'} in {gt_dir}",
            path=gt_dir, fix="matching rule: " + MATCHING_RULE)
    results = []
    for mod, images in outputs.items():
        if not any(p.role != "excluded" for p in plans[mod]):
            LOGGER.warning("%s: no image has a lesion mask or a patient label: skipped", mod)
            continue
        result = evaluate_modality(
            output_dir, mod, images, masks, label_rows=label_rows,
            healthy_without_mask=healthy_without_mask, n_bins=n_bins, size_edges=size_edges,
            gt_dir=gt_dir, gt_pattern=gt_pattern)
        if participants:
            result["settings"]["participants"] = sorted(wanted)
        write_results(output_dir, result, update_report=update_report, eval_dir=eval_dir)
        results.append(result)
    return results


def _listing(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


# ------------------------------------------------------------------------------------------------
# writing
METRIC_DESCRIPTIONS = {
    "patient_auroc": "patient-level AUROC of subject scores (lesioned vs healthy)",
    "patient_ap": "patient-level average precision",
    "n_lesioned": "images with lesions (patient level)",
    "n_healthy": "healthy images (patient level)",
    "voxel_auroc": "voxel AUROC over the pooled brain voxels",
    "voxel_ap": "voxel average precision over the pooled brain voxels",
    "voxel_dice_max": "best Dice over thresholds, one threshold for the batch",
    "voxel_iou": "IoU at the Dice-max threshold",
    "voxel_threshold": "Dice-max threshold: predicted = probseg >= threshold",
    "voxel_predicted_fraction": "share of the brain voxels at or above the Dice-max threshold",
    "voxel_threshold_bin": "Dice-max threshold as a bin index (threshold = bin / n_bins)",
    "mask_dice": "Dice of cg3d's own binary anomaly masks, pooled",
    "mask_iou": "IoU of cg3d's own binary anomaly masks, pooled",
    "n_lesion_voxels": "lesion voxels inside the brain masks",
    "n_brain_voxels": "brain voxels evaluated",
    "n_images_evaluated": "images in the patient-level metrics",
    "n_images_voxel": "images in the voxel-level metrics",
    "n_images_excluded": "images excluded (no ground truth or failed)",
    "n_lesions": "lesions (26-connected components)",
}


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _describe(key: str) -> str:
    if key in METRIC_DESCRIPTIONS:
        return METRIC_DESCRIPTIONS[key]
    if key.startswith("ltpr_mask_"):
        return "lesion-wise TPR at cg3d's binary mask, lesions of " + key[len("ltpr_mask_"):] + " mm^3"
    if key.startswith("ltpr_"):
        return "lesion-wise TPR at the Dice-max threshold, lesions of " + key[len("ltpr_"):] + " mm^3"
    if key.startswith("n_lesions_"):
        return "number of lesions of " + key[len("n_lesions_"):] + " mm^3"
    return key


def results_tsv(result: dict[str, Any]) -> str:
    """``metric  value  description`` table (``n/a`` for undefined values)."""
    lines = ["metric\tvalue\tdescription"]
    lines += [f"{k}\t{_fmt(v)}\t{_describe(k)}" for k, v in result["metrics"].items()]
    return "\n".join(lines) + "\n"


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def html_fragment(result: dict[str, Any]) -> str:
    """HTML section with the metric table, lesion-wise TPR and the notes."""
    esc = html.escape
    mod = result["modality"]
    metric_rows = "".join(
        f"<tr><td>{esc(k)}</td><td>{esc(_fmt(v))}</td><td>{esc(_describe(k))}</td></tr>"
        for k, v in result["metrics"].items())
    lw = result["lesionwise"]
    lesion_rows = "".join(
        f"<tr><td>{esc(a['bin'])}</td><td>{a['n_lesions']}</td><td>{esc(_fmt(a['tpr']))}</td>"
        f"<td>{esc(_fmt(b['tpr']))}</td></tr>"
        for a, b in zip(lw["at_dice_max_threshold"], lw["at_binary_mask"]))
    notes = "".join(f"<li>{esc(n)}</li>" for n in result["warnings"])
    return (
        f'<section id="evaluation-{esc(mod)}"><h2>Evaluation against lesion masks ({esc(mod)})</h2>\n'
        f"<p>Ground truth: {esc(result['settings']['ground_truth'])} "
        f"(<code>*_{esc(result['settings']['gt_pattern'])}</code>). Matching: "
        f"{esc(MATCHING_RULE)}.</p>\n"
        f"<table><thead><tr><th>metric</th><th>value</th><th>meaning</th></tr></thead>"
        f"<tbody>{metric_rows}</tbody></table>\n"
        f"<h3>Lesion-wise true-positive rate</h3><table><thead><tr><th>volume (mm^3)</th><th>lesions"
        f"</th><th>TPR at Dice-max threshold</th><th>TPR at binary mask</th></tr></thead>"
        f"<tbody>{lesion_rows}</tbody></table>\n"
        + (f"<h3>Notes</h3><ul>{notes}</ul>\n" if notes else "")
        + "</section>"
    )


def insert_section_locally(report: Path, fragment: str) -> None:
    """Replace what is between the evaluation markers (or add them before ``</body>``), atomically."""
    text = report.read_text(encoding="utf-8")
    block = f"{REPORT_START}\n{fragment}\n{REPORT_END}"
    start, end = text.find(REPORT_START), text.find(REPORT_END)
    if start >= 0 and end > start:
        text = text[:start] + block + text[end + len(REPORT_END):]
    else:
        body = text.lower().rfind("</body>")
        text = text[:body] + block + "\n" + text[body:] if body >= 0 else text + "\n" + block + "\n"
    write_text(report, text)


def update_group_report(report: Path, fragment: str) -> None:
    """Put the fragment into ``group_<mod>.html`` with the report module's function if it exists."""
    try:
        from ..reports.group import insert_evaluation_section  # type: ignore[attr-defined]
    except (ImportError, AttributeError):
        insert_evaluation_section = None
    if insert_evaluation_section is None:
        insert_section_locally(report, fragment)
    else:
        insert_evaluation_section(report, fragment)


def add_to_bidsignore(output_dir: Path, pattern: str = "eval_*") -> bool:
    """Add ``pattern`` to an existing ``.bidsignore`` (idempotent); True when the file changed."""
    path = output_dir / ".bidsignore"
    if not path.is_file():
        return False
    lines = path.read_text(encoding="utf-8").splitlines()
    if pattern in (line.strip() for line in lines):
        return False
    write_text(path, "\n".join([*lines, pattern]) + "\n")
    return True


def write_results(output_dir: Path, result: dict[str, Any], update_report: bool = True,
                  eval_dir: Path | None = None) -> None:
    """``eval_<mod>.tsv`` + ``.json``, ``.bidsignore`` and the group report section."""
    mod = result["modality"]
    target = Path(eval_dir) if eval_dir is not None else output_dir
    write_text(target / f"eval_{mod}.tsv", results_tsv(result))
    write_json(target / f"eval_{mod}.json", _json_safe(result))
    if target.resolve() != output_dir.resolve():
        return
    add_to_bidsignore(output_dir)
    report = output_dir / f"group_{mod}.html"
    if update_report and report.is_file():
        try:
            update_group_report(report, html_fragment(result))
        except (OSError, ValueError) as exc:
            LOGGER.warning("could not update %s: %s", report.name, exc)


def markdown_summary(result: dict[str, Any]) -> str:
    """Short Markdown summary printed on stdout."""
    m = result["metrics"]
    keys = ["patient_auroc", "patient_ap", "voxel_auroc", "voxel_ap", "voxel_dice_max", "voxel_iou",
            "voxel_threshold", *[k for k in m if k.startswith("ltpr_") and not k.startswith("ltpr_mask_")]]
    head = "| modality | " + " | ".join(keys) + " |"
    sep = "|" + "---|" * (len(keys) + 1)
    row = f"| {result['modality']} | " + " | ".join(_fmt(m.get(k)) for k in keys) + " |"
    return "\n".join([head, sep, row])

if __name__ == "__main__":
    sys.exit(main())
