"""HTML reports of cg3d (issue #4): per subject ``sub-<label>.html`` and per modality ``group_<mod>.html``.

Public API::

    from cg3d_bids.reports import (ImageResult, Provenance, write_subject_report,
                                   write_group_report, insert_evaluation_section)

    prov = Provenance.from_dict(provenance_dict)          # the run's provenance (unknown keys kept)
    write_subject_report(out_dir, "01", results_of_sub01, prov)      # -> out_dir/sub-01.html
    write_group_report(out_dir, "T2w", results_t2w, batch, communities, prov)  # -> group_T2w.html
    insert_evaluation_section(out_dir / "group_T2w.html", "<section>…</section>")

Reports are self-contained (inline CSS/JS, no network at view time); subject figures are SVG files
under ``sub-<label>/figures/`` referenced by relative paths, the group plot is inlined. Figures are
drawn by matplotlib with the Agg backend (:mod:`.figures`).
"""

from __future__ import annotations

from .data import ImageResult, Provenance, image_anchor
from .group import EVALUATION_END, EVALUATION_START, insert_evaluation_section, write_group_report
from .subject import write_subject_report

__all__ = [
    "EVALUATION_END",
    "EVALUATION_START",
    "ImageResult",
    "Provenance",
    "image_anchor",
    "insert_evaluation_section",
    "write_group_report",
    "write_subject_report",
]
