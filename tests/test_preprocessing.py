"""Preprocessing: loading/validation, masks across grids, cube geometry, Nyul, skull-stripping.

Synthetic volumes check geometry exactly; real 4 mm images come from the bundled demo dataset.
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cg3d_bids.demo_data import demo_dataset_path
from cg3d_bids.errors import InputDataError, NoInputError
from cg3d_bids.core.preprocessing import (
    PERCENTILES,
    cube_to_native,
    landmarks_from_percentiles,
    learn_landmarks,
    load_image,
    load_image_pair,
    load_mask_for_image,
    load_native,
    make_cube,
    map_mask_to_image,
    nonzero_mask,
    standardise,
)

DEMO = demo_dataset_path()
MASKS = DEMO / "derivatives" / "masks"


def demo_image(label: str = "ms26", modality: str = "T1w") -> Path:
    return DEMO / f"sub-{label}" / "anat" / f"sub-{label}_{modality}.nii.gz"


def demo_mask(label: str = "ms26") -> Path:
    return MASKS / f"sub-{label}" / "anat" / f"sub-{label}_desc-brain_mask.nii.gz"


def save(tmp_path: Path, name: str, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def blob(shape: tuple[int, int, int], center: tuple[float, float, float], sigma: float) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float32)
    d2 = sum((g - c) ** 2 for g, c in zip(grid, center))
    return np.exp(-d2 / (2 * sigma**2)).astype(np.float32)


def centroid(values: np.ndarray) -> np.ndarray:
    w = np.clip(values, 0, None)
    return np.array([(g * w).sum() / w.sum() for g in np.indices(values.shape)])


def world_to_voxel(affine: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    return np.linalg.inv(affine)[:3, :3] @ xyz + np.linalg.inv(affine)[:3, 3]


# ------------------------------------------------------------------------------------------------
# io: errors name the file
def _assert_input_error(path: Path, match: str) -> InputDataError:
    with pytest.raises(InputDataError, match=match) as exc:
        load_image(path)
    assert str(path) in str(exc.value) and "fix:" in str(exc.value)
    assert exc.value.exit_code == 65
    return exc.value


def test_corrupt_file(tmp_path):
    path = tmp_path / "sub-01_T1w.nii.gz"
    path.write_bytes(b"this is not a nifti file at all" * 20)
    _assert_input_error(path, "cannot read")


def test_truncated_gzip(tmp_path):
    data = demo_image().read_bytes()
    path = tmp_path / "sub-01_T1w.nii.gz"
    path.write_bytes(data[: len(data) // 2])
    _assert_input_error(path, "truncated or corrupt")


def test_corrupt_deflate_stream(tmp_path):
    """Damage inside the compressed stream (ISA-L raises its own error type there) is reported
    as a corrupt file, with or without ISA-L."""
    import builtins

    data = bytearray(demo_image().read_bytes())
    data[20:70] = bytes(b ^ 0xFF for b in data[20:70])
    path = tmp_path / "sub-01_T1w.nii.gz"
    path.write_bytes(bytes(data))
    _assert_input_error(path, "truncated or corrupt")
    real_import = builtins.__import__

    def no_isal(name, *args, **kwargs):
        if name.startswith("isal"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builtins, "__import__", no_isal)
        _assert_input_error(path, "truncated or corrupt")
        assert load_image(demo_image()).shape == load_image(demo_image()).shape  # the fallback reads


def test_truncated_uncompressed(tmp_path):
    path = save(tmp_path, "sub-01_T1w.nii", np.ones((20, 20, 20), np.float32))
    path.write_bytes(path.read_bytes()[:5000])
    _assert_input_error(path, "truncated|cannot read")


def test_image_pair_contiguous_or_not_holds_the_same_voxels(tmp_path):
    """``contiguous=False`` (the outputs stage) skips the C-ordered copy, never a value."""
    rng = np.random.default_rng(5)
    data = rng.integers(-50, 400, (9, 7, 5)).astype(np.int16)
    lps = np.diag([-1.2, -1.0, 1.5, 1.0])                  # stored LPS: reoriented to RAS
    for affine in (np.eye(4), lps):
        path = save(tmp_path, "img.nii.gz", data, affine)
        native, canonical = load_image_pair(path)
        native_f, canonical_f = load_image_pair(path, contiguous=False)
        assert canonical.dataobj.flags.c_contiguous and canonical.dataobj.dtype == np.float32
        assert canonical_f.dataobj.dtype == np.float32
        assert np.array_equal(canonical.dataobj, canonical_f.dataobj)
        assert np.array_equal(native.dataobj, native_f.dataobj)
        assert np.array_equal(canonical.affine, canonical_f.affine)
        assert np.array_equal(np.asarray(native.dataobj), data.astype(np.float32))


def test_4d_refused_trailing_singleton_squeezed(tmp_path):
    _assert_input_error(save(tmp_path, "bold.nii.gz", np.ones((6, 6, 6, 3), np.float32)), "3D")
    image = load_image(save(tmp_path, "one.nii.gz", np.ones((6, 7, 8, 1), np.float32)))
    assert image.shape == (6, 7, 8)
    _assert_input_error(save(tmp_path, "flat.nii.gz", np.ones((6, 7), np.float32)), "3D")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_refused(tmp_path, bad):
    data = np.ones((8, 8, 8), np.float32)
    data[2, 3, 4] = bad
    _assert_input_error(save(tmp_path, "bad.nii.gz", data), "NaN")


def test_all_zero_refused(tmp_path):
    _assert_input_error(save(tmp_path, "zero.nii.gz", np.zeros((8, 8, 8), np.int16)), "all zeros")


def test_missing_file(tmp_path):
    with pytest.raises(NoInputError, match="not found"):
        load_image(tmp_path / "nope.nii.gz")


def test_canonical_reorientation_lps_equals_ras(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.random((5, 6, 7)).astype(np.float32) + 1
    ras_affine = np.diag([2.0, 3.0, 4.0, 1.0])
    ras_affine[:3, 3] = [-10, -20, -30]
    # LPS copy: flip x and y in storage, affine adjusted so every voxel keeps its world position
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:3, 3] = [4, 5, 0]  # (n - 1) of the flipped axes
    lps_affine = ras_affine @ flip
    lps = save(tmp_path, "lps.nii.gz", data[::-1, ::-1, :].copy(), lps_affine)
    ras = save(tmp_path, "ras.nii.gz", data, ras_affine)
    assert nib.aff2axcodes(nib.load(lps).affine) == ("L", "P", "S")
    a, b = load_image(lps), load_image(ras)
    assert np.allclose(a.affine, b.affine) and np.array_equal(a.get_fdata(), b.get_fdata())
    assert a.get_data_dtype() == np.float32 and np.asarray(a.dataobj).dtype == np.float32
    native, canonical = load_image_pair(lps)
    assert nib.aff2axcodes(native.affine) == ("L", "P", "S") and np.allclose(native.affine, lps_affine)
    assert np.allclose(canonical.affine, ras_affine)


def test_real_image_loads_canonical():
    image = load_image(demo_image("ms26"))  # stored LAS
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    assert nib.aff2axcodes(load_native(demo_image("ms26")).affine) == ("L", "A", "S")


# ------------------------------------------------------------------------------------------------
# masks
def _box_image(tmp_path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """A 40^3 2 mm RAS image with a bright box (the 'brain') of 20^3 voxels on a zero background."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-40, -40, -40]
    data = np.zeros((40, 40, 40), np.float32)
    data[10:30, 10:30, 10:30] = 100
    path = save(tmp_path, "img.nii.gz", data, affine)
    return load_image(path), data > 0


