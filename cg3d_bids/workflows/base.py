"""The nipype workflow of a cg3d run: the stages (:mod:`cg3d_bids.stages`) wired per modality.

Per modality batch::

    prepare (MapNode, one per image of the landmark cohort)
      -> landmarks (Nyul, learned from the cohort)
      -> tokenize (MapNode over chunks of the selected images; GPU node on CUDA)
      -> score (MapNode, one per scoring batch: --batch-size chunks)         [group only]
      -> outputs (MapNode, one per image)                                    [group only]
      -> group (table + group report)                                        [group only]
    all modalities -> subject reports (MapNode over chunks of subjects)      [group only]

``participant`` stops after ``tokenize``: tokens are cached in the work directory and a later
``group`` run picks them up. The landmark cohort is every image of the modality that passes the
BIDS filters (participant and session filters excluded), so participant jobs and the group job
standardise intensities identically. Nodes exchange file paths of stored records; nipype's node
folders are per run (``base_dir``) and are not a cache: the work cache is (:mod:`cg3d_bids.cache`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nipype.interfaces.utility import Function, Merge
from nipype.pipeline import engine as pe

from ..interfaces.stage import (
    ComputeLandmarks,
    PrepareImage,
    ScoreBatch,
    TokenizeImages,
    WriteGroupOutputs,
    WriteImageOutputs,
    WriteSubjectReports,
)

__all__ = ["chunks", "init_cg3d_wf", "prepare_order"]


def chunks(items: Sequence[Any], n_chunks: int) -> list[list[Any]]:
    """``items`` dealt round-robin into at most ``n_chunks`` non-empty lists."""
    n_chunks = max(1, min(n_chunks, len(items)))
    return [list(items[i::n_chunks]) for i in range(n_chunks)]


def prepare_order(cohort: Sequence[str], selected: Sequence[str]) -> list[str]:
    """The order in which to prepare the cohort's images (bids names): the selected ones first,
    then the rest of the cohort walked from the first selected image's position (wrapping around).

    Every ``participant`` call needs the whole cohort prepared (batch Nyul landmarks). Calls for
    different subjects running at the same time on a shared work dir then start at different
    places and find most of the others' images already cached, instead of all preparing the
    cohort in the same order at once. The result does not depend on the order.
    """
    chosen = set(selected)
    start = next((i for i, name in enumerate(cohort) if name in chosen), 0)
    rotated = list(cohort[start:]) + list(cohort[:start])
    return [n for n in rotated if n in chosen] + [n for n in rotated if n not in chosen]


def select_prepared(prepared: list[str], names: list[str], n_chunks: int) -> tuple[list[str], list[list[str]]]:
    """The prepared-image files of ``names`` in that order, and the same dealt into chunks.

    (A nipype ``Function``: self-contained, imports inside.)
    """
    from cg3d_bids.records import load_fields
    from cg3d_bids.workflows.base import chunks

    by_name = {load_fields(path, ("image",))["image"]["bids_name"]: path for path in prepared}
    ordered = [by_name[name] for name in names]
    return ordered, chunks(ordered, n_chunks)


def init_cg3d_wf(
    *,
    settings_file: Path,
    analysis_level: str,
    selected: dict[str, list[tuple[str, Path]]],
    cohort: dict[str, list[tuple[str, Path]]],
    subjects: list[str],
    batches: dict[str, list[tuple[int, list[str]]]] | None = None,
    use_gpu: bool,
    n_chunks: int,
    base_dir: Path,
    score_threads: int = 0,
) -> pe.Workflow:
    """Build the workflow.

    ``selected`` / ``cohort``: per modality, ``(bids_name, stored ImageRecord path)`` in batch
    order (the images to process / every image of the modality, for the landmarks);
    ``subjects``: labels of the subject reports; ``batches``: per modality, the scoring batches
    ``(number, bids names)`` (default: batch 1 of every selected image); ``n_chunks``: parallel chunks of
    the tokenize (CPU) and reports map nodes. On CPU each scoring batch runs alone, on every
    processor slot (``n_procs = n_chunks``), with ``score_threads`` threads (0: the process's
    ``OMP_NUM_THREADS``): its tiles spread over all cores instead of one worker's share.
    """
    wf = pe.Workflow(name="cg3d_wf", base_dir=str(base_dir))
    config = str(settings_file)
    groups = []
    for modality, records in selected.items():
        names = [name for name, _ in records]
        cohort_paths = dict(cohort[modality])
        prepare = pe.MapNode(PrepareImage(settings_file=config), iterfield=["image"], name=f"prepare_{modality}")
        prepare.inputs.image = [str(cohort_paths[n]) for n in prepare_order(list(cohort_paths), names)]
        landmarks = pe.Node(ComputeLandmarks(settings_file=config, modality=modality),
                            name=f"landmarks_{modality}")
        select = select_node(modality, names, 1 if use_gpu else n_chunks)
        tokenize = pe.MapNode(TokenizeImages(settings_file=config, use_gpu=use_gpu), iterfield=["prepared"],
                              name=f"tokenize_{modality}")
        wf.connect([
            (prepare, landmarks, [("out_file", "prepared")]),
            (prepare, select, [("out_file", "prepared")]),
            (select, tokenize, [("chunks", "prepared")]),
            (landmarks, tokenize, [("out_file", "landmarks")]),
        ])
        if analysis_level != "group":
            continue
        scoring = (batches or {}).get(modality) or [(1, names)]
        score = pe.MapNode(ScoreBatch(settings_file=config, modality=modality, use_gpu=use_gpu),
                           iterfield=["order", "batch"], name=f"score_{modality}")
        score.inputs.order = [members for _, members in scoring]
        score.inputs.batch = [number for number, _ in scoring]
        if not use_gpu:
            score.n_procs = max(1, n_chunks)
            score.inputs.threads = score_threads
        outputs = pe.MapNode(WriteImageOutputs(settings_file=config), iterfield=["prepared"],
                             name=f"outputs_{modality}")
        group = pe.Node(WriteGroupOutputs(settings_file=config, modality=modality), name=f"group_{modality}")
        wf.connect([
            (tokenize, score, [("out_files", "tokens")]),
            (select, outputs, [("ordered", "prepared")]),
            (score, outputs, [("out_file", "scores")]),
            (outputs, group, [("out_file", "results")]),
            (score, group, [("out_file", "scores")]),
        ])
        groups.append(group)
    if analysis_level == "group" and groups:
        add_subject_reports(wf, config, groups, subjects, n_chunks)
    return wf


def select_node(modality: str, names: list[str], n_chunks: int) -> pe.Node:
    """The node that puts a modality's prepared images in ``names`` order and deals them into
    ``n_chunks`` tokenize chunks (:func:`select_prepared`)."""
    select = pe.Node(Function(input_names=["prepared", "names", "n_chunks"],
                              output_names=["ordered", "chunks"], function=select_prepared),
                     name=f"select_{modality}")
    select.inputs.names = names
    select.inputs.n_chunks = n_chunks
    return select


def add_subject_reports(wf: pe.Workflow, config: str, groups: list[pe.Node], subjects: list[str],
                        n_chunks: int) -> None:
    """The subject reports (a MapNode over ``n_chunks`` chunks of ``subjects``), after every
    modality's ``groups`` node."""
    reports = pe.MapNode(WriteSubjectReports(settings_file=config), iterfield=["subjects"],
                         name="subject_reports")
    reports.inputs.subjects = chunks(sorted(subjects), n_chunks)
    merge = pe.Node(Merge(len(groups)), name="merge_groups")
    for i, node in enumerate(groups, 1):
        wf.connect(node, "out_file", merge, f"in{i}")
    wf.connect(merge, "out", reports, "groups")
