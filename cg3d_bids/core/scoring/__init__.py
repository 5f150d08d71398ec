"""Batch scoring of 3D patch tokens: MuSc mutual scoring and the CoDeGraph stage."""

from .mutual import (
    MinDistanceTable,
    SmallBatchWarning,
    min_distance_table,
    minimum_batch_size,
    musc_k,
    mutual_scores,
    scores_from_table,
    sorted_msv,
)

__all__ = [
    "MinDistanceTable",
    "SmallBatchWarning",
    "min_distance_table",
    "minimum_batch_size",
    "musc_k",
    "mutual_scores",
    "scores_from_table",
    "sorted_msv",
]

from .codegraph import CodeGraphResult, CodeGraphSettings, codegraph_scores  # noqa: E402

__all__ += ["CodeGraphResult", "CodeGraphSettings", "codegraph_scores"]