def test_mask_same_grid_used_directly():
    image = load_image(demo_image("ms26"))
    mapped = map_mask_to_image(demo_mask("ms26"), image)
    assert not mapped.resampled and mapped.mask.dtype == bool and mapped.mask.shape == image.shape
    expected = np.asarray(load_image(demo_mask("ms26")).dataobj) > 0
    assert np.array_equal(mapped.mask, expected)


@pytest.mark.slow
def test_mask_resampled_across_grids(tmp_path):
    image, truth = _box_image(tmp_path)
    # the same box on a 1 mm grid, stored LPS, with another field of view
    fine = np.zeros((90, 90, 90), np.uint8)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = [44.5, 44.5, -45]
    ijk = np.indices(fine.shape).reshape(3, -1).T
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    inside = np.all((world >= -21) & (world <= 19), axis=1)  # world extent of the 2 mm box voxels
    fine.reshape(-1)[inside] = 1
    mask_path = save(tmp_path, "mask.nii.gz", fine, affine)
    mapped = map_mask_to_image(mask_path, image)
    assert mapped.resampled and mapped.inside_fov_fraction == 1.0
    dice = 2 * (mapped.mask & truth).sum() / (mapped.mask.sum() + truth.sum())
    assert dice > 0.95
    assert np.array_equal(load_mask_for_image(mask_path, image), mapped.mask)


