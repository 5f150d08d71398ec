"""Atomic writers: NIfTI files are gzip streams any reader inflates, the same image the same bytes."""

from __future__ import annotations

import builtins
import gzip

import nibabel as nib
import numpy as np
import pytest

from cg3d_bids.atomic import write_nifti


def _image() -> nib.Nifti1Image:
    data = np.zeros((20, 18, 16), np.float32)
    data[4:15, 3:14, 2:12] = np.random.default_rng(0).random((11, 11, 10), dtype=np.float32)
    return nib.Nifti1Image(data, np.diag([1.5, 1.5, 2.0, 1.0]))


@pytest.mark.parametrize("isal", [True, False])
def test_write_nifti_gz_is_plain_gzip_and_reproducible(tmp_path, monkeypatch, isal):
    if not isal:  # a platform without ISA-L falls back to the standard library's zlib
        real_import = builtins.__import__

        def no_isal(name, *args, **kwargs):
            if name == "isal" or name.startswith("isal."):
                raise ImportError(name)
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", no_isal)
    image = _image()
    first, second = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    write_nifti(first, image)
    write_nifti(second, image)
    assert first.read_bytes() == second.read_bytes()  # fixed mtime: same image, same bytes
    assert gzip.decompress(first.read_bytes()) == image.to_bytes()
    back = nib.load(first)
    assert np.array_equal(back.get_fdata(dtype=np.float32), image.get_fdata(dtype=np.float32))
    assert np.allclose(back.affine, image.affine)
    assert not list(tmp_path.glob(".tmp-*"))  # nothing half-written left behind


def test_write_nifti_other_formats_go_through_nibabel(tmp_path):
    image = _image()
    write_nifti(tmp_path / "a.nii", image)
    assert (tmp_path / "a.nii").read_bytes() == image.to_bytes()
