"""maps: layer averaging, trilinear token -> voxel upsampling, subject summary numbers."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from cg3d_bids.core.maps import average_layers, connected_components, subject_summary, token_map_to_cube

G, P = 4, 14
H = G * P


def test_average_layers():
    scores = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [2.0, 5.0, 2.0]], dtype=np.float32)
    out = average_layers(scores)
    assert out.dtype == np.float32 and np.allclose(out, [2.0, 3.0, 2.0])
    assert average_layers(np.ones((4, 2, 5))).shape == (2, 5)
    with pytest.raises(ValueError):
        average_layers(np.ones(5))


@pytest.mark.parametrize("cell", [(1, 2, 1), (0, 3, 2), (3, 0, 0)])
def test_one_hot_token_lands_in_its_voxel_block(cell):
    scores = np.zeros(G**3, np.float32)
    scores[(cell[0] * G + cell[1]) * G + cell[2]] = 1.0
    cube = token_map_to_cube(scores, G, H)
    assert cube.shape == (H, H, H) and cube.dtype == np.float32
    block = tuple(slice(c * P, (c + 1) * P) for c in cell)
    peak = np.unravel_index(int(np.argmax(cube)), cube.shape)
    assert all(c * P <= v < (c + 1) * P for c, v in zip(cell, peak))
    # align_corners=False: voxel i sits at token coordinate (i + 0.5) / p - 0.5 (clamped at the
    # edges); the map is the separable tent around the token centre, exactly
    src = np.clip((np.arange(H) + 0.5) / P - 0.5, 0, G - 1)
    w = [np.maximum(0.0, 1.0 - np.abs(src - c)) for c in cell]
    np.testing.assert_allclose(cube, np.einsum("i,j,k->ijk", *w), atol=1e-5)
    assert cube[block].min() > 0.15  # the whole block is warm ...
    far = np.ones(cube.shape, bool)
    far[tuple(slice(max(0, c * P - P // 2), (c + 1) * P + P // 2) for c in cell)] = False
    assert np.all(cube[far] == 0)  # ... and nothing beyond half a cell around it


def test_upsampling_is_linear_between_token_centres_and_zero_outside_the_mask():
    gx = np.arange(G, dtype=np.float32)
    ramp = np.broadcast_to(gx[:, None, None], (G, G, G)).ravel().copy()  # score = gx
    cube = token_map_to_cube(ramp, G, H)
    x = (np.arange(H) + 0.5) / P - 0.5  # token coordinate of each voxel centre
    np.testing.assert_allclose(cube[:, 10, 20], np.clip(x, 0, G - 1), atol=1e-5)
    mask = np.zeros((H, H, H), bool)
    mask[5:30, 10:50, 0:20] = True
    masked = token_map_to_cube(ramp + 1, G, H, mask)
    assert np.all(masked[~mask] == 0) and np.all(masked[mask] >= 1)
    const = token_map_to_cube(np.full(G**3, 2.5, np.float32), G, H)
    assert np.all(const == 2.5)
    with pytest.raises(ValueError):
        token_map_to_cube(np.zeros(G**3 - 1), G, H)


def _synthetic_map():
    """20^3 map: brain = x < 18; blob A (27 voxels, value 5) and B (2 diagonal voxels, value 3)."""
    values = np.full((20, 20, 20), 0.5, np.float32)
    brain = np.zeros(values.shape, bool)
    brain[:18] = True
    values[2:5, 2:5, 2:5] = 5.0
    values[3, 3, 3] = 6.0  # the peak of A
    values[10, 10, 10] = values[11, 11, 11] = 3.0  # 26-connected only through a corner
    values[19, 0, 0] = 9.0  # outside the brain: ignored everywhere
    return values, brain


def test_subject_summary_numbers_and_components():
    values, brain = _synthetic_map()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-10.0, 20.0, 5.0]
    s = subject_summary(values, brain, 8.0, 1.0, affine=affine)
    assert s.score_max == 6.0
    n_brain = 18 * 20 * 20
    assert s.brain_voxels == n_brain and s.brain_volume_mm3 == n_brain * 8.0
    top = np.sort(values[brain])[::-1][: int(np.ceil(0.01 * n_brain))]  # 72 voxels
    assert s.score_top1pct == pytest.approx(float(top.mean()))
    assert s.anomaly_voxels == 29 and s.anomaly_volume_mm3 == 29 * 8.0
    assert s.n_components == 2  # the diagonal pair is one component (26-connectivity)
    a, b = s.components
    assert a.n_voxels == 27 and a.volume_mm3 == 216.0 and a.peak == 6.0
    assert a.centroid_voxel == pytest.approx([3.0, 3.0, 3.0]) and a.peak_voxel == (3, 3, 3)
    assert a.centroid_mm == pytest.approx([-4.0, 26.0, 11.0])
    assert b.n_voxels == 2 and b.centroid_voxel == pytest.approx([10.5, 10.5, 10.5]) and b.peak == 3.0
    json.dumps(dataclasses.asdict(s))  # JSON-ready
    # an explicit anomaly mask wins over the threshold and is clipped to the brain
    region = np.zeros(values.shape, bool)
    region[10:12, 10:12, 10:12] = True
    region[19] = True
    s2 = subject_summary(values, brain, 1.0, 1.0, anomaly_mask=region)
    assert s2.anomaly_voxels == 8 and s2.n_components == 1
    assert s2.components[0].centroid_mm is None
    s3 = subject_summary(values, brain, 1.0)
    assert s3.n_components == 0 and s3.anomaly_volume_mm3 == 0.0 and s3.score_max == 6.0


def test_connected_components_limit_keeps_the_largest():
    binary = np.zeros((12, 12, 12), bool)
    binary[0, 0, 0] = True
    binary[5:8, 5:8, 5:8] = True
    binary[10, 10, 9:12] = True
    count, comps = connected_components(binary, binary.astype(np.float32), 1.0, max_components=2)
    assert count == 3 and [c.n_voxels for c in comps] == [27, 3]


def test_robust_stats_and_probseg_transform():
    from cg3d_bids.core.maps import probseg_transform, robust_stats

    scores = np.array([1.0, 2.0, 3.0, 4.0, 100.0], np.float32)
    median, scale = robust_stats(scores)
    assert median == 3.0 and scale == pytest.approx(1.4826)  # MAD = 1; the outlier does not move them
    assert robust_stats(np.ones(4, np.float32))[1] == 1e-12  # a constant batch does not divide by zero
    raw = np.array([median, median + 3 * scale, median + 10 * scale])
    prob = probseg_transform(raw, median, scale, z_center=3.0)
    assert prob.dtype == np.float32 and prob[1] == pytest.approx(0.5)
    assert prob[0] < 0.05 and prob[2] > 0.99 and np.all(np.diff(prob) > 0)


def test_scores_to_native_on_a_reoriented_grid():
    """A constant token map lands on every brain voxel of an LPS image, and 0 outside the brain."""
    import nibabel as nib

    from cg3d_bids.core.maps import scores_to_native
    from cg3d_bids.core.preprocessing import from_canonical, make_cube

    data = np.zeros((20, 22, 18), np.float32)
    data[4:16, 5:17, 3:15] = 1.0
    lps = np.diag([-2.0, -2.0, 2.0, 1.0])
    native = nib.Nifti1Image(data, lps)
    canonical = nib.as_closest_canonical(native)
    brain_canonical = np.asarray(canonical.dataobj) > 0
    cube = make_cube(canonical, brain_canonical, size=28, fov_mm=56.0)
    brain = from_canonical(brain_canonical, native).astype(bool)
    assert np.array_equal(brain, data > 0)  # the reorientation round trip is exact
    raw = scores_to_native(np.full(8, 2.5, np.float32), 2, cube.mask, cube.affine, native, brain)
    assert raw.shape == data.shape and raw.dtype == np.float32
    assert np.all(raw[~brain] == 0) and np.allclose(raw[brain], 2.5, atol=1e-5)


def test_connected_components_match_labelling_the_whole_volume():
    """Labelling only the region's bounding box gives the components of the whole volume."""
    from scipy import ndimage

    rng = np.random.default_rng(5)
    binary = np.zeros((30, 26, 22), bool)
    binary[6:24, 9:20, 5:17] = rng.random((18, 11, 12)) > 0.88  # specks: many components
    values = rng.random(binary.shape).astype(np.float32)
    affine = np.diag([1.5, 2.0, 2.5, 1.0])
    affine[:3, 3] = [-10.0, 4.0, 7.0]
    count, comps = connected_components(binary, values, 2.0, affine, max_components=None)
    labels, expected_count = ndimage.label(binary, structure=np.ones((3, 3, 3), bool))
    assert count == expected_count > 3
    for comp in comps:
        inside = labels == comp.label
        assert comp.n_voxels == int(inside.sum()) and comp.volume_mm3 == 2.0 * comp.n_voxels
        assert comp.centroid_voxel == pytest.approx(np.argwhere(inside).mean(axis=0))
        assert values[comp.peak_voxel] == comp.peak == values[inside].max() and inside[comp.peak_voxel]
        assert comp.peak_mm == pytest.approx(affine[:3, :3] @ np.array(comp.peak_voxel) + affine[:3, 3])
    assert connected_components(np.zeros((4, 4, 4), bool), values[:4, :4, :4], 1.0) == (0, [])


def test_bounding_box_of_masks_in_2d_3d_and_4d():
    from cg3d_bids.core.boxes import bounding_box

    for shape, where in [((5, 6), (slice(1, 3), slice(2, 6))), ((4, 5, 6), (slice(0, 1), slice(2, 4), slice(3, 5))),
                         ((3, 4, 5, 2), (slice(1, 3), slice(0, 2), slice(4, 5), slice(1, 2)))]:
        mask = np.zeros(shape, bool)
        mask[where] = True
        mask[tuple(s.start for s in where)] = True
        assert bounding_box(mask) == where
        assert bounding_box(np.zeros(shape, bool)) is None