def test_mask_other_orientation_same_grid_not_resampled(tmp_path):
    image, truth = _box_image(tmp_path)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = 39
    path = save(tmp_path, "mask_las.nii.gz", truth[::-1].astype(np.uint8).copy(), image.affine @ flip)
    mapped = map_mask_to_image(path, image)
    assert not mapped.resampled and np.array_equal(mapped.mask, truth)


def _assert_mask_error(mask_path: Path, image, match: str) -> None:
    with pytest.raises(InputDataError, match=match) as exc:
        load_mask_for_image(mask_path, image)
    message = str(exc.value)
    assert str(mask_path) in message and "img.nii.gz" in message  # both files named
    assert "--mask-source nonzero" in message


def test_unmappable_masks(tmp_path):
    image, truth = _box_image(tmp_path)
    far = image.affine.copy()
    far[:3, 3] += 500  # same grid shape, 500 mm away
    _assert_mask_error(save(tmp_path, "far.nii.gz", truth.astype(np.uint8), far), image, "does not overlap")
    empty = save(tmp_path, "empty.nii.gz", np.zeros((40,) * 3, np.uint8), image.affine)
    _assert_mask_error(empty, image, "empty")
    assert not map_mask_to_image(empty, image, brain=False).mask.any()  # e.g. a lesion-free subject
    shifted = np.zeros((40,) * 3, np.uint8)
    shifted[5:15, 5:15, 5:15] = 1  # 1/8 on the box, 7/8 on the zero background
    _assert_mask_error(save(tmp_path, "shifted.nii.gz", shifted, image.affine), image, "not aligned")
    speck = np.zeros((40,) * 3, np.uint8)
    speck[20, 20, 20] = 1
    _assert_mask_error(save(tmp_path, "speck.nii.gz", speck, image.affine), image, "covers only")


def test_nonzero_mask_cleanup():
    data = np.zeros((30, 30, 30), np.float32)
    data[5:25, 5:25, 5:25] = 1.0
    data[12:16, 12:16, 12:16] = 0.0   # enclosed hole -> filled
    data[0, 0, 0] = 5.0               # speck -> removed
    mask = nonzero_mask(nib.Nifti1Image(data, np.eye(4)))
    assert mask.sum() == 20**3 and not mask[0, 0, 0] and mask[13, 13, 13]
    with pytest.raises(InputDataError, match="all zeros"):
        nonzero_mask(np.zeros((4, 4, 4)))


