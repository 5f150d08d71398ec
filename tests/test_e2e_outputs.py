"""End to end, what the outputs and the console say: a clean console, the random test encoder
named in every output, stale outputs of a smaller cohort listed (or removed on request) so that
the group table and the folder agree, and a constant image skipped with ``--skip-bad-images``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from bids_fixtures import make_bids_dataset
from cg3d_bids.bids.validation import validate_derivatives
from cg3d_bids.cli.main import main
from test_e2e import FAST, SUBJECTS, read_tsv, run_cg3d

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """Six T1w subjects (lesion in sub-02, lesion ground truth), one group run as a subprocess
    (its console captured)."""
    root = tmp_path_factory.mktemp("outputs")
    paths = make_bids_dataset(root / "bids", subjects=SUBJECTS, modalities=("T1w",), lesion_subjects=["02"],
                              with_lesion_masks=True, seed=31)
    common = ["-d", f"masks={paths['masks_dir']}", "--modality", "T1w"]
    cmd = [sys.executable, "-m", "cg3d_bids", str(root / "bids"), str(root / "out"), "group", "-w",
           str(root / "work"), *FAST, *common]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    return {"root": root, "paths": paths, "common": common, "proc": proc}


def test_console_is_one_line_per_event(first_run):
    proc = first_run["proc"]
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "", "nipype printed to stdout"
    lines = proc.stderr.splitlines()
    assert not [line for line in lines if "nipype" in line or "Traceback" in line]
    plan = [i for i, line in enumerate(lines) if line.startswith("cg3d input plan")]
    assert len(plan) == 1
    table = set(range(plan[0], plan[0] + 3))  # the input plan: a title, a header and one row
    events = [line for i, line in enumerate(lines) if i not in table]
    assert all(re.match(r"\d\d:\d\d:\d\d \S+ (INFO|WARNING|ERROR): ", line) for line in events), events
    assert len(events) == len(set(events)), "an event printed twice"
    (log,) = (first_run["root"] / "out" / "logs").glob("cg3d-*.log")
    assert "nipype.workflow" in log.read_text(), "nipype's records belong in the log file"


def test_test_encoder_is_named_in_every_output(first_run, capsys):
    out = first_run["root"] / "out"
    rows = read_tsv(out / "group_T1w.tsv")
    assert {r["test_encoder"] for r in rows} == {"true"}
    dictionary = json.loads((out / "group_T1w.json").read_text())
    assert "TEST ENCODER" in dictionary["Warning"] and dictionary["test_encoder"]["Format"] == "boolean"
    assert dictionary["Provenance"]["is_test_encoder"] is True
    readme = (out / "README.md").read_text()
    assert "WARNING: TEST ENCODER" in readme.split("\n\n", 2)[1], "the banner opens the README"
    citation = (out / "logs" / "CITATION.md").read_text()
    methods = citation.split("## References")[0]
    assert "random test encoder" in methods and "randomly initialised test vision transformer" in methods
    assert "DINOv2" not in methods, "the random encoder is never called DINOv2"
    sidecar = json.loads((out / "sub-01" / "anat" / "sub-01_label-anomaly_desc-T1w_probseg.json").read_text())
    assert sidecar["ModelIsTestEncoder"] is True

    assert main(["evaluate", str(out), "--ground-truth", str(first_run["paths"]["lesions_dir"])]) == 0
    printed = capsys.readouterr().out
    assert "TEST ENCODER" in printed
    assert json.loads((out / "eval_T1w.json").read_text())["is_test_encoder"] is True
    assert "TEST ENCODER" in (out / "group_T1w.html").read_text()


def test_rerun_on_a_smaller_cohort_lists_then_removes_stale_outputs(first_run, tmp_path, capsys):
    root = first_run["root"]
    small = tmp_path / "bids"
    shutil.copytree(root / "bids", small)
    shutil.rmtree(small / "sub-06")
    shutil.rmtree(small / "derivatives" / "masks" / "sub-06")
    common = ["-d", f"masks={small / 'derivatives' / 'masks'}", "--modality", "T1w"]
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    stale_files = sorted(p.relative_to(out).as_posix() for p in out.glob("sub-06/**/*") if p.is_file())
    assert len(stale_files) == 8

    assert run_cg3d(small, out, root / "work", *common) == 0
    err = capsys.readouterr().err
    assert "sub-06_T1w" in err and "--remove-stale-outputs" in err
    rows = {r["participant_id"]: r for r in read_tsv(out / "group_T1w.tsv")}
    assert list(rows) == [f"sub-{s}" for s in SUBJECTS[:5]] + ["sub-06"]
    assert rows["sub-06"]["status"] == "stale" and rows["sub-06"]["score_max"] == "n/a"
    assert rows["sub-06"]["test_encoder"] == "n/a" and rows["sub-01"]["test_encoder"] == "true"
    assert sorted(int(r["rank"]) for r in rows.values() if r["status"] == "ok") == [1, 2, 3, 4, 5]
    stale = json.loads((out / "group_T1w.json").read_text())["StaleOutputs"]
    assert stale["Images"] == ["sub-06_T1w"] and sorted(stale["Files"]) == stale_files and not stale["Removed"]
    assert all((out / rel).exists() for rel in stale_files), "kept without --remove-stale-outputs"

    assert run_cg3d(small, out, root / "work", *common, "--remove-stale-outputs") == 0
    rows = read_tsv(out / "group_T1w.tsv")
    assert [r["participant_id"] for r in rows] == [f"sub-{s}" for s in SUBJECTS[:5]]
    assert not (out / "sub-06").exists() and not (out / "sub-06.html").exists()
    listed = {r["bids_name"] for r in rows}
    on_disk = {p.name.split("_label-")[0] + "_T1w" for p in out.glob("sub-*/anat/*_probseg.nii.gz")}
    assert on_disk == listed, "the table lists exactly the images whose outputs are in the folder"
    n_errors, messages = validate_derivatives(out)
    assert n_errors == 0, messages


@pytest.mark.parametrize("work", ["fresh", "reused"])
def test_constant_image_is_skipped_with_skip_bad_images(tmp_path, capsys, work):
    """Item 2: a constant image among six stops the run with 65; with --skip-bad-images (fresh
    work dir, or the one of the stopped run) it is listed as skipped, the others scored, exit 1."""
    paths = make_bids_dataset(tmp_path / "bids", subjects=SUBJECTS, modalities=("T1w",), seed=32)
    path = tmp_path / "bids" / "sub-04" / "anat" / "sub-04_T1w.nii.gz"
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.full(img.shape, 500.0, np.float32), img.affine, img.header), path)
    common = ["-d", f"masks={paths['masks_dir']}", "--modality", "T1w"]
    if work == "reused":
        assert run_cg3d(tmp_path / "bids", tmp_path / "stopped", tmp_path / "work", *common) == 65
        assert "sub-04_T1w.nii.gz" in capsys.readouterr().err
    assert run_cg3d(tmp_path / "bids", tmp_path / "out", tmp_path / "work", *common, "--skip-bad-images") == 1
    rows = {r["participant_id"]: r for r in read_tsv(tmp_path / "out" / "group_T1w.tsv")}
    assert list(rows) == [f"sub-{s}" for s in SUBJECTS]
    assert rows["sub-04"]["status"] == "skipped" and "constant" in rows["sub-04"]["error"]
    assert "sub-04_T1w.nii.gz" in rows["sub-04"]["error"]
    assert sorted(int(r["rank"]) for r in rows.values() if r["status"] == "ok") == [1, 2, 3, 4, 5]
    assert not (tmp_path / "out" / "sub-04" / "anat").exists()
