"""Stage ``group``: ``group_<mod>.tsv``/``.json`` and ``group_<mod>.html`` of one modality.

Outputs of images that are not part of this batch are stale (:mod:`cg3d_bids.bids.stale`): listed
as ``stale`` rows and in ``StaleOutputs``, or removed with ``--remove-stale-outputs``.
"""

from __future__ import annotations

import dataclasses

from ..bids.group_table import rank_and_percentile, table_row, write_group_table
from ..bids.stale import check_modality, remove_files
from ..core.scoring import musc_k
from ..records import BatchScores, GroupSummary, ImageResult
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
def group(ctx: StageContext, results: list[ImageResult], scores: Ref[BatchScores], modality: str) -> GroupSummary:
    """Rank the batch, write its table and group report; the summary the subject reports read."""
    from ..reports import write_group_report
    from ..reports.data import report_image

    settings = ctx.settings
    batch = scores.load()
    results = ranked(results)
    out_dir = settings.inputs.output_dir
    provenance = settings.provenance()
    stale_rows, stale, to_remove = check_modality(out_dir, modality, results,
                                                  remove=settings.execution.remove_stale_outputs)
    write_group_table(out_dir, modality, [table_row(r) for r in results] + stale_rows, provenance,
                      extra={"StaleOutputs": stale} if stale["Images"] else None)
    remove_files(out_dir, to_remove)  # after the table: it never lists files that are gone
    n_scored = len(batch.names)
    summary = GroupSummary(
        modality=modality, results=tuple(results), n_scored=n_scored, k=musc_k(n_scored, settings.method.fraction),
        median=batch.median, scale=batch.scale, communities=batch.communities, timings=dict(batch.timings),
    )
    facts = {
        "B": n_scored, "K": summary.k, "fraction": settings.method.fraction,
        "cube_size": settings.method.cube_size, "layers": list(settings.run.layers),
        "device": settings.execution.device, "threshold": settings.method.threshold,
        "runtime_s": dict(batch.timings),
    }
    communities = [{"id": k + 1, "members": list(c.members), "n_suspicious": list(c.n_suspicious)}
                   for k, c in enumerate(batch.communities)]
    write_group_report(out_dir, modality, [report_image(r, out_dir, n_scored) for r in results], facts,
                       communities, provenance)
    return summary
