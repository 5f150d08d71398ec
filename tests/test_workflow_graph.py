"""The nipype graph: which nodes a level builds, what they are given, and the cohort's prepare order."""

from __future__ import annotations

import pytest

from cg3d_bids.workflows.base import chunks, init_cg3d_wf, prepare_order


@pytest.mark.parametrize("selected, expected", [
    ("c", "cdefab"),
    ("eb", "becdfa"),
    ("", "abcdef"),
    ("abcdef", "abcdef"),
])
def test_prepare_order_starts_with_the_selected_images_then_walks_on(selected, expected):
    order = prepare_order(list("abcdef"), list(selected))
    assert order == list(expected)
    assert sorted(order) == list("abcdef")


def test_concurrent_participant_calls_start_at_different_images():
    firsts = {prepare_order(list("abcdefgh"), [name])[0] for name in "abcdefgh"}
    assert firsts == set("abcdefgh")


def test_chunks_deal_round_robin_and_never_empty():
    assert chunks(list("abcde"), 2) == [["a", "c", "e"], ["b", "d"]]
    assert chunks(list("ab"), 8) == [["a"], ["b"]]
    assert chunks([], 3) == [[]]


def _build(tmp_path, level, use_gpu=False):
    settings = tmp_path / "settings.toml"
    settings.write_text("")
    files = {}
    for name in "abcdef":
        files[name] = tmp_path / f"sub-{name}_T1w.json"
        files[name].write_text("{}")
    cohort = {"T1w": [(f"sub-{n}_T1w", files[n]) for n in "abcdef"]}
    selected = {"T1w": [("sub-d_T1w", files["d"])]}
    return init_cg3d_wf(settings_file=settings, analysis_level=level, selected=selected, cohort=cohort,
                        subjects=["d"], use_gpu=use_gpu, n_chunks=2, base_dir=tmp_path / "nipype")


def test_participant_graph_prepares_in_that_order_and_stops_at_tokens(tmp_path):
    wf = _build(tmp_path, "participant")
    prepare = wf.get_node("prepare_T1w")
    assert [p.rsplit("/", 1)[1] for p in prepare.inputs.image] == [f"sub-{n}_T1w.json" for n in "defabc"]
    assert not any(name.startswith(("score_", "outputs_", "group_", "subject_reports"))
                   for name in wf.list_node_names())
    assert wf.get_node("select_T1w").inputs.names == ["sub-d_T1w"]


def test_group_graph_has_scoring_outputs_and_reports(tmp_path):
    wf = _build(tmp_path, "group")
    names = wf.list_node_names()
    for node in ("prepare_T1w", "landmarks_T1w", "tokenize_T1w", "score_T1w", "outputs_T1w",
                 "group_T1w", "subject_reports"):
        assert node in names, node
    assert wf.get_node("score_T1w").inputs.order == [["sub-d_T1w"]] and wf.get_node("score_T1w").inputs.batch == [1]
    assert wf.get_node("subject_reports").inputs.subjects == [["d"]]


def test_gpu_runs_one_tokenize_chunk_in_a_gpu_slot(tmp_path):
    wf = _build(tmp_path, "group", use_gpu=True)
    assert wf.get_node("select_T1w").inputs.n_chunks == 1
    assert wf.get_node("tokenize_T1w").inputs.use_gpu is True and wf.get_node("score_T1w").inputs.use_gpu is True


def test_cpu_scoring_batches_run_alone_on_every_thread(tmp_path):
    settings = tmp_path / "settings.toml"
    settings.write_text("")
    record = tmp_path / "sub-a_T1w.json"
    record.write_text("{}")
    images = {"T1w": [("sub-a_T1w", record)]}
    kwargs = dict(settings_file=settings, analysis_level="group", selected=images, cohort=images,
                  subjects=["a"], n_chunks=4, base_dir=tmp_path / "nipype", score_threads=6)
    score = init_cg3d_wf(use_gpu=False, **kwargs).get_node("score_T1w")
    assert score.n_procs == 4 and score.inputs.threads == 6
    score = init_cg3d_wf(use_gpu=True, **kwargs).get_node("score_T1w")
    assert score.n_procs == 1 and score.inputs.threads == 0  # one GPU slot; threads as the process


def test_node_threads_are_restored_after_the_node(monkeypatch):
    import os

    import torch

    from cg3d_bids.interfaces.stage import _threads
    from cg3d_bids.stages.context import limit_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    with _threads(2):
        limit_threads()
        assert torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "2"
    assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    with _threads(0):
        assert os.environ["OMP_NUM_THREADS"] == "1"