# ------------------------------------------------------------------------------------------------
# cube
def _blob_image(tmp_path: Path, center_vox=(14.0, 22.0, 12.0)) -> tuple[Path, np.ndarray]:
    """LAS 3 mm image: a brain box plus a Gaussian blob at a known voxel; returns path and affine."""
    shape = (40, 44, 36)
    affine = np.diag([-3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = [60, -66, -50]
    data = 10 * blob(shape, center_vox, 2.0)
    data[4:36, 4:40, 4:32] += 1.0
    return save(tmp_path, "blob.nii.gz", data, affine), affine


def test_cube_geometry_blob_lands_at_expected_voxel(tmp_path):
    path, affine = _blob_image(tmp_path)
    image = load_image(path)
    mask = np.asarray(image.dataobj) > 0.5
    cube = make_cube(image, mask, size=64, fov_mm=156.0)
    assert cube.data.shape == (64, 64, 64) and cube.data.dtype == np.float32 and cube.mask.dtype == bool
    assert cube.spacing == pytest.approx(156.0 / 64)
    assert np.allclose(cube.affine[:3, :3], np.eye(3) * 156.0 / 64)  # RAS-aligned, isotropic
    # centre = centre of the brain box's world bounding box
    corners = np.array([[4, 4, 4], [35, 39, 31]]) @ affine[:3, :3].T + affine[:3, 3]
    assert np.allclose(cube.center, corners.mean(axis=0))
    assert np.allclose(cube.affine[:3, :3] @ np.full(3, 31.5) + cube.affine[:3, 3], cube.center)
    blob_world = affine[:3, :3] @ np.array([14.0, 22.0, 12.0]) + affine[:3, 3]
    expected = world_to_voxel(cube.affine, blob_world)
    peak = np.array(np.unravel_index(np.argmax(cube.data), cube.data.shape))
    assert np.all(np.abs(peak - expected) <= 1.0)
    # RAS index order: the blob is at world x = 60 - 42 = +18 (right) -> upper half of axis 0
    assert blob_world[0] > cube.center[0] and peak[0] > 32
    assert cube.outside_fraction == 0.0
    assert np.all(cube.data[~cube.mask] == 0)


def test_cube_outside_fraction_warns(tmp_path, caplog):
    path, _ = _blob_image(tmp_path)
    image = load_image(path)
    mask = np.asarray(image.dataobj) > 0.5  # brain box 96 x 108 x 84 mm
    with caplog.at_level(logging.WARNING, logger="cg3d"):
        cube = make_cube(image, mask, size=32, fov_mm=90.0)
    # brain box 32 x 36 x 28 voxels of 3 mm; a 90 mm cube keeps 30 x 30 x 28 of them
    assert cube.outside_fraction == pytest.approx(1 - (30 * 30) / (32 * 36))
    assert any("outside" in r.message and "%" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cg3d"):
        quiet = make_cube(image, mask, size=32, fov_mm=90.0, warn_outside=False)
    assert quiet.outside_fraction == cube.outside_fraction and not caplog.records


def test_cube_to_native_round_trip_blob(tmp_path):
    path, affine = _blob_image(tmp_path)
    native, canonical = load_image_pair(path)
    mask = np.asarray(canonical.dataobj) > 0.5
    cube = make_cube(canonical, mask, size=96, fov_mm=156.0)
    back = cube_to_native(cube.data, cube.affine, native)
    assert back.shape == native.shape and back.dtype == np.float32
    original = np.asarray(native.dataobj)
    assert np.corrcoef(back.ravel(), original.ravel())[0, 1] > 0.9
    peak_region = np.where(original > 3, original, 0)
    assert np.linalg.norm(centroid(np.where(original > 3, back, 0)) - centroid(peak_region)) < 1.0
    native_mask = np.zeros(native.shape, bool)
    native_mask[:20] = True
    masked = cube_to_native(cube.data, cube.affine, native, native_mask)
    assert np.all(masked[20:] == 0) and np.array_equal(masked[:20], back[:20])


def test_cube_real_image_round_trip():
    native, canonical = load_image_pair(demo_image("glioma7294"))  # stored LPS
    cube = make_cube(canonical, load_mask_for_image(demo_mask("glioma7294"), canonical), size=64)
    assert cube.outside_fraction < 0.01
    back = cube_to_native(cube.data, cube.affine, native)
    assert np.corrcoef(back.ravel(), np.asarray(native.dataobj).ravel())[0, 1] > 0.9


def test_cube_empty_mask():
    image = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4))
    with pytest.raises(InputDataError, match="empty"):
        make_cube(image, np.zeros((8, 8, 8), bool), size=16)


# ------------------------------------------------------------------------------------------------
# Nyul
def _brains(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.gamma(2.0 + i, 50.0 * (i + 1), size=5000) + 10 * i for i in range(4)]


def test_nyul_landmarks_and_mapping():
    brains = _brains()
    mu = learn_landmarks(brains)
    assert mu.shape == (len(PERCENTILES),) and mu[0] == 0 and mu[-1] == 1 and np.all(np.diff(mu) > 0)
    per_image = np.stack([np.percentile(b, PERCENTILES) for b in brains])
    assert np.allclose(landmarks_from_percentiles(per_image), mu)
    data = np.zeros((10, 10, 60), np.float32)
    mask = np.zeros_like(data, bool)
    mask[:, :, 5:55] = True
    data[mask] = brains[2]
    out = standardise(data, mask, mu, PERCENTILES)
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    assert np.all(out[~mask] == 0)
    # monotone: intensity order preserved
    order = np.argsort(data[mask], kind="stable")
    assert np.all(np.diff(out[mask][order]) >= -1e-7)
    # the image's own landmarks land on the standard landmarks
    own = np.percentile(data[mask], PERCENTILES)
    assert np.allclose(np.interp(own, own, mu), mu)
    assert np.allclose(np.percentile(out[mask], PERCENTILES), mu, atol=1e-3)
    assert np.array_equal(out, standardise(data.copy(), mask.copy(), mu, list(PERCENTILES)))


def test_nyul_ties_and_constant():
    mask = np.ones((10, 10, 10), bool)
    quantised = np.repeat(np.arange(4, dtype=np.float32), 250).reshape(10, 10, 10)  # heavy ties
    mu = learn_landmarks([quantised[mask], np.arange(1000.0)])
    out = standardise(quantised, mask, mu)
    levels = np.unique(out)
    assert np.all(np.isfinite(out)) and len(levels) == 4 and 0 <= levels[0] and levels[-1] <= 1
    own = np.percentile(quantised, PERCENTILES)
    assert levels[-1] == pytest.approx(mu[own == 3].mean())  # a tied value -> mean of its landmarks
    with pytest.raises(InputDataError, match="constant"):
        standardise(np.full((5, 5, 5), 7.0, np.float32), np.ones((5, 5, 5), bool), mu, source="x.nii.gz")
    with pytest.raises(InputDataError, match="constant"):
        learn_landmarks([np.ones(100), np.arange(100.0)])
    with pytest.raises(ValueError):
        standardise(quantised, mask, mu[:-1])


# ------------------------------------------------------------------------------------------------
# skull-stripping
def test_skullstrip_missing_deepbet(monkeypatch):
    import sys

    from cg3d_bids.core.preprocessing import skullstrip as skullstrip_fn
    from cg3d_bids.core.preprocessing.skullstrip import SkullstripUnavailableError, _extractor

    _extractor.cache_clear()
    monkeypatch.setitem(sys.modules, "deepbet", None)
    with pytest.raises(SkullstripUnavailableError, match=r"cg3d-bids\[skullstrip\]") as exc:
        skullstrip_fn(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)))
    assert exc.value.exit_code == 69
    _extractor.cache_clear()


