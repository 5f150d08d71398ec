"""Per-subject HTML report: ``<out_dir>/sub-<label>.html`` + ``<out_dir>/sub-<label>/figures/*.svg``.

One section per image (sessions as sections, runs/acquisitions as separate image sections), each
with the anomaly mosaic, the batch-relative score, the connected components of the anomaly mask and a
brain-mask check figure; failed images get a section with their error. Settings, provenance and a
methods paragraph close the report. Templates are jinja2 with autoescaping; figures are drawn by
:mod:`cg3d_bids.reports.figures` (matplotlib, Agg backend), each image's files read once for both.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup, escape

from ..atomic import write_text
from .data import ImageResult, Provenance, check_label, finite

LOGGER = logging.getLogger("cg3d.reports")

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"

#: Upper bound of a subject report with its figures (bytes); figures are re-drawn at a lower
#: resolution when a first rendering exceeds it.
MAX_REPORT_BYTES = 5_000_000
#: Components listed per image (largest first); the rest are counted.
MAX_COMPONENTS_SHOWN = 25

REFERENCES = [
    "Le-Gia T, Ahn J. Training-free zero-shot anomaly detection in 3D brain MRI with 2D foundation "
    "models (CoDeGraph3D). Medical Imaging with Deep Learning (MIDL) 2026, under review.",
    "Li X, Huang Z, Xue F, Zhou Y. MuSc: zero-shot industrial anomaly classification and segmentation "
    "with mutual scoring of the unlabeled images. International Conference on Learning Representations "
    "(ICLR) 2024.",
    "Le Gia T, Ahn J. On the problem of consistent anomalies in zero-shot industrial anomaly detection "
    "(CoDeGraph). Transactions on Machine Learning Research (TMLR) 2025.",
    "Oquab M, Darcet T, Moutakanni T, et al. DINOv2: learning robust visual features without "
    "supervision. arXiv:2304.07193, 2023.",
    "Gorgolewski K, Burns CD, Madison C, et al. Nipype: a flexible, lightweight and extensible "
    "neuroimaging data processing framework in Python. Frontiers in Neuroinformatics 5:13, 2011.",
    "Yarkoni T, Markiewicz CJ, de la Vega A, et al. PyBIDS: Python tools for BIDS datasets. "
    "Journal of Open Source Software 4(40):1294, 2019.",
    "Nyúl LG, Udupa JK, Zhang X. New variants of a method of MRI scale standardization. "
    "IEEE Transactions on Medical Imaging 19(2):143-150, 2000.",
]


# --------------------------------------------------------------------------------------------------
# jinja2 environment and filters (shared with group.py)
def _num(value: Any, digits: int = 3) -> str:
    if not finite(value):
        return "n/a"
    return f"{float(value):.{digits}f}"


def _pct(value: Any) -> str:
    return "n/a" if not finite(value) else f"{float(value):.1f} %"


def _vol(value: Any) -> str:
    if not finite(value):
        return "n/a"
    value = float(value)
    return f"{value:,.0f}" if abs(value) >= 10 else f"{value:.1f}"


def _seconds(value: Any) -> str:
    if not finite(value):
        return "n/a"
    value = float(value)
    if value >= 120:
        return f"{value / 60:.1f} min"
    return f"{value:.1f} s"


def _bids_name(value: Any) -> Markup:
    """A BIDS name that may wrap after its underscores only: ``sub-01_`` ``<wbr>`` ``T1w``, each
    entity unbreakable (class ``nw``); escaped."""
    parts = [escape(part) for part in str(value).split("_")]
    spans = [Markup('<span class="nw">{}</span>').format(p + ("_" if i < len(parts) - 1 else ""))
             for i, p in enumerate(parts)]
    return Markup("<wbr>").join(spans)


_ENV: jinja2.Environment | None = None


def environment() -> jinja2.Environment:
    """The reports' jinja2 environment (autoescaping on, undefined variables are errors)."""
    global _ENV
    if _ENV is None:
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        )
        env.filters.update(num=_num, pct=_pct, vol=_vol, seconds=_seconds, wbr=_bids_name)
        _ENV = env
    return _ENV


