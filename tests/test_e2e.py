"""End to end: ``cg3d bids out group`` on tiny BIDS datasets, with the random test encoder.

One group run per dataset layout is shared by the tests that inspect its outputs (module-scoped
fixtures); each run takes seconds (56^3 cubes, tiny ViT, CPU, nipype Linear plugin).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_fixtures import make_bids_dataset
from cg3d_bids.cli.main import main

pytestmark = pytest.mark.slow  # every test here runs cg3d end to end (seconds to a minute each)

SUBJECTS = ["01", "02", "03", "04", "05", "06"]
FAST = ["--device", "cpu", "--encoder", "test-tiny-vit", "--cube-size", "56", "--nprocs", "1",
        "--skip-bids-validation", "--projection-dim", "16"]


def run_cg3d(bids: Path, out: Path, work: Path, *extra: str, level: str = "group") -> int:
    return main([str(bids), str(out), level, "-w", str(work), *FAST, *extra])


def tree_snapshot(root: Path) -> dict[str, tuple[str, float]]:
    """Content hash and mtime of every file (to prove inputs are never written)."""
    snap = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            snap[str(path.relative_to(root))] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime)
    return snap


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """Six subjects, T1w + T2w, masks from a derivatives dataset, no sessions."""
    root = tmp_path_factory.mktemp("plain")
    paths = make_bids_dataset(root / "bids", subjects=SUBJECTS, modalities=("T1w", "T2w"),
                              with_masks=True, lesion_subjects=["02"], seed=1)
    before = tree_snapshot(root / "bids")
    status = run_cg3d(root / "bids", root / "out", root / "work", "-d", f"masks={paths['masks_dir']}")
    return {"root": root, "status": status, "before": before, "paths": paths}


def test_group_run_succeeds_and_never_writes_inputs(plain_run):
    assert plain_run["status"] == 0
    assert tree_snapshot(plain_run["root"] / "bids") == plain_run["before"]


def test_outputs_on_native_grid_with_source_header(plain_run):
    out, bids = plain_run["root"] / "out", plain_run["root"] / "bids"
    for sub in SUBJECTS:
        for mod in ("T1w", "T2w"):
            source = nib.load(bids / f"sub-{sub}" / "anat" / f"sub-{sub}_{mod}.nii.gz")
            for name, dtype in (("label-anomaly_desc-{m}_probseg", np.float32),
                                ("label-anomaly_desc-{m}_mask", np.uint8),
                                ("label-brain_desc-{m}_mask", np.uint8)):
                path = out / f"sub-{sub}" / "anat" / f"sub-{sub}_{name.format(m=mod)}.nii.gz"
                img = nib.load(path)
                assert img.shape == source.shape, path
                np.testing.assert_allclose(img.affine, source.affine, atol=1e-5)
                assert img.get_data_dtype() == dtype
                assert path.with_name(path.name.replace(".nii.gz", ".json")).exists()
            probseg = np.asarray(nib.load(out / f"sub-{sub}" / "anat" /
                                          f"sub-{sub}_label-anomaly_desc-{mod}_probseg.nii.gz").dataobj)
            assert probseg.min() >= 0 and probseg.max() <= 1


def test_brain_mask_output_is_the_mask_used(plain_run):
    """The written brain mask equals the derivatives mask voxel for voxel (orientation round trip)."""
    out, masks = plain_run["root"] / "out", plain_run["paths"]["masks_dir"]
    for sub in SUBJECTS:
        expected = np.asarray(nib.load(masks / f"sub-{sub}" / "anat" / f"sub-{sub}_desc-brain_mask.nii.gz").dataobj) > 0
        written = np.asarray(nib.load(out / f"sub-{sub}" / "anat" /
                                      f"sub-{sub}_label-brain_desc-T1w_mask.nii.gz").dataobj) > 0
        np.testing.assert_array_equal(written, expected)
        probseg = np.asarray(nib.load(out / f"sub-{sub}" / "anat" /
                                      f"sub-{sub}_label-anomaly_desc-T1w_probseg.nii.gz").dataobj)
        assert np.all(probseg[~expected] == 0), "background must score 0"


def test_group_table_has_one_row_per_image(plain_run):
    out = plain_run["root"] / "out"
    for mod in ("T1w", "T2w"):
        rows = read_tsv(out / f"group_{mod}.tsv")
        assert [r["participant_id"] for r in rows] == [f"sub-{s}" for s in SUBJECTS]
        assert all(r["status"] == "ok" for r in rows)
        scores = [float(r["score_max"]) for r in rows]
        assert len(set(scores)) == len(scores) and min(scores) > 0
        assert sorted(int(r["rank"]) for r in rows) == list(range(1, len(SUBJECTS) + 1))
        assert json.loads((out / f"group_{mod}.json").read_text())


def test_dataset_files_and_logs(plain_run):
    out = plain_run["root"] / "out"
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Name"] == "cg3d"
    assert "SourceDatasets" in desc
    assert "group_*" in (out / ".bidsignore").read_text()
    assert list((out / "logs").glob("config-*.toml"))
    assert (out / "logs" / "CITATION.md").exists()
    sidecar = json.loads((out / "sub-01" / "anat" / "sub-01_label-anomaly_desc-T1w_probseg.json").read_text())
    assert "bids:raw:sub-01/anat/sub-01_T1w.nii.gz" in json.dumps(sidecar)


def test_reports_written(plain_run):
    from cg3d_bids.bids.naming import output_paths
    from cg3d_bids.records import ImageRecord

    out = plain_run["root"] / "out"
    for sub in SUBJECTS:
        assert (out / f"sub-{sub}.html").exists()
        for mod in ("T1w", "T2w"):
            record = ImageRecord(subject=sub, session=None, modality=mod, path=Path("x"), relpath="x",
                                 entities={"sub": sub}, bids_name=f"sub-{sub}_{mod}")
            missing = [str(p) for p in output_paths(record, out).values() if not p.exists()]
            assert not missing, missing
    for mod in ("T1w", "T2w"):
        html = (out / f"group_{mod}.html").read_text()
        assert "sub-01" in html


def test_outputs_pass_bids_validator(plain_run):
    from cg3d_bids.bids.validation import validate_derivatives

    n_errors, messages = validate_derivatives(plain_run["root"] / "out")
    assert n_errors == 0, messages


def test_rerun_resumes_without_recomputing(plain_run, tmp_path):
    root = plain_run["root"]
    tokens = sorted((root / "work" / "tokens").rglob("*.npz"))
    mtimes = {p: p.stat().st_mtime_ns for p in tokens}
    probseg = root / "out" / "sub-03" / "anat" / "sub-03_label-anomaly_desc-T2w_probseg.nii.gz"
    before = np.asarray(nib.load(probseg).dataobj).copy()
    status = run_cg3d(root / "bids", root / "out", root / "work", "-d", f"masks={plain_run['paths']['masks_dir']}")
    assert status == 0
    assert {p: p.stat().st_mtime_ns for p in tokens} == mtimes
    np.testing.assert_array_equal(np.asarray(nib.load(probseg).dataobj), before)


def test_changed_setting_recomputes(plain_run, tmp_path):
    root = plain_run["root"]
    n_before = len(list((root / "work" / "tokens").rglob("*.npz")))
    status = run_cg3d(root / "bids", tmp_path / "out", root / "work", "-d",
                      f"masks={plain_run['paths']['masks_dir']}", "--modality", "T1w", "--random-seed", "7")
    assert status == 0
    assert len(list((root / "work" / "tokens").rglob("*.npz"))) == n_before + len(SUBJECTS)


# ---------------------------------------------------------------------------------------------
def test_sessions_and_nonzero_masks(tmp_path):
    make_bids_dataset(tmp_path / "bids", subjects=SUBJECTS[:5], sessions=["a", "b"], modalities=("T2w",),
                      with_masks=False, seed=3)
    status = run_cg3d(tmp_path / "bids", tmp_path / "out", tmp_path / "work", "--modality", "T2w",
                      "--mask-source", "nonzero")
    assert status == 0
    rows = read_tsv(tmp_path / "out" / "group_T2w.tsv")
    assert len(rows) == 10
    assert {r["session_id"] for r in rows} == {"ses-a", "ses-b"}
    assert (tmp_path / "out" / "sub-01" / "ses-b" / "anat" /
            "sub-01_ses-b_label-anomaly_desc-T2w_probseg.nii.gz").exists()
    html = (tmp_path / "out" / "sub-01.html").read_text()
    assert "ses-a" in html and "ses-b" in html


def test_participant_then_group_reuses_tokens(tmp_path):
    paths = make_bids_dataset(tmp_path / "bids", subjects=SUBJECTS[:5], modalities=("T1w",), seed=4)
    common = ["-d", f"masks={paths['masks_dir']}", "--modality", "T1w"]
    for sub in SUBJECTS[:5]:
        assert run_cg3d(tmp_path / "bids", tmp_path / "out", tmp_path / "work", *common,
                        "--participant-label", sub, level="participant") == 0
    tokens = sorted((tmp_path / "work" / "tokens").rglob("*.npz"))
    assert len(tokens) == 5
    assert not (tmp_path / "out" / "group_T1w.tsv").exists()
    mtimes = [p.stat().st_mtime_ns for p in tokens]
    assert run_cg3d(tmp_path / "bids", tmp_path / "out", tmp_path / "work", *common) == 0
    assert [p.stat().st_mtime_ns for p in tokens] == mtimes
    assert len(read_tsv(tmp_path / "out" / "group_T1w.tsv")) == 5


def test_killed_run_resumes_to_identical_outputs(tmp_path):
    """SIGKILL a group run once the first token file exists; the rerun equals an uninterrupted run."""
    paths = make_bids_dataset(tmp_path / "bids", subjects=SUBJECTS, modalities=("T1w",), seed=5)
    common = ["-d", f"masks={paths['masks_dir']}", "--modality", "T1w"]
    assert run_cg3d(tmp_path / "bids", tmp_path / "ref", tmp_path / "work_ref", *common) == 0

    cmd = [sys.executable, "-m", "cg3d_bids", str(tmp_path / "bids"), str(tmp_path / "out"), "group",
           "-w", str(tmp_path / "work"), *FAST, *common]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    token_dir = tmp_path / "work" / "tokens"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if token_dir.exists() and any(token_dir.rglob("*.npz")):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "out" / "group_T1w.tsv").exists()
    assert not list(tmp_path.rglob("out/**/*.nii.gz")), "no output may exist before scoring"

    assert run_cg3d(tmp_path / "bids", tmp_path / "out", tmp_path / "work", *common) == 0
    for ref in sorted((tmp_path / "ref").rglob("*.nii.gz")):
        new = tmp_path / "out" / ref.relative_to(tmp_path / "ref")
        np.testing.assert_array_equal(np.asarray(nib.load(new).dataobj), np.asarray(nib.load(ref).dataobj))
    ref_rows = read_tsv(tmp_path / "ref" / "group_T1w.tsv")
    new_rows = read_tsv(tmp_path / "out" / "group_T1w.tsv")
    assert [r["score_max"] for r in ref_rows] == [r["score_max"] for r in new_rows]


@pytest.fixture(scope="module")
def skip_run(tmp_path_factory):
    """Seven subjects, sub-02 corrupt and sub-05 with an Inf voxel: a run without and one with
    --skip-bad-images (stderr of the first kept)."""
    tmp_path = tmp_path_factory.mktemp("skip")
    subjects = ["01", "02", "03", "04", "05", "06", "07"]
    paths = make_bids_dataset(tmp_path / "bids", subjects=subjects, modalities=("T1w",), seed=6)
    anat = str(tmp_path / "bids" / "sub-{s}" / "anat" / "sub-{s}_T1w.nii.gz")
    good = Path(anat.format(s="02")).read_bytes()
    Path(anat.format(s="02")).write_bytes(b"not a nifti")
    img = nib.load(anat.format(s="05"))
    data = np.asarray(img.dataobj).astype(np.float32)
    data[2, 2, 2] = np.inf
    nib.save(nib.Nifti1Image(data, img.affine), anat.format(s="05"))
    common = ["-d", f"masks={paths['masks_dir']}", "--modality", "T1w"]
    cmd = [sys.executable, "-m", "cg3d_bids", str(tmp_path / "bids"), str(tmp_path / "stop"), "group",
           "-w", str(tmp_path / "work"), *FAST, *common]
    stopped = subprocess.run(cmd, capture_output=True, text=True)
    status = run_cg3d(tmp_path / "bids", tmp_path / "out", tmp_path / "work", *common, "--skip-bad-images")
    return {"root": tmp_path, "subjects": subjects, "anat": anat, "good": good, "common": common,
            "stopped": stopped, "status": status}


def test_without_skip_bad_images_bad_data_stops_and_points_to_the_flag(skip_run):
    assert skip_run["stopped"].returncode == 65
    assert "--skip-bad-images" in skip_run["stopped"].stderr
    assert not (skip_run["root"] / "stop").exists()


def test_every_report_opens_cleanly_in_chromium(plain_run, skip_run):
    """Every HTML report of two end-to-end runs (one with skipped images) in headless Chromium:
    no console error, no broken image, no network request, not blank."""
    from browser import check_report, find_chromium

    if find_chromium() is None:
        print("chromium not found: apt-get install chromium")
        pytest.skip("chromium not found: apt-get install chromium")
    pages = sorted((plain_run["root"] / "out").glob("*.html")) + sorted((skip_run["root"] / "out").glob("*.html"))
    assert len(pages) == len(SUBJECTS) + 2 + len(skip_run["subjects"]) + 1
    for page in pages:
        check = check_report(page)
        assert check.ok, check.summary()


def test_skip_bad_images_scores_the_rest(skip_run):
    """--skip-bad-images: the corrupt and the Inf image are listed as skipped, the other five
    scored, exit 1; a fixed image rejoins the batch on the rerun."""
    tmp_path, subjects, anat = skip_run["root"], skip_run["subjects"], skip_run["anat"]
    assert skip_run["status"] == 1
    rows = {r["participant_id"]: r for r in read_tsv(tmp_path / "out" / "group_T1w.tsv")}
    assert list(rows) == [f"sub-{s}" for s in subjects]
    assert {k for k, r in rows.items() if r["status"] == "skipped"} == {"sub-02", "sub-05"}
    assert "sub-02_T1w.nii.gz" in rows["sub-02"]["error"] and "sub-05_T1w.nii.gz" in rows["sub-05"]["error"]
    assert sorted(int(r["rank"]) for r in rows.values() if r["status"] == "ok") == [1, 2, 3, 4, 5]
    anat_out = str(tmp_path / "out" / "sub-{s}" / "anat" / "sub-{s}_label-anomaly_desc-T1w_probseg.nii.gz")
    assert not Path(anat_out.format(s="02")).exists()
    assert Path(anat_out.format(s="03")).exists()
    assert "skipped" in (tmp_path / "out" / "sub-02.html").read_text()
    assert "skipped" in (tmp_path / "out" / "group_T1w.html").read_text()
    with np.load(next((tmp_path / "work" / "scores" / "T1w").glob("*.npz"))) as scores:
        assert scores["valid"].shape[0] == 5
    from cg3d_bids.bids.validation import validate_derivatives

    n_errors, messages = validate_derivatives(tmp_path / "out")
    assert n_errors == 0, messages

    Path(anat.format(s="02")).write_bytes(skip_run["good"])
    assert run_cg3d(tmp_path / "bids", tmp_path / "out", tmp_path / "work", *skip_run["common"],
                    "--skip-bad-images") == 1
    rows = {r["participant_id"]: r for r in read_tsv(tmp_path / "out" / "group_T1w.tsv")}
    assert [k for k, r in rows.items() if r["status"] != "ok"] == ["sub-05"]
    assert Path(anat_out.format(s="02")).exists()
    # participant level: a call whose own image is skipped fails, the others succeed
    for sub, expected in (("05", 1), ("03", 0)):
        assert run_cg3d(tmp_path / "bids", tmp_path / "out", tmp_path / "work", *skip_run["common"],
                        "--skip-bad-images", "--participant-label", sub, level="participant") == expected


@contextmanager
def read_only_view(source: Path, view: Path):
    """``view`` shows ``source`` read-only: a read-only bind mount as root (where permission bits
    do not stop root), write permissions removed otherwise."""
    view.mkdir()
    if os.geteuid() != 0:
        paths = [source, *source.rglob("*")]
        modes = {p: p.stat().st_mode for p in paths}
        view.rmdir()
        view.symlink_to(source)
        for p in paths:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p in reversed(paths):
                p.chmod(modes[p])
        return
    bind = subprocess.run(["mount", "--bind", str(source), str(view)], capture_output=True, text=True)
    if bind.returncode:
        pytest.skip(f"cannot bind-mount as root here: {bind.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", str(view)], check=True)


def test_read_only_input_dataset(tmp_path):
    """A dataset the process cannot write to (masks inside it too) runs, validation included."""
    make_bids_dataset(tmp_path / "src", subjects=SUBJECTS[:5], modalities=("T1w",), seed=8)
    view = tmp_path / "ro"
    with read_only_view(tmp_path / "src", view):
        with pytest.raises(OSError):
            (view / "probe.txt").write_text("x")
        argv = [str(view), str(tmp_path / "out"), "group", "-w", str(tmp_path / "work"),
                *[a for a in FAST if a != "--skip-bids-validation"],
                "--modality", "T1w", "-d", f"masks={view / 'derivatives' / 'masks'}"]
        assert main(argv) == 0
    assert len(read_tsv(tmp_path / "out" / "group_T1w.tsv")) == 5
    assert not (tmp_path / "src" / "probe.txt").exists()


def test_concurrent_participant_calls_share_the_work_dir(tmp_path):
    """One participant call per subject, all at once on one work dir (an HPC array job), then
    the group level: every call succeeds and the group reuses every token."""
    subjects = SUBJECTS[:5]
    paths = make_bids_dataset(tmp_path / "bids", subjects=subjects, modalities=("T1w",), seed=9)
    common = ["-d", f"masks={paths['masks_dir']}", "--modality", "T1w"]
    procs = [
        subprocess.Popen([sys.executable, "-m", "cg3d_bids", str(tmp_path / "bids"), str(tmp_path / "out"),
                          "participant", "-w", str(tmp_path / "work"), *FAST, *common,
                          "--participant-label", sub],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for sub in subjects
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    tokens = sorted((tmp_path / "work" / "tokens").rglob("*.npz"))
    assert len(tokens) == len(subjects)
    assert len(list((tmp_path / "work" / "prep").rglob("*.npz"))) == len(subjects)
    mtimes = [p.stat().st_mtime_ns for p in tokens]
    assert run_cg3d(tmp_path / "bids", tmp_path / "out", tmp_path / "work", *common) == 0
    assert [p.stat().st_mtime_ns for p in tokens] == mtimes
    assert len(read_tsv(tmp_path / "out" / "group_T1w.tsv")) == len(subjects)
    runs = list((tmp_path / "work" / "runs").iterdir())
    assert len(runs) == len(subjects) + 1, "one run folder per call"
    assert not any((run / "nipype").exists() for run in runs), "nipype folders of finished runs are removed"
