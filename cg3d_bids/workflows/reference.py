"""The nipype graphs of saved reference cohorts (:mod:`cg3d_bids.stages.reference`).

``participant --reference BANK`` (per modality; no batch, no landmark cohort)::

    prepare (MapNode, the selected images) ----------------------------+
    reference_landmarks (the bank's) -> reference_tokenize (MapNode over chunks)
      -> reference_score (each image against the bank's images)
      -> outputs (MapNode, unchanged) -> reference_group (ranks, reference_<mod>.tsv)
    all modalities -> subject reports (MapNode over chunks of subjects, unchanged)

``group --save-reference BANK`` adds one ``save_reference`` node per modality to the group graph
of :func:`cg3d_bids.workflows.base.init_cg3d_wf` (:func:`connect_save_reference`).
"""

from __future__ import annotations

from pathlib import Path

from nipype.pipeline import engine as pe

from ..interfaces.stage import (
    PrepareImage,
    ReferenceGroup,
    ReferenceLandmarks,
    ReferenceScore,
    ReferenceTokenize,
    SaveReference,
    WriteImageOutputs,
)
from ..errors import UsageError
from .base import add_subject_reports, select_node

__all__ = ["connect_save_reference", "init_reference_wf"]


def init_reference_wf(
    *,
    settings_file: Path,
    selected: dict[str, list[tuple[str, Path]]],
    subjects: list[str],
    use_gpu: bool,
    n_chunks: int,
    base_dir: Path,
) -> pe.Workflow:
    """The ``participant --reference`` graph: ``selected`` as in
    :func:`~cg3d_bids.workflows.base.init_cg3d_wf` (per modality, ``(bids_name, ImageRecord path)``)."""
    wf = pe.Workflow(name="cg3d_reference_wf", base_dir=str(base_dir))
    config = str(settings_file)
    groups = []
    for modality, records in selected.items():
        names = [name for name, _ in records]
        prepare = pe.MapNode(PrepareImage(settings_file=config), iterfield=["image"], name=f"prepare_{modality}")
        prepare.inputs.image = [str(path) for _, path in records]
        landmarks = pe.Node(ReferenceLandmarks(settings_file=config, modality=modality),
                            name=f"reference_landmarks_{modality}")
        select = select_node(modality, names, 1 if use_gpu else n_chunks)
        tokenize = pe.MapNode(ReferenceTokenize(settings_file=config, use_gpu=use_gpu), iterfield=["prepared"],
                              name=f"reference_tokenize_{modality}")
        score = pe.Node(ReferenceScore(settings_file=config, modality=modality, use_gpu=use_gpu),
                        name=f"reference_score_{modality}")
        outputs = pe.MapNode(WriteImageOutputs(settings_file=config), iterfield=["prepared"],
                             name=f"outputs_{modality}")
        group = pe.Node(ReferenceGroup(settings_file=config, modality=modality), name=f"reference_group_{modality}")
        wf.connect([
            (prepare, select, [("out_file", "prepared")]),
            (select, tokenize, [("chunks", "prepared")]),
            (landmarks, tokenize, [("out_file", "landmarks")]),
            (tokenize, score, [("out_files", "tokens")]),
            (select, score, [("ordered", "prepared")]),
            (select, outputs, [("ordered", "prepared")]),
            (score, outputs, [("out_files", "scores")]),
            (outputs, group, [("out_file", "results")]),
            (score, group, [("out_files", "scores")]),
        ])
        groups.append(group)
    add_subject_reports(wf, config, groups, subjects, n_chunks)
    return wf


def connect_save_reference(wf: pe.Workflow, settings_file: Path, modalities: list[str],
                           batches: dict[str, list[tuple[int, list[str]]]] | None = None) -> pe.Workflow:
    """Add a ``save_reference`` node per modality to the group graph (after its group node).

    A bank is one MuSc batch: a modality scored in several chunks (``--batch-size``) is refused."""
    config = str(settings_file)
    for modality, chunks_ in (batches or {}).items():
        if len(chunks_) > 1:
            raise UsageError(f"--save-reference saves one scoring batch per modality, but --batch-size splits "
                             f"{modality} into {len(chunks_)} batches",
                             fix="drop --batch-size (or raise it above the modality's number of images) when "
                             "saving a reference bank")
    for modality in modalities:
        nodes = {name: wf.get_node(f"{name}_{modality}") for name in ("tokenize", "landmarks", "score", "group")}
        missing = [name for name, node in nodes.items() if node is None]
        if missing:
            raise RuntimeError(f"the group workflow has no {', '.join(missing)} node for {modality}")
        save = pe.Node(SaveReference(settings_file=config, modality=modality), name=f"save_reference_{modality}")
        wf.connect([
            (nodes["tokenize"], save, [("out_files", "tokens")]),
            (nodes["landmarks"], save, [("out_file", "landmarks")]),
            (nodes["score"], save, [("out_file", "scores")]),
            (nodes["group"], save, [("out_file", "summary")]),
        ])
    return wf
