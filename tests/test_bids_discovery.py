"""Input discovery with pybids: images, labels, filters, masks, errors and the reusable index."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
import re
import shutil

import pytest

from bids_fixtures import add_image, make_bids_dataset
from cg3d_bids.bids.discovery import ImageRecord, discover_images, parse_labels
from cg3d_bids.errors import InputDataError, NoInputError, NoMatchError, UsageError

SMALL = (10, 12, 10)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """Three subjects, T1w + T2w, no sessions, masks in derivatives/masks."""
    root = tmp_path_factory.mktemp("plain")
    return make_bids_dataset(root / "bids", subjects=["01", "02", "03"], shape=SMALL)


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    """Two subjects x two sessions, acq/run entities, session-specific + subject-level masks."""
    root = tmp_path_factory.mktemp("ses")
    return make_bids_dataset(root / "bids", subjects=["01", "02"], sessions=["a", "b"], shape=SMALL,
                             acq={"T2w": "hires"}, runs=2, mask_level="both")


def find(plain_or_ses, **kwargs):
    paths = plain_or_ses
    kwargs.setdefault("derivatives", {"masks": paths["masks_dir"]})
    return discover_images(paths["bids_dir"], **kwargs)


@pytest.mark.slow
def test_dataset_without_sessions(plain):
    result = find(plain)
    assert list(result) == ["T1w", "T2w"] and result.warnings == []
    records = result["T1w"]
    assert [r.bids_name for r in records] == ["sub-01_T1w", "sub-02_T1w", "sub-03_T1w"]
    rec = records[1]
    assert rec.subject == "02" and rec.session is None and rec.modality == "T1w"
    assert rec.path == plain["bids_dir"] / "sub-02" / "anat" / "sub-02_T1w.nii.gz" and rec.path.is_absolute()
    assert rec.relpath == "sub-02/anat/sub-02_T1w.nii.gz"
    assert rec.entities == {"sub": "02"}
    assert rec.mask_path == plain["masks"]["sub-02"]
    assert rec.mask_source == "derivatives:masks"
    assert rec.mask_relpath == "sub-02/anat/sub-02_desc-brain_mask.nii.gz"
    assert rec.source_uri == "bids:raw:sub-02/anat/sub-02_T1w.nii.gz"
    assert rec.mask_uri == "bids:masks:sub-02/anat/sub-02_desc-brain_mask.nii.gz"
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.subject = "03"  # records are frozen
    summary = result.summary()
    assert "T1w" in summary and "T2w" in summary and "derivatives:masks (3)" in summary


@pytest.mark.slow
def test_sessions_entities_and_session_specific_masks(sessions):
    result = find(sessions)
    t2w = result["T2w"]
    assert len(t2w) == 8 and len(result["T1w"]) == 8
    rec = t2w[3]
    assert rec.bids_name == "sub-01_ses-b_acq-hires_run-2_T2w"
    assert list(rec.entities.items()) == [("sub", "01"), ("ses", "b"), ("acq", "hires"), ("run", "2")]
    assert rec.session == "b" and rec.relpath == "sub-01/ses-b/anat/sub-01_ses-b_acq-hires_run-2_T2w.nii.gz"
    # session-specific masks win over the subject-level one that also exists
    assert all(r.mask_path == sessions["masks"][f"sub-{r.subject}_ses-{r.session}"] for r in result.records)
    assert "sessions" in result.summary() and "2" in result.summary()


@pytest.mark.slow
def test_subject_level_mask_is_the_fallback(tmp_path):
    paths = make_bids_dataset(tmp_path / "bids", subjects=["01"], sessions=["a", "b"], shape=SMALL,
                              modalities=("T2w",), mask_level="both")
    paths["masks"]["sub-01_ses-b"].unlink()
    result = find(paths, modalities=("T2w",))
    by_session = {r.session: r for r in result["T2w"]}
    assert by_session["a"].mask_path == paths["masks"]["sub-01_ses-a"]
    assert by_session["b"].mask_path == paths["subject_masks"]["sub-01"]
    assert by_session["b"].mask_relpath == "sub-01/anat/sub-01_desc-brain_mask.nii.gz"


@pytest.mark.slow
def test_mask_with_matching_entities_preferred_and_contradicting_ignored(tmp_path):
    paths = make_bids_dataset(tmp_path / "bids", subjects=["01"], modalities=("T1w",), shape=SMALL, runs=2)
    anat = paths["masks_dir"] / "sub-01" / "anat"
    shutil.copy(anat / "sub-01_desc-brain_mask.nii.gz", anat / "sub-01_run-2_desc-brain_mask.nii.gz")
    shutil.copy(anat / "sub-01_desc-brain_mask.nii.gz",
                anat / "sub-01_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz")
    result = find(paths, modalities=("T1w",))
    masks = {r.entities["run"]: r.mask_path.name for r in result["T1w"]}
    assert masks == {"1": "sub-01_desc-brain_mask.nii.gz", "2": "sub-01_run-2_desc-brain_mask.nii.gz"}


@pytest.mark.slow
def test_labels_with_and_without_prefix_and_from_a_file(plain, tmp_path):
    assert parse_labels(["sub-01", "02", "sub-01"]) == ["01", "02"]
    assert parse_labels(["sub-s060"]) == ["s060"]  # removeprefix, not lstrip (mriqc#889)
    assert parse_labels("ses-a", "ses-") == ["a"]
    assert parse_labels(None) is None
    label_file = tmp_path / "labels.txt"
    label_file.write_text("sub-03  # third\n\n01,sub-02\n")
    assert parse_labels([str(label_file)]) == ["01", "02", "03"]
    result = find(plain, participant_labels=[str(label_file)])
    assert [r.subject for r in result["T1w"]] == ["01", "02", "03"]
    result = find(plain, participant_labels=["sub-03"])
    assert [r.bids_name for r in result.records] == ["sub-03_T1w", "sub-03_T2w"]


@pytest.mark.parametrize("label", ["WMH_MRI_21", "01-a", "sub-", "ä1"])
def test_bad_label_characters_are_usage_errors(label):
    with pytest.raises(UsageError) as exc:
        parse_labels([label])
    assert exc.value.exit_code == 64
    assert repr(label) in str(exc.value) and "[0-9a-zA-Z]" in str(exc.value)


def test_missing_participant_is_no_match(plain):
    with pytest.raises(NoMatchError) as exc:
        find(plain, participant_labels=["01", "99", "sub-98"])
    assert exc.value.exit_code == 18
    message = str(exc.value)
    assert re.search(r"participant\(s\): ([^(]+) \(", message).group(1) == "98, 99"
    assert "mounted properly" in message


@pytest.mark.slow
def test_session_labels(sessions):
    result = find(sessions, session_labels=["ses-b"])
    assert {r.session for r in result.records} == {"b"}
    with pytest.raises(NoMatchError) as exc:
        find(sessions, session_labels=["zz"])
    assert exc.value.exit_code == 18 and "zz" in str(exc.value)


@pytest.mark.slow
def test_session_label_keeps_images_without_sessions(plain):
    """BEP027: files without ses are kept when a session label is given."""
    assert len(find(plain, session_labels=["a"]).records) == 6


@pytest.mark.slow
def test_filters_matching_nothing_are_no_match(plain):
    with pytest.raises(NoMatchError) as exc:
        find(plain, bids_filters={"t1w": {"acquisition": "nope"}})
    assert exc.value.exit_code == 18
    assert "acquisition='nope'" in str(exc.value) and "filters" in str(exc.value)
    with pytest.raises(UsageError):
        find(plain, bids_filters={"t1w": {"notanentity": "x"}})
    with pytest.raises(UsageError):
        find(plain, bids_filters={"t1w": ["not", "a", "dict"]})


@pytest.mark.slow
def test_bids_filters_null_and_any(tmp_path):
    paths = make_bids_dataset(tmp_path / "bids", subjects=["01", "02"], modalities=("T1w",), shape=SMALL)
    add_image(paths["bids_dir"], "01", "T1w", acq="mprage", shape=SMALL)
    result = find(paths, modalities=("T1w",), bids_filters={"T1w": {"acquisition": None}})
    assert [r.bids_name for r in result["T1w"]] == ["sub-01_T1w", "sub-02_T1w"]
    result = find(paths, modalities=("T1w",), bids_filters={"t1w": {"acq": "*"}})
    assert [r.bids_name for r in result["T1w"]] == ["sub-01_acq-mprage_T1w"]
    assert result["T1w"][0].mask_path == paths["masks"]["sub-01"]
    result = find(paths, modalities=("T1w",), bids_filters={"t1w": {"acquisition": "mprage"}, "bold": {}})
    assert len(result["T1w"]) == 1 and any("'bold'" in w for w in result.warnings)


@pytest.mark.slow
def test_mask_filters(sessions):
    result = find(sessions, bids_filters={"mask": {"session": None}})
    assert all(r.mask_path == sessions["subject_masks"][f"sub-{r.subject}"] for r in result.records)


@pytest.mark.slow
def test_modality_without_images_warns_or_fails(plain):
    result = find(plain, modalities=("T1w", "FLAIR"))
    assert list(result) == ["T1w"]
    assert any("FLAIR" in w for w in result.warnings) and "FLAIR" in result.summary()
    with pytest.raises(NoInputError) as exc:
        find(plain, modalities=("FLAIR",))
    assert exc.value.exit_code == 66 and "FLAIR" in str(exc.value)
    with pytest.raises(UsageError):
        find(plain, modalities=("bold",))


@pytest.mark.slow
def test_image_without_mask_names_the_file_and_the_fixes(tmp_path):
    paths = make_bids_dataset(tmp_path / "bids", subjects=["01", "02", "03"], modalities=("T1w",), shape=SMALL)
    paths["masks"]["sub-02"].unlink()
    with pytest.raises(NoInputError) as exc:
        find(paths, modalities=("T1w",))
    message = str(exc.value)
    assert exc.value.exit_code == 66
    assert "sub-02_T1w" in message and str(paths["bids_dir"] / "sub-02" / "anat" / "sub-02_T1w.nii.gz") in message
    assert "-d masks=" in message and "--mask-source nonzero" in message and "--mask-source skullstrip" in message
    assert "sub-02/anat/sub-02_desc-brain_mask.nii.gz" in message


@pytest.mark.slow
def test_computed_masks_need_no_derivatives(plain):
    with pytest.raises(NoInputError, match="no derivatives dataset"):
        discover_images(plain["bids_dir"])
    result = discover_images(plain["bids_dir"], mask_source="nonzero")
    assert all(r.mask_path is None and r.mask_source == "nonzero" and r.mask_uri is None for r in result.records)
    assert "non-zero voxels" in result.summary()
    with pytest.raises(UsageError):
        discover_images(plain["bids_dir"], mask_source="magic")


def test_bad_input_and_derivatives_folders(plain, tmp_path):
    with pytest.raises(NoInputError, match="does not exist") as exc:
        discover_images(tmp_path / "nowhere")
    assert exc.value.exit_code == 66
    (tmp_path / "notbids").mkdir()
    with pytest.raises(NoInputError, match="dataset_description.json") as exc:
        discover_images(tmp_path / "notbids")
    assert exc.value.fix
    with pytest.raises(NoInputError, match="'masks' does not exist"):
        find(plain, derivatives={"masks": tmp_path / "missing"})
    (tmp_path / "nodesc").mkdir()
    with pytest.raises(NoInputError, match="no dataset_description.json") as exc:
        find(plain, derivatives={"other": tmp_path / "nodesc"})
    assert str(tmp_path / "nodesc") in str(exc.value)
    with pytest.raises(UsageError, match="reserved"):
        find(plain, derivatives={"raw": plain["masks_dir"]})
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "dataset_description.json").write_text("{not json")
    with pytest.raises(InputDataError) as exc:
        discover_images(tmp_path / "badjson")
    assert exc.value.exit_code == 65 and "dataset_description.json" in str(exc.value)


@pytest.mark.slow
def test_index_database_is_reused_and_refreshed(tmp_path, monkeypatch):
    from bids.layout import BIDSLayoutIndexer

    paths = make_bids_dataset(tmp_path / "bids", subjects=["01", "02"], modalities=("T1w",), shape=SMALL)
    db = tmp_path / "db"
    calls = []
    original = BIDSLayoutIndexer.__call__
    monkeypatch.setattr(BIDSLayoutIndexer, "__call__", lambda self, layout: (calls.append(1), original(self, layout)))

    first = find(paths, modalities=("T1w",), database_dir=db)
    assert len(calls) == 2  # raw + masks derivative
    assert len(list(db.glob("raw-*/layout_index.sqlite"))) == 1
    assert len(list(db.glob("deriv-masks-*/layout_index.sqlite"))) == 1
    second = find(paths, modalities=("T1w",), database_dir=db, participant_labels=["02"])
    assert len(calls) == 2, "re-opening must not re-index"
    assert [r.bids_name for r in second["T1w"]] == ["sub-02_T1w"]
    assert [r.mask_path for r in first["T1w"]][1] == second["T1w"][0].mask_path

    add_image(paths["bids_dir"], "01", "T1w", run=2, shape=SMALL)  # new file -> new signature -> re-index
    third = find(paths, modalities=("T1w",), database_dir=db)
    assert len(calls) == 3
    assert "sub-01_run-2_T1w" in [r.bids_name for r in third["T1w"]]
    find(paths, modalities=("T1w",), database_dir=db, reset_database=True)
    assert len(calls) == 5
    assert not list(db.glob(".tmp-*")), "temporary index folders are cleaned up"


@pytest.mark.slow
def test_pre_indexed_database_is_trusted(tmp_path):
    """A user index (``pybids layout BIDS DB``): layout_index.sqlite directly in the folder."""
    from bids.layout import BIDSLayout

    paths = make_bids_dataset(tmp_path / "bids", subjects=["01"], modalities=("T1w",), shape=SMALL)
    BIDSLayout(paths["bids_dir"], validate=False, database_path=tmp_path / "db")
    result = find(paths, modalities=("T1w",), database_dir=tmp_path / "db")
    assert [r.bids_name for r in result["T1w"]] == ["sub-01_T1w"]
    assert not list((tmp_path / "db").glob("raw-*"))


@pytest.mark.slow
def test_ignored_folders_are_not_indexed(plain, tmp_path):
    """func/, sourcedata/, hidden files and anat files with other suffixes never become records."""
    paths = make_bids_dataset(tmp_path / "bids", subjects=["01"], modalities=("T1w",), shape=SMALL)
    bids = paths["bids_dir"]
    for rel in ("sub-01/func/sub-01_task-rest_T1w.nii.gz", "sourcedata/sub-01/anat/sub-01_T1w.nii.gz",
                "sub-01/anat/.sub-01_T1w.nii.gz", "sub-01/anat/sub-01_T1map.nii.gz"):
        (bids / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(paths["images"]["T1w"][0], bids / rel)
    result = find(paths, modalities=("T1w",))
    assert [r.relpath for r in result.records] == ["sub-01/anat/sub-01_T1w.nii.gz"]


@pytest.mark.slow
def test_records_round_trip_through_the_record_codec(plain, tmp_path):
    from cg3d_bids import records

    rec = find(plain)["T2w"][0]
    assert isinstance(rec, ImageRecord)
    path = records.save(rec, tmp_path / "rec.json")
    data = json.loads(path.read_text())
    assert data["record"] == "ImageRecord" and data["fields"]["relpath"] == "sub-01/anat/sub-01_T2w.nii.gz"
    back = records.load(path, ImageRecord)
    assert back == rec and isinstance(back.path, Path) and isinstance(back.mask_path, Path)