@pytest.mark.slow
def test_skullstrip_deepbet_on_4mm_image():
    try:
        import deepbet  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"deepbet not importable ({exc}); pip install 'cg3d-bids[skullstrip]'")
    from cg3d_bids.core.preprocessing import skullstrip

    image = load_image(demo_image("healthyixi012"))
    mask = skullstrip(image)
    reference = load_mask_for_image(demo_mask("healthyixi012"), image)
    assert mask.dtype == bool and mask.shape == image.shape
    dice = 2 * (mask & reference).sum() / (mask.sum() + reference.sum())
    assert dice > 0.8, dice


def test_truncated_mask_named(tmp_path):
    image, _ = _box_image(tmp_path)
    data = gzip.compress(np.zeros(10, np.uint8).tobytes())
    bad = tmp_path / "mask.nii.gz"
    bad.write_bytes(data)
    with pytest.raises(InputDataError) as exc:
        load_mask_for_image(bad, image)
    assert str(bad) in str(exc.value)


@pytest.mark.parametrize("oblique", [False, True])
def test_resampling_only_where_needed_is_bit_identical(oblique):
    """The brain-only resampling gives exactly affine_transform's values (the cube and the maps
    must not change when the work shrinks)."""
    from cg3d_bids.core.preprocessing.resample import resample, resample_mask, resample_where

    rng = np.random.default_rng(7 + oblique)
    data = rng.random((50, 57, 43)).astype(np.float32)
    mask = np.zeros(data.shape, bool)
    mask[10:40, 12:45, 8:35] = rng.random((30, 33, 27)) > 0.2
    vox2vox = np.eye(4)
    vox2vox[:3, :3] = np.diag(rng.uniform(0.5, 1.5, 3)) + (rng.normal(size=(3, 3)) * 0.2 if oblique else 0)
    vox2vox[:3, 3] = rng.uniform(-6, 6, 3)
    shape = (48, 48, 48)
    expected_mask = resample(mask.astype(np.uint8), vox2vox, shape, 0).astype(bool)
    expected = resample(data, vox2vox, shape, 1)
    expected[~expected_mask] = 0
    got_mask = resample_mask(mask, vox2vox, shape)
    assert got_mask.any() and np.array_equal(got_mask, expected_mask)
    assert np.array_equal(resample_where(data, vox2vox, got_mask, 1), expected)
    assert not resample_mask(np.zeros_like(mask), vox2vox, shape).any()


