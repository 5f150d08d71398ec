"""Brain masks whose geometry is suspicious are used, with one warning naming both files: a mask
resampled from another grid, or one lying largely on background (e.g. a mask of another shape
written with the image's affine, so shifted in world space)."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest

from bids_fixtures import make_bids_dataset
from cg3d_bids import stages
from cg3d_bids.bids.discovery import discover_images
from cg3d_bids.cli.run import resolve_run_info
from cg3d_bids.core.preprocessing import load_image, load_mask_for_image, map_mask_to_image
from cg3d_bids.core.preprocessing.io import WARN_MASK_ON_BACKGROUND
from cg3d_bids.errors import InputDataError
from cg3d_bids.settings import Settings
from cg3d_bids.stages import StageContext
from cg3d_bids.stages.inputs import load_inputs


@pytest.fixture
def dataset(tmp_path):
    paths = make_bids_dataset(tmp_path / "bids", subjects=["01", "02", "03", "04", "05"], modalities=("T1w",),
                              shape=(24, 28, 24), voxel_size=(6.0, 6.0, 6.0), seed=7)
    return paths


def mask_path(paths, sub="01"):
    return paths["masks_dir"] / f"sub-{sub}" / "anat" / f"sub-{sub}_desc-brain_mask.nii.gz"


def image_path(paths, sub="01"):
    return paths["bids_dir"] / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz"


def pad_with_same_affine(path, pad=3):
    """The mask array padded at the start of two axes, saved with the unchanged affine: in world
    space the brain moves by ``pad`` voxels (the issue's case: same affine, another shape)."""
    img = nib.load(path)
    data = np.pad(np.asarray(img.dataobj), ((pad, 0), (pad, 0), (0, 0)))
    nib.save(nib.Nifti1Image(data, img.affine), path)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "cg3d"]


def test_same_affine_other_shape_warns_naming_both_files_and_the_share(dataset, caplog):
    pad_with_same_affine(mask_path(dataset))
    image = load_image(image_path(dataset))
    mapped = map_mask_to_image(mask_path(dataset), image)
    assert mapped.resampled and mapped.background_fraction > WARN_MASK_ON_BACKGROUND
    with caplog.at_level(logging.WARNING, logger="cg3d"):
        load_mask_for_image(mask_path(dataset), image)
    (message,) = warnings_of(caplog)
    assert str(mask_path(dataset)) in message and str(image_path(dataset)) in message
    assert f"{mapped.background_fraction:.0%} of it lies on image background" in message
    assert "resampled" in message


def test_a_good_mask_gives_no_warning(dataset, caplog):
    image = load_image(image_path(dataset))
    with caplog.at_level(logging.WARNING, logger="cg3d"):
        load_mask_for_image(mask_path(dataset), image)
    assert map_mask_to_image(mask_path(dataset), image).background_fraction < 0.02
    assert warnings_of(caplog) == []


def test_a_mask_resampled_from_an_aligned_grid_warns_once_about_resampling(dataset, caplog):
    """A mask on a finer grid of the same world space: used, with a note that it was resampled."""
    img = nib.load(mask_path(dataset))
    data = np.asarray(img.dataobj)
    fine = np.repeat(np.repeat(np.repeat(data, 2, 0), 2, 1), 2, 2)
    affine = img.affine.copy()
    affine[:3, :3] /= 2.0
    affine[:3, 3] -= np.diag(img.affine)[:3] / 4.0  # voxel centres of the 2x grid
    nib.save(nib.Nifti1Image(fine, affine), mask_path(dataset))
    image = load_image(image_path(dataset))
    with caplog.at_level(logging.WARNING, logger="cg3d"):
        mask = load_mask_for_image(mask_path(dataset), image)
    (message,) = warnings_of(caplog)
    assert "resampled" in message and "background" not in message
    assert (mask == (np.asarray(nib.as_closest_canonical(nib.load(image_path(dataset))).dataobj) > 0)).mean() > 0.9


def test_prepare_warns_once_per_image_the_other_stages_do_not(dataset, tmp_path, caplog):
    pad_with_same_affine(mask_path(dataset))
    (image, *_rest) = discover_images(dataset["bids_dir"], modalities=("T1w",),
                                      derivatives={"masks": dataset["masks_dir"]})["T1w"]
    settings = Settings().replace(
        inputs={"bids_dir": dataset["bids_dir"], "output_dir": tmp_path / "out", "modality": ("T1w",)},
        method={"encoder": "test-tiny-vit", "cube_size": 28, "projection_dim": 8},
        execution={"device": "cpu", "work_dir": tmp_path / "work"},
    )
    ctx = StageContext.from_settings(resolve_run_info(settings, run_id="geometry"))
    with caplog.at_level(logging.WARNING, logger="cg3d"):
        assert stages.prepare(ctx, image).usable
        load_inputs(ctx, image)  # as tokenize and outputs read it
    assert len([m for m in warnings_of(caplog) if "brain mask" in m]) == 1


def test_the_mask_comes_in_the_memory_order_of_the_image(dataset):
    """A mask file stored like the image (nibabel reads both in Fortran order) comes back in the
    C order of the canonical image's array: masked reads across two orders are ~8x slower."""
    image = load_image(image_path(dataset))
    assert np.asanyarray(image.dataobj).flags.c_contiguous
    mapped = map_mask_to_image(mask_path(dataset), image)
    assert not mapped.resampled and mapped.mask.flags.c_contiguous
    stored = np.asarray(nib.as_closest_canonical(nib.load(mask_path(dataset))).dataobj) > 0
    assert np.array_equal(mapped.mask, stored)


def test_the_stages_after_prepare_skip_the_checks_against_the_image_values(dataset):
    """``warn=False`` reads a pair that passed prepare's checks: the checks against the image's
    values are not run again (they read every voxel); those of the mask file still are."""
    image = load_image(image_path(dataset))
    blank = nib.Nifti1Image(np.zeros(image.shape, np.float32), image.affine)  # all zero under the mask
    with pytest.raises(InputDataError, match="all zeros inside the brain mask"):
        load_mask_for_image(mask_path(dataset), blank)
    mask = load_mask_for_image(mask_path(dataset), blank, warn=False)
    assert np.array_equal(mask, map_mask_to_image(mask_path(dataset), image).mask)
    empty = nib.load(mask_path(dataset))
    nib.save(nib.Nifti1Image(np.zeros(empty.shape, np.uint8), empty.affine), mask_path(dataset))
    with pytest.raises(InputDataError, match="the brain mask is empty"):
        load_mask_for_image(mask_path(dataset), image, warn=False)
