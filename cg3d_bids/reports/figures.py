"""Report figures, drawn with nilearn and matplotlib (headless Agg backend).

Figures are SVG (default) or PNG. In an SVG the image layers (anatomy, overlay, contours) are
rasterised (``FIG_DPI``) and re-encoded as 256-colour palette PNGs (Pillow), text stays text: a
mosaic of a 1 mm brain is ~200 kB. The grey window is [0, 99.5th percentile of the image] for
every slice. Files are written atomically.

- :func:`plot_anomaly_mosaic`: three rows (sagittal ``x``, coronal ``y``, axial ``z``) of slices of
  the input image with the anomaly map overlaid (transparent below a floor), the anomaly-mask contour
  and the brain-mask contour, and a colour bar. Each row contains the slice through the map's peak
  voxel (ringed) plus evenly spaced slices through the brain.
- :func:`plot_brain_mask`: the brain-mask contour on the image (mask QC).
- :func:`plot_score_distribution`: the group's subject scores as a binned swarm plot with the
  threshold line; returns SVG text for inlining, with a hover title on every point.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless, also inside nipype worker processes

import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from ..atomic import atomic_path  # noqa: E402

#: Colours shared with the HTML legend (see the templates' CSS).
OVERLAY_CMAP = "hot"
ANOMALY_CONTOUR = "#00e5ff"   # cyan: binary anomaly mask
BRAIN_CONTOUR = "#7bd67b"     # green: brain mask
PEAK_MARK = "#ff4dff"         # magenta ring around the peak voxel
FLAGGED_COLOUR = "#d62728"
NORMAL_COLOUR = "#4c72b0"
FIG_DPI = 120                 #: resolution of the rasterised layers inside the SVGs

_MODES = (("x", "sagittal"), ("y", "coronal"), ("z", "axial"))
#: nilearn ``dim``: a tiny non-zero value keeps one grey window for all slices, [0, p99.5] of the
#: brain (see :func:`_window`); ``dim=0`` would window every slice on its own.
_NO_DIM = 1e-6


@dataclass
class MosaicInfo:
    """What a mosaic shows (for the caption)."""

    peak_mm: tuple[float, float, float] | None   #: world mm of the map's maximum; None if below the floor
    peak_value: float | None                      #: maximum of the map inside the brain
    cuts: dict[str, list[float]]                  #: display mode -> cut coordinates (mm)


# --------------------------------------------------------------------------------------------------
def _load(img: str | Path | nib.spatialimages.SpatialImage) -> nib.spatialimages.SpatialImage:
    if isinstance(img, (str, Path)):
        img = nib.load(str(img))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3D image, got shape {data.shape}")
    data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    return nib.Nifti1Image(data, img.affine)


def _window(img, upper: float = 99.5):
    """Clip intensities to [0, the ``upper`` percentile of the non-zero voxels] (display window).

    A bright lesion or vessel would otherwise compress the grey levels of the whole brain.
    """
    data = np.asarray(img.dataobj, dtype=np.float32)
    nonzero = data[data > 0]
    if nonzero.size:
        data = np.clip(data, 0.0, float(np.percentile(nonzero, upper)))
    return nib.Nifti1Image(data, img.affine)


def _world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return nib.affines.apply_affine(affine, ijk)


def peak_coordinates(prob_img, mask_img=None) -> tuple[tuple[float, float, float] | None, float | None]:
    """World coordinates (mm) and value of the anomaly map's maximum (inside the mask if given)."""
    data = np.asarray(prob_img.dataobj, dtype=np.float32)
    if mask_img is not None and mask_img.shape == prob_img.shape:
        data = np.where(np.asarray(mask_img.dataobj) > 0, data, -np.inf)
    if not np.isfinite(data).any() or np.nanmax(data) <= 0:
        return None, None
    ijk = np.unravel_index(int(np.argmax(data)), data.shape)
    xyz = _world(prob_img.affine, np.asarray(ijk, dtype=float))
    return (float(xyz[0]), float(xyz[1]), float(xyz[2])), float(data[ijk])


