"""Output names, sidecars, dataset files, group tables and BIDS validation of inputs and outputs."""

from __future__ import annotations

import csv
import json
import threading
from pathlib import Path

import pytest

from bids_fixtures import make_bids_dataset, make_fake_outputs
from cg3d_bids.bids.derivatives import (anomaly_mask_sidecar, brain_mask_sidecar, container_info,
                                        dataset_description, previous_version, probseg_sidecar,
                                        write_bidsignore,
                                        write_dataset_description, write_readme)
from cg3d_bids.bids.discovery import ImageRecord, discover_images
from cg3d_bids.bids.group_table import COLUMNS, read_group_table, write_group_table
from cg3d_bids.bids.naming import group_paths, output_paths, subject_report_path
from cg3d_bids.bids.validation import find_validator, input_config, validate_bids_input, validate_derivatives
from cg3d_bids.errors import BidsValidationError

SMALL = (10, 12, 10)


def record(name: str = "sub-01_ses-01_acq-hires_run-2_T2w", mask: str | None = "masks") -> ImageRecord:
    """An ImageRecord built by hand from a BIDS file name."""
    parts = name.split("_")
    entities = dict(p.split("-", 1) for p in parts[:-1])
    folder = f"sub-{entities['sub']}" + (f"/ses-{entities['ses']}" if "ses" in entities else "") + "/anat"
    mask_rel = f"sub-{entities['sub']}/anat/sub-{entities['sub']}_desc-brain_mask.nii.gz"
    return ImageRecord(
        subject=entities["sub"], session=entities.get("ses"), modality=parts[-1],
        path=Path("/data/bids") / folder / f"{name}.nii.gz", relpath=f"{folder}/{name}.nii.gz",
        entities=entities, mask_path=Path("/data/masks") / mask_rel if mask else None,
        mask_source=f"derivatives:{mask}" if mask else "nonzero", mask_relpath=mask_rel if mask else None,
        bids_name=name,
    )


# ------------------------------------------------------------------------------------------------
# names
def test_names_without_sessions():
    paths = {k: p.as_posix() for k, p in output_paths(record("sub-01_T2w")).items()}
    assert paths == {
        "probseg": "sub-01/anat/sub-01_label-anomaly_desc-T2w_probseg.nii.gz",
        "probseg_json": "sub-01/anat/sub-01_label-anomaly_desc-T2w_probseg.json",
        "anomaly_mask": "sub-01/anat/sub-01_label-anomaly_desc-T2w_mask.nii.gz",
        "anomaly_mask_json": "sub-01/anat/sub-01_label-anomaly_desc-T2w_mask.json",
        "brain_mask": "sub-01/anat/sub-01_label-brain_desc-T2w_mask.nii.gz",
        "brain_mask_json": "sub-01/anat/sub-01_label-brain_desc-T2w_mask.json",
        "figure_probseg": "sub-01/figures/sub-01_label-anomaly_desc-T2w_probseg.svg",
        "figure_brain_mask": "sub-01/figures/sub-01_label-brain_desc-T2w_mask.svg",
        "subject_report": "sub-01.html",
    }


def test_names_with_session_acq_run_and_flair():
    rec = record("sub-01_ses-01_acq-hires_run-2_T2w")
    paths = output_paths(rec, "/out")
    src = "sub-01_ses-01_acq-hires_run-2"
    assert paths["probseg"] == Path(f"/out/sub-01/ses-01/anat/{src}_label-anomaly_desc-T2w_probseg.nii.gz")
    assert paths["anomaly_mask"] == Path(f"/out/sub-01/ses-01/anat/{src}_label-anomaly_desc-T2w_mask.nii.gz")
    assert paths["brain_mask_json"] == Path(f"/out/sub-01/ses-01/anat/{src}_label-brain_desc-T2w_mask.json")
    assert paths["figure_probseg"] == Path(f"/out/sub-01/figures/{src}_label-anomaly_desc-T2w_probseg.svg")
    assert paths["subject_report"] == Path("/out/sub-01.html")
    flair = output_paths(record("sub-02_ce-gad_rec-norm_run-1_FLAIR"))
    assert flair["probseg"].name == "sub-02_ce-gad_rec-norm_run-1_label-anomaly_desc-FLAIR_probseg.nii.gz"
    assert subject_report_path("sub-03") == Path("sub-03.html")
    assert {k: p.name for k, p in group_paths("T1w").items()} == {
        "tsv": "group_T1w.tsv", "json": "group_T1w.json", "html": "group_T1w.html"}