def render(template: str, **context: Any) -> str:
    context.setdefault("generated", _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"))
    context.setdefault("references", REFERENCES)
    return environment().get_template(template).render(**context)


def relative_href(target: Path, start: Path) -> str | None:
    """URL-style relative path from folder ``start`` to ``target``; None on another drive/root."""
    try:
        rel = os.path.relpath(Path(target).resolve(), Path(start).resolve())
    except ValueError:
        return None
    from urllib.parse import quote

    return quote(Path(rel).as_posix())


def subject_report_path(out_dir: str | os.PathLike, subject: str) -> Path:
    return Path(out_dir) / f"sub-{check_label(subject)}.html"


def figure_names(result: ImageResult, fmt: str = "svg") -> tuple[str, str]:
    """File names of the anomaly mosaic and the brain-mask figure (BIDS-like, §3.2 of the conventions)."""
    prefix = result.source_prefix
    return (f"{prefix}_label-anomaly_desc-{result.modality}_probseg.{fmt}",
            f"{prefix}_label-brain_desc-{result.modality}_mask.{fmt}")


# --------------------------------------------------------------------------------------------------
def _component_rows(components: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for comp in components or []:
        centroid = comp.get("centroid_mm", comp.get("centroid", comp.get("center_mm")))
        if centroid is None or len(centroid) != 3:
            centroid = (math.nan, math.nan, math.nan)
        volume = comp.get("volume_mm3", comp.get("volume", math.nan))
        peak = comp.get("peak", comp.get("peak_value", comp.get("max", math.nan)))
        rows.append({
            "centroid": [float(c) if finite(c) else math.nan for c in centroid],
            "volume": float(volume) if finite(volume) else math.nan,
            "peak": float(peak) if finite(peak) else math.nan,
        })
    rows.sort(key=lambda r: -(r["volume"] if finite(r["volume"]) else -1.0))
    return rows


def _file_row(name: str, path: Path | None, report_dir: Path) -> tuple[str, str | None, str] | None:
    if path is None:
        return None
    path = Path(path)
    if not path.exists():
        return None
    href = relative_href(path, report_dir)
    inside = href is not None and not href.startswith("..")
    return (name, href if inside else None, href if inside else str(path))


#: ImageResult attribute and label of each figure layer
_LAYERS = {
    "image": ("image_path", "input image"),
    "probseg": ("probseg_path", "anomaly map"),
    "anomaly_mask": ("anomaly_mask_path", "anomaly mask"),
    "brain_mask": ("brain_mask_path", "brain mask"),
}


def _layer_loader(result: ImageResult, given: Mapping[str, Any] | None) -> Callable[..., Any]:
    """``load(name, required=True)``: the image's layer as a :class:`figures.Volume`, read once.

    A layer comes from ``given`` (paths or in-memory nibabel images, keyed like :data:`_LAYERS`)
    when there, else from the result's file; a missing file raises ``FileNotFoundError`` when
    ``required``, else gives None.
    """
    from . import figures

    cache: dict[str, Any] = {}

    def load(name: str, required: bool = True):
        if name not in cache:
            source = (given or {}).get(name)
            if source is None:
                attr, label = _LAYERS[name]
                path = Path(getattr(result, attr))
                if not path.exists():
                    if required:
                        raise FileNotFoundError(f"{label} not found: {path}")
                    return None
                source = path
            cache[name] = figures.load_volume(source)
        return cache[name]

    return load


def _draw_figures(item: dict[str, Any], fig_dir: Path, report_dir: Path, *, fmt: str, dpi: int,
                  floor: float, threshold: float, given: Mapping[str, Any] | None = None) -> None:
    from . import figures

    result: ImageResult = item["result"]
    anomaly_name, mask_name = figure_names(result, fmt)
    item.update(anomaly_figure=None, mask_figure=None, anomaly_error=None, mask_error=None,
                peak=None, peak_value=None, cuts=None, figure_paths=[])
    load = _layer_loader(result, given)
    try:
        info = figures.plot_anomaly_mosaic(load("image"), load("probseg"), fig_dir / anomaly_name,
                                           anomaly_mask=load("anomaly_mask", False),
                                           brain_mask=load("brain_mask", False), floor=floor,
                                           threshold=threshold, dpi=dpi)
        item["anomaly_figure"] = relative_href(fig_dir / anomaly_name, report_dir)
        item["figure_paths"].append(fig_dir / anomaly_name)
        item["peak"], item["peak_value"], item["cuts"] = info.peak_mm, info.peak_value, info.cuts
    except Exception as exc:  # a broken figure must not lose the whole report
        LOGGER.warning("anomaly figure of %s failed: %s", result.bids_name, exc)
        item["anomaly_error"] = f"{type(exc).__name__}: {exc}"
    try:
        figures.plot_brain_mask(load("image"), load("brain_mask"), fig_dir / mask_name, dpi=dpi)
        item["mask_figure"] = relative_href(fig_dir / mask_name, report_dir)
        item["figure_paths"].append(fig_dir / mask_name)
    except Exception as exc:
        LOGGER.warning("brain-mask figure of %s failed: %s", result.bids_name, exc)
        item["mask_error"] = f"{type(exc).__name__}: {exc}"


def _use_drawn_figures(item: dict[str, Any], out_dir: Path, fmt: str, dpi: int) -> bool:
    """Take the figures drawn with the maps (``result.figures``) when they are there, in this
    format and resolution: the report then reads no image again."""
    drawn = item["result"].figures
    if drawn is None or fmt != "svg" or dpi != _default_dpi():
        return False
    paths = [out_dir / p for p in (drawn.anomaly, drawn.mask) if p]
    if not all(p.exists() for p in paths):
        return False
    item.update(
        anomaly_figure=relative_href(out_dir / drawn.anomaly, out_dir) if drawn.anomaly else None,
        mask_figure=relative_href(out_dir / drawn.mask, out_dir) if drawn.mask else None,
        anomaly_error=drawn.anomaly_error, mask_error=drawn.mask_error, peak=drawn.peak_mm,
        peak_value=drawn.peak_value, cuts=drawn.cuts, figure_paths=paths,
    )
    return True


def _default_dpi() -> int:
    from . import figures

    return int(figures.FIG_DPI)


def draw_figures(result: ImageResult, out_dir: str | os.PathLike, volumes: Mapping[str, Any], *,
                 threshold: float) -> dict[str, Any]:
    """Draw the two figures of one image from in-memory ``volumes`` (layers ``image``, ``probseg``,
    ``anomaly_mask``, ``brain_mask``) into ``<out_dir>/sub-<label>/figures/``, as the subject
    report would; returns paths (relative to ``out_dir``), the mosaic's peak and cuts, errors."""
    out_dir = Path(out_dir)
    item: dict[str, Any] = {"result": result}
    fig_dir = out_dir / f"sub-{check_label(result.subject)}" / "figures"
    _draw_figures(item, fig_dir, out_dir, fmt="svg", dpi=_default_dpi(), floor=min(0.2, threshold / 2),
                  threshold=threshold, given=volumes)
    anomaly, mask = figure_names(result)
    return {
        "anomaly": (fig_dir / anomaly).relative_to(out_dir).as_posix() if item["anomaly_figure"] else None,
        "mask": (fig_dir / mask).relative_to(out_dir).as_posix() if item["mask_figure"] else None,
        "peak_mm": item["peak"], "peak_value": item["peak_value"], "cuts": item["cuts"],
        "anomaly_error": item["anomaly_error"], "mask_error": item["mask_error"],
    }


def _group_links(out_dir: Path, modalities: Sequence[str]) -> list[tuple[str, str]]:
    links = []
    for mod in modalities:
        path = out_dir / f"group_{mod}.html"
        if path.exists():
            links.append((mod, f"group_{mod}.html"))
    return links


def write_subject_report(
    out_dir: str | os.PathLike,
    subject: str,
    results: Sequence[ImageResult],
    provenance: Provenance | dict[str, Any] | None = None,
    *,
    threshold: float | None = None,
    display_floor: float | None = None,
    figure_format: str = "svg",
    dpi: int | None = None,
    max_bytes: int = MAX_REPORT_BYTES,
    volumes: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write ``<out_dir>/sub-<subject>.html`` and its figures under ``<out_dir>/sub-<subject>/figures/``.

    ``results`` are this subject's images (any modality and session; failed ones included).
    ``threshold`` is the probseg threshold of the binary anomaly mask (default: the provenance's, else
    0.5); ``display_floor`` the overlay value under which the map is transparent (default
    ``min(0.2, threshold / 2)``). ``figure_format`` is ``svg`` (rasterised image layers) or ``png``.
    When the report and its figures exceed ``max_bytes``, the figures are drawn again at a lower
    resolution. ``volumes`` (optional, ``{bids_name: {layer: image}}`` with layers ``image``,
    ``probseg``, ``anomaly_mask``, ``brain_mask``, each a path or an in-memory nibabel image) lets a
    caller that holds the arrays skip reading the files; missing layers are read from the result's
    paths. Returns the path of the HTML file.
    """
    from . import figures

    subject = check_label(subject, "subject")
    out_dir = Path(out_dir)
    prov = provenance if isinstance(provenance, Provenance) else Provenance.from_dict(provenance or {})
    others = sorted({r.subject for r in results if r.subject.removeprefix("sub-") != subject})
    if others:
        raise ValueError(f"results of other subjects passed to the report of sub-{subject}: {others}")
    if figure_format not in ("svg", "png"):
        raise ValueError("figure_format must be 'svg' or 'png'")
    thr = float(threshold if threshold is not None else (prov.threshold if prov.threshold is not None else 0.5))
    floor = float(display_floor if display_floor is not None else min(0.2, thr / 2))
    report = out_dir / f"sub-{subject}.html"
    fig_dir = out_dir / f"sub-{subject}" / "figures"
    dpi = int(dpi or figures.FIG_DPI)

    items: list[dict[str, Any]] = []
    for result in sorted(results, key=ImageResult.sort_key):
        comps = _component_rows(result.components) if result.ok else []
        item: dict[str, Any] = {
            "result": result, "anchor": result.anchor, "label": result.label,
            "components": comps, "components_shown": comps[:MAX_COMPONENTS_SHOWN],
            "rank_text": f"{result.rank} / {result.n_images}" if result.rank else "n/a",
            "source_text": None, "mask_text": None, "files": [],
            "anomaly_figure": None, "mask_figure": None, "anomaly_error": None, "mask_error": None,
            "peak": None, "peak_value": None, "cuts": None, "figure_paths": [],
        }
        if result.ok:
            image_href = _file_row("input image", result.image_path, out_dir)
            item["source_text"] = image_href[2] if image_href else str(result.image_path)
            mask_row = _file_row("brain mask", result.brain_mask_path, out_dir)
            item["mask_text"] = mask_row[2] if mask_row else None
            item["files"] = [row for row in (
                _file_row("anomaly map (probseg)", result.probseg_path, out_dir),
                _file_row("anomaly mask", result.anomaly_mask_path, out_dir),
                mask_row,
            ) if row is not None]
            if not _use_drawn_figures(item, out_dir, figure_format, dpi):
                _draw_figures(item, fig_dir, out_dir, fmt=figure_format, dpi=dpi, floor=floor, threshold=thr,
                              given=(volumes or {}).get(result.bids_name))
        items.append(item)

    def _html() -> str:
        sessions: list[dict[str, Any]] = []
        for item in items:
            ses = item["result"].session
            if not sessions or sessions[-1]["session"] != ses:
                sessions.append({"session": ses, "images": []})
            sessions[-1]["images"].append(item)
        return render(
            "subject.html", subject=subject, prov=prov, prov_rows=prov.rows(), images=items,
            sessions=sessions, n_sessions=len({i["result"].session for i in items if i["result"].session}),
            failed=[i for i in items if not i["result"].ok], threshold=thr, floor=floor,
            group_links=_group_links(out_dir, sorted({i["result"].modality for i in items})),
        )

    html = _html()
    total = len(html.encode()) + _figure_bytes(items)
    if total > max_bytes and any(i["figure_paths"] for i in items):
        budget = max_bytes * 0.9 - len(html.encode())
        scale = math.sqrt(max(budget, 1.0) / max(_figure_bytes(items), 1))
        new_dpi = max(40, int(dpi * min(scale, 0.95)))
        LOGGER.info("sub-%s report is %.1f MB: drawing figures again at %d dpi", subject, total / 1e6, new_dpi)
        for item in items:
            if item["result"].ok:
                _draw_figures(item, fig_dir, out_dir, fmt=figure_format, dpi=new_dpi, floor=floor, threshold=thr,
                              given=(volumes or {}).get(item["result"].bids_name))
        html = _html()
    write_text(report, html)
    return report


def _figure_bytes(items: Sequence[dict[str, Any]]) -> int:
    return sum(Path(p).stat().st_size for i in items for p in i["figure_paths"] if Path(p).exists())
