"""The nipype workflow of a cg3d run.

Per modality batch::

    prepare (MapNode, one per image of the landmark cohort)
      -> landmarks (Nyul, learned from the cohort)
      -> tokenize (MapNode over chunks of the selected images; GPU node on CUDA)
      -> score (one node: the whole batch)                                   [group only]
      -> outputs (MapNode, one per image)                                    [group only]
      -> group (table + group report)                                        [group only]
    all modalities -> subject reports                                        [group only]

``participant`` stops after ``tokenize``: tokens are cached in the work directory and a later
``group`` run picks them up. The landmark cohort is every image of the modality that passes the
BIDS filters (participant and session filters excluded), so participant jobs and the group job
standardise intensities identically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nipype.interfaces.utility import Function, Merge
from nipype.pipeline import engine as pe

from ..interfaces.group import WriteGroupOutputs, WriteSubjectReports
from ..interfaces.stages import (
    ComputeLandmarks,
    PrepareImage,
    ScoreBatch,
    TokenizeImages,
    WriteImageOutputs,
)


def _chunks(items: list[Any], n_chunks: int) -> list[list[Any]]:
    n_chunks = max(1, min(n_chunks, len(items)))
    return [items[i::n_chunks] for i in range(n_chunks)]


def prepare_order(cohort: list[dict[str, Any]], selected: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The order in which to prepare the cohort's images: the selected ones first, then the rest
    of the cohort walked from the first selected image's position (wrapping around).

    Every ``participant`` call needs the whole cohort prepared (batch Nyul landmarks). Calls for
    different subjects running at the same time on a shared work dir then start at different
    places and find most of the others' images already cached, instead of all preparing the
    cohort in the same order at once. The result does not depend on the order.
    """
    chosen = {rec["bids_name"] for rec in selected}
    start = next((i for i, rec in enumerate(cohort) if rec["bids_name"] in chosen), 0)
    rotated = cohort[start:] + cohort[:start]
    return ([rec for rec in rotated if rec["bids_name"] in chosen]
            + [rec for rec in rotated if rec["bids_name"] not in chosen])


def _order_tokens(token_files: list[list[str]], names: list[str]) -> list[str]:
    """Token files back in batch order (chunks interleave the images)."""
    from pathlib import Path

    flat = [item for chunk in token_files for item in chunk if item]  # "": skipped image
    by_name = {Path(path).name.rsplit("_", 1)[0]: path for path in flat}
    return [by_name.get(name, "") for name in names]


def init_cg3d_wf(
    *,
    config_file: Path,
    analysis_level: str,
    selected: dict[str, list[dict[str, Any]]],
    cohort: dict[str, list[dict[str, Any]]],
    provenance: dict[str, Any],
    use_gpu: bool,
    n_token_chunks: int,
    base_dir: Path,
) -> pe.Workflow:
    """Build the workflow. ``selected``/``cohort``: image records (dicts) per modality."""
    wf = pe.Workflow(name="cg3d_wf", base_dir=str(base_dir))
    config = str(config_file)
    group_nodes = []
    for modality, records in selected.items():
        cohort_records = cohort[modality]
        prepare = pe.MapNode(
            PrepareImage(config_file=config), iterfield=["record"], name=f"prepare_{modality}",
        )
        prepare.inputs.record = [json.dumps(rec) for rec in prepare_order(cohort_records, records)]
        landmarks = pe.Node(
            ComputeLandmarks(config_file=config, modality=modality), name=f"landmarks_{modality}"
        )
        chunks = _chunks(records, 1 if use_gpu else n_token_chunks)
        tokenize = pe.MapNode(
            TokenizeImages(config_file=config, use_gpu=use_gpu), iterfield=["records"],
            name=f"tokenize_{modality}",
        )
        tokenize.inputs.records = [json.dumps(chunk) for chunk in chunks]
        wf.connect([
            (prepare, landmarks, [("out_file", "prep_files")]),
            (landmarks, tokenize, [("out_file", "landmarks_file")]),
        ])
        if analysis_level != "group":
            continue
        names = [rec["bids_name"] for rec in records]
        score = pe.Node(
            ScoreBatch(config_file=config, modality=modality, use_gpu=use_gpu), name=f"score_{modality}"
        )
        order = pe.Node(
            Function(input_names=["token_files", "names"], output_names=["ordered"], function=_order_tokens),
            name=f"order_{modality}",
        )
        order.inputs.names = names
        outputs = pe.MapNode(
            WriteImageOutputs(config_file=config, provenance=json.dumps(provenance)),
            iterfield=["record", "token_file"], name=f"outputs_{modality}",
        )
        outputs.inputs.record = [json.dumps(rec) for rec in records]
        group = pe.Node(
            WriteGroupOutputs(config_file=config, modality=modality, provenance=json.dumps(provenance),
                              records=json.dumps(records)),
            name=f"group_{modality}",
        )
        wf.connect([
            (tokenize, order, [("token_files", "token_files")]),
            (order, score, [("ordered", "token_files")]),
            (order, outputs, [("ordered", "token_file")]),
            (score, outputs, [("out_file", "score_file")]),
            (outputs, group, [("out_file", "result_files")]),
            (score, group, [("out_file", "score_file")]),
        ])
        group_nodes.append(group)
    if analysis_level == "group" and group_nodes:
        subjects = sorted({rec["subject"] for records in selected.values() for rec in records})
        reports = pe.MapNode(  # subject reports in parallel chunks (figures dominate the time)
            WriteSubjectReports(config_file=config, provenance=json.dumps(provenance)),
            iterfield=["subjects"], name="subject_reports",
        )
        reports.inputs.subjects = _chunks(subjects, n_token_chunks)
        merge = pe.Node(Merge(len(group_nodes)), name="merge_groups")
        for i, node in enumerate(group_nodes, 1):
            wf.connect(node, "out_file", merge, f"in{i}")
        wf.connect(merge, "out", reports, "group_files")
    for node_name in wf.list_node_names():
        node = wf.get_node(node_name)
        # Our stages keep their own content-keyed caches, and the run configuration (with its
        # run id) is an input of every node, so nipype's hashes never skip work of a new run.
        # MapNodes must not be forced: under MultiProc the master re-runs forced sub-nodes.
        node.overwrite = None if isinstance(node, pe.MapNode) else True
    return wf
