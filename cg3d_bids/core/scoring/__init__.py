"""Batch scoring of 3D patch tokens: MuSc mutual scoring and the CoDeGraph stage.

- :mod:`.tiles`: exact fp32 distance tiles reduced to per-image minima;
- :mod:`.mutual`: MuSc mutual scores (one layer);
- :mod:`.codegraph`: settings and statistics of the consistent-anomaly stage;
- :mod:`.shards`: the stage on tokens, in one go or over shards of the batch;
- :mod:`.memory`: the memory plan (predicted peak, block size, or the fix).
"""

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
from .codegraph import CodeGraphResult, CodeGraphSettings
from .shards import (
    GraphResult,
    RescoredRows,
    RowScores,
    build_graph,
    codegraph_scores,
    rescore_rows,
    score_rows,
)

__all__ = [
    "CodeGraphResult",
    "CodeGraphSettings",
    "GraphResult",
    "MinDistanceTable",
    "RescoredRows",
    "RowScores",
    "SmallBatchWarning",
    "build_graph",
    "codegraph_scores",
    "min_distance_table",
    "minimum_batch_size",
    "musc_k",
    "mutual_scores",
    "rescore_rows",
    "score_rows",
    "scores_from_table",
    "sorted_msv",
]
