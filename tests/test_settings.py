"""The one settings object: TOML codec, cache keys, provenance, and that every generated view agrees."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from cg3d_bids.boutiques import build_descriptor
from cg3d_bids.cli.parser import build_parser, default_text
from cg3d_bids.settings import Affects, Settings, iter_options


def _custom(tmp_path: Path) -> Settings:
    return Settings().replace(
        inputs={"bids_dir": tmp_path / "bids", "output_dir": tmp_path / "out", "analysis_level": "participant",
                "participant_label": ("01", "02"), "modality": ("T2w",), "derivatives": {"masks": tmp_path / "m"},
                "bids_filters": {"t2w": {"acquisition": None, "run": "*"}}},
        method={"encoder": "test-tiny-vit", "cube_size": 112, "layers": (1, 3), "fraction": 0.25,
                "codegraph": False, "codegraph_pvalue": 0.01, "threshold": 0.7},
        execution={"device": "cpu", "work_dir": tmp_path / "w", "mem_gb": 16.0, "nprocs": 3},
        run={"run_id": "r1", "weights_sha256": None, "precision": "fp32", "layers": (1, 3), "is_test_encoder": True},
    )


def test_toml_round_trip_keeps_types(tmp_path):
    settings = _custom(tmp_path)
    back = Settings.from_toml(settings.to_toml())
    assert back == settings
    assert isinstance(back.inputs.bids_dir, Path) and isinstance(back.inputs.derivatives["masks"], Path)
    assert back.inputs.participant_label == ("01", "02") and back.method.layers == (1, 3)
    assert back.inputs.bids_filters == {"t2w": {"acquisition": None, "run": "*"}}  # null = entity absent
    assert "weights_sha256" not in settings.to_toml()  # None is left out (TOML has no null)
    assert Settings.from_toml("") == Settings()


def test_unknown_keys_are_refused():
    with pytest.raises(ValueError, match="not_a_setting"):
        Settings.from_dict({"method": {"not_a_setting": 1}})
    with pytest.raises(ValueError, match="nonsense"):
        Settings.from_dict({"nonsense": {}})


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().method.cube_size = 3  # type: ignore[misc]


def test_cache_keys_follow_what_each_setting_changes(tmp_path):
    base = _custom(tmp_path)

    def keys(s: Settings) -> dict[Affects, str]:
        return {level: s.key(level) for level in (Affects.CUBE, Affects.TOKENS, Affects.SCORES, Affects.OUTPUTS)}

    before = keys(base)
    # execution settings change nothing
    assert keys(base.replace(execution={"nprocs": 1, "slice_batch": 7, "device": "cuda"})) == before
    # a cube setting changes every level
    after = keys(base.replace(method={"fov_mm": 150.0}))
    assert all(after[level] != before[level] for level in before)
    # a score setting leaves the cube and token keys alone
    after = keys(base.replace(method={"fraction": 0.5}))
    assert after[Affects.TOKENS] == before[Affects.TOKENS] and after[Affects.SCORES] != before[Affects.SCORES]
    # the threshold only changes outputs
    after = keys(base.replace(method={"threshold": 0.6}))
    assert after[Affects.SCORES] == before[Affects.SCORES] and after[Affects.OUTPUTS] != before[Affects.OUTPUTS]
    # tokens follow the EFFECTIVE precision, layers and weights (resolved once), not the raw option
    assert base.replace(execution={"precision": "bf16"}).key(Affects.TOKENS) == before[Affects.TOKENS]
    assert base.replace(run={"precision": "bf16"}).key(Affects.TOKENS) != before[Affects.TOKENS]
    assert base.replace(run={"weights_sha256": "ab" * 32}).key(Affects.TOKENS) != before[Affects.TOKENS]
    assert base.replace(run={"layers": (1, 2)}).key(Affects.TOKENS) != before[Affects.TOKENS]


def test_provenance_records_effective_values(tmp_path):
    settings = _custom(tmp_path).replace(method={"codegraph": True, "codegraph_pvalue": None})
    prov = settings.provenance()
    assert prov["codegraph_pvalue"] == 1e-3 and prov["codegraph_resolution"] == 0.5  # CodeGraphSettings defaults
    assert prov["layers"] == [1, 3] and prov["precision"] == "fp32" and prov["is_test_encoder"] is True
    assert prov["seed"] == 0 and prov["config_hash"] == settings.key(Affects.OUTPUTS)
    json.dumps(prov)
    off = settings.replace(method={"codegraph": False}).provenance()
    assert off["codegraph"] is False and off["codegraph_pvalue"] is None


def test_codegraph_settings_follow_the_method(tmp_path):
    settings = _custom(tmp_path).replace(method={"codegraph": True, "codegraph_resolution": 0.2, "random_seed": 5})
    cg = settings.codegraph_settings
    assert cg.pvalue == 0.01 and cg.resolution == 0.2 and cg.seed == 5
    assert settings.replace(method={"codegraph": False}).codegraph_settings is None


# ------------------------------------------------------------------------------------------------
# the parser, README table and Boutiques descriptor are generated from the same declarations
def _actions() -> dict[str, argparse.Action]:
    return {action.dest: action for action in build_parser()._actions}


def test_parser_defaults_and_flags_are_the_settings():
    actions = _actions()
    for _section, spec in iter_options():
        action = actions[spec.name]
        if spec.option.kind == "positional":
            assert not action.option_strings
            continue
        assert tuple(action.option_strings) == spec.option.flags, spec.name
        default = list(spec.default) if isinstance(spec.default, tuple) else spec.default
        if spec.option.kind == "no-flag":
            assert action.default is True and spec.default is True
        else:
            assert action.default == default, spec.name
        if spec.option.choices:
            assert list(action.choices) == list(spec.option.choices)


def test_descriptor_inputs_are_the_settings():
    by_id = {item["id"]: item for item in build_descriptor()["inputs"]}
    for _section, spec in iter_options():
        item = by_id[spec.option.bosh_id]
        if spec.option.kind != "positional":
            assert item["command-line-flag"] in spec.option.flags
            assert (item["type"] == "Flag") == (spec.option.kind in ("flag", "no-flag", "count")), spec.name
        if spec.option.choices:
            assert item["value-choices"] == list(spec.option.choices)


def test_readme_table_shows_real_defaults():
    from importlib.util import module_from_spec, spec_from_file_location

    path = Path(__file__).resolve().parents[1] / "scripts" / "options_table.py"
    spec = spec_from_file_location("options_table", path)
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.options_table()
    assert "| `--random-seed`, `--seed` | 0 |" in table           # a zero is a default
    assert "| `--no-codegraph` | off (the stage runs) |" in table   # the flag is off: CoDeGraph runs
    assert "| `--cube-size` | 224 |" in table and "| `--modality`, `--modalities`, `-m` | T1w T2w |" in table
    assert default_text(["T1w", "T2w"]) == "T1w T2w"
