"""Evaluation metrics on arrays (docs/method.md §6; CoDeGraph3D paper §4.1). No BIDS here.

Patient level: AUROC and AP of subject scores with scikit-learn (``roc_auc_score``,
``average_precision_score``); fewer than two classes gives NaN and a warning, not an error.

Voxel level: the brain voxels of the whole batch are pooled and one threshold serves the whole
batch, as in the paper. To keep memory bounded on hundreds of 1 mm volumes, each volume is
streamed into two fixed-bin histograms over [0, 1] (``n_bins`` bins, default 10,000), one for
lesion voxels and one for the other brain voxels (:class:`VoxelHistogram`); AUROC, AP, Dice-max
and IoU are then computed from the cumulative histograms. Scores are first quantised to their
bin, so these metrics are the exact scikit-learn values of the quantised scores and differ from
those of the raw scores only through ties inside a bin (< 1e-3 on continuous scores).

Weights: each volume may give its voxels a weight (e.g. the voxel volume in mm^3, so that images
of different resolutions are pooled by the brain volume they cover, as on one common grid); the
histograms then hold weighted counts and every metric is the sample-weighted one (scikit-learn's
``sample_weight``). All metrics are ratios of weighted counts, so a common factor cancels: the
histograms store each weight relative to the first volume's, and equal weights therefore give
bit-for-bit the unweighted (count-pooled) arithmetic (integers in float64 are exact up to 2^53).

Thresholds are bin edges: at threshold bin ``t`` a voxel is predicted anomalous when its bin index
is ``>= t``, i.e. when ``score >= t / n_bins`` (:func:`threshold_mask` applies exactly this rule).

Lesion-wise detection: a lesion is a connected component (26-connectivity) of the ground truth; it
is detected at a threshold when any of its voxels is predicted anomalous, i.e. when the maximum
score inside the lesion reaches the threshold. Storing that maximum per lesion
(:func:`lesion_records`) lets detection be read at the Dice-max threshold after the last volume.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

DEFAULT_N_BINS = 10_000
#: lesion volume bin edges in mm^3 (paper §4.2: < 100 mm^3 and > 1000 mm^3)
DEFAULT_SIZE_EDGES = (100.0, 1000.0)


class MetricWarning(UserWarning):
    """A metric could not be computed (e.g. only one class) and is reported as n/a."""


# ------------------------------------------------------------------------------------------------
# quantisation
def score_bins(scores: np.ndarray, n_bins: int = DEFAULT_N_BINS) -> np.ndarray:
    """Bin index in ``[0, n_bins)`` of each score in [0, 1] (values outside are clipped).

    Bin ``k`` holds ``k / n_bins <= score < (k + 1) / n_bins``; a score of exactly 1 is in the
    last bin. NaN scores are an error.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    idx = np.floor(np.clip(scores, 0.0, 1.0) * n_bins).astype(np.int64)
    return np.minimum(idx, n_bins - 1)


def threshold_mask(scores: np.ndarray, threshold_bin: int, n_bins: int = DEFAULT_N_BINS) -> np.ndarray:
    """Boolean prediction at threshold bin ``threshold_bin`` (``score >= threshold_bin / n_bins``)."""
    return score_bins(scores, n_bins) >= threshold_bin