# ------------------------------------------------------------------------------------------------
# sidecars and dataset files
def test_sidecars_use_bids_uris_and_record_provenance():
    rec = record()
    model = {"version": "0.1.0", "encoder": "dinov2_vitl14", "weights_sha256": "ab" * 32, "config_hash": "c0ffee",
             "layers": [6, 12], "run_id": "r1", "command": "cg3d ...", "is_test_encoder": None}
    raw = "bids:raw:sub-01/ses-01/anat/sub-01_ses-01_acq-hires_run-2_T2w.nii.gz"
    src = "sub-01/ses-01/anat/sub-01_ses-01_acq-hires_run-2"
    probseg = probseg_sidecar(rec, transform={"ScoreTransform": "logistic", "ZCenter": 2.0}, model=model,
                              extra={"Note": "x"})
    assert probseg["Sources"] == [raw, f"bids::{src}_label-brain_desc-T2w_mask.nii.gz"]
    assert probseg["SpatialReference"] == raw
    assert probseg["ScoreTransform"] == "logistic" and probseg["ZCenter"] == 2.0 and probseg["Note"] == "x"
    assert probseg["ModelName"] == "dinov2_vitl14" and probseg["ModelSHA256"] == "ab" * 32
    assert probseg["Cg3dVersion"] == "0.1.0" and probseg["Cg3dConfigHash"] == "c0ffee"
    assert probseg["Settings"] == {"layers": [6, 12]}, "run-specific and null keys are left out"
    assert "T2w" in probseg["Description"]

    mask = anomaly_mask_sidecar(rec, 0.5, model=model)
    assert mask["Type"] == "Lesion" and mask["Threshold"] == 0.5
    assert mask["Sources"] == [f"bids::{src}_label-anomaly_desc-T2w_probseg.nii.gz",
                               f"bids::{src}_label-brain_desc-T2w_mask.nii.gz"]
    brain = brain_mask_sidecar(rec, model=model)
    assert brain["Type"] == "Brain" and brain["MaskSource"] == "derivatives:masks"
    assert brain["Sources"] == ["bids:masks:sub-01/anat/sub-01_desc-brain_mask.nii.gz"]
    computed = brain_mask_sidecar(record(mask=None))
    assert computed["Sources"] == [raw] and "non-zero" in computed["Description"]


def test_dataset_description_links_and_provenance(tmp_path):
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text(json.dumps(
        {"Name": "raw", "BIDSVersion": "1.10.0", "License": "CC0", "DatasetDOI": "10.18112/openneuro.ds0.v1"}))
    inside = dataset_description(bids / "derivatives" / "cg3d", bids_dir=bids, version="0.1.0",
                                 derivatives={"smriprep": bids / "derivatives" / "smriprep",
                                              "masks": tmp_path / "elsewhere"}, env={})
    assert inside["DatasetType"] == "derivative" and inside["BIDSVersion"]
    assert inside["GeneratedBy"][0]["Name"] == "cg3d" and inside["GeneratedBy"][0]["Version"] == "0.1.0"
    assert "Container" not in inside["GeneratedBy"][0] and inside["GeneratedBy"][0]["CodeURL"]
    assert inside["DatasetLinks"] == {"raw": "../..", "smriprep": "../smriprep",
                                      "masks": (tmp_path / "elsewhere").as_uri()}
    assert inside["SourceDatasets"] == [{"DOI": "doi:10.18112/openneuro.ds0.v1",
                                         "URL": "https://doi.org/10.18112/openneuro.ds0.v1"}]
    assert inside["License"] == "CC0"
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "raw", "BIDSVersion": "1.10.0"}))
    outside = dataset_description(tmp_path / "out", bids_dir=bids, version="0.1.0", env={})
    assert outside["DatasetLinks"] == {"raw": bids.as_uri()} and outside["DatasetLinks"]["raw"].startswith("file:///")
    assert outside["SourceDatasets"] == [{"URL": bids.as_uri()}] and "License" not in outside


def test_container_detection():
    assert container_info({}) is None
    assert container_info({"CG3D_IMAGE_TAG": "org/cg3d:0.1.0"}) == {"Type": "docker", "Tag": "org/cg3d:0.1.0"}
    assert container_info({"CG3D_CONTAINER_TYPE": "podman"}) == {"Type": "podman"}
    apptainer = container_info({"CG3D_IMAGE_TAG": "org/cg3d:0.1.0", "CG3D_CONTAINER_TYPE": "docker",
                                "APPTAINER_CONTAINER": "/images/cg3d.sif"})
    assert apptainer == {"Type": "apptainer", "Tag": "org/cg3d:0.1.0", "URI": "file:///images/cg3d.sif"}
    assert container_info({"SINGULARITY_CONTAINER": "/x.sif"})["Type"] == "singularity"


