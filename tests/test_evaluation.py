"""Evaluation metrics (cg3d_bids.core.metrics), the evaluation logic (cg3d_bids.evaluation) and the
``cg3d evaluate`` command (cg3d_bids.cli.evaluate)."""

from __future__ import annotations

import json
import math
import tracemalloc
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from cg3d_bids import evaluation as evl
from cg3d_bids.cli import evaluate as ev
from cg3d_bids.core.metrics import (
    LesionRecord,
    MetricWarning,
    VoxelHistogram,
    average_precision_from_histograms,
    dice_iou,
    dice_max,
    dice_max_from_histograms,
    label_lesions,
    lesion_records,
    lesionwise_tpr,
    patient_metrics,
    roc_auc_from_histograms,
    score_bins,
    size_bin_names,
    threshold_mask,
    voxel_metrics,
)
from cg3d_bids.errors import InputDataError
from cg3d_bids.reports import EVALUATION_END, EVALUATION_START


# ------------------------------------------------------------------------------------------------
# histogram metrics vs scikit-learn
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_histogram_metrics_match_sklearn_exact(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(50_000) < rng.uniform(0.01, 0.2)
    scores = np.clip(rng.normal(0.45 + rng.uniform(0.05, 0.3) * labels, 0.15), 0, 1)
    hist = VoxelHistogram(10_000)
    for chunk in np.array_split(np.arange(labels.size), 7):  # streamed in pieces
        hist.update(scores[chunk], labels[chunk])
    assert abs(roc_auc_from_histograms(hist.pos, hist.neg) - roc_auc_score(labels, scores)) < 1e-3
    assert abs(average_precision_from_histograms(hist.pos, hist.neg)
               - average_precision_score(labels, scores)) < 1e-3


def test_histogram_metrics_are_exact_on_quantised_scores():
    rng = np.random.default_rng(3)
    labels = rng.random(5_000) < 0.3
    scores = (rng.integers(0, 50, 5_000) + 0.5) / 50 * 0.5 + 0.25 * labels  # ties, few values
    hist = VoxelHistogram(100)
    hist.update(scores, labels)
    q = (score_bins(scores, 100) + 0.5) / 100
    assert roc_auc_from_histograms(hist.pos, hist.neg) == pytest.approx(roc_auc_score(labels, q), abs=1e-12)
    assert average_precision_from_histograms(hist.pos, hist.neg) == pytest.approx(
        average_precision_score(labels, q), abs=1e-12)


def test_single_class_voxels_give_nan_with_warning():
    hist = VoxelHistogram(10)
    hist.update(np.array([0.1, 0.5]), np.array([False, False]))
    with pytest.warns(MetricWarning):
        assert math.isnan(roc_auc_from_histograms(hist.pos, hist.neg))


# ------------------------------------------------------------------------------------------------
# Dice-max / IoU on hand-made arrays
def test_dice_max_hand_made():
    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.1])
    labels = np.array([1, 1, 0, 1, 0], dtype=bool)
    # thresholds: >=.9 D=.5, >=.8 D=.8, >=.7 D=4/6, >=.2 D=6/7 (TP3 FP1 FN0), >=.1 D=.75
    best = dice_max(scores, labels, n_bins=10)
    assert best.dice == pytest.approx(6 / 7)
    assert best.iou == pytest.approx(3 / 4)
    assert best.threshold == pytest.approx(0.2)
    assert (best.tp, best.fp, best.fn) == (3, 1, 0)
    pred = threshold_mask(scores, best.threshold_bin, 10)
    assert dice_iou(pred, labels) == pytest.approx((6 / 7, 3 / 4))


def test_dice_max_perfect_and_ties_choose_highest_threshold():
    scores = np.array([0.95, 0.95, 0.05, 0.05])
    labels = np.array([1, 1, 0, 0], dtype=bool)
    best = dice_max(scores, labels, n_bins=100)
    assert best.dice == 1.0 and best.iou == 1.0
    assert best.threshold == pytest.approx(0.95)  # not 0.06, which gives the same Dice


def test_dice_iou_binary():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True  # 8 voxels
    b[1:3] = True  # 8 voxels, 4 shared
    assert dice_iou(a, b) == pytest.approx((0.5, 4 / 12))
    assert all(math.isnan(x) for x in dice_iou(np.zeros(3, bool), np.zeros(3, bool)))