# ------------------------------------------------------------------------------------------------
# streaming accumulator
class VoxelHistogram:
    """Fixed-size score histograms of positives (lesion) and negatives (other brain voxels).

    ``update`` adds one volume at a time, each voxel with the volume's ``weight`` (default 1: plain
    voxel counts). ``pos``/``neg`` hold the weighted counts per bin in units of :attr:`unit` (the
    first volume's weight), as ``float64``; ``n_pos``/``n_neg`` count voxels. The state is two
    arrays of ``n_bins`` entries whatever the number of volumes (``nbytes``); no voxel array is kept.
    """

    def __init__(self, n_bins: int = DEFAULT_N_BINS):
        if n_bins < 2:
            raise ValueError("n_bins must be >= 2")
        self.n_bins = int(n_bins)
        self.pos = np.zeros(self.n_bins, dtype=np.float64)
        self.neg = np.zeros(self.n_bins, dtype=np.float64)
        self.unit: float | None = None  #: weight of the first volume; pos/neg are in these units
        self.n_pos = 0  #: lesion voxels added (unweighted)
        self.n_neg = 0  #: other voxels added (unweighted)
        self.n_volumes = 0

    def update(self, scores: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None,
               weight: float = 1.0) -> None:
        """Add one volume's voxels (``labels`` truthy = lesion), optionally within ``mask``.

        ``weight`` (> 0, finite) is what each voxel of this volume counts, e.g. its volume in mm^3.
        """
        scores, labels = _masked(scores, labels, mask)
        bins = score_bins(scores.ravel(), self.n_bins)
        labels = labels.ravel()
        pos = np.bincount(bins[labels], minlength=self.n_bins)
        neg = np.bincount(bins[~labels], minlength=self.n_bins)
        scale = self._scale(weight)
        self.pos += pos if scale == 1.0 else pos * scale
        self.neg += neg if scale == 1.0 else neg * scale
        self.n_pos += int(pos.sum())
        self.n_neg += int(neg.sum())
        self.n_volumes += 1

    def _scale(self, weight: float) -> float:
        """``weight`` in units of the first volume's weight (which becomes the unit)."""
        weight = float(weight)
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"voxel weight must be positive and finite, got {weight}")
        if self.unit is None:
            self.unit = weight
        return weight / self.unit

    def merge(self, other: VoxelHistogram) -> None:
        """Add another accumulator with the same binning (its weights rescaled to this unit)."""
        if other.n_bins != self.n_bins:
            raise ValueError("cannot merge histograms with different n_bins")
        if other.unit is not None:
            scale = self._scale(other.unit)
            self.pos += other.pos * scale
            self.neg += other.neg * scale
        self.n_pos += other.n_pos
        self.n_neg += other.n_neg
        self.n_volumes += other.n_volumes

    @property
    def nbytes(self) -> int:
        """Memory held by the state (independent of the number of volumes)."""
        return int(self.pos.nbytes + self.neg.nbytes)

    @property
    def pos_weight(self) -> float:
        """Total weight of the lesion voxels (e.g. mm^3 when weighted by voxel volume)."""
        return float(self.pos.sum()) * (self.unit or 0.0)

    @property
    def neg_weight(self) -> float:
        """Total weight of the other voxels."""
        return float(self.neg.sum()) * (self.unit or 0.0)


def _masked(scores: np.ndarray, labels: np.ndarray,
            mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``scores`` and boolean ``labels`` (same shape), restricted to ``mask`` when given."""
    scores = np.asarray(scores)
    labels = np.asarray(labels, dtype=bool)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in shape")
    if mask is None:
        return scores, labels
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != scores.shape:
        raise ValueError(f"mask {mask.shape} and scores {scores.shape} differ in shape")
    return scores[mask], labels[mask]


# ------------------------------------------------------------------------------------------------
# metrics from histograms
def _cumulative(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Weighted) true and false positives at each threshold bin, highest threshold first, with a
    leading 0. Entry ``j`` (j = 1..n) = counts of bins ``>= n - j``; entry 0 = predict nothing.
    """
    tps = np.concatenate([[0.0], np.cumsum(np.asarray(pos, dtype=np.float64)[::-1])])
    fps = np.concatenate([[0.0], np.cumsum(np.asarray(neg, dtype=np.float64)[::-1])])
    return tps, fps


def roc_auc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve of binned (weighted) counts; ties within a bin count one half, as
    scikit-learn's ``roc_auc_score`` (with ``sample_weight`` for weighted counts)."""
    from sklearn.metrics import auc

    tps, fps = _cumulative(pos, neg)
    if tps[-1] == 0 or fps[-1] == 0:
        warnings.warn("voxel AUROC undefined: only one class among the voxels", MetricWarning, stacklevel=2)
        return math.nan
    return float(auc(fps / fps[-1], tps / tps[-1]))


def average_precision_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float:
    """Average precision of binned (weighted) counts: sum of (R_k - R_{k-1}) P_k, as scikit-learn's
    ``average_precision_score`` (no interpolation; ``sample_weight`` for weighted counts)."""
    tps, fps = _cumulative(pos, neg)
    if tps[-1] == 0:
        warnings.warn("voxel AP undefined: no lesion voxels", MetricWarning, stacklevel=2)
        return math.nan
    predicted = tps + fps
    precision = np.divide(tps, predicted, out=np.zeros(len(tps)), where=predicted > 0)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(recall) * precision[1:]))