def cut_coordinates(extent_img, n_cuts: int, peak_mm: Sequence[float] | None) -> dict[str, list[float]]:
    """Per display mode: ``n_cuts - 1`` evenly spaced cuts through the (mask) extent plus the peak.

    ``extent_img`` is a mask (non-zero voxels) whose world bounding box bounds the cuts; evenly
    spaced cuts too close to the peak (under half a spacing) are dropped.
    """
    inside = np.asarray(extent_img.dataobj) > 0
    if inside.any():
        spans = [np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
        lo, hi = np.array([s[0] for s in spans]), np.array([s[-1] for s in spans])
    else:
        lo, hi = np.zeros(3, int), np.array(inside.shape) - 1
    # world box from the corners of the voxel box (exact for axis-aligned affines)
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])],
                       dtype=float)
    world = _world(extent_img.affine, corners)
    cuts: dict[str, list[float]] = {}
    n_even = max(n_cuts - (1 if peak_mm is not None else 0), 1)
    for axis, (mode, _) in enumerate(_MODES):
        a, b = float(world[:, axis].min()), float(world[:, axis].max())
        # evenly spaced inside the extent, leaving a margin of half a step at both ends
        step = (b - a) / n_even
        even = [a + step * (k + 0.5) for k in range(n_even)]
        if peak_mm is not None:
            p = float(peak_mm[axis])
            even = [c for c in even if abs(c - p) >= step / 2] + [p]
        cuts[mode] = sorted(round(c, 2) for c in even)
    return cuts


def _rasterise(fig: plt.Figure) -> None:
    """Rasterise image-like layers (keeps text and lines of colour bars vectorial)."""
    for ax in fig.axes:
        for artist in list(ax.images) + list(ax.collections):
            artist.set_rasterized(True)


def _save(fig: plt.Figure, out_path: Path, dpi: int = FIG_DPI) -> Path:
    """Save atomically; the raster layers are re-encoded as palette PNGs (:func:`shrink_png`)."""
    out_path = Path(out_path)
    fmt = out_path.suffix.lstrip(".").lower() or "svg"
    buf = io.BytesIO()
    # text as <text> (not glyph paths) and no date: smaller, reproducible SVGs
    metadata = {"Date": None} if fmt == "svg" else None
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "cg3d"}):
        fig.savefig(buf, format=fmt, dpi=dpi, facecolor=fig.get_facecolor(), metadata=metadata)
    plt.close(fig)
    data = buf.getvalue()
    if fmt == "png":
        data = shrink_png(data)
    elif fmt == "svg":
        data = _shrink_svg_images(data.decode("utf-8")).encode("utf-8")
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(data)
    return out_path


def shrink_png(png: bytes, colours: int = 256) -> bytes:
    """Re-encode a PNG with an adaptive palette of ``colours`` (Pillow); keep it if not smaller.

    Greyscale anatomy plus a colour-mapped overlay survives 256 colours with little visible loss
    and the file shrinks 3-5x, which keeps reports with many images well under 5 MB.
    """
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(png))
        img.load()
        quant = img.quantize(colors=colours, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
        out = io.BytesIO()
        quant.save(out, format="PNG", optimize=True)
    except Exception:  # never lose a figure over an optimisation
        return png
    return out.getvalue() if out.tell() < len(png) else png


def _shrink_svg_images(svg: str) -> str:
    import base64

    def repl(match: re.Match) -> str:
        png = base64.b64decode(match.group(1))
        return "data:image/png;base64," + base64.b64encode(shrink_png(png)).decode("ascii")

    return re.sub(r"data:image/png;base64,([A-Za-z0-9+/=\s]+)", repl, svg)


def _overlay_colorbar(fig: plt.Figure, rect: Sequence[float], floor: float, threshold: float | None) -> None:
    cax = fig.add_axes(rect)
    norm = Normalize(vmin=0.0, vmax=1.0)
    cb = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=OVERLAY_CMAP), cax=cax)
    cb.outline.set_edgecolor("white")
    cb.outline.set_linewidth(0.5)
    cax.axhspan(0.0, floor, color="#222222", zorder=3)
    cax.text(0.5, floor / 2, "clear", color="#bbbbbb", fontsize=6, ha="center", va="center",
             transform=cax.transData, zorder=4, rotation=90)
    ticks = sorted({0.0, round(floor, 3), 1.0} | ({round(threshold, 3)} if threshold is not None else set()))
    cb.set_ticks(ticks)
    cb.ax.tick_params(colors="white", labelsize=7, length=2)
    if threshold is not None:
        cax.axhline(threshold, color=ANOMALY_CONTOUR, lw=1.2, zorder=5)
    cb.set_label("anomaly map (probseg)", color="white", fontsize=7)


def _legend(fig: plt.Figure, handles: list[Line2D], y: float) -> None:
    leg = fig.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.005, y), ncol=len(handles),
                     frameon=False, fontsize=7, handlelength=1.6, columnspacing=1.2)
    for text in leg.get_texts():
        text.set_color("white")


