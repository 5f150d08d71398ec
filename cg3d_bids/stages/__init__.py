"""The stages of a cg3d run: one typed function each, on records (:mod:`cg3d_bids.records`).

A stage is ``stage(ctx, *inputs) -> output``: ``ctx`` (:class:`~.context.StageContext`) holds the
run's settings and work cache; inputs and outputs are records, ``Ref``s to stored records (large
ones, loaded when needed) or plain values. :func:`cg3d_bids.interfaces.stage_interface` turns any
stage into a nipype interface, so adding a stage is one function here and one node in
:func:`cg3d_bids.workflows.base.init_cg3d_wf`.

================  ===========================================================  ==================
stage             does                                                         returns
================  ===========================================================  ==================
prepare           load + check an image and its mask, place it in the cube     PreparedImage
landmarks         Nyul landmarks from every usable image of a modality         Landmarks
tokenize          standardised cubes -> 3D patch tokens (the encoder, GPU)     list[Ref[ImageTokens]]
score             MuSc (+ consistent-anomaly stage) per layer, averaged        BatchScores
outputs           native-grid probseg, masks and sidecars of one image         ImageResult
group             group table and group report of one modality                 GroupSummary
subject_reports   one HTML report per subject                                  list[Path]
================  ===========================================================  ==================

Sharded scoring (``group --stage score|graph|rescore --shard i/n``) splits ``score`` into
:func:`~.shards.score_shard`, :func:`~.shards.graph`, :func:`~.shards.rescore_shard` and
:func:`~.shards.assemble` (:mod:`.shards`). Saved reference cohorts (``group --save-reference``,
``participant --reference``) add the stages of :mod:`.reference`: ``save_reference``,
``reference_landmarks``, ``reference_tokenize``, ``reference_score`` and ``reference_group``.
"""

from .context import Ref, StageContext, stage
from .group import group
from .landmarks import landmarks
from .outputs import outputs
from .prepare import prepare
from .reference import reference_group, reference_landmarks, reference_score, reference_tokenize, save_reference
from .reports import subject_reports
from .score import score
from .shards import assemble, graph, rescore_shard, score_shard
from .tokenize import tokenize

__all__ = [
    "Ref", "StageContext", "assemble", "graph", "group", "landmarks", "outputs", "prepare", "reference_group",
    "reference_landmarks", "reference_score", "reference_tokenize", "rescore_shard", "save_reference", "score",
    "score_shard", "stage", "subject_reports", "tokenize",
]