@dataclass(frozen=True)
class DiceMax:
    """Best Dice over thresholds and the IoU at the same threshold."""

    dice: float
    iou: float
    threshold: float  #: lower bin edge: predicted = score >= threshold
    threshold_bin: int
    tp: float  #: (weighted) true positives at the threshold; voxel counts when unweighted
    fp: float
    fn: float


def dice_max_from_histograms(pos: np.ndarray, neg: np.ndarray) -> DiceMax:
    """Dice-max over all bin-edge thresholds; ties go to the highest threshold.

    ``Dice = 2 TP / (2 TP + FP + FN)``, ``IoU = TP / (TP + FP + FN)`` at that threshold (IoU is
    monotone in Dice, so this is also the best IoU); TP, FP, FN are (weighted) counts.
    """
    n_bins = len(pos)
    tps, fps = _cumulative(pos, neg)
    n_pos = float(tps[-1])
    if n_pos == 0:
        warnings.warn("voxel Dice-max undefined: no lesion voxels", MetricWarning, stacklevel=2)
        return DiceMax(math.nan, math.nan, math.nan, -1, 0.0, float(fps[-1]), 0.0)
    dice = 2.0 * tps / (n_pos + tps + fps)
    j = int(np.argmax(dice))  # first maximum = highest threshold
    tp, fp = float(tps[j]), float(fps[j])
    fn = n_pos - tp
    threshold_bin = n_bins - j  # j = 0 -> n_bins (predict nothing)
    return DiceMax(
        dice=float(dice[j]), iou=tp / (tp + fp + fn), threshold=threshold_bin / n_bins,
        threshold_bin=threshold_bin, tp=tp, fp=fp, fn=fn,
    )


def voxel_metrics(hist: VoxelHistogram) -> dict[str, float | int]:
    """AUROC, AP, Dice-max with its threshold and IoU from a filled :class:`VoxelHistogram`.

    With weights, the metrics and ``voxel_predicted_fraction`` (share of the total weight at or
    above the threshold) are weighted; ``n_lesion_voxels``/``n_brain_voxels`` count voxels.
    """
    best = dice_max_from_histograms(hist.pos, hist.neg)
    total = float(hist.pos.sum() + hist.neg.sum())
    return {
        "voxel_auroc": roc_auc_from_histograms(hist.pos, hist.neg),
        "voxel_ap": average_precision_from_histograms(hist.pos, hist.neg),
        "voxel_dice_max": best.dice,
        "voxel_iou": best.iou,
        "voxel_threshold": best.threshold,
        "voxel_threshold_bin": best.threshold_bin,
        "voxel_predicted_fraction": (best.tp + best.fp) / total if total > 0 else math.nan,
        "n_lesion_voxels": hist.n_pos,
        "n_brain_voxels": hist.n_pos + hist.n_neg,
    }


# ------------------------------------------------------------------------------------------------
# binary masks
def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean arrays (NaN when both are empty)."""
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(~pred & truth))
    return dice_iou_from_counts(tp, fp, fn)


def dice_iou_from_counts(tp: float, fp: float, fn: float) -> tuple[float, float]:
    """Dice and IoU from (weighted) confusion counts (NaN when nothing is predicted nor true)."""
    if tp + fp + fn == 0:
        return math.nan, math.nan
    return 2.0 * tp / (2.0 * tp + fp + fn), tp / (tp + fp + fn)


def dice_max(scores: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_N_BINS) -> DiceMax:
    """Dice-max of one array of scores in [0, 1] against boolean labels (convenience)."""
    hist = VoxelHistogram(n_bins)
    hist.update(scores, labels)
    return dice_max_from_histograms(hist.pos, hist.neg)


# ------------------------------------------------------------------------------------------------
# patient level
def patient_metrics(scores: Sequence[float], labels: Sequence[int | bool]) -> dict[str, float | int]:
    """Patient-level AUROC and AP (scikit-learn); NaN with a warning when a class is missing."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    out: dict[str, float | int] = {"patient_auroc": math.nan, "patient_ap": math.nan,
                                   "n_lesioned": n_pos, "n_healthy": n_neg}
    if n_pos == 0 or n_neg == 0:
        warnings.warn(
            f"patient-level AUROC/AP need lesioned and healthy images; got {n_pos} lesioned and "
            f"{n_neg} healthy: reported as n/a", MetricWarning, stacklevel=2,
        )
        return out
    out["patient_auroc"] = float(roc_auc_score(y, s))
    out["patient_ap"] = float(average_precision_score(y, s))
    return out


