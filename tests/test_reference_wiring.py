"""How saved reference cohorts plug into the app: settings, graphs, the command line and the demo."""

from __future__ import annotations

import pytest

from cg3d_bids.cli.demo import HEALTHY, REFERENCE_FRACTION
from cg3d_bids.cli.parser import COMMANDS, build_parser
from cg3d_bids.cli.reference import check_reference_options
from cg3d_bids.core.scoring import musc_k
from cg3d_bids.core.scoring.reference import reference_k
from cg3d_bids.errors import BatchTooSmallError, UsageError
from cg3d_bids.settings import Affects, Settings
from cg3d_bids.workflows.base import init_cg3d_wf
from cg3d_bids.workflows.reference import connect_save_reference, init_reference_wf


def test_new_settings_round_trip_and_name_the_bank_in_the_provenance(tmp_path):
    base = Settings().replace(inputs={"analysis_level": "participant", "reference": tmp_path / "bank"},
                              run={"reference_checksum": "sha256:ab", "reference_sizes": {"T1w": 7}})
    assert Settings.from_toml(base.to_toml()) == base
    prov = base.provenance()
    assert (prov["reference_bank"], prov["reference_checksum"], prov["reference_images"]) == (
        str(tmp_path / "bank"), "sha256:ab", {"T1w": 7})
    assert "reference_bank" not in Settings().provenance()  # runs without a bank are unchanged
    saving = Settings().replace(execution={"save_reference": tmp_path / "bank"})
    assert Settings.from_toml(saving.to_toml()) == saving
    for level in (Affects.CUBE, Affects.TOKENS, Affects.SCORES, Affects.OUTPUTS):  # saving changes no result
        assert saving.key(level) == Settings().key(level)


def test_the_options_and_the_subcommand_are_declared(tmp_path):
    bids = str(tmp_path)
    args = build_parser().parse_args([bids, "o", "participant", "--reference", "bank"])
    assert args.reference.name == "bank" and args.reference.is_absolute()
    args = build_parser().parse_args([bids, "o", "group", "--save-reference", "bank"])
    assert args.save_reference.name == "bank"
    assert "reference" in COMMANDS


@pytest.mark.parametrize(("level", "section", "key", "message"), [
    ("group", "inputs", "reference", "participant-level"),
    ("participant", "execution", "save_reference", "group-level"),
])
def test_options_at_the_wrong_level(tmp_path, level, section, key, message):
    settings = Settings().replace(inputs={"analysis_level": level, "bids_dir": tmp_path})
    settings = settings.replace(**{section: {key: tmp_path / "bank"}})
    with pytest.raises(UsageError, match=message):
        check_reference_options(settings)


def _files(tmp_path):
    settings = tmp_path / "settings.toml"
    settings.write_text("")
    files = {}
    for name in "abcdef":
        files[name] = tmp_path / f"sub-{name}_T1w.json"
        files[name].write_text("{}")
    return settings, files


def test_reference_graph_scores_against_the_bank_without_a_cohort(tmp_path):
    settings, files = _files(tmp_path)
    selected = {"T1w": [("sub-d_T1w", files["d"])]}
    wf = init_reference_wf(settings_file=settings, selected=selected, subjects=["d"], use_gpu=False, n_chunks=2,
                           base_dir=tmp_path / "nipype")
    names = wf.list_node_names()
    for node in ("prepare_T1w", "reference_landmarks_T1w", "reference_tokenize_T1w", "reference_score_T1w",
                 "outputs_T1w", "reference_group_T1w", "subject_reports"):
        assert node in names, node
    assert not any(name in names for name in ("landmarks_T1w", "score_T1w", "group_T1w"))
    assert [p.rsplit("/", 1)[1] for p in wf.get_node("prepare_T1w").inputs.image] == ["sub-d_T1w.json"]
    edges = {(u.name, v.name) for u, v in wf._graph.edges()}
    assert ("reference_landmarks_T1w", "reference_tokenize_T1w") in edges
    assert ("reference_score_T1w", "outputs_T1w") in edges and ("outputs_T1w", "reference_group_T1w") in edges


def test_save_reference_follows_the_group_stage(tmp_path):
    settings, files = _files(tmp_path)
    cohort = {"T1w": [(f"sub-{n}_T1w", files[n]) for n in "abcdef"]}
    wf = init_cg3d_wf(settings_file=settings, analysis_level="group", selected=cohort, cohort=cohort,
                      subjects=list("abcdef"), use_gpu=False, n_chunks=1, base_dir=tmp_path / "nipype")
    connect_save_reference(wf, settings, ["T1w"])
    edges = {(u.name, v.name) for u, v in wf._graph.edges()}
    for source in ("tokenize_T1w", "landmarks_T1w", "score_T1w", "group_T1w"):
        assert (source, "save_reference_T1w") in edges
    participant = init_cg3d_wf(settings_file=settings, analysis_level="participant", selected=cohort, cohort=cohort,
                               subjects=["a"], use_gpu=False, n_chunks=1, base_dir=tmp_path / "n2")
    with pytest.raises(RuntimeError, match="no score, group node"):
        connect_save_reference(participant, settings, ["T1w"])
    with pytest.raises(UsageError, match="splits T1w into 2 batches"):  # a bank is one MuSc batch
        connect_save_reference(wf, settings, ["T1w"], {"T1w": [(1, ["sub-a_T1w"]), (2, ["sub-b_T1w"])]})


def test_the_demo_bank_is_large_enough_only_with_its_documented_fraction():
    """Three healthy subjects: K = 0 at the default 0.3 (refused), K = 1 at the demo's 0.5."""
    fraction = float(REFERENCE_FRACTION)
    assert len(HEALTHY) == 3 and musc_k(len(HEALTHY), fraction) == 1 and reference_k(len(HEALTHY), fraction) == 1
    with pytest.raises(BatchTooSmallError):
        reference_k(len(HEALTHY), 0.3)
