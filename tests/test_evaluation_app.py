"""Unit tests of the evaluation logic (cg3d_bids.evaluation): discovery, tables, labels, provenance."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cg3d_bids import evaluation as evl
from cg3d_bids.errors import InputDataError, NoInputError, UsageError


def _touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------
# names
def test_find_outputs_parses_cg3d_names_only(tmp_path):
    anat = tmp_path / "sub-01" / "ses-2" / "anat"
    good = [
        _touch(anat / "sub-01_ses-2_acq-ax_run-1_label-anomaly_desc-T2w_probseg.nii.gz"),
        _touch(tmp_path / "sub-02" / "anat" / "sub-02_label-anomaly_desc-FLAIR_probseg.nii"),
    ]
    for name in ("sub-01_ses-2_label-brain_desc-T2w_mask.nii.gz",       # not a probseg
                 "sub-01_ses-2_desc-T2w_probseg.nii.gz",                # no label-anomaly
                 "sub-01_ses-2_label-anomaly_desc-T2w_probseg.json",   # sidecar
                 "sub-01_ses-2_label-anomaly_desc-T2w_extra-x_probseg.nii.gz"):  # entities out of place
        _touch(anat / name)
    _touch(tmp_path / "derivatives" / "anat" / "sub-03_label-anomaly_desc-T2w_probseg.nii.gz")  # not sub-*
    found = evl.find_outputs(tmp_path)
    assert sorted(found) == ["FLAIR", "T2w"]
    [t2w], [flair] = found["T2w"], found["FLAIR"]
    assert t2w.probseg == good[0] and flair.probseg == good[1]
    assert t2w.prefix == "sub-01_ses-2_acq-ax_run-1" and t2w.bids_name == "sub-01_ses-2_acq-ax_run-1_T2w"
    assert t2w.entities == {"sub": "01", "ses": "2", "acq": "ax", "run": "1"}
    assert t2w.brain_mask == anat / "sub-01_ses-2_acq-ax_run-1_label-brain_desc-T2w_mask.nii.gz"
    assert t2w.anomaly_mask == anat / "sub-01_ses-2_acq-ax_run-1_label-anomaly_desc-T2w_mask.nii.gz"
    assert t2w.sidecar == anat / "sub-01_ses-2_acq-ax_run-1_label-anomaly_desc-T2w_probseg.json"
    assert flair.brain_mask.name == "sub-02_label-brain_desc-FLAIR_mask.nii"  # same extension


def test_find_ground_truth_with_patterns_and_desc_modality(tmp_path):
    _touch(tmp_path / "sub-01" / "anat" / "sub-01_acq-ax_label-lesion_mask.nii.gz")
    _touch(tmp_path / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_desc-FLAIR_label-lesion_mask.nii")
    _touch(tmp_path / "sub-02" / "anat" / "sub-02_desc-lesion_mask.nii.gz")
    _touch(tmp_path / "sub-02" / "anat" / "sub-02_label-lesion_mask.json")
    masks = evl.find_ground_truth(tmp_path)
    assert [(m.prefix, m.modality) for m in masks] == [("sub-01_acq-ax", None), ("sub-01_ses-1_desc-FLAIR", "FLAIR")]
    assert masks[0].source_entities == {"sub": "01", "acq": "ax"}
    assert masks[1].source_entities == {"sub": "01", "ses": "1"}
    [other] = evl.find_ground_truth(tmp_path, "desc-lesion_mask")
    assert (other.prefix, other.entities, other.modality) == ("sub-02", {"sub": "02"}, None)


def test_prefix_entities_ignores_parts_without_value():
    assert evl.prefix_entities("sub-01_ses-a_acq-x") == {"sub": "01", "ses": "a", "acq": "x"}
    assert evl.prefix_entities("sub-01_junk") == {"sub": "01"}


# ------------------------------------------------------------------------------------------------
# tables
def test_read_group_scores(tmp_path):
    _touch(tmp_path / "group_T2w.tsv",
           "participant_id\tbids_name\tscore_max\tstatus\n"
           "sub-01\tsub-01_T2w\t0.75\tok\n"
           "sub-02\tsub-02_acq-ax_T2w\tn/a\tfailed\n"
           "sub-03\tsub-03_T2w\t0.5\tn/a\n\n")
    scores = evl.read_group_scores(tmp_path, "T2w")
    assert scores["sub-01"] == evl.GroupScore("ok", 0.75)
    assert scores["sub-02_acq-ax"].status == "failed" and math.isnan(scores["sub-02_acq-ax"].score_max)
    assert scores["sub-03"].status == "ok"  # no status = ok
    assert evl.read_group_scores(tmp_path, "T1w") is None


@pytest.mark.parametrize("text, message", [
    ("participant_id\tscore_max\nsub-01\t0.5\n", "no bids_name column"),
    ("", "is empty"),
    ("bids_name\tscore_max\nsub-01_T2w\thigh\n", "cannot read"),
])
def test_bad_group_table_names_the_file(tmp_path, text, message):
    path = _touch(tmp_path / "group_T2w.tsv", text)
    with pytest.raises(InputDataError, match=message) as exc:
        evl.read_group_scores(tmp_path, "T2w")
    assert exc.value.path == str(path) and exc.value.fix and exc.value.exit_code == 65


def test_patient_labels_and_lookup(tmp_path):
    path = _touch(tmp_path / "labels.tsv",
                  "participant_id\tsession_id\tbids_name\tlesion\n"
                  "sub-01\tn/a\tn/a\t1\n"
                  "02\tses-b\tn/a\thealthy\n"
                  "n/a\tn/a\tsub-01_acq-x_T2w\t0\n"
                  "sub-03\tn/a\tn/a\tn/a\n")
    labels = evl.read_patient_labels(path)
    assert labels == [evl.PatientLabel("01", None, None, True), evl.PatientLabel("02", "b", None, False),
                      evl.PatientLabel(None, None, "sub-01_acq-x_T2w", False)]

    def image(prefix: str) -> evl.OutputImage:
        return evl.OutputImage(prefix, "T2w", Path("p"), Path("b"), Path("m"), evl.prefix_entities(prefix))

    assert evl.lookup_patient_label(image("sub-01_ses-a"), labels) is True  # participant row, any session
    assert evl.lookup_patient_label(image("sub-01_acq-x"), labels) is False  # bids_name row wins
    assert evl.lookup_patient_label(image("sub-02_ses-b"), labels) is False
    assert evl.lookup_patient_label(image("sub-02_ses-c"), labels) is None
    assert evl.lookup_patient_label(image("sub-03"), labels) is None  # n/a = unknown


def test_bad_patient_labels_name_the_file(tmp_path):
    with pytest.raises(NoInputError, match="not found"):
        evl.read_patient_labels(tmp_path / "missing.tsv")
    path = _touch(tmp_path / "l.tsv", "participant_id\tlabel\nsub-01\t1\n")
    with pytest.raises(InputDataError, match="needs a 'lesion' column") as exc:
        evl.read_patient_labels(path)
    assert exc.value.path == str(path)
    _touch(path, "participant_id\tlesion\nsub-01\tmaybe\n")
    with pytest.raises(InputDataError, match="'maybe' is not 1/0"):
        evl.read_patient_labels(path)


def test_plan_image_roles():
    image = evl.OutputImage("sub-01", "T2w", Path("p"), Path("b"), Path("m"), {"sub": "01"})
    gt = evl.GroundTruth(Path("g"), "sub-01", {"sub": "01"}, None)
    lesioned, healthy = [evl.PatientLabel("01", None, None, True)], [evl.PatientLabel("01", None, None, False)]
    assert evl.plan_image(image, [gt], [], False).role == "mask"
    assert evl.plan_image(image, [], lesioned, False).role == "labelled"
    assert evl.plan_image(image, [], healthy, False).role == "healthy"
    assert evl.plan_image(image, [], [], True).role == "healthy"
    excluded = evl.plan_image(image, [], [], False)
    assert excluded.role == "excluded" and "--healthy-without-mask" in excluded.reason


# ------------------------------------------------------------------------------------------------
# provenance and settings
def test_encoder_provenance(tmp_path):
    images = []
    for sub, sidecar in (("01", {"ModelIsTestEncoder": False}), ("02", {"ModelIsTestEncoder": True}),
                         ("03", {"ModelName": "x"}), ("04", None), ("05", "not json")):
        image = evl.OutputImage(f"sub-{sub}", "T1w", tmp_path / f"sub-{sub}_label-anomaly_desc-T1w_probseg.nii.gz",
                                Path("b"), Path("m"), {"sub": sub})
        if sidecar is not None:
            image.sidecar.write_text(sidecar if isinstance(sidecar, str) else json.dumps(sidecar))
        images.append(image)
    prov = evl.encoder_provenance(tmp_path, "T1w", images)
    assert prov.is_test_encoder and prov.flagged_images == ("sub-02_T1w",)
    assert prov.unchecked_images == ("sub-03_T1w", "sub-04_T1w", "sub-05_T1w") and prov.group_json is None
    clean = evl.encoder_provenance(tmp_path, "T1w", images[:1])
    assert not clean.is_test_encoder
    _touch(tmp_path / "group_T1w.json", json.dumps({"Provenance": {"is_test_encoder": True}}))
    assert evl.encoder_provenance(tmp_path, "T1w", images[:1]).is_test_encoder


@pytest.mark.parametrize("kwargs, message", [
    ({"n_bins": 1}, "--n-bins"), ({"size_edges": (100.0, 10.0)}, "--size-edges"),
    ({"size_edges": ()}, "--size-edges"), ({"voxel_weighting": "area"}, "--voxel-weighting"),
])
def test_settings_reject_bad_values(kwargs, message):
    with pytest.raises(UsageError, match=message) as exc:
        evl.EvaluationSettings(**kwargs)
    assert exc.value.exit_code == 64 and exc.value.fix


def test_tsv_cells_and_bidsignore(tmp_path):
    assert [evl.format_value(v) for v in (None, math.nan, True, False, 0.123456789, 3, "x")] == [
        "n/a", "n/a", "true", "false", "0.123457", "3", "x"]
    assert not evl.add_to_bidsignore(tmp_path)  # no .bidsignore: none created
    _touch(tmp_path / ".bidsignore", "*.html\n")
    assert evl.add_to_bidsignore(tmp_path) and not evl.add_to_bidsignore(tmp_path)
    assert (tmp_path / ".bidsignore").read_text() == "*.html\neval_*\n"
