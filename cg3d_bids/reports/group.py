"""Group HTML report of one modality: ``<out_dir>/group_<modality>.html`` (single self-contained file).

Contents: summary, the score distribution (inline SVG, one point per image at its subject score, the
mask threshold converted to raw-score units, flagged in red), a table of every image sortable by any
column (inline vanilla JS) with flagged images first and links to
``sub-<label>.html#<image anchor>``, the communities linked by the consistent-anomaly stage,
batch facts and runtimes, settings/provenance, a methods paragraph with references, and an evaluation
placeholder between the markers :data:`EVALUATION_START` and :data:`EVALUATION_END` that
:func:`insert_evaluation_section` (used by ``cg3d evaluate``) replaces.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from markupsafe import Markup

from ..atomic import write_text
from .data import ImageResult, Provenance, finite, image_anchor
from .subject import render

LOGGER = logging.getLogger("cg3d.reports")

TIMINGS_START = "<!-- cg3d:timings:start -->"
TIMINGS_END = "<!-- cg3d:timings:end -->"
EVALUATION_START = "<!-- cg3d:evaluation:start -->"
EVALUATION_END = "<!-- cg3d:evaluation:end -->"

_BATCH_LABELS = [
    ("B", "batch size B"),
    ("K", "K = floor(f (B - 1))"),
    ("fraction", "fraction f"),
    ("cube_size", "cube size (voxels)"),
    ("layers", "layers (1-based)"),
    ("threshold", "mask threshold (probseg)"),
    ("median", "batch median of the raw scores"),
    ("scale", "batch scale of the raw scores"),
    ("z_center", "probseg transform centre z"),
    ("device", "device"),
]


def raw_threshold(threshold: Any, median: Any, scale: Any, z_center: Any) -> float | None:
    """The raw score at which probseg equals ``threshold``; None when a number is missing or invalid.

    probseg = logistic((raw - median) / scale - z_center), hence
    raw = median + scale * (z_center + ln(t / (1 - t))).
    """
    if not all(finite(v) for v in (threshold, median, scale, z_center)):
        return None
    t, scale = float(threshold), float(scale)
    if not 0.0 < t < 1.0 or scale <= 0.0:
        return None
    return float(median) + scale * (float(z_center) + math.log(t / (1.0 - t)))


def _check_flags(results: Sequence[ImageResult], raw_thr: float) -> None:
    """Log images whose flag disagrees with their subject score and the raw threshold."""
    tol = 1e-5 * max(1.0, abs(raw_thr))
    odd = [r.bids_name for r in results if r.ok and finite(r.score)
           and ((r.flagged and r.score < raw_thr - tol) or (not r.flagged and r.score > raw_thr + tol))]
    if odd:
        LOGGER.warning("flag and score disagree with the raw threshold %.4g for %s", raw_thr, ", ".join(odd))


def _value(value: Any) -> str:
    """``data-value`` for numeric sorting: ``NaN`` for missing values (sorted last)."""
    return repr(float(value)) if finite(value) else "NaN"


def default_order(results: Sequence[ImageResult]) -> list[ImageResult]:
    """Flagged first, then by decreasing score; failed/skipped images last (by name)."""
    def key(r: ImageResult):
        if not r.ok:
            return (2, 0.0, r.bids_name)
        score = float(r.score) if finite(r.score) else -math.inf
        return (0 if r.flagged else 1, -score, r.bids_name)
    return sorted(results, key=key)


def group_report_path(out_dir: str | os.PathLike, modality: str) -> Path:
    return Path(out_dir) / f"group_{modality}.html"


def write_group_report(
    out_dir: str | os.PathLike,
    modality: str,
    results: Sequence[ImageResult],
    batch: dict[str, Any] | None = None,
    communities: Sequence[dict[str, Any]] | None = None,
    provenance: Provenance | dict[str, Any] | None = None,
) -> Path:
    """Write ``<out_dir>/group_<modality>.html`` and return its path.

    ``batch``: facts of the scoring batch — ``B``, ``K``, ``fraction``, ``cube_size``, ``layers``,
    ``device``, ``threshold`` (probseg), ``median``, ``scale`` and ``z_center`` (the batch's robust
    statistics of the raw scores and the probseg transform's centre, as in each probseg sidecar's
    ``BatchMedian``, ``BatchScale``, ``ZCenter``; ``z_center`` defaults to the provenance's) and
    ``runtime_s`` (``{stage: seconds}``); missing keys are left out, other keys are shown as they are.
    The score plot's x axis is the subject score (peak raw score); its threshold line is the probseg
    threshold converted to raw units (:func:`raw_threshold`), drawn only when the statistics are given.
    ``communities``: ``[{"id", "members": [bids_name, …], "n_suspicious": [int per member]}]`` from the
    consistent-anomaly stage.
    """
    from . import figures

    if not modality or not all(c.isalnum() or c in "-_" for c in modality):
        raise ValueError(f"invalid modality {modality!r}")
    out_dir = Path(out_dir)
    batch = dict(batch or {})
    prov = provenance if isinstance(provenance, Provenance) else Provenance.from_dict(provenance or {})
    threshold = batch.get("threshold", prov.threshold)
    threshold = float(threshold) if finite(threshold) else None
    batch.setdefault("z_center", prov.z_center)
    raw_thr = raw_threshold(threshold, batch.get("median"), batch.get("scale"), batch.get("z_center"))
    if raw_thr is not None:
        _check_flags(results, raw_thr)

    ordered = default_order(results)
    rows = []
    by_name: dict[str, str] = {}
    for r in ordered:
        href = f"sub-{r.subject.removeprefix('sub-')}.html#{image_anchor(r.bids_name)}"
        by_name[r.bids_name] = href
        rows.append({
            "result": r, "ok": r.ok, "flagged": bool(r.ok and r.flagged), "bids_name": r.bids_name,
            "subject": r.subject.removeprefix("sub-"), "session": r.session, "href": href,
            "score": r.score if r.ok else None, "score_value": _value(r.score if r.ok else None),
            "rank": r.rank if r.ok and r.rank else None, "rank_value": _value(r.rank if r.ok and r.rank else None),
            "percentile": r.percentile if r.ok else None, "percentile_value": _value(r.percentile if r.ok else None),
            "volume": r.anomalous_volume_mm3, "volume_value": _value(r.anomalous_volume_mm3 if r.ok else None),
            "n_components": len(r.components or []),
            "n_components_value": _value(len(r.components or []) if r.ok else None),
            "error": None if r.ok else r.error, "batch": r.batch,
        })

    ok = [r for r in results if r.ok and finite(r.score)]
    svg = figures.plot_score_distribution(
        [r.bids_name for r in ok], [float(r.score) for r in ok], [r.flagged for r in ok],
        threshold=raw_thr, xlabel=f"subject score of {modality} images (peak raw score)",
        threshold_label=None if raw_thr is None else f"mask threshold: raw {raw_thr:.4g} = probseg {threshold:g}",
    )

    com_rows = []
    for k, com in enumerate(communities or []):
        members = list(com.get("members", []))
        counts = list(com.get("n_suspicious", []) or [])
        com_rows.append({
            "id": com.get("id", k + 1),
            "members": [{"name": name, "href": by_name.get(name),
                         "n_suspicious": counts[i] if i < len(counts) else None}
                        for i, name in enumerate(members)],
        })

    n_images = int(batch.get("B") or len(results))
    batch_rows: list[tuple[str, Any]] = []
    for key, label in _BATCH_LABELS:
        value = batch.get(key)
        if value is None and key == "layers":
            value = prov.layers
        if isinstance(value, (list, tuple)):
            value = ", ".join(str(v) for v in value)
        if value is not None:
            batch_rows.append((label, value))
        if key == "z_center" and raw_thr is not None:
            batch_rows.append(("mask threshold (raw score)", f"{raw_thr:.6g}"))
    runtime = batch.get("runtime_s", batch.get("runtime", batch.get("timings"))) or {}
    skip = {k for k, _ in _BATCH_LABELS} | {"runtime_s", "runtime", "timings"}
    batch_rows += [(k, v) for k, v in sorted(batch.items()) if k not in skip and v is not None]
    runtime_rows = [(str(k), v) for k, v in runtime.items()] if isinstance(runtime, dict) else []

    html = render(
        "group.html", modality=modality, prov=prov, prov_rows=prov.rows(), rows=rows,
        n_images=n_images, n_ok=len([r for r in results if r.ok]),
        n_failed=len([r for r in results if not r.ok]),
        n_flagged=len([r for r in results if r.ok and r.flagged]), threshold=threshold, raw_threshold=raw_thr,
        distribution_svg=Markup(svg), communities=com_rows, batch_rows=batch_rows,
        runtime_rows=runtime_rows, show_batch=len({r.batch for r in results if r.batch is not None}) > 1,
        timings_start=Markup(TIMINGS_START), timings_end=Markup(TIMINGS_END),
    )
    report = group_report_path(out_dir, modality)
    write_text(report, html)
    return report


def insert_timings(report_path: str | os.PathLike, modality: str, rows: Sequence[Any], run_id: str) -> Path:
    """Put the run's per-stage timings (:class:`cg3d_bids.timings.TimingRow`, rows of ``modality``
    and of every modality) into the Batch card of a group report, between the timings markers."""
    shown = [row for row in rows if row.modality in (modality, "all")]
    fragment = render("_timings.html", rows=shown, run_id=run_id, generated="")
    return _replace_between(report_path, TIMINGS_START, TIMINGS_END, fragment, "timings")


def _replace_between(report_path: str | os.PathLike, start_marker: str, end_marker: str, fragment: str,
                     section_id: str) -> Path:
    """Replace what lies between two markers of a report with ``fragment`` (atomic, idempotent); a
    report without the markers gets them, around the fragment, in a new card before ``</main>``."""
    report_path = Path(report_path)
    if start_marker in fragment or end_marker in fragment:
        raise ValueError(f"the {section_id} fragment must not contain its markers")
    text = report_path.read_text(encoding="utf-8")
    block = f"{start_marker}\n{fragment.strip()}\n{end_marker}"
    start = text.find(start_marker)
    end = text.find(end_marker, start + 1) if start >= 0 else -1
    if start >= 0 and end > start:
        new = text[:start] + block + text[end + len(end_marker):]
    else:
        section = f'<section class="card" id="{section_id}">\n{block}\n</section>\n'
        body = text.lower().rfind("</main>")
        if body < 0:
            body = text.lower().rfind("</body>")
        new = text[:body] + section + text[body:] if body >= 0 else text + "\n" + section
    if new != text:
        write_text(report_path, new)
    return report_path


def insert_evaluation_section(report_path: str | os.PathLike, html_fragment: str) -> Path:
    """Replace what is between the evaluation markers of a group report with ``html_fragment``.

    Atomic (temporary file + rename) and idempotent: inserting the same fragment twice gives the same
    file. A report without the markers gets them (around the fragment) before ``</body>``. The
    fragment is trusted HTML (written by ``cg3d evaluate``) but must not contain the markers.
    """
    return _replace_between(report_path, EVALUATION_START, EVALUATION_END, html_fragment, "evaluation")