def plot_anomaly_mosaic(
    image: str | Path,
    probseg: str | Path | None,
    out_path: str | Path,
    *,
    anomaly_mask: str | Path | None = None,
    brain_mask: str | Path | None = None,
    floor: float = 0.2,
    threshold: float | None = 0.5,
    n_cuts: int = 7,
    row_height: float = 1.55,
    dpi: int = FIG_DPI,
) -> MosaicInfo:
    """Three-row mosaic (sagittal, coronal, axial) of ``image`` with the anomaly map overlaid.

    Values of ``probseg`` below ``floor`` are transparent; the anomaly-mask contour is cyan, the
    brain-mask contour green; the slice through the map's peak is in every row, ringed in cyan.
    With ``probseg=None`` only the image and the contours are drawn (used by :func:`plot_brain_mask`).
    """
    from nilearn import plotting

    bg = _window(_load(image))
    prob = _load(probseg) if probseg is not None else None
    brain = _load(brain_mask) if brain_mask is not None else None
    amask = _load(anomaly_mask) if anomaly_mask is not None else None
    peak, peak_value = (None, None)
    if prob is not None:
        peak, peak_value = peak_coordinates(prob, brain)
        if peak_value is not None and peak_value < floor:
            peak = None          # nothing is shown: evenly spaced slices, no peak mark
    extent = brain if brain is not None and np.any(np.asarray(brain.dataobj) > 0) else bg
    cuts = cut_coordinates(extent, n_cuts, peak)

    row_h, width = row_height, 10.5
    legend_h = 0.32
    fig = plt.figure(figsize=(width, row_h * 3 + legend_h), facecolor="black")
    total_h = row_h * 3 + legend_h
    gutter = 0.022
    right = 0.905 if prob is not None else 0.995
    for row, (mode, name) in enumerate(_MODES):
        bottom = (legend_h + row_h * (2 - row)) / total_h
        ax = fig.add_axes((gutter, bottom, right - gutter, row_h / total_h))
        common = dict(display_mode=mode, cut_coords=cuts[mode], figure=fig, axes=ax, annotate=False,
                      draw_cross=False, black_bg=True, colorbar=False)
        if prob is not None:
            with warnings.catch_warnings():  # a map entirely below the floor is a normal result
                warnings.filterwarnings("ignore", message=".*empty mask.*")
                display = plotting.plot_stat_map(prob, bg_img=bg, threshold=floor, vmin=0.0, vmax=1.0,
                                                 cmap=OVERLAY_CMAP, symmetric_cbar=False, dim=_NO_DIM,
                                                 transparency=0.65, resampling_interpolation="continuous",
                                                 **common)
        else:
            display = plotting.plot_anat(bg, dim=_NO_DIM, **common)
        display.annotate(size=8, left_right=True, positions=True)
        if brain is not None and np.any(np.asarray(brain.dataobj) > 0):
            display.add_contours(brain, levels=[0.5], colors=[BRAIN_CONTOUR], linewidths=0.7)
        if amask is not None and np.any(np.asarray(amask.dataobj) > 0):
            display.add_contours(amask, levels=[0.5], colors=[ANOMALY_CONTOUR], linewidths=0.9)
        if peak is not None:
            axis = "xyz".index(mode)
            in_plane = [peak[i] for i in range(3) if i != axis]
            cut_ax = _cut_axes(display, peak[axis])
            if cut_ax is not None:
                cut_ax.plot(*in_plane, marker="o", ms=11, mfc="none", mec=PEAK_MARK, mew=1.2)
        fig.text(gutter / 2, bottom + row_h / total_h / 2, name, color="#dddddd", fontsize=8,
                 rotation=90, ha="center", va="center")
    handles = [Line2D([], [], color=BRAIN_CONTOUR, lw=1.2, label="brain mask")]
    if amask is not None:
        handles.append(Line2D([], [], color=ANOMALY_CONTOUR, lw=1.2, label="anomaly mask"))
    if peak is not None:
        handles.append(Line2D([], [], ls="none", marker="o", ms=7, mfc="none", mec=PEAK_MARK,
                              label=f"peak {peak_value:.2f} at ({peak[0]:.0f}, {peak[1]:.0f}, {peak[2]:.0f}) mm"))
    _legend(fig, handles, 0.0)
    if prob is not None:
        _overlay_colorbar(fig, (0.93, (legend_h + 0.25) / total_h, 0.014, (row_h * 3 - 0.5) / total_h),
                          floor, threshold)
    _rasterise(fig)
    _save(fig, Path(out_path), dpi)
    return MosaicInfo(peak_mm=peak, peak_value=peak_value, cuts=cuts)


def _cut_axes(display: Any, coord: float):
    """The matplotlib axes of the cut closest to ``coord`` in a nilearn slicer display."""
    axes = getattr(display, "axes", None)
    if not isinstance(axes, dict) or not axes:
        return None
    key = min(axes, key=lambda c: abs(float(c) - coord))
    return getattr(axes[key], "ax", None)


