"""The nipype graph: which nodes a level builds and in which order the cohort is prepared."""

from __future__ import annotations

import json

import pytest

from cg3d_bids.workflows.base import init_cg3d_wf, prepare_order


def _records(names):
    return [{"bids_name": f"sub-{n}_T1w", "subject": n, "modality": "T1w"} for n in names]


def _names(records):
    return [rec["subject"] for rec in records]


@pytest.mark.parametrize("selected, expected", [
    (["c"], ["c", "d", "e", "f", "a", "b"]),
    (["e", "b"], ["b", "e", "c", "d", "f", "a"]),
    ([], ["a", "b", "c", "d", "e", "f"]),
    (["a", "b", "c", "d", "e", "f"], ["a", "b", "c", "d", "e", "f"]),
])
def test_prepare_order_starts_with_the_selected_images_then_walks_on(selected, expected):
    cohort = _records("abcdef")
    order = prepare_order(cohort, _records(selected))
    assert _names(order) == expected
    assert sorted(_names(order)) == sorted(_names(cohort))


def test_concurrent_participant_calls_start_at_different_images():
    cohort = _records("abcdefgh")
    firsts = {_names(prepare_order(cohort, _records(sub)))[0] for sub in "abcdefgh"}
    assert firsts == set("abcdefgh")


def _build(tmp_path, level):
    config = tmp_path / "config.json"
    config.write_text("{}")
    cohort = _records("abcdef")
    return init_cg3d_wf(config_file=config, analysis_level=level, selected={"T1w": _records("d")},
                        cohort={"T1w": cohort}, provenance={}, use_gpu=False, n_token_chunks=2,
                        base_dir=tmp_path / "nipype")


def test_participant_graph_prepares_in_that_order_and_stops_at_tokens(tmp_path):
    wf = _build(tmp_path, "participant")
    prepare = wf.get_node("prepare_T1w")
    assert [json.loads(r)["subject"] for r in prepare.inputs.record] == ["d", "e", "f", "a", "b", "c"]
    assert not any(name.startswith(("score_", "outputs_", "group_", "subject_reports"))
                   for name in wf.list_node_names())


def test_group_graph_has_scoring_outputs_and_reports(tmp_path):
    names = _build(tmp_path, "group").list_node_names()
    for node in ("prepare_T1w", "landmarks_T1w", "tokenize_T1w", "score_T1w", "outputs_T1w",
                 "group_T1w", "subject_reports"):
        assert node in names, node
