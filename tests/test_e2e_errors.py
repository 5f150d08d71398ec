"""Bad input ends with the right exit code, a message naming the file and the fix, and no outputs."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_fixtures import make_bids_dataset
from cg3d_bids.cli.main import main

FAST = ["--device", "cpu", "--encoder", "test-tiny-vit", "--cube-size", "56", "--nprocs", "1",
        "--skip-bids-validation", "--projection-dim", "16", "--modality", "T1w"]
SUBJECTS = ["01", "02", "03", "04", "05"]


@pytest.fixture
def dataset(tmp_path):
    paths = make_bids_dataset(tmp_path / "bids", subjects=SUBJECTS, modalities=("T1w",), seed=11)
    return tmp_path, paths


def run(tmp_path: Path, paths, *extra: str) -> int:
    return main([str(tmp_path / "bids"), str(tmp_path / "out"), "group", "-w", str(tmp_path / "work"),
                 *FAST, "-d", f"masks={paths['masks_dir']}", *extra])


def t1w(tmp_path: Path, sub: str) -> Path:
    return tmp_path / "bids" / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz"


def mask(paths, sub: str) -> Path:
    return paths["masks_dir"] / f"sub-{sub}" / "anat" / f"sub-{sub}_desc-brain_mask.nii.gz"


def check(capsys, tmp_path: Path, status: int, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert status == code, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert "fix:" in err
    assert not (tmp_path / "out").exists(), "a failed run must leave no output folder"
    return err


@pytest.mark.slow
def test_corrupt_nifti(dataset, capsys):
    tmp_path, paths = dataset
    t1w(tmp_path, "02").write_bytes(b"this is not a nifti file at all")
    check(capsys, tmp_path, run(tmp_path, paths), 65, "sub-02_T1w.nii.gz")


@pytest.mark.slow
def test_truncated_nifti(dataset, capsys):
    tmp_path, paths = dataset
    path = t1w(tmp_path, "03")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    check(capsys, tmp_path, run(tmp_path, paths), 65, "sub-03_T1w.nii.gz")


@pytest.mark.slow
def test_4d_image(dataset, capsys):
    tmp_path, paths = dataset
    img = nib.load(t1w(tmp_path, "01"))
    data = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), img.affine), t1w(tmp_path, "01"))
    check(capsys, tmp_path, run(tmp_path, paths), 65, "sub-01_T1w.nii.gz", "4D")


@pytest.mark.slow
def test_nan_image(dataset, capsys):
    tmp_path, paths = dataset
    img = nib.load(t1w(tmp_path, "04"))
    data = np.asarray(img.dataobj).astype(np.float32)
    data[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), t1w(tmp_path, "04"))
    check(capsys, tmp_path, run(tmp_path, paths), 65, "sub-04_T1w.nii.gz")


@pytest.mark.slow
def test_empty_mask(dataset, capsys):
    tmp_path, paths = dataset
    img = nib.load(mask(paths, "02"))
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), mask(paths, "02"))
    check(capsys, tmp_path, run(tmp_path, paths), 65, "sub-02_desc-brain_mask.nii.gz")


@pytest.mark.slow
def test_mask_that_cannot_be_mapped(dataset, capsys):
    tmp_path, paths = dataset
    img = nib.load(mask(paths, "05"))
    far = img.affine.copy()
    far[:3, 3] += 5000.0  # a grid nowhere near the image
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), far), mask(paths, "05"))
    check(capsys, tmp_path, run(tmp_path, paths), 65, "sub-05_desc-brain_mask.nii.gz")


def test_labels_matching_nothing(dataset, capsys):
    tmp_path, paths = dataset
    check(capsys, tmp_path, run(tmp_path, paths, "--participant-label", "99"), 18, "99")


@pytest.mark.slow
def test_modality_without_images(dataset, capsys):
    tmp_path, paths = dataset
    status = main([str(tmp_path / "bids"), str(tmp_path / "out"), "group", "-w", str(tmp_path / "work"),
                   *FAST[:-2], "--modality", "FLAIR", "-d", f"masks={paths['masks_dir']}"])
    check(capsys, tmp_path, status, 66, "FLAIR")


@pytest.mark.slow
def test_batch_below_minimum(dataset, capsys):
    tmp_path, paths = dataset
    err = check(capsys, tmp_path, run(tmp_path, paths, "--participant-label", "01", "02", "03"), 66)
    assert "at least 5" in err


@pytest.mark.slow
def test_missing_weights_offline(dataset, capsys, monkeypatch):
    tmp_path, paths = dataset
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    monkeypatch.delenv("CG3D_WEIGHTS_DIR", raising=False)
    args = [a if a != "test-tiny-vit" else "dinov2_vits14" for a in FAST]
    status = main([str(tmp_path / "bids"), str(tmp_path / "out"), "group", "-w", str(tmp_path / "work"),
                   *args, "-d", f"masks={paths['masks_dir']}"])
    check(capsys, tmp_path, status, 66, "--weights")


@pytest.mark.slow
def test_image_without_mask(dataset, capsys):
    tmp_path, paths = dataset
    mask(paths, "03").unlink()
    check(capsys, tmp_path, run(tmp_path, paths), 66, "sub-03_T1w.nii.gz", "--mask-source")


@pytest.mark.slow
def test_gzip_with_bad_crc_is_caught(dataset, capsys):
    """A .nii.gz whose payload is damaged (not only cut short) is reported too."""
    tmp_path, paths = dataset
    path = t1w(tmp_path, "01")
    raw = bytearray(gzip.decompress(path.read_bytes()))
    compressed = bytearray(gzip.compress(bytes(raw)))
    compressed[len(compressed) // 2] ^= 0xFF
    path.write_bytes(bytes(compressed))
    check(capsys, tmp_path, run(tmp_path, paths), 65, "sub-01_T1w.nii.gz")