def plot_brain_mask(image: str | Path, brain_mask: str | Path, out_path: str | Path, *, n_cuts: int = 6,
                    dpi: int = FIG_DPI) -> MosaicInfo:
    """Brain-mask QC figure: the mask contour on the image in three orientations (evenly spaced)."""
    return plot_anomaly_mosaic(image, None, out_path, brain_mask=brain_mask, n_cuts=n_cuts, threshold=None,
                               row_height=1.45, dpi=dpi)


# --------------------------------------------------------------------------------------------------
def swarm_offsets(values: Sequence[float], bin_width: float, step: float = 1.0) -> np.ndarray:
    """Vertical offsets of a binned swarm: points in the same bin stack 0, +1, -1, +2 … (x ``step``)."""
    values = np.asarray(values, dtype=float)
    offsets = np.zeros(len(values))
    if len(values) == 0 or bin_width <= 0:
        return offsets
    bins = np.floor((values - values.min()) / bin_width).astype(int)
    for b in np.unique(bins):
        idx = np.flatnonzero(bins == b)
        idx = idx[np.argsort(values[idx], kind="stable")]
        for k, i in enumerate(idx):
            offsets[i] = ((k + 1) // 2) * (1 if k % 2 else -1) * step
    return offsets


def plot_score_distribution(
    names: Sequence[str],
    scores: Sequence[float],
    flagged: Sequence[bool],
    *,
    threshold: float | None,
    xlabel: str = "subject score (maximum of the anomaly map)",
    out_path: str | Path | None = None,
) -> str:
    """Binned swarm plot of the subject scores with the threshold line; returns the SVG text.

    Flagged images are red, the others blue; every point carries an SVG ``<title>`` (name and score)
    shown on hover. The SVG is also written to ``out_path`` when given.
    """
    scores = np.asarray(scores, dtype=float)
    keep = np.isfinite(scores)
    names = [n for n, k in zip(names, keep) if k]
    flags = [bool(f) for f, k in zip(flagged, keep) if k]
    scores = scores[keep]
    lo = min(float(scores.min()) if len(scores) else 0.0, threshold if threshold is not None else 1.0, 0.0)
    hi = max(float(scores.max()) if len(scores) else 1.0, threshold if threshold is not None else 0.0, 1.0)
    span = hi - lo or 1.0
    fig, ax = plt.subplots(figsize=(9.0, 2.3))
    offsets = swarm_offsets(scores, bin_width=span / 70.0)
    ymax = max(3.0, float(np.abs(offsets).max()) + 1.0) if len(offsets) else 3.0
    for i, (name, s, f, dy) in enumerate(zip(names, scores, flags, offsets)):
        (line,) = ax.plot([s], [dy], ls="none", marker="o", ms=7 if f else 6,
                          mfc=FLAGGED_COLOUR if f else NORMAL_COLOUR, mec="white", mew=0.6,
                          alpha=0.95, zorder=3)
        line.set_gid(f"cg3d-pt-{i}")
    if threshold is not None:
        ax.axvline(threshold, color="#444444", ls="--", lw=1.0, zorder=2)
        ax.text(threshold, ymax * 0.92, f" threshold {threshold:g}", color="#444444", fontsize=8,
                va="top", ha="left")
    ax.set_xlim(lo - 0.03 * span, hi + 0.03 * span)
    ax.set_ylim(-ymax, ymax)
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(axis="x", color="#e5e5e5", lw=0.6, zorder=0)
    handles = [
        Line2D([], [], ls="none", marker="o", mfc=FLAGGED_COLOUR, mec="white", ms=7,
               label=f"flagged ({sum(flags)})"),
        Line2D([], [], ls="none", marker="o", mfc=NORMAL_COLOUR, mec="white", ms=6,
               label=f"not flagged ({len(flags) - sum(flags)})"),
    ]
    ax.legend(handles=handles, loc="upper left", fontsize=8, frameon=False, ncol=2,
              bbox_to_anchor=(0.0, 1.18))
    fig.tight_layout()
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "cg3d"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    svg = _svg_add_titles(buf.getvalue(), [f"{n}: {s:.3f}" for n, s in zip(names, scores)])
    if out_path is not None:
        with atomic_path(out_path) as tmp:
            tmp.write_text(svg, encoding="utf-8")
    return svg


def _svg_add_titles(svg: str, titles: list[str]) -> str:
    """Insert ``<title>`` (hover text) into the groups ``cg3d-pt-<i>`` of a matplotlib SVG."""
    from xml.sax.saxutils import escape

    def repl(match: re.Match) -> str:
        i = int(match.group(1))
        title = escape(titles[i]) if i < len(titles) else ""
        return f'{match.group(0)}<title>{title}</title>'

    svg = re.sub(r'<g id="cg3d-pt-(\d+)">', repl, svg)
    # drop the XML prolog / DOCTYPE so the SVG can be inlined in HTML
    return svg[svg.find("<svg"):]