@pytest.mark.parametrize("oblique", [False, True])
def test_make_cube_equals_the_plain_affine_transform_recipe(oblique):
    """The cube (data, mask, affine, outside fraction) is exactly what resampling the whole cube
    with affine_transform gives, on axis-aligned (separable fast path) and oblique grids."""
    from cg3d_bids.core.preprocessing import cube as cube_mod
    from cg3d_bids.core.preprocessing.resample import resample, voxel_to_world

    rng = np.random.default_rng(3)
    data = rng.random((40, 44, 36)).astype(np.float32) + 0.1
    mask = np.zeros(data.shape, bool)
    mask[6:34, 5:40, 4:33] = True
    affine = np.diag([1.2, 1.1, 1.3, 1.0])
    affine[:3, 3] = [-20.0, -24.0, -18.0]
    if oblique:
        angle = 0.2
        rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        affine[:3, :3] = rotation @ affine[:3, :3]
    image = nib.Nifti1Image(data, affine)
    got = cube_mod.make_cube(image, mask, size=28, fov_mm=30.0, warn_outside=False)
    world = voxel_to_world(np.argwhere(mask), affine)
    expected_affine = cube_mod.cube_affine((world.min(0) + world.max(0)) / 2, 28, 30.0)
    vox2vox = np.linalg.inv(affine) @ expected_affine
    expected_mask = resample(mask.astype(np.uint8), vox2vox, (28,) * 3, 0).astype(bool)
    expected = resample(data, vox2vox, (28,) * 3, 1)
    expected[~expected_mask] = 0
    coords = voxel_to_world(np.argwhere(mask), np.linalg.inv(expected_affine) @ affine)
    outside = float(1 - np.all((coords >= -0.5) & (coords <= 27.5), axis=1).mean())
    assert np.array_equal(got.affine, expected_affine) and np.array_equal(got.mask, expected_mask)
    assert np.array_equal(got.data, expected) and got.outside_fraction == outside > 0


