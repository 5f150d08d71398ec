"""Stage ``group``: ``group_<mod>.tsv``/``.json`` and ``group_<mod>.html`` of one modality.

Outputs of images that are not part of this batch are stale (:mod:`cg3d_bids.bids.stale`): listed
as ``stale`` rows and in ``StaleOutputs``, or removed with ``--remove-stale-outputs``.
"""

from __future__ import annotations

import dataclasses

from ..bids.group_table import rank_and_percentile, table_row, write_group_table
from ..bids.stale import check_modality, remove_files
from ..records import BatchFacts, BatchScores, GroupSummary, ImageResult
from .context import Ref, StageContext, stage

__all__ = ["group", "ranked"]


def ranked(results: list[ImageResult]) -> list[ImageResult]:
    """``results`` with ``rank`` and ``score_percentile`` among the scored (``ok``) images."""
    ok = [i for i, r in enumerate(results) if r.ok]
    ranks, percentiles = rank_and_percentile([results[i].score_max for i in ok])
    out = list(results)
    for i, rank, pct in zip(ok, ranks, percentiles):
        out[i] = dataclasses.replace(out[i], rank=rank, score_percentile=pct)
    return out


@stage("group", timing="reports")
def group(ctx: StageContext, results: list[ImageResult], scores: list[Ref[BatchScores]],
          modality: str) -> GroupSummary:
    """Rank the modality's images, write its table and group report; the summary the subject
    reports read."""
    from ..reports import write_group_report
    from ..reports.data import report_image

    settings = ctx.settings
    batches = sorted((BatchFacts.of(ref.load()) for ref in scores), key=lambda b: b.batch)
    results = ranked(results)
    summary = GroupSummary(modality=modality, results=tuple(results), batches=tuple(batches))
    out_dir = settings.inputs.output_dir
    provenance = settings.provenance()
    stale_rows, stale, to_remove = check_modality(out_dir, modality, results,
                                                  remove=settings.execution.remove_stale_outputs)
    write_group_table(out_dir, modality, [table_row(r) for r in results] + stale_rows, provenance,
                      extra={"StaleOutputs": stale} if stale["Images"] else None)
    remove_files(out_dir, to_remove)  # after the table: it never lists files that are gone
    one = batches[0] if len(batches) == 1 else None
    facts = {
        "B": summary.n_scored, "K": one.k if one else ", ".join(str(b.k) for b in batches),
        "batches": len(batches) if not one else None,
        "batch sizes": None if one else ", ".join(str(len(b.names)) for b in batches),
        "fraction": settings.method.fraction,
        "cube_size": settings.method.cube_size, "layers": list(settings.run.layers),
        "device": settings.execution.device, "threshold": settings.method.threshold,
        # one batch: its statistics place the threshold on the raw-score axis; several batches
        # have several thresholds in raw units, so the plot shows none
        "median": one.median if one else None, "scale": one.scale if one else None,
        "z_center": settings.method.z_center,
        "runtime_s": {f"scoring_s (batch {b.batch})" if not one else "scoring_s": b.timings.get("scoring_s", 0.0)
                      for b in batches},
    }
    communities = [{"id": k + 1, "members": list(c.members), "n_suspicious": list(c.n_suspicious)}
                   for k, c in enumerate(c for b in batches for c in b.communities)]
    views = [report_image(r, out_dir, summary.batch_size(r.batch)) for r in results]
    write_group_report(out_dir, modality, views, facts, communities, provenance)
    return summary