def test_patient_metrics_sklearn_and_single_class():
    out = patient_metrics([0.9, 0.4, 0.5], [1, 1, 0])
    assert out["patient_auroc"] == pytest.approx(0.5)
    assert out["patient_ap"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    with pytest.warns(MetricWarning, match="lesioned and healthy"):
        out = patient_metrics([0.9, 0.4], [1, 1])
    assert math.isnan(out["patient_auroc"]) and math.isnan(out["patient_ap"])


# ------------------------------------------------------------------------------------------------
# lesion-wise TPR
def _three_lesions() -> tuple[np.ndarray, np.ndarray]:
    truth = np.zeros((40, 40, 40), bool)
    scores = np.full(truth.shape, 0.05, np.float32)
    truth[2:5, 2:5, 2:5] = True  # 27 voxels
    scores[3, 3, 3] = 0.3
    truth[10:15, 10:15, 10:15] = True  # 125 voxels
    scores[12, 12, 12] = 0.6
    truth[22:33, 22:33, 22:33] = True  # 1331 voxels
    scores[22:33, 22:33, 22:33] = 0.9
    return truth, scores


def test_lesionwise_tpr_by_size_bins():
    truth, scores = _three_lesions()
    records = lesion_records(truth, scores, voxel_volume_mm3=1.0)
    assert sorted(r.volume_mm3 for r in records) == [27.0, 125.0, 1331.0]
    detected = [r.detected_at(5000) for r in records]  # threshold 0.5
    table = {row["bin"]: row for row in lesionwise_tpr([r.volume_mm3 for r in records], detected)}
    assert size_bin_names() == ["<100", "100-1000", ">1000"]
    assert (table["<100"]["n_lesions"], table["<100"]["tpr"]) == (1, 0.0)
    assert (table["100-1000"]["n_lesions"], table["100-1000"]["tpr"]) == (1, 1.0)
    assert (table[">1000"]["n_lesions"], table[">1000"]["tpr"]) == (1, 1.0)
    assert table["all"]["tpr"] == pytest.approx(2 / 3)
    # 2 mm voxels: 8 times the volume: 216 and exactly 1000 mm3 (edge included) in 100-1000
    big = lesion_records(truth, scores, voxel_volume_mm3=8.0)
    table = {row["bin"]: row for row in lesionwise_tpr([r.volume_mm3 for r in big],
                                                       [r.detected_at(5000) for r in big])}
    assert table["<100"]["n_lesions"] == 0 and math.isnan(table["<100"]["tpr"])
    assert table["100-1000"]["n_lesions"] == 2 and table[">1000"]["n_lesions"] == 1


def test_lesion_detection_by_binary_mask_and_26_connectivity():
    truth, scores = _three_lesions()
    pred = np.zeros(truth.shape, bool)
    pred[3, 3, 3] = True  # hits only the small lesion
    records = sorted(lesion_records(truth, scores, 1.0, pred_mask=pred), key=lambda r: r.volume_mm3)
    assert [r.detected_by_mask for r in records] == [True, False, False]
    corner = np.zeros((3, 3, 3), bool)
    corner[0, 0, 0] = corner[1, 1, 1] = True  # touch at a corner only
    assert label_lesions(corner)[1] == 1
    assert LesionRecord(10.0, 7).detected_at(7) and not LesionRecord(10.0, 6).detected_at(7)


# ------------------------------------------------------------------------------------------------
# bounded memory
def _volume(rng: np.random.Generator, shape=(64, 64, 64)) -> tuple[np.ndarray, np.ndarray]:
    scores = rng.random(shape, dtype=np.float32)
    labels = scores > 0.97
    return scores, labels


def test_accumulator_state_is_independent_of_number_of_volumes():
    rng = np.random.default_rng(0)
    one, many = VoxelHistogram(), VoxelHistogram()
    one.update(*_volume(rng))
    size_one = one.nbytes
    for _ in range(25):
        many.update(*_volume(rng))
    assert many.nbytes == size_one == 2 * 8 * 10_000
    assert many.n_volumes == 25 and many.n_pos + many.n_neg == 25 * 64**3
    # no array attribute other than the two histograms
    arrays = [k for k, v in vars(many).items() if isinstance(v, np.ndarray)]
    assert sorted(arrays) == ["neg", "pos"]


def test_streaming_peak_memory_does_not_grow_with_volumes():
    rng = np.random.default_rng(1)
    volume_bytes = 64**3 * 4

    def peak(n_volumes: int) -> int:
        hist = VoxelHistogram()
        tracemalloc.start()
        for _ in range(n_volumes):
            scores, labels = _volume(rng)
            hist.update(scores, labels)
            del scores, labels
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    p2, p20 = peak(2), peak(20)
    assert p20 < 1.3 * p2  # concatenating 20 volumes would be ~10x
    assert p20 < 12 * volume_bytes


# ------------------------------------------------------------------------------------------------
# the evaluate command on a fake cg3d output folder
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
SHAPE = (12, 12, 12)


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(data, affine).to_filename(str(path))


def _brain() -> np.ndarray:
    brain = np.zeros(SHAPE, np.uint8)
    brain[2:10, 2:10, 2:10] = 1
    return brain


# (subject, lesion box or None for an empty mask, "nogt" for no mask, subject score)
SUBJECTS = {
    "01": ((slice(3, 6), slice(3, 6), slice(3, 6)), 0.9),  # 27 voxels * 8 mm3 = 216 mm3
    "02": ((slice(6, 8), slice(6, 8), slice(6, 7)), 0.4),  # 4 voxels = 32 mm3
    "03": (None, 0.5),  # empty mask: healthy
    "04": ("nogt", 0.2),  # no mask at all
}


def _probseg(sub: str, box) -> np.ndarray:
    rng = np.random.default_rng(int(sub))
    data = (rng.integers(0, 10, SHAPE) / 10 * 0.5).astype(np.float32)  # values 0 .. 0.45
    if isinstance(box, tuple):
        data[box] += 0.3 if sub == "01" else 0.1
    data[_brain() == 0] = 0
    return data


def _fake_run(tmp_path: Path, mod: str = "T2w", gt_affine: np.ndarray | None = None) -> tuple[Path, Path]:
    out = tmp_path / "out"
    gt = tmp_path / "lesions"
    rows = ["participant_id\tsession_id\tbids_name\tscore_max\tstatus"]
    for sub, (box, score) in SUBJECTS.items():
        anat = out / f"sub-{sub}" / "anat"
        prob = _probseg(sub, box)
        _save(anat / f"sub-{sub}_label-anomaly_desc-{mod}_probseg.nii.gz", prob)
        _save(anat / f"sub-{sub}_label-anomaly_desc-{mod}_mask.nii.gz", (prob > 0.5).astype(np.uint8))
        _save(anat / f"sub-{sub}_label-brain_desc-{mod}_mask.nii.gz", _brain())
        rows.append(f"sub-{sub}\tn/a\tsub-{sub}_{mod}\t{score}\tok")
        if box == "nogt":
            continue
        lesion = np.zeros(SHAPE, np.uint8)
        if box is not None:
            lesion[box] = 1
        path = gt / f"sub-{sub}" / "anat" / f"sub-{sub}_label-lesion_mask.nii.gz"
        if gt_affine is None:
            _save(path, lesion)
        else:  # the same lesion on a 1 mm grid
            _save(path, np.repeat(np.repeat(np.repeat(lesion, 2, 0), 2, 1), 2, 2), gt_affine)
    (out / f"group_{mod}.tsv").write_text("\n".join(rows) + "\n")
    (out / ".bidsignore").write_text("*.html\nfigures\ngroup_*\n")
    return out, gt


def _expected_voxel(subjects=("01", "02", "03")) -> dict[str, float]:
    scores, labels = [], []
    for sub in subjects:
        box = SUBJECTS[sub][0]
        prob = _probseg(sub, box)
        lesion = np.zeros(SHAPE, bool)
        if isinstance(box, tuple):
            lesion[box] = True
        brain = _brain().astype(bool)
        scores.append(prob[brain])
        labels.append(lesion[brain])
    s, y = np.concatenate(scores), np.concatenate(labels)
    dices = [(2 * np.sum((s >= t) & y) / (np.sum(s >= t) + y.sum()), t) for t in np.unique(s)]
    best, thr = max(dices, key=lambda d: (d[0], d[1]))
    return {"voxel_auroc": roc_auc_score(y, s), "voxel_ap": average_precision_score(y, s),
            "voxel_dice_max": best, "voxel_threshold": thr, "n_brain_voxels": s.size}


def test_evaluate_writes_expected_numbers(tmp_path, capsys):
    out, gt = _fake_run(tmp_path)
    assert ev.main([str(out), "--ground-truth", str(gt)]) == 0
    table = (out / "eval_T2w.tsv").read_text().splitlines()
    assert table[0] == "metric\tvalue\tdescription"
    tsv = {line.split("\t")[0]: line.split("\t")[1] for line in table[1:]}
    result = json.loads((out / "eval_T2w.json").read_text())
    m = result["metrics"]
    assert float(tsv["patient_auroc"]) == pytest.approx(m["patient_auroc"])
    # patient: lesioned 0.9, 0.4; healthy 0.5 (sub-04 excluded without --healthy-without-mask)
    assert m["patient_auroc"] == pytest.approx(0.5)
    assert m["patient_ap"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert (m["n_lesioned"], m["n_healthy"], m["n_images_excluded"]) == (2, 1, 1)
    assert m["subject_score_source"].startswith("score_max")
    expected = _expected_voxel()
    for key in ("voxel_auroc", "voxel_ap", "voxel_dice_max"):
        assert m[key] == pytest.approx(expected[key], abs=1e-3), key
    assert m["voxel_threshold"] == pytest.approx(expected["voxel_threshold"], abs=1e-4)
    assert m["n_brain_voxels"] == expected["n_brain_voxels"] == 3 * 512
    assert m["voxel_iou"] == pytest.approx(m["voxel_dice_max"] / (2 - m["voxel_dice_max"]))
    # lesions: 216 mm3 (100-1000) and 32 mm3 (<100)
    assert (m["n_lesions_lt100"], m["n_lesions_100to1000"], m["n_lesions_gt1000"]) == (1, 1, 0)
    assert m["n_lesions"] == 2
    excluded = [r for r in result["images"] if r["role"] == "excluded"]
    assert [r["bids_name"] for r in excluded] == ["sub-04_T2w"]
    assert any("excluded" in w for w in result["warnings"])
    assert "eval_*" in (out / ".bidsignore").read_text().splitlines()
    assert "| T2w |" in capsys.readouterr().out


def test_healthy_without_mask_adds_images_as_healthy(tmp_path):
    out, gt = _fake_run(tmp_path)
    assert ev.main([str(out), "--ground-truth", str(gt), "--healthy-without-mask"]) == 0
    m = json.loads((out / "eval_T2w.json").read_text())["metrics"]
    # healthy now 0.5 and 0.2: pairs (0.9>0.5, 0.9>0.2, 0.4<0.5, 0.4>0.2) -> 0.75
    assert m["patient_auroc"] == pytest.approx(0.75)
    assert (m["n_healthy"], m["n_images_excluded"], m["n_images_voxel"]) == (2, 0, 4)
    assert m["n_brain_voxels"] == 4 * 512
    assert m["voxel_auroc"] == pytest.approx(_expected_voxel(("01", "02", "03", "04"))["voxel_auroc"], abs=1e-3)


def test_ground_truth_on_another_grid_is_resampled(tmp_path):
    out, gt = _fake_run(tmp_path, gt_affine=np.diag([1.0, 1.0, 1.0, 1.0]) @ np.array(
        [[1, 0, 0, -0.5], [0, 1, 0, -0.5], [0, 0, 1, -0.5], [0, 0, 0, 1]]))
    assert ev.main([str(out), "--ground-truth", str(gt)]) == 0
    result = json.loads((out / "eval_T2w.json").read_text())
    assert result["metrics"]["voxel_auroc"] == pytest.approx(_expected_voxel()["voxel_auroc"], abs=1e-3)
    assert any("resampled" in w for w in result["warnings"])


def test_matching_rule_subset_entities_and_desc_modality(tmp_path):
    masks = [
        evl.GroundTruth(Path("a"), "sub-01", {"sub": "01"}, None),
        evl.GroundTruth(Path("b"), "sub-01_acq-ax", {"sub": "01", "acq": "ax"}, None),
        evl.GroundTruth(Path("c"), "sub-02_desc-FLAIR", {"sub": "02", "desc": "FLAIR"}, "FLAIR"),
        evl.GroundTruth(Path("d"), "sub-03_ses-1", {"sub": "03", "ses": "1"}, None),
    ]

    def image(prefix: str, mod: str) -> evl.OutputImage:
        return evl.OutputImage(prefix, mod, Path("p"), Path("b"), Path("m"), evl.prefix_entities(prefix))

    assert evl.match_ground_truth(image("sub-01", "T1w"), masks).path == Path("a")
    assert evl.match_ground_truth(image("sub-01_acq-ax", "T2w"), masks).path == Path("b")  # most specific
    assert evl.match_ground_truth(image("sub-01_acq-sag", "T2w"), masks).path == Path("a")
    assert evl.match_ground_truth(image("sub-02", "FLAIR"), masks).path == Path("c")
    assert evl.match_ground_truth(image("sub-02", "T2w"), masks) is None
    assert evl.match_ground_truth(image("sub-03_ses-1", "T2w"), masks).path == Path("d")
    assert evl.match_ground_truth(image("sub-03_ses-2", "T2w"), masks) is None
    assert evl.match_ground_truth(image("sub-03", "T2w"), masks) is None
    tie = masks + [evl.GroundTruth(Path("e"), "sub-01_run-1", {"sub": "01", "run": "1"}, None)]
    with pytest.raises(InputDataError, match="equally well"):
        evl.match_ground_truth(image("sub-01_acq-ax_run-1", "T2w"), tie)


def test_patient_labels_tsv_for_images_without_mask(tmp_path):
    out, gt = _fake_run(tmp_path)
    labels = tmp_path / "labels.tsv"
    labels.write_text("participant_id\tlesion\nsub-04\t1\n")
    assert ev.main([str(out), "--ground-truth", str(gt), "--patient-labels", str(labels)]) == 0
    result = json.loads((out / "eval_T2w.json").read_text())
    m = result["metrics"]
    # sub-04 (0.2) is lesioned at patient level only: lesioned 0.9, 0.4, 0.2 vs healthy 0.5
    assert m["patient_auroc"] == pytest.approx(1 / 3)
    assert (m["n_lesioned"], m["n_images_voxel"], m["n_brain_voxels"]) == (3, 3, 3 * 512)


def test_report_section_replaced_between_markers(tmp_path):
    out, gt = _fake_run(tmp_path)
    report = out / "group_T2w.html"
    report.write_text(f"<html><body><h1>x</h1>\n{EVALUATION_START}\nOLD-SECTION\n{EVALUATION_END}\n</body></html>")
    for _ in range(2):
        assert ev.main([str(out), "--ground-truth", str(gt)]) == 0
    text = report.read_text()
    assert "OLD-SECTION" not in text and text.count("Evaluation against lesion masks") == 1
    assert text.count(EVALUATION_START) == 1 and "<h1>x</h1>" in text
    assert (out / ".bidsignore").read_text().splitlines().count("eval_*") == 1


def test_exit_codes(tmp_path, capsys):
    out, gt = _fake_run(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ev.main([str(empty), "--ground-truth", str(gt)]) == 66
    assert "OUTPUT_DIR group" in capsys.readouterr().err
    assert ev.main([str(out), "--ground-truth", str(tmp_path / "missing")]) == 66
    assert ev.main([str(out), "--ground-truth", str(empty)]) == 18  # no masks at all
    other = tmp_path / "other"
    _save(other / "sub-99" / "anat" / "sub-99_label-lesion_mask.nii.gz", np.zeros(SHAPE, np.uint8))
    assert ev.main([str(out), "--ground-truth", str(other)]) == 18
    err = capsys.readouterr().err
    assert "sub-01" in err and "sub-99" in err  # what was looked for and what was found
    with pytest.raises(SystemExit) as exc:
        ev.main([str(out)])  # --ground-truth missing
    assert exc.value.code == 64


def test_single_class_patient_level_is_na_not_crash(tmp_path):
    out, gt = _fake_run(tmp_path)
    (gt / "sub-03" / "anat" / "sub-03_label-lesion_mask.nii.gz").unlink()  # no healthy image left
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ev.main([str(out), "--ground-truth", str(gt)]) == 0
    result = json.loads((out / "eval_T2w.json").read_text())
    assert result["metrics"]["patient_auroc"] is None
    assert any("n/a" in w for w in result["warnings"])
    assert "patient_auroc\tn/a\t" in (out / "eval_T2w.tsv").read_text()
    assert result["metrics"]["voxel_auroc"] is not None


def test_probseg_max_is_used_without_group_table(tmp_path):
    out, gt = _fake_run(tmp_path)
    (out / "group_T2w.tsv").unlink()
    assert ev.main([str(out), "--ground-truth", str(gt)]) == 0
    result = json.loads((out / "eval_T2w.json").read_text())
    assert result["metrics"]["subject_score_source"] == "max of probseg"
    scores = {r["bids_name"]: r["subject_score"] for r in result["images"] if r["role"] != "excluded"}
    assert scores["sub-01_T2w"] == pytest.approx(float(_probseg("01", SUBJECTS["01"][0]).max()))


def test_voxel_metrics_dict():
    hist = VoxelHistogram(10)
    hist.update(np.array([0.9, 0.8, 0.7, 0.2, 0.1]), np.array([1, 1, 0, 1, 0], bool))
    m = voxel_metrics(hist)
    assert m["voxel_dice_max"] == pytest.approx(6 / 7) and m["voxel_threshold"] == pytest.approx(0.2)
    assert dice_max_from_histograms(hist.pos, hist.neg).threshold_bin == m["voxel_threshold_bin"] == 2


def test_participant_subset_into_eval_dir(tmp_path):
    out, gt = _fake_run(tmp_path)
    sub = tmp_path / "subset"
    assert ev.main([str(out), "--ground-truth", str(gt), "--participant-label", "sub-01", "03",
                    "--eval-dir", str(sub)]) == 0
    m = json.loads((sub / "eval_T2w.json").read_text())["metrics"]
    assert (m["n_lesioned"], m["n_healthy"], m["n_brain_voxels"]) == (1, 1, 2 * 512)
    assert m["patient_auroc"] == pytest.approx(1.0)
    assert not (out / "eval_T2w.json").exists()
    assert "eval_*" not in (out / ".bidsignore").read_text()


def test_benchmark_intensity_models_are_as_documented(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy"))
    import build_dataset as bd

    centres = (30.0, 60.0, 100.0)
    t1 = np.linspace(1, 140, 200, dtype=np.float32)
    brain = np.ones_like(t1, bool)
    t2 = bd.synth_contrast(t1, brain, centres, bd.T2W_POINTS)
    assert np.all(np.diff(t2) <= 0) and t2[0] > t2[-1]  # monotone inverting
    assert bd.synth_contrast(np.array([60.0]), np.array([True]), centres, bd.T2W_POINTS)[0] == pytest.approx(550)
    flair = bd.synth_contrast(np.array([30.0, 60.0, 100.0]), np.ones(3, bool), centres, bd.FLAIR_POINTS)
    assert flair[0] < flair[2] < flair[1]  # dark CSF, GM > WM
    rng = np.random.default_rng(0)
    soft = np.array([0.0, 1.0], np.float32)
    hyper, a = bd.apply_lesion(np.array([100.0, 100.0], np.float32), soft, "T2w", rng)
    hypo, b = bd.apply_lesion(np.array([100.0, 100.0], np.float32), soft, "T1w", rng)
    assert 0.4 <= a <= 0.9 and hyper[0] == 100 and hyper[1] == pytest.approx(100 * (1 + a))
    assert -0.6 <= b <= -0.3 and hypo[1] == pytest.approx(100 * (1 + b))


def test_degenerate_dice_max_threshold_is_flagged(tmp_path):
    out, gt = _fake_run(tmp_path)
    for sub in SUBJECTS:  # maps that are high everywhere but in the lesions
        path = out / f"sub-{sub}" / "anat" / f"sub-{sub}_label-anomaly_desc-T2w_probseg.nii.gz"
        img = nib.load(str(path))
        inverted = np.where(_brain() > 0, 1.0 - np.asarray(img.dataobj), 0).astype(np.float32)
        nib.Nifti1Image(inverted, img.affine).to_filename(str(path))
    assert ev.main([str(out), "--ground-truth", str(gt)]) == 0
    result = json.loads((out / "eval_T2w.json").read_text())
    assert result["metrics"]["voxel_auroc"] < 0.5
    assert result["metrics"]["voxel_predicted_fraction"] > 0.5
    assert any("trivially high" in w for w in result["warnings"])


# ------------------------------------------------------------------------------------------------
# test-encoder runs say so in every output
def _write_sidecars(out: Path, flags: dict[str, bool | None], mod: str = "T2w") -> None:
    """Probseg sidecars as cg3d writes them; None = a sidecar without ModelIsTestEncoder."""
    for sub, flag in flags.items():
        sidecar = {"Description": "anomaly map", "ModelName": "test-tiny-vit" if flag else "dinov2_vitl14"}
        if flag is not None:
            sidecar["ModelIsTestEncoder"] = flag
        path = out / f"sub-{sub}" / "anat" / f"sub-{sub}_label-anomaly_desc-{mod}_probseg.json"
        path.write_text(json.dumps(sidecar))


def _group_report(out: Path, mod: str = "T2w") -> Path:
    report = out / f"group_{mod}.html"
    report.write_text(f"<html><body><main>\n{EVALUATION_START}\nNot evaluated\n{EVALUATION_END}\n</main></body></html>")
    return report


def test_one_test_encoder_map_taints_every_output(tmp_path, capsys):
    out, gt = _fake_run(tmp_path)
    # only sub-04, which is even excluded from the metrics, was made with the test encoder
    _write_sidecars(out, {"01": False, "02": False, "03": False, "04": True})
    report = _group_report(out)
    assert ev.main([str(out), "--ground-truth", str(gt)]) == 0
    result = json.loads((out / "eval_T2w.json").read_text())
    assert result["is_test_encoder"] is True and result["metrics"]["is_test_encoder"] is True
    assert result["encoder_provenance"]["flagged_images"] == ["sub-04_T2w"]
    assert result["warnings"][0].startswith("TEST ENCODER") and "mean nothing" in result["warnings"][0]
    assert "is_test_encoder\ttrue\t" in (out / "eval_T2w.tsv").read_text()
    stdout = capsys.readouterr().out
    assert stdout.startswith(evl.TEST_ENCODER_WARNING) and "| T2w |" in stdout
    html = report.read_text()
    assert 'id="evaluation-test-encoder"' in html and "THESE NUMBERS MEAN NOTHING" in html


def test_group_json_provenance_alone_flags_the_test_encoder(tmp_path):
    out, gt = _fake_run(tmp_path)
    _write_sidecars(out, {"01": None, "02": None, "03": None, "04": None})
    (out / "group_T2w.json").write_text(json.dumps({"Provenance": {"is_test_encoder": True}}))
    assert ev.main([str(out), "--ground-truth", str(gt)]) == 0
    result = json.loads((out / "eval_T2w.json").read_text())
    assert result["is_test_encoder"] is True
    assert result["encoder_provenance"]["group_json"] is True


def test_real_encoder_run_has_no_warning_and_unknown_provenance_is_noted(tmp_path, capsys):
    out, gt = _fake_run(tmp_path)
    _write_sidecars(out, {"01": False, "02": False, "03": False, "04": False})
    (out / "group_T2w.json").write_text(json.dumps({"Provenance": {"is_test_encoder": False}}))
    report = _group_report(out)
    assert ev.main([str(out), "--ground-truth", str(gt)]) == 0
    result = json.loads((out / "eval_T2w.json").read_text())
    assert result["is_test_encoder"] is False and result["encoder_provenance"]["unchecked_images"] == []
    assert not any("TEST ENCODER" in w or "ModelIsTestEncoder" in w for w in result["warnings"])
    assert "is_test_encoder\tfalse\t" in (out / "eval_T2w.tsv").read_text()
    assert "TEST ENCODER" not in capsys.readouterr().out
    assert "evaluation-test-encoder" not in report.read_text()
    (out / "sub-02" / "anat" / "sub-02_label-anomaly_desc-T2w_probseg.json").unlink()  # provenance unknown
    assert ev.main([str(out), "--ground-truth", str(gt)]) == 0
    result = json.loads((out / "eval_T2w.json").read_text())
    assert result["is_test_encoder"] is False
    assert result["encoder_provenance"]["unchecked_images"] == ["sub-02_T2w"]
    assert any("could not be checked" in w and "sub-02_T2w" in w for w in result["warnings"])


# ------------------------------------------------------------------------------------------------
# outputs: no pandas, jinja-rendered and escaped HTML, deterministic files, voxel weighting recorded
def test_evaluation_runs_without_pandas(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__
    attempts = []

    def guarded(name, globals=None, *args, **kwargs):  # noqa: A002 - builtins.__import__'s signature
        if name.split(".")[0] == "pandas" and str((globals or {}).get("__name__", "")).startswith("cg3d_bids"):
            attempts.append(globals["__name__"])
            raise ImportError("pandas is not a dependency of cg3d")
        return real_import(name, globals, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", guarded)
    out, gt = _fake_run(tmp_path)
    labels = tmp_path / "labels.tsv"
    labels.write_text("participant_id\tlesion\nsub-04\t1\n")
    assert ev.main([str(out), "--ground-truth", str(gt), "--patient-labels", str(labels)]) == 0
    assert json.loads((out / "eval_T2w.json").read_text())["metrics"]["n_lesioned"] == 3
    assert attempts == []


def test_report_section_is_rendered_from_the_template_and_escaped(tmp_path):
    out, gt = _fake_run(tmp_path)
    report = _group_report(out)
    [result] = evl.run_evaluation(out, gt)
    result["warnings"].append("<script>alert(1)</script>")
    fragment = evl.html_section(result)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in fragment and "<script>" not in fragment
    assert fragment.count("<tr>") == len(result["metrics"]) + len(result["lesionwise"]["at_binary_mask"]) + 2
    assert "--voxel-weighting volume" in fragment and evl.WEIGHTING_TEXT["volume"] in fragment
    html = report.read_text()
    assert 'id="evaluation-T2w"' in html and "Not evaluated" not in html
    assert html.index(EVALUATION_START) < html.index("Evaluation against lesion masks") < html.index(EVALUATION_END)


def test_outputs_are_deterministic_and_record_the_voxel_weighting(tmp_path):
    out, gt = _fake_run(tmp_path)
    report = _group_report(out)
    snapshots = []
    for _ in range(2):
        assert ev.main([str(out), "--ground-truth", str(gt)]) == 0
        snapshots.append([(out / n).read_bytes() for n in ("eval_T2w.tsv", "eval_T2w.json")] + [report.read_bytes()])
    assert snapshots[0] == snapshots[1]
    result = json.loads((out / "eval_T2w.json").read_text())
    assert result["settings"]["voxel_weighting"] == result["metrics"]["voxel_weighting"] == "volume"
    assert "voxel_weighting\tvolume\t" in (out / "eval_T2w.tsv").read_text()
    assert ev.main([str(out), "--ground-truth", str(gt), "--voxel-weighting", "count"]) == 0
    result = json.loads((out / "eval_T2w.json").read_text())
    assert result["settings"]["voxel_weighting"] == "count"
    assert "voxel_weighting\tcount\t" in (out / "eval_T2w.tsv").read_text()


def test_inputs_are_not_modified(tmp_path):
    out, gt = _fake_run(tmp_path)
    before = {p: p.read_bytes() for p in [*out.rglob("*.nii.gz"), *gt.rglob("*"), out / "group_T2w.tsv"]
              if p.is_file()}
    assert ev.main([str(out), "--ground-truth", str(gt)]) == 0
    assert all(p.read_bytes() == data for p, data in before.items())


def test_failed_image_in_group_table_is_excluded(tmp_path):
    out, gt = _fake_run(tmp_path)
    table = out / "group_T2w.tsv"
    table.write_text(table.read_text().replace("sub-02_T2w\t0.4\tok", "sub-02_T2w\tn/a\tfailed"))
    assert ev.main([str(out), "--ground-truth", str(gt)]) == 0
    result = json.loads((out / "eval_T2w.json").read_text())
    roles = {r["bids_name"]: (r["role"], r["reason"]) for r in result["images"]}
    assert roles["sub-02_T2w"] == ("excluded", "status 'failed' in group_T2w.tsv")
    assert result["metrics"]["n_lesioned"] == 1 and result["metrics"]["n_brain_voxels"] == 2 * 512
