"""Stage ``subject_reports``: ``sub-<label>.html`` (all modalities and sessions of the subject)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..records import GroupSummary
from .context import StageContext, stage

LOGGER = logging.getLogger("cg3d")

__all__ = ["subject_reports"]


@stage("reports")
def subject_reports(ctx: StageContext, groups: list[GroupSummary], subjects: list[str]) -> list[Path]:
    """One report per subject of ``subjects``; returns the paths written."""
    from ..reports import write_subject_report
    from ..reports.data import report_image

    out_dir = ctx.settings.inputs.output_dir
    wanted = set(subjects)
    per_subject: dict[str, list] = {}
    for summary in groups:
        for result in summary.results:
            if result.image.subject in wanted:
                per_subject.setdefault(result.image.subject, []).append(
                    report_image(result, out_dir, summary.batch_size(result.batch)))
    provenance = ctx.settings.provenance()
    written = []
    start = time.monotonic()
    for done, (subject, items) in enumerate(sorted(per_subject.items()), 1):
        t0 = time.monotonic()
        written.append(write_subject_report(out_dir, subject, items, provenance))
        elapsed = time.monotonic() - start
        LOGGER.info("[reports %d/%d] sub-%s in %.1f s (elapsed %.0f s, about %.0f s left)", done,
                    len(per_subject), subject, time.monotonic() - t0, elapsed,
                    elapsed / done * (len(per_subject) - done))
    return written