def test_bidsignore_and_readme(tmp_path):
    (tmp_path / ".bidsignore").write_text("extra_stuff\n*.html\n")
    path = write_bidsignore(tmp_path)
    assert path.read_text().splitlines() == ["*.html", "figures", "group_*", "extra_stuff"]
    assert "*_statmap.*" in write_bidsignore(tmp_path, statmap=True).read_text()
    readme = write_readme(tmp_path, version="0.1.0")
    text = readme.read_text()
    assert readme.name == "README.md" and "cg3d 0.1.0" in text and "_probseg" in text and len(text) > 300
    mtime = readme.stat().st_mtime_ns
    write_readme(tmp_path, version="0.1.0")
    assert readme.stat().st_mtime_ns == mtime, "identical content is not rewritten"


def test_concurrent_dataset_description_writes_are_atomic(tmp_path):
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "raw", "BIDSVersion": "1.10.0"}))
    out = bids / "derivatives" / "cg3d"
    target = out / "dataset_description.json"
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(index: int) -> None:
        try:
            for i in range(25):
                write_dataset_description(out, bids_dir=bids, version=f"0.1.{(index + i) % 3}",
                                          derivatives={"masks": bids / "derivatives" / "masks"})
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def reader() -> None:
        while not stop.is_set():
            if target.exists():
                try:
                    assert json.loads(target.read_text())["DatasetType"] == "derivative"
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)
                    return

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    watcher.join()
    assert errors == []
    assert json.loads(target.read_text())["GeneratedBy"][0]["Version"] in {"0.1.0", "0.1.1", "0.1.2"}
    assert previous_version(out) in {"0.1.0", "0.1.1", "0.1.2"} and previous_version(tmp_path) is None
    assert sorted(p.name for p in out.iterdir()) == ["dataset_description.json"], "no temporary files left"


# ------------------------------------------------------------------------------------------------
# group table
def test_group_table_round_trip(tmp_path):
    rows = [
        {"participant_id": "sub-01", "session_id": None, "bids_name": "sub-01_T2w",
         "source": "bids:raw:sub-01/anat/sub-01_T2w.nii.gz", "mask_source": "derivatives:masks",
         "score_max": 0.25, "score_top1pct": 0.2, "anomaly_volume_mm3": 0.0, "n_components": 0,
         "brain_volume_mm3": 1.2e6, "flagged": False, "status": "ok", "error": None, "outside_fraction": 0.01},
        {"participant_id": "sub-02", "bids_name": "sub-02_T2w", "score_max": 0.75, "score_top1pct": 0.7,
         "anomaly_volume_mm3": 1234.5, "n_components": 2, "flagged": True, "status": "ok", "my_extra": "x"},
        {"participant_id": "sub-03", "bids_name": "sub-03_T2w", "status": "failed",
         "error": "bad NIfTI:\tcorrupt\nheader"},
        {"participant_id": "sub-04", "bids_name": "sub-04_T2w", "status": "skipped", "error": "excluded"},
    ]
    tsv, dictionary = write_group_table(tmp_path, "T2w", rows, {"version": "0.1.0", "threshold": 0.5},
                                        column_docs={"my_extra": {"Description": "an extra column"}})
    assert tsv == tmp_path / "group_T2w.tsv" and dictionary == tmp_path / "group_T2w.json"
    lines = tsv.read_text().splitlines()
    assert len(lines) == 5 and all(line.count("\t") == lines[0].count("\t") for line in lines)
    with open(tsv, newline="") as fh:
        table = list(csv.DictReader(fh, delimiter="\t"))
    assert list(table[0])[:len(COLUMNS)] == list(COLUMNS)
    assert list(table[0])[len(COLUMNS):] == ["my_extra"]
    assert [r["rank"] for r in table] == ["2", "1", "n/a", "n/a"], "ranks computed among ok rows"
    assert [r["score_percentile"] for r in table][:2] == ["50.0", "100.0"]
    assert table[0]["session_id"] == "n/a" and table[0]["flagged"] == "false" and table[1]["flagged"] == "true"
    assert table[2]["error"] == "bad NIfTI: corrupt header" and table[2]["score_max"] == "n/a"
    assert {r["status"] for r in table} == {"ok", "failed", "skipped"}

    back = read_group_table(tsv)
    assert back[1]["score_max"] == 0.75 and back[2]["score_max"] is None
    assert back[0]["brain_volume_mm3"] == 1.2e6 and back[1]["n_components"] == 2
    assert back[0]["outside_fraction"] == 0.01
    assert back[1]["flagged"] is True and back[0]["session_id"] is None
    assert back[1]["rank"] == 1 and back[3]["error"] == "excluded"

    doc = json.loads(dictionary.read_text())
    for column in lines[0].split("\t"):
        assert doc[column]["Description"], column
    assert set(doc["status"]["Levels"]) == {"ok", "failed", "skipped", "stale"}
    assert doc["anomaly_volume_mm3"]["Units"] == "mm^3" and doc["rank"]["Format"] == "integer"
    assert doc["my_extra"]["Description"] == "an extra column"
    assert doc["Provenance"]["threshold"] == 0.5 and doc["GeneratedBy"][0]["Version"] == "0.1.0"