def test_axis_aligned_linear_resampling_repeats_scipys_arithmetic():
    """The numpy path for axis-aligned grids gives affine_transform's values bit for bit: flips,
    zooms both ways, shifts past the edges, coordinates landing exactly on the last voxel, float32
    and float64 data, zero runs (the sign of zero included)."""
    from cg3d_bids.core.preprocessing.resample import _linear_separable, resample, resample_where

    rng = np.random.default_rng(11)
    for trial in range(60):
        shape_in = tuple(int(n) for n in rng.integers(1, 24, 3))
        dtype = (np.float32, np.float64)[trial % 2]
        data = (rng.normal(size=shape_in) * 10.0 ** rng.integers(-3, 4)).astype(dtype)
        data[rng.random(shape_in) < 0.3] = 0.0
        vox2vox = np.eye(4)
        vox2vox[:3, :3] = np.diag(rng.choice([1.0, -1.0, 0.5, 2.0, 0.7, -1.3, 1 / 3], 3))
        vox2vox[:3, 3] = rng.normal(size=3) * 6 if trial % 3 else rng.integers(-3, 4, 3)
        if trial % 4 == 0:  # output voxel 0 samples the input's last voxel exactly
            vox2vox[0, 0], vox2vox[0, 3] = -1.0, shape_in[0] - 1
        shape_out = tuple(int(n) for n in rng.integers(1, 24, 3))
        where = rng.random(shape_out) < rng.uniform(0.1, 1.0)
        expected = resample(data, vox2vox, shape_out, 1)
        expected[~where] = 0
        got = resample_where(data, vox2vox, where, 1)
        assert got.dtype == expected.dtype
        assert np.array_equal(got.view(np.uint8), expected.view(np.uint8)), (trial, shape_in, vox2vox)
        assert np.array_equal(_linear_separable(data, vox2vox, where).view(np.uint8), got.view(np.uint8))


def test_image_landmarks_are_numpys_percentiles_exactly():
    """Sorting before ``numpy.percentile`` (a speed-up) must not change a single bit."""
    from cg3d_bids.core.preprocessing.nyul import image_landmarks

    rng = np.random.default_rng(11)
    cases = [rng.gamma(2.0, 100.0, 100_003).astype(np.float32), rng.normal(size=5_001),
             rng.integers(0, 40, 20_000).astype(np.int16),            # many ties
             np.array([3.5], np.float32), np.array([2.0, -1.0])]
    for values in cases:
        expected = np.percentile(np.asarray(values, dtype=np.float64), list(PERCENTILES))
        got = image_landmarks(values, PERCENTILES)
        assert got.dtype == np.float64 and np.array_equal(got.view(np.uint64), expected.view(np.uint64))
    shuffled = rng.permutation(cases[0])
    assert np.array_equal(image_landmarks(shuffled), image_landmarks(cases[0]))
    values = cases[0].copy()
    image_landmarks(values)
    assert np.array_equal(values, cases[0])     # the caller's array is not sorted in place


def test_standardise_with_known_own_landmarks_is_the_same():
    """``tokenize`` passes the percentiles ``prepare`` computed: the result must not change."""
    from cg3d_bids.core.preprocessing.nyul import image_landmarks, standardise_values

    rng = np.random.default_rng(3)
    data = rng.gamma(2.0, 100.0, (20, 20, 20)).astype(np.float32)
    mask = rng.random(data.shape) > 0.4
    mu = np.linspace(0.0, 1.0, len(PERCENTILES))
    own = image_landmarks(data[mask], PERCENTILES)
    out = standardise(data, mask, mu, PERCENTILES)
    assert np.array_equal(out, standardise(data, mask, mu, PERCENTILES, own=tuple(own)))
    assert np.array_equal(out[mask], standardise_values(data[mask], mu, own=own).astype(np.float32))
    with pytest.raises(ValueError, match="own landmarks"):
        standardise(data, mask, mu, PERCENTILES, own=own[:-1])
    shifted = own.copy()
    shifted[5] += 50.0  # other landmarks give another mapping: ``own`` is really used
    assert not np.array_equal(out, standardise(data, mask, mu, PERCENTILES, own=shifted))
