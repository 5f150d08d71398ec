"""Report figures: world coordinates, orientation (neurological, storage order, oblique), determinism,
in-memory inputs, the aligned fast path against scipy, and the score plot's threshold line.

The phantom is defined in world millimetres (an ellipsoid "brain" centred on the origin with a bright
blob at the subject's left, anterior, superior) and sampled on whatever grid a test needs, so the
same object can be stored RAS, LPS, permuted or oblique.
"""

from __future__ import annotations

import io
import math
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, ornt_transform

from cg3d_bids.reports import figures

BLOB = np.array([-25.0, 21.0, 15.0])          # left, anterior, superior (world mm, RAS)
SHAPE = (64, 80, 60)


def ras_affine(step: float = 2.0) -> np.ndarray:
    affine = np.diag([step, step, step, 1.0])
    affine[:3, 3] = [-63.0, -79.0, -59.0]      # BLOB falls on a voxel centre
    return affine


def rotation(deg_z: float, deg_x: float) -> np.ndarray:
    cz, sz = math.cos(math.radians(deg_z)), math.sin(math.radians(deg_z))
    cx, sx = math.cos(math.radians(deg_x)), math.sin(math.radians(deg_x))
    rz = np.array([[cz, -sz, 0, 0], [sz, cz, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    rx = np.array([[1, 0, 0, 0], [0, cx, -sx, 0], [0, sx, cx, 0], [0, 0, 0, 1]])
    return rz @ rx


def phantom(affine: np.ndarray, shape=SHAPE, linear: bool = False) -> dict[str, nib.Nifti1Image]:
    """Image, probseg, anomaly mask and brain mask of the world-space phantom on a grid.

    ``linear``: the image is ``1000 + 3x + 5y + 7z`` everywhere (trilinear interpolation reproduces
    it exactly, so sampled planes reveal their world coordinates).
    """
    ijk = np.indices(shape).reshape(3, -1).T
    x, y, z = nib.affines.apply_affine(affine, ijk).T
    brain = (x / 60) ** 2 + (y / 75) ** 2 + (z / 55) ** 2 < 1
    d2 = (x - BLOB[0]) ** 2 + (y - BLOB[1]) ** 2 + (z - BLOB[2]) ** 2
    if linear:
        image = 1000 + 3 * x + 5 * y + 7 * z
    else:
        image = np.where(brain, 100 + 20 * np.sin(x / 7) + 10 * np.cos(y / 9) + 80 * np.exp(-d2 / 50), 0)
    prob = np.where(brain, 0.05 + 0.9 * np.exp(-d2 / 72), 0)
    arrays = {"image": image, "probseg": prob, "anomaly_mask": (prob > 0.5) & brain, "brain_mask": brain}
    dtypes = {"image": np.float32, "probseg": np.float32, "anomaly_mask": np.uint8, "brain_mask": np.uint8}
    return {k: nib.Nifti1Image(v.reshape(shape).astype(dtypes[k]), affine) for k, v in arrays.items()}


def stored_as(images: dict[str, nib.Nifti1Image], codes: str) -> dict[str, nib.Nifti1Image]:
    """The same images with their voxel axes stored in another orientation (e.g. ``LPS``)."""
    def move(img):
        return img.as_reoriented(ornt_transform(axcodes2ornt(nib.aff2axcodes(img.affine)), axcodes2ornt(codes)))
    return {k: move(v) for k, v in images.items()}


def mosaic(images, out, **kw) -> figures.MosaicInfo:
    return figures.plot_anomaly_mosaic(images["image"], images["probseg"], out,
                                       anomaly_mask=images["anomaly_mask"], brain_mask=images["brain_mask"], **kw)


# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("codes", ["LPS", "PIR", "ASL"])
def test_storage_order_does_not_change_the_figure(tmp_path, codes):
    affine = ras_affine(1.7)                   # display samples fall between voxels at arbitrary fractions
    affine[:3, 3] += [0.31, -0.17, 0.45]
    ras = phantom(affine, shape=(72, 90, 68))
    other = stored_as(ras, codes)
    assert nib.aff2axcodes(other["image"].affine) == tuple(codes)
    for ext in ("svg", "png"):
        a = mosaic(ras, tmp_path / f"ras.{ext}")
        b = mosaic(other, tmp_path / f"other.{ext}")
        assert a == b
        assert (tmp_path / f"ras.{ext}").read_bytes() == (tmp_path / f"other.{ext}").read_bytes()
    assert np.linalg.norm(np.array(a.peak_mm) - BLOB) < 1.5 and a.peak_value > 0.9


@pytest.mark.slow
def test_figures_are_deterministic_and_files_equal_in_memory_images(tmp_path):
    images = phantom(ras_affine())
    paths = {}
    for name, img in images.items():
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(img, paths[name])
    mosaic(images, tmp_path / "a.svg")
    mosaic(images, tmp_path / "b.svg")
    mosaic(paths, tmp_path / "c.svg")
    one = (tmp_path / "a.svg").read_bytes()
    assert one == (tmp_path / "b.svg").read_bytes() == (tmp_path / "c.svg").read_bytes()
    text = one.decode()
    assert text.count("<image") == 2            # one raster layer for the slices, one for the colour bar
    assert re.search(r'<g id="cg3d-background">.*?</g>\s*<image [^>]*data:image/png;base64,', text, re.S)
    assert "peak probseg 0.95 at (-25, 21, 15) mm" in text                      # text stays text
    figures.plot_brain_mask(images["image"], paths["brain_mask"], tmp_path / "m1.svg")
    figures.plot_brain_mask(paths["image"], images["brain_mask"], tmp_path / "m2.svg")
    assert (tmp_path / "m1.svg").read_bytes() == (tmp_path / "m2.svg").read_bytes()


@pytest.mark.parametrize("codes, oblique", [("RAS", False), ("LPS", False), ("SAL", False),
                                            ("RAS", True), ("LPS", True)])
@pytest.mark.slow
def test_planes_are_at_their_world_coordinates(codes, oblique):
    """A linear image 1000 + 3x + 5y + 7z: every sampled value equals the formula at the plane's world
    point (cut coordinate and grid coordinates), whatever the storage order or obliquity."""
    affine = rotation(17.0, 9.0) @ ras_affine(2.2) if oblique else ras_affine(2.2)
    images = stored_as(phantom(affine, linear=True), codes)
    data = figures.prepare_mosaic(images["image"], images["probseg"], brain_mask=images["brain_mask"])
    grid = data.grid
    assert grid.step == 1.0
    checked = 0
    for mode, _, axis, u_axis, v_axis, _ in figures._ROWS:
        planes = data.planes[mode]["image"]
        assert planes.shape == (len(data.cuts[mode]), grid.shape[v_axis], grid.shape[u_axis])
        for k, cut in enumerate(data.cuts[mode]):
            world = np.zeros((3, grid.shape[v_axis], grid.shape[u_axis]))
            world[axis] = cut
            world[u_axis] = grid.coords(u_axis)[None, :]
            world[v_axis] = grid.coords(v_axis)[:, None]
            expected = 1000 + 3 * world[0] + 5 * world[1] + 7 * world[2]
            inside = planes[k] > 0                     # 0 outside the image's field of view
            assert inside.mean() > 0.25
            np.testing.assert_allclose(planes[k][inside], expected[inside], atol=0.05)
            checked += int(inside.sum())
    assert checked > 50_000
    assert data.peak_mm is not None and np.linalg.norm(np.array(data.peak_mm) - BLOB) < 2.5


@pytest.mark.slow
def test_oblique_image_shows_the_same_anatomy():
    """The phantom sampled on an oblique grid is displayed like its RAS version (same world object)."""
    ras = figures.prepare_mosaic(**_kw(phantom(ras_affine())), n_cuts=1)
    obl = figures.prepare_mosaic(**_kw(phantom(rotation(20.0, -12.0) @ ras_affine())), n_cuts=1)
    assert np.linalg.norm(np.array(obl.peak_mm) - BLOB) < 2.5
    for mode, _, axis, u_axis, v_axis, _ in figures._ROWS:
        for data in (ras, obl):
            prob = data.planes[mode]["probseg"][0]
            j, i = np.unravel_index(int(np.argmax(prob)), prob.shape)
            shown = (data.grid.coords(u_axis)[i], data.grid.coords(v_axis)[j])
            assert np.allclose(shown, (BLOB[u_axis], BLOB[v_axis]), atol=2.5), (mode, shown)
            brain = data.planes[mode]["brain_mask"][0] > 0.5
            cols = np.flatnonzero(brain.any(axis=0))
            width = (cols[-1] - cols[0]) * data.grid.step
            half = {0: 60, 1: 75, 2: 55}[u_axis]
            cut = data.cuts[mode][0]
            radius = {0: 60, 1: 75, 2: 55}[axis]
            expected = 2 * half * math.sqrt(max(0.0, 1 - (cut / radius) ** 2))
            assert abs(width - expected) < 6, (mode, width, expected)


def _kw(images):
    return dict(image=images["image"], probseg=images["probseg"], anomaly_mask=images["anomaly_mask"],
                brain_mask=images["brain_mask"])


def test_aligned_fast_path_matches_scipy():
    rng = np.random.default_rng(0)
    affine = np.diag([1.3, 0.9, 2.0, 1.0])
    affine[:3, 3] = [-20.0, -30.0, -25.0]
    vol = figures.load_volume(nib.Nifti1Image(rng.normal(size=(33, 61, 27)).astype(np.float32), affine))
    assert vol.aligned
    grid = figures.DisplayGrid(start=(-24.0, -33.0, -29.0), step=0.7, shape=(70, 85, 85))  # beyond the FOV
    cuts = (-21.0, -19.3, 0.0, 3.35, 17.6, 40.0)
    for _mode, _, axis, u_axis, v_axis, _ in figures._ROWS:
        for mask in (False, True):
            fast = figures._sample_plane_aligned(vol, grid, axis, u_axis, v_axis, cuts, mask)
            points = np.concatenate([figures._plane_points(grid, axis, u_axis, v_axis, c) for c in cuts], axis=1)
            ref = figures.sample_planes(vol, points, mask=mask)
            np.testing.assert_allclose(fast, ref.reshape(fast.shape), atol=1e-5)


def _bands(mask: np.ndarray) -> list[tuple[int, int]]:
    """Runs of at least 20 pixel rows with 40 or more ``mask`` pixels (rows of slices, not text)."""
    rows = np.flatnonzero(mask.sum(axis=1) >= 40)
    splits = np.flatnonzero(np.diff(rows) > 1)
    starts, ends = np.r_[rows[0], rows[splits + 1]], np.r_[rows[splits], rows[-1]]
    return [(a, b) for a, b in zip(starts.tolist(), ends.tolist()) if b - a >= 20]


@pytest.mark.slow
@pytest.mark.parametrize("codes", ["RAS", "LPS"])
def test_neurological_orientation_in_the_pixels(tmp_path, codes):
    """In the PNG, the left-anterior-superior blob is left of the brain's centre in coronal and axial
    slices, right (anterior) in the sagittal slice, and above the centre where up is superior or
    anterior."""
    from PIL import Image

    images = stored_as(phantom(ras_affine()), codes)
    mosaic(images, tmp_path / "m.png", n_cuts=1)
    rgb = np.asarray(Image.open(tmp_path / "m.png").convert("RGB")).astype(int)
    rgb = rgb[:, : int(rgb.shape[1] * 0.85)]                          # leave out the colour bar
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    overlay = (r - b > 60) & (r > 120)
    grey = (np.abs(r - g) < 6) & (np.abs(g - b) < 6) & (r > 40)
    bands = _bands(grey)
    assert len(bands) == 3                                           # sagittal, coronal, axial rows
    expect = {"sagittal": (+1, -1), "coronal": (-1, -1), "axial": (-1, -1)}   # (x sign, row sign)
    for (top, bottom), name in zip(bands, ("sagittal", "coronal", "axial")):
        o, gr = np.argwhere(overlay[top:bottom + 1]), np.argwhere(grey[top:bottom + 1])
        assert len(o) > 20, name
        d_row, d_col = o.mean(0) - gr.mean(0)
        sx, sr = expect[name]
        assert np.sign(d_col) == sx and abs(d_col) > 5, (name, d_col)
        assert np.sign(d_row) == sr and abs(d_row) > 3, (name, d_row)


@pytest.mark.slow
def test_reports_do_not_import_nilearn_or_pyplot(tmp_path):
    """Figures are drawn on ``Figure`` objects: no nilearn, and no pyplot (its global figure
    registry and import cost, ~0.1 s per run, are of no use to a headless app)."""
    code = (
        "import sys, numpy as np, nibabel as nib\n"
        "from cg3d_bids.reports import figures, write_subject_report, write_group_report\n"
        "img = nib.Nifti1Image(np.random.default_rng(0).random((20, 20, 20)).astype('float32'), np.eye(4))\n"
        f"figures.plot_anomaly_mosaic(img, img, {str(tmp_path / 'x.svg')!r}, brain_mask=img)\n"
        f"figures.plot_anomaly_mosaic(img, img, {str(tmp_path / 'x.png')!r}, brain_mask=img)\n"
        "figures.plot_score_distribution(['a', 'b'], [0.1, 0.9], [False, True], threshold=0.5)\n"
        "assert 'nilearn' not in sys.modules, 'nilearn was imported'\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_map_below_floor_has_no_ring_and_even_cuts(tmp_path):
    images = phantom(ras_affine())
    low = nib.Nifti1Image(np.asarray(images["probseg"].dataobj) * 0.1, images["probseg"].affine)
    info = figures.plot_anomaly_mosaic(images["image"], low, tmp_path / "low.svg", brain_mask=images["brain_mask"])
    assert info.peak_mm is None and info.peak_value == pytest.approx(0.095, abs=1e-3)
    text = (tmp_path / "low.svg").read_text()
    assert "peak probseg" not in text and all(len(c) == 7 for c in info.cuts.values())


# ------------------------------------------------------------------------------------------------
# the group score plot
def _positions(svg: str) -> tuple[dict[int, float], float | None]:
    """x of every point (``cg3d-pt-<i>``) and of the threshold line in a score-plot SVG."""
    points = {int(m.group(1)): float(m.group(2)) for m in re.finditer(
        r'<g id="cg3d-pt-(\d+)">.*?<use [^>]*?x="([-\d.]+)"', svg, flags=re.S)}
    line = re.search(r'<g id="cg3d-threshold">\s*<path d="M ([-\d.]+) ', svg)
    return points, float(line.group(1)) if line else None


def _batch(seed: int, n: int = 40):
    """Raw subject scores of a synthetic batch and their flags, as the pipeline computes them."""
    rng = np.random.default_rng(seed)
    raw = np.concatenate([rng.normal(1.2, 0.08, n - 6), rng.normal(1.55, 0.1, 6)]).astype(np.float32)
    median = float(np.median(raw))
    scale = float(1.4826 * np.median(np.abs(raw - median)))
    z_center = 3.0
    probseg = (1.0 / (1.0 + np.exp(-((raw - median) / scale - z_center)))).astype(np.float32)
    return raw, probseg > 0.5, median, scale, z_center


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_threshold_line_separates_flagged_images(seed):
    from cg3d_bids.reports.group import raw_threshold

    raw, flagged, median, scale, z_center = _batch(seed)
    assert 0 < flagged.sum() < len(raw)
    thr = raw_threshold(0.5, median, scale, z_center)
    assert thr == pytest.approx(median + scale * z_center)
    svg = figures.plot_score_distribution([f"sub-{i:02d}_T1w" for i in range(len(raw))], raw, flagged,
                                          threshold=thr)
    points, line = _positions(svg)
    assert len(points) == len(raw) and line is not None
    for i, x in points.items():
        assert (x >= line) if flagged[i] else (x <= line), (i, raw[i], flagged[i], thr)
    # the old bug: the probseg threshold (0.5) drawn on the raw axis leaves every image right of it
    wrong_points, wrong = _positions(figures.plot_score_distribution(
        [f"s{i}" for i in range(len(raw))], raw, flagged, threshold=0.5))
    assert any(wrong_points[i] > wrong for i in np.flatnonzero(~flagged))


def test_raw_threshold_needs_the_statistics():
    from cg3d_bids.reports.group import raw_threshold

    assert raw_threshold(0.5, 1.0, 0.1, 3.0) == pytest.approx(1.3)
    assert raw_threshold(0.9, 1.0, 0.1, 3.0) == pytest.approx(1.3 + 0.1 * math.log(9))
    for args in ((0.5, None, 0.1, 3.0), (0.5, 1.0, None, 3.0), (0.5, 1.0, 0.1, None), (0.5, 1.0, 0.0, 3.0),
                 (1.0, 1.0, 0.1, 3.0), (None, 1.0, 0.1, 3.0), (0.5, float("nan"), 0.1, 3.0)):
        assert raw_threshold(*args) is None
    svg = figures.plot_score_distribution(["a", "b"], [1.0, 2.0], [False, True], threshold=None)
    assert _positions(svg)[1] is None and "threshold" not in svg


@pytest.mark.slow
def test_png_output_is_a_palette_png(tmp_path):
    from PIL import Image

    images = phantom(ras_affine())
    mosaic(images, tmp_path / "m.png")
    png = Image.open(io.BytesIO((tmp_path / "m.png").read_bytes()))
    assert png.mode == "P" and png.size[0] == 10.5 * figures.FIG_DPI