# ------------------------------------------------------------------------------------------------
# lesion-wise detection
_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


def label_lesions(truth: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of a 3D boolean ground truth (26-connectivity)."""
    return ndimage.label(np.asarray(truth, dtype=bool), structure=_STRUCTURE_26)


@dataclass(frozen=True)
class LesionRecord:
    """One ground-truth lesion: its volume, the highest score bin inside it, and detection by a mask."""

    volume_mm3: float
    max_bin: int
    detected_by_mask: bool | None = None

    def detected_at(self, threshold_bin: int) -> bool:
        """Detected at a threshold: some voxel of the lesion has ``bin >= threshold_bin``."""
        return self.max_bin >= threshold_bin


def lesion_records(
    truth: np.ndarray,
    scores: np.ndarray,
    voxel_volume_mm3: float,
    pred_mask: np.ndarray | None = None,
    n_bins: int = DEFAULT_N_BINS,
) -> list[LesionRecord]:
    """Per-lesion records of one volume (lesions = 26-connected components of ``truth``)."""
    labels, n = label_lesions(truth)
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    sizes = ndimage.sum_labels(np.ones(labels.shape, dtype=np.int32), labels, index)
    max_bins = ndimage.maximum(score_bins(scores, n_bins), labels, index)
    if pred_mask is None:
        hits = [None] * n
    else:
        hits = [bool(h) for h in ndimage.maximum(np.asarray(pred_mask, dtype=bool), labels, index)]
    return [
        LesionRecord(float(size) * voxel_volume_mm3, int(mb), hit)
        for size, mb, hit in zip(np.atleast_1d(sizes), np.atleast_1d(max_bins), hits)
    ]


def size_bin_names(edges: Sequence[float] = DEFAULT_SIZE_EDGES) -> list[str]:
    """Names of the volume bins, e.g. ``<100``, ``100-1000``, ``>1000`` (mm^3)."""
    edges = [float(e) for e in edges]
    fmt = [f"{e:g}" for e in edges]
    names = [f"<{fmt[0]}"]
    names += [f"{a}-{b}" for a, b in zip(fmt[:-1], fmt[1:])]
    names.append(f">{fmt[-1]}")
    return names


def size_bin_index(volume_mm3: float, edges: Sequence[float] = DEFAULT_SIZE_EDGES) -> int:
    """Bin of a lesion volume: ``v < e0`` -> 0, ``e0 <= v <= e1`` -> 1, ..., ``v > e_last`` -> last."""
    for k, edge in enumerate(edges):
        if volume_mm3 < edge or (k > 0 and volume_mm3 <= edge):
            return k
    return len(edges)


def lesionwise_tpr(
    volumes_mm3: Sequence[float],
    detected: Sequence[bool],
    edges: Sequence[float] = DEFAULT_SIZE_EDGES,
) -> list[dict[str, float | int | str]]:
    """Lesion-wise true-positive rate per volume bin (plus ``all``); NaN for an empty bin."""
    names = size_bin_names(edges)
    n = np.zeros(len(names) + 1, dtype=int)
    hit = np.zeros(len(names) + 1, dtype=int)
    for volume, det in zip(volumes_mm3, detected):
        k = size_bin_index(volume, edges)
        n[[k, -1]] += 1
        hit[[k, -1]] += int(bool(det))
    return [
        {"bin": name, "n_lesions": int(n[k]), "n_detected": int(hit[k]),
         "tpr": float(hit[k] / n[k]) if n[k] else math.nan}
        for k, name in enumerate([*names, "all"])
    ]
