"""Stale outputs (:mod:`cg3d_bids.bids.stale`) on an output tree written by cg3d's own writers."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest

from bids_fixtures import make_bids_dataset, make_fake_outputs
from cg3d_bids.bids.discovery import discover_images
from cg3d_bids.bids.group_table import read_group_table, write_group_table
from cg3d_bids.bids.stale import check_modality, check_subject_reports, find_stale_images, remove_files


@dataclass(frozen=True)
class Result:
    """The part of an ImageResult that stale-output checks read."""

    image: object
    ok: bool = True


@pytest.fixture
def tree(tmp_path):
    paths = make_bids_dataset(tmp_path / "bids", subjects=["01", "02", "03"], sessions=["a"],
                              modalities=("T1w", "T2w"), seed=2)
    images = discover_images(paths["bids_dir"], modalities=("T1w", "T2w"),
                             derivatives={"masks": paths["masks_dir"]}).images
    make_fake_outputs(tmp_path / "out", [*images["T1w"], *images["T2w"]], bids_dir=paths["bids_dir"])
    return tmp_path / "out", images


def test_outputs_of_images_outside_the_batch_are_found_per_modality(tree):
    out, images = tree
    keep = {r.bids_name for r in images["T1w"] if r.subject != "03"}
    stale = find_stale_images(out, "T1w", keep)
    assert [s.bids_name for s in stale] == ["sub-03_ses-a_T1w"]
    assert stale[0].subject == "03" and stale[0].session == "a"
    assert sorted(stale[0].files) == sorted([
        "sub-03/ses-a/anat/sub-03_ses-a_label-anomaly_desc-T1w_probseg.nii.gz",
        "sub-03/ses-a/anat/sub-03_ses-a_label-anomaly_desc-T1w_probseg.json",
        "sub-03/ses-a/anat/sub-03_ses-a_label-anomaly_desc-T1w_mask.nii.gz",
        "sub-03/ses-a/anat/sub-03_ses-a_label-anomaly_desc-T1w_mask.json",
        "sub-03/ses-a/anat/sub-03_ses-a_label-brain_desc-T1w_mask.nii.gz",
        "sub-03/ses-a/anat/sub-03_ses-a_label-brain_desc-T1w_mask.json",
        "sub-03/figures/sub-03_ses-a_label-anomaly_desc-T1w_probseg.svg",
        "sub-03/figures/sub-03_ses-a_label-brain_desc-T1w_mask.svg",
    ])
    assert find_stale_images(out, "T2w", {r.bids_name for r in images["T2w"]}) == []


def test_check_modality_lists_or_removes(tree, caplog):
    out, images = tree
    results = [Result(r) for r in images["T1w"] if r.subject != "03"]
    with caplog.at_level(logging.WARNING, logger="cg3d"):
        rows, entry, to_remove = check_modality(out, "T1w", results, remove=False)
    assert [r["bids_name"] for r in rows] == ["sub-03_ses-a_T1w"] and rows[0]["status"] == "stale"
    assert entry["Images"] == ["sub-03_ses-a_T1w"] and len(entry["Files"]) == 8 and not entry["Removed"]
    assert to_remove == [] and "sub-03_ses-a_T1w" in caplog.text and "--remove-stale-outputs" in caplog.text

    rows, entry, to_remove = check_modality(out, "T1w", results, remove=True)
    assert rows == [] and entry["Removed"] and len(to_remove) == 8
    remove_files(out, to_remove)
    assert find_stale_images(out, "T1w", {r.image.bids_name for r in results}) == []
    assert (out / "sub-03" / "ses-a" / "anat").is_dir(), "T2w outputs of sub-03 are not touched"


def test_images_skipped_this_time_keep_their_row_but_their_old_maps_are_stale(tree):
    out, images = tree
    results = [Result(r, ok=r.subject != "02") for r in images["T1w"]]
    rows, entry, _ = check_modality(out, "T1w", results, remove=False)
    assert rows == [], "sub-02 already has a row (skipped)"
    assert entry["Images"] == ["sub-02_ses-a_T1w"]


def test_subject_reports_of_subjects_no_table_lists(tree):
    out, images = tree
    for modality in ("T1w", "T2w"):
        rows = [row for row in read_group_table(out / f"group_{modality}.tsv") if row["participant_id"] != "sub-03"]
        write_group_table(out, modality, rows)
        results = [Result(r) for r in images[modality] if r.subject != "03"]
        _, _, to_remove = check_modality(out, modality, results, remove=True)
        remove_files(out, to_remove)
    assert not (out / "sub-03").exists(), "folders left empty by removed files are removed"
    assert check_subject_reports(out, remove=False) == ["sub-03.html"]
    assert (out / "sub-03.html").exists()
    check_subject_reports(out, remove=True)
    assert not (out / "sub-03.html").exists() and not (out / "sub-03").exists()
    assert (out / "sub-01.html").exists() and (out / "sub-01" / "figures").is_dir()
