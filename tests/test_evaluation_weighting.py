"""Voxel weighting of the pooled voxel metrics (``cg3d evaluate --voxel-weighting {volume,count}``).

Voxels of images on different native grids cover different volumes. Weighted by voxel volume, the
pooled metrics must equal those of the same cohort resampled to one common grid; with equal weights
they must be exactly the count-pooled numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from cg3d_bids import evaluation as evl
from cg3d_bids.cli import evaluate as ev
from cg3d_bids.core.metrics import VoxelHistogram, dice_max_from_histograms, score_bins, voxel_metrics

#: metrics that depend on the voxel weighting
VOXEL_KEYS = ("voxel_auroc", "voxel_ap", "voxel_dice_max", "voxel_iou", "voxel_threshold",
              "voxel_threshold_bin", "voxel_predicted_fraction", "mask_dice", "mask_iou")
#: volume-weighted on native grids vs count-pooled on a common grid: the same sums of the same
#: numbers, only grouped differently, so they agree to floating-point rounding
COMMON_GRID_TOLERANCE = 1e-12


def _volumes(seed: int, n: int = 3, shape=(20, 20, 20)) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        labels = rng.random(shape) < 0.05
        scores = np.clip(rng.normal(0.4 + 0.25 * labels, 0.15), 0, 1).astype(np.float32)
        brain = rng.random(shape) < 0.8
        out.append((scores, labels, brain))
    return out


# ------------------------------------------------------------------------------------------------
# core: weighted histograms
@pytest.mark.parametrize("weight", [0.729, 8.0, 1e-3, 3.3])
def test_equal_weights_reproduce_count_pooling_exactly(weight):
    counted, weighted = VoxelHistogram(1000), VoxelHistogram(1000)
    for scores, labels, brain in _volumes(0):
        counted.update(scores, labels, mask=brain)
        weighted.update(scores, labels, mask=brain, weight=weight)
    assert np.array_equal(counted.pos, weighted.pos) and np.array_equal(counted.neg, weighted.neg)
    assert voxel_metrics(weighted) == voxel_metrics(counted)  # exact, not approximately
    assert weighted.pos_weight == pytest.approx(weight * counted.n_pos, rel=1e-12)


def test_weighted_metrics_are_sklearns_sample_weighted_ones():
    hist = VoxelHistogram(200)
    scores, labels, weights = [], [], []
    for (s, y, brain), w in zip(_volumes(1), (0.729, 8.0, 1.0)):
        hist.update(s, y, mask=brain, weight=w)
        scores.append(s[brain])
        labels.append(y[brain])
        weights.append(np.full(int(brain.sum()), w))
    s, y, w = np.concatenate(scores), np.concatenate(labels), np.concatenate(weights)
    q = (score_bins(s, 200) + 0.5) / 200  # the quantised scores the histogram sees
    m = voxel_metrics(hist)
    assert m["voxel_auroc"] == pytest.approx(roc_auc_score(y, q, sample_weight=w), abs=1e-12)
    assert m["voxel_ap"] == pytest.approx(average_precision_score(y, q, sample_weight=w), abs=1e-12)
    pred = score_bins(s, 200) >= m["voxel_threshold_bin"]
    tp, fp, fn = (w * (pred & y)).sum(), (w * (pred & ~y)).sum(), (w * (~pred & y)).sum()
    assert m["voxel_dice_max"] == pytest.approx(2 * tp / (2 * tp + fp + fn), rel=1e-12)
    assert m["voxel_iou"] == pytest.approx(tp / (tp + fp + fn), rel=1e-12)
    assert m["voxel_predicted_fraction"] == pytest.approx(w[pred].sum() / w.sum(), rel=1e-12)
    assert (m["n_lesion_voxels"], m["n_brain_voxels"]) == (int(y.sum()), y.size)  # counts, not weights


def test_weight_equals_replicating_voxels():
    (scores, labels, brain), = _volumes(2, n=1)
    other_scores, other_labels, other_brain = _volumes(3, n=1)[0]
    weighted, replicated = VoxelHistogram(500), VoxelHistogram(500)
    weighted.update(other_scores, other_labels, mask=other_brain)
    weighted.update(scores, labels, mask=brain, weight=8.0)
    replicated.update(other_scores, other_labels, mask=other_brain)
    for _ in range(8):
        replicated.update(scores, labels, mask=brain)
    assert voxel_metrics(weighted)["voxel_auroc"] == voxel_metrics(replicated)["voxel_auroc"]
    best_w = dice_max_from_histograms(weighted.pos, weighted.neg)
    best_r = dice_max_from_histograms(replicated.pos, replicated.neg)
    assert (best_w.dice, best_w.threshold_bin, best_w.tp) == (best_r.dice, best_r.threshold_bin, best_r.tp)


def test_merge_rescales_to_the_first_unit_and_bad_weights_are_rejected():
    vols = _volumes(4)
    whole, a, b = VoxelHistogram(300), VoxelHistogram(300), VoxelHistogram(300)
    for (s, y, m), w in zip(vols, (2.0, 0.5, 0.5)):
        whole.update(s, y, mask=m, weight=w)
    a.update(*vols[0], weight=2.0)
    b.update(*vols[1], weight=0.5)
    b.update(*vols[2], weight=0.5)
    a.merge(b)
    assert np.allclose(a.pos, whole.pos, rtol=1e-15) and np.allclose(a.neg, whole.neg, rtol=1e-15)
    assert (a.n_pos, a.n_neg, a.n_volumes) == (whole.n_pos, whole.n_neg, 3)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive and finite"):
            VoxelHistogram(10).update(np.array([0.5]), np.array([True]), weight=bad)


# ------------------------------------------------------------------------------------------------
# app: a mixed-resolution cohort on disk
FINE = np.diag([1.0, 1.0, 1.0, 1.0])  # 1 mm, 16^3 voxels
COARSE = np.diag([2.0, 2.0, 2.0, 1.0])  # 2 mm, 8^3 voxels, the same 16 mm field of view
#: 2 mm voxel i is centred at 2i mm; its eight 1 mm children are centred at 2i -/+ 0.5 mm
COARSE_ON_FINE = np.array([[1, 0, 0, -0.5], [0, 1, 0, -0.5], [0, 0, 1, -0.5], [0, 0, 0, 1.0]])


def _upsample(data: np.ndarray) -> np.ndarray:
    """Nearest-neighbour 2 mm -> 1 mm (each voxel becomes 2 x 2 x 2 voxels of the same value)."""
    return np.repeat(np.repeat(np.repeat(data, 2, 0), 2, 1), 2, 2)


def _coarse_subject(rng: np.random.Generator, lesioned: bool) -> dict[str, np.ndarray]:
    """2 mm image with a map that separates its lesion well."""
    brain = np.zeros((8, 8, 8), np.uint8)
    brain[1:7, 1:7, 1:7] = 1
    lesion = np.zeros_like(brain)
    if lesioned:
        lesion[2:4, 2:4, 2:4] = 1  # 8 voxels = 64 mm^3
    prob = rng.uniform(0.0, 0.5, brain.shape)
    prob[lesion > 0] = rng.uniform(0.7, 0.95, int(lesion.sum()))
    return {"brain": brain, "lesion": lesion, "prob": np.where(brain > 0, prob, 0).astype(np.float32)}


def _fine_subject(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """1 mm image whose map barely separates its lesion."""
    brain = np.zeros((16, 16, 16), np.uint8)
    brain[2:14, 2:14, 2:14] = 1
    lesion = np.zeros_like(brain)
    lesion[4:8, 4:8, 4:8] = 1  # 64 voxels = 64 mm^3
    prob = rng.uniform(0.2, 0.55, brain.shape)
    prob[lesion > 0] = rng.uniform(0.3, 0.6, int(lesion.sum()))
    return {"brain": brain, "lesion": lesion, "prob": np.where(brain > 0, prob, 0).astype(np.float32)}


def _write_subject(out: Path, gt: Path, sub: str, arrays: dict[str, np.ndarray], affine: np.ndarray) -> None:
    anat = out / f"sub-{sub}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    files = {
        anat / f"sub-{sub}_label-anomaly_desc-T2w_probseg.nii.gz": arrays["prob"],
        anat / f"sub-{sub}_label-anomaly_desc-T2w_mask.nii.gz": (arrays["prob"] > 0.5).astype(np.uint8),
        anat / f"sub-{sub}_label-brain_desc-T2w_mask.nii.gz": arrays["brain"],
        gt / f"sub-{sub}" / "anat" / f"sub-{sub}_label-lesion_mask.nii.gz": arrays["lesion"],
    }
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.Nifti1Image(data, affine).to_filename(str(path))


def _cohort(root: Path, common_grid: bool) -> tuple[Path, Path]:
    """sub-01 at 1 mm (poor map), sub-02 (lesioned) and sub-03 (healthy) at 2 mm (good maps);
    with ``common_grid`` the 2 mm images are upsampled (nearest) onto a 1 mm grid."""
    rng = np.random.default_rng(7)
    fine, coarse, healthy = _fine_subject(rng), _coarse_subject(rng, True), _coarse_subject(rng, False)
    out, gt = root / "out", root / "lesions"
    _write_subject(out, gt, "01", fine, FINE)
    for sub, arrays in (("02", coarse), ("03", healthy)):
        if common_grid:
            _write_subject(out, gt, sub, {k: _upsample(v) for k, v in arrays.items()}, COARSE_ON_FINE)
        else:
            _write_subject(out, gt, sub, arrays, COARSE)
    return out, gt


def _evaluate(out: Path, gt: Path, weighting: str) -> dict:
    assert ev.main([str(out), "--ground-truth", str(gt), "--voxel-weighting", weighting]) == 0
    return json.loads((out / "eval_T2w.json").read_text())


def test_volume_weighting_equals_the_cohort_on_a_common_grid(tmp_path):
    mixed_out, mixed_gt = _cohort(tmp_path / "mixed", common_grid=False)
    common_out, common_gt = _cohort(tmp_path / "common", common_grid=True)
    volume = _evaluate(mixed_out, mixed_gt, "volume")
    common = _evaluate(common_out, common_gt, "count")
    assert volume["metrics"]["n_brain_voxels"] == 12**3 + 2 * 6**3  # native voxels
    assert common["metrics"]["n_brain_voxels"] == 3 * 12**3  # same brains on 1 mm voxels
    for key in VOXEL_KEYS:
        assert volume["metrics"][key] == pytest.approx(common["metrics"][key], abs=COMMON_GRID_TOLERANCE), key
    # weighting by volume on a common grid changes nothing: every voxel has the same volume
    common_volume = _evaluate(common_out, common_gt, "volume")
    assert all(common_volume["metrics"][k] == common["metrics"][k] for k in VOXEL_KEYS)
    # lesion-wise detection is read from lesion volumes in mm^3 on either grid
    assert volume["lesionwise"] == common["lesionwise"]


def test_count_pooling_lets_the_fine_image_dominate(tmp_path):
    out, gt = _cohort(tmp_path, common_grid=False)
    volume, count = _evaluate(out, gt, "volume")["metrics"], _evaluate(out, gt, "count")["metrics"]
    # the 1 mm image has 8 voxels per 2 mm voxel and the poor map: counted, it drags the pooled
    # metrics down; weighted by volume, each image counts by the brain volume it covers
    assert count["voxel_auroc"] < volume["voxel_auroc"] - 0.05
    assert count["voxel_ap"] < volume["voxel_ap"] - 0.05
    assert count["voxel_dice_max"] < volume["voxel_dice_max"]
    # patient-level numbers do not depend on the voxel weighting
    assert (count["patient_auroc"], count["n_lesioned"]) == (volume["patient_auroc"], volume["n_lesioned"])


def test_voxel_weight():
    assert evl.voxel_volume_mm3(np.diag([0.9, 0.9, 0.9, 1.0])) == pytest.approx(0.729)
    assert evl.voxel_volume_mm3(np.diag([-2.0, 2.0, 2.0, 1.0])) == pytest.approx(8.0)  # flipped axis
    assert evl.voxel_weight(8.0, "volume") == 8.0 and evl.voxel_weight(8.0, "count") == 1.0
    with pytest.raises(ValueError, match="unknown voxel weighting"):
        evl.voxel_weight(8.0, "area")