def test_group_table_rejects_unknown_status(tmp_path):
    with pytest.raises(ValueError, match="status"):
        write_group_table(tmp_path, "T1w", [{"participant_id": "sub-01", "status": "weird"}], {})
    assert not (tmp_path / "group_T1w.tsv").exists()


# ------------------------------------------------------------------------------------------------
# BIDS validation
def _require_validator() -> None:
    if find_validator() is None:
        pytest.fail("bids-validator-deno is not installed: pip install 'cg3d-bids[test]' (or bids-validator-deno)")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["sessions", "plain"])
def test_complete_output_tree_passes_the_validator(tmp_path, layout):
    _require_validator()
    if layout == "sessions":
        paths = make_bids_dataset(tmp_path / "bids", subjects=["01", "02"], sessions=["a", "b"], shape=SMALL,
                                  modalities=("T1w", "T2w", "FLAIR"), acq={"T2w": "hires"}, runs=2,
                                  mask_level="both")
        out = paths["bids_dir"] / "derivatives" / "cg3d"
    else:
        paths = make_bids_dataset(tmp_path / "bids", subjects=["01", "02"], shape=SMALL)
        out = tmp_path / "out"
    derivatives = {"masks": paths["masks_dir"]}
    result = discover_images(paths["bids_dir"], modalities=("T1w", "T2w", "FLAIR"), derivatives=derivatives)
    fake = make_fake_outputs(out, result.records, bids_dir=paths["bids_dir"], derivatives=derivatives)
    n_probseg = len(list(out.rglob("*_probseg.nii.gz")))
    assert n_probseg == len(result.records) == (24 if layout == "sessions" else 4)
    assert all(p.exists() for outputs in fake["outputs"].values() for p in outputs.values())
    n_errors, messages = validate_derivatives(out)
    assert n_errors == 0, "\n".join(messages)
    # the validator does see problems: a file with a bad name is an error
    (out / "sub-01" / "anat").mkdir(parents=True, exist_ok=True)
    (out / "sub-01" / "anat" / "sub-01_label-anomaly_stat-x_statmap.nii.gz").write_bytes(b"")
    n_errors, messages = validate_derivatives(out)
    assert n_errors > 0 and any("statmap" in m for m in messages)


@pytest.mark.slow
def test_input_validation(tmp_path, monkeypatch):
    _require_validator()
    paths = make_bids_dataset(tmp_path / "bids", subjects=["01", "02"], modalities=("T1w",), shape=SMALL)
    bids = paths["bids_dir"]
    (bids / "sub-02" / "anat" / "sub-02_bogus.nii.gz").write_bytes(b"")  # an error in sub-02 only
    (bids / "sub-01" / "func").mkdir()
    (bids / "sub-01" / "func" / "sub-01_task-x_bold.nii.gz").write_bytes(b"")  # datatype cg3d never reads
    config = input_config(bids, ["01"])
    assert {"location": "sub-02/"} in config["ignore"] and {"location": "func/"} in config["ignore"]

    warnings = validate_bids_input(bids, participant_labels=["sub-01"])
    assert all(isinstance(w, str) for w in warnings)
    with pytest.raises(BidsValidationError) as exc:
        validate_bids_input(bids, participant_labels=["02"])
    assert exc.value.exit_code == 16
    assert "sub-02_bogus.nii.gz" in str(exc.value) and "--skip-bids-validation" in str(exc.value)
    with pytest.raises(BidsValidationError):
        validate_bids_input(bids)

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    warnings = validate_bids_input(bids, participant_labels=["02"])
    assert len(warnings) == 1 and "does not appear to be installed" in warnings[0]
    with pytest.raises(FileNotFoundError, match="cg3d-bids\\[test\\]"):
        validate_derivatives(tmp_path)
