"""Command-line behaviour that needs no pipeline run: exit codes, help, path and device checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cg3d_bids import __version__
from cg3d_bids.cli.parser import build_parser, parse_args
from cg3d_bids.cli.main import main


def _bids(tmp_path: Path) -> Path:
    root = tmp_path / "bids"
    (root / "sub-01" / "anat").mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.10.0"}))
    return root


def test_help_states_defaults_and_sources(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for needle in ("default: 224", "default: 0.3", "default: 128", "[paper", "[MuSc code", "--device",
                   "Performance", "Selecting the data"):
        assert needle in text, needle
    flat = " ".join(text.split())
    for noise in ("(default: None)", "(default: False)", "(default: True)", "(default: {})"):
        assert noise not in flat, noise  # nothing unset, no flag values
    assert "[method.md] (default: 0)" in flat  # a zero default is still a default


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_nipype_does_not_call_home(monkeypatch):
    """No etelemetry request from nipype's first interface (offline nodes would stall on it)."""
    import os

    from nipype.interfaces.base import BaseInterface

    monkeypatch.delenv("NIPYPE_NO_ET", raising=False)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert os.environ["NIPYPE_NO_ET"] == "1"
    calls = []
    monkeypatch.setattr(BaseInterface, "_etelemetry_version_data", None)
    monkeypatch.setattr("nipype.check_latest_version", lambda *a, **k: calls.append(1))
    from cg3d_bids.interfaces.stage import PrepareImage

    PrepareImage()
    assert calls == []


def test_console_exits_with_mains_status_and_freezes_the_collector(monkeypatch):
    """The ``cg3d`` program (``console``) exits with ``main``'s status, the collector frozen so that
    the interpreter's teardown does not walk every imported object."""
    import gc

    from cg3d_bids.cli import main as cli_main

    monkeypatch.setattr(cli_main, "main", lambda: 3)
    gc.unfreeze()
    try:
        with pytest.raises(SystemExit) as exc:
            cli_main.console()
        assert exc.value.code == 3
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_collector_paused_restores_the_collectors_state():
    import gc

    from cg3d_bids.cli.run import collector_paused

    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with collector_paused():
            assert not gc.isenabled()
            raise RuntimeError("an import failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()   # was off before: stays off
    finally:
        gc.enable()


def test_unknown_level_exits_17(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args([str(_bids(tmp_path)), str(tmp_path / "out"), "session"])
    assert exc.value.code == 17
    assert "unknown analysis level" in capsys.readouterr().err


@pytest.mark.parametrize("argv_tail", [["--nope"], ["--fraction", "2"], ["--cube-size", "100"],
                                       ["--device", "tpu"], ["--participant-label", "s_1"]])
def test_usage_errors_exit_64(tmp_path, argv_tail):
    with pytest.raises(SystemExit) as exc:
        parse_args([str(_bids(tmp_path)), str(tmp_path / "out"), "group", *argv_tail])
    assert exc.value.code == 64


def test_missing_bids_dir_exits_64(tmp_path):
    with pytest.raises(SystemExit) as exc:
        parse_args([str(tmp_path / "nope"), str(tmp_path / "out"), "group"])
    assert exc.value.code == 64


def test_labels_are_normalised(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("sub-03\n02\n")
    args = parse_args([str(_bids(tmp_path)), str(tmp_path / "out"), "participant",
                       "--participant-label", "sub-01", str(labels), "--session-label", "ses-a"])
    assert args.participant_label == ["01", "02", "03"]
    assert args.session_label == ["a"]


def test_removeprefix_not_lstrip(tmp_path):
    args = parse_args([str(_bids(tmp_path)), str(tmp_path / "out"), "group", "--participant-label", "s060"])
    assert args.participant_label == ["s060"]


def test_derivatives_name_path(tmp_path):
    args = parse_args([str(_bids(tmp_path)), str(tmp_path / "out"), "group",
                       "-d", f"masks={tmp_path}", str(tmp_path / "smriprep")])
    assert set(args.derivatives) == {"masks", "smriprep"}


def test_output_equal_to_input_is_refused(tmp_path, capsys):
    bids = _bids(tmp_path)
    assert main([str(bids), str(bids), "group", "--device", "cpu"]) == 64
    assert "same as the input BIDS folder" in capsys.readouterr().err


def test_output_inside_input_is_refused_but_derivatives_allowed(tmp_path, capsys):
    bids = _bids(tmp_path)
    assert main([str(bids), str(bids / "sub-01" / "out"), "group", "--device", "cpu",
                 "-w", str(tmp_path / "w")]) == 64
    assert "inside the input BIDS dataset" in capsys.readouterr().err
    assert not (bids / "sub-01" / "out").exists()


def test_work_dir_inside_input_is_refused(tmp_path, capsys):
    bids = _bids(tmp_path)
    assert main([str(bids), str(tmp_path / "out"), "group", "--device", "cpu", "-w", str(bids / "work")]) == 64
    assert "working directory" in capsys.readouterr().err


def test_unwritable_output_exits_73(tmp_path, capsys):
    bids = _bids(tmp_path)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert main([str(bids), str(blocker / "out"), "group", "--device", "cpu", "-w", str(tmp_path / "w")]) == 73
    err = capsys.readouterr().err
    assert "afile" in err and "fix:" in err
    # /proc refuses new files even for root: a real write test, not a permission-bit guess
    assert main([str(bids), "/proc/cg3d-out", "group", "--device", "cpu", "-w", str(tmp_path / "w")]) == 73


def test_cuda_without_gpu_exits_69(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here; this test checks the message without one")
    assert main([str(_bids(tmp_path)), str(tmp_path / "out"), "group", "-w", str(tmp_path / "w")]) == 69
    err = capsys.readouterr().err
    assert "--gpus all" in err and "--nv" in err and "--device cpu" in err
    assert not (tmp_path / "out").exists()


def test_bids_exec_spec_prints_descriptor(tmp_path, capsys):
    assert main([str(_bids(tmp_path)), str(tmp_path / "out"), "group", "--bids-exec-spec"]) == 0
    descriptor = json.loads(capsys.readouterr().out)
    assert descriptor["tool-version"] == __version__


def test_bids_exec_spec_needs_no_positionals(capsys):
    assert main(["--bids-exec-spec"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "cg3d"


@pytest.mark.slow
def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "cg3d_bids", "--version"], capture_output=True, text=True)
    assert result.returncode == 0
    assert __version__ in result.stdout


def test_parser_has_every_documented_alias():
    options = {opt for action in build_parser()._actions for opt in action.option_strings}
    for alias in ("--participant_label", "--session-id", "--skip_bids_validator", "--n_cpus", "--mem_mb",
                  "--bids-filter-file", "--use-plugin", "--config-file", "-w", "--nprocs", "--mem"):
        assert alias in options, alias


@pytest.mark.parametrize("flag, expected", [([], False), (["--reset-bids-db"], True)])
def test_reset_bids_db_reaches_discovery(tmp_path, monkeypatch, flag, expected):
    import cg3d_bids.bids.discovery as discovery

    seen = {}

    def fake_discover(bids_dir, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt  # stop before any work; main() turns this into exit 130

    monkeypatch.setattr(discovery, "discover_images", fake_discover)
    status = main([str(_bids(tmp_path)), str(tmp_path / "out"), "group", "--device", "cpu",
                   "--encoder", "test-tiny-vit", "--skip-bids-validation", "-w", str(tmp_path / "w"), *flag])
    assert status == 130
    assert seen["reset_database"] is expected


def test_config_file_restores_settings_and_the_command_line_wins(tmp_path):
    from cg3d_bids.cli.parser import settings_from_args
    from cg3d_bids.settings import Settings

    bids = _bids(tmp_path)
    saved = Settings().replace(
        inputs={"bids_dir": bids, "output_dir": tmp_path / "o", "modality": ("T2w",)},
        method={"fraction": 0.2, "random_seed": 11, "cube_size": 112, "threshold": 0.7},
        execution={"work_dir": tmp_path / "w"}, run={"run_id": "old-run", "weights_sha256": "ab" * 32},
    )
    toml = tmp_path / "config-x.toml"
    toml.write_text(saved.to_toml())
    argv = [str(bids), str(tmp_path / "out"), "group", "--config-file", str(toml), "--random-seed", "3"]
    settings = settings_from_args(parse_args(argv), argv)
    method = settings.method
    assert (method.fraction, method.cube_size, settings.inputs.modality, method.threshold) == (0.2, 112, ("T2w",), 0.7)
    assert method.random_seed == 3  # given on the command line
    assert settings.inputs.output_dir == (tmp_path / "out").absolute()  # positionals never come from the file
    assert settings.execution.work_dir == tmp_path / "w"
    assert settings.run.run_id == "" and settings.run.weights_sha256 is None  # run facts never come from it


def test_a_broken_config_file_is_a_usage_error(tmp_path, capsys):
    toml = tmp_path / "config.toml"
    toml.write_text("[method]\nnot_a_setting = 1\n")
    status = main([str(_bids(tmp_path)), str(tmp_path / "out"), "group", "--config-file", str(toml)])
    err = capsys.readouterr().err
    assert status == 64 and "not_a_setting" in err and "config.toml" in err, err


@pytest.mark.parametrize("text, needle", [
    ("plugin: [unclosed", "not valid YAML"),
    ("- a list", "mapping"),
    ("plugin: Nonsense", "unknown nipype plugin"),
])
@pytest.mark.slow
def test_bad_plugin_file_is_a_usage_error_before_any_work(tmp_path, capsys, text, needle):
    plugin = tmp_path / "plugin.yml"
    plugin.write_text(text)
    status = main([str(_bids(tmp_path)), str(tmp_path / "out"), "group", "--device", "cpu",
                   "--use-plugin", str(plugin), "-w", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert status == 64 and needle in err and "plugin.yml" in err, err


def test_plugin_file_is_read(tmp_path):
    from cg3d_bids.cli.run import read_plugin_file

    path = tmp_path / "plugin.yml"
    path.write_text("plugin: SLURM\nplugin_args: {sbatch_args: '-p gpu', max_jobs: 5}\n")
    assert read_plugin_file(path) == ("SLURM", {"sbatch_args": "-p gpu", "max_jobs": 5})


def test_label_files_with_comments(tmp_path):
    """A label file may hold '#' comments (as discovery documents); the parser uses the same reader."""
    labels = tmp_path / "labels.txt"
    labels.write_text("# subjects of batch 1\nsub-03  # the patient\n\n02\n")
    args = parse_args([str(_bids(tmp_path)), str(tmp_path / "out"), "participant", "--participant-label", str(labels)])
    assert args.participant_label == ["02", "03"]


def test_encoder_typo_fails_at_parse_time(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args([str(_bids(tmp_path)), str(tmp_path / "out"), "group", "--encoder", "dinov2_vitl"])
    assert exc.value.code == 64
    err = capsys.readouterr().err
    assert "invalid choice: 'dinov2_vitl'" in err and "dinov2_vitl14" in err


def test_subcommands_are_listed_and_have_their_own_help(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for command in ("cg3d demo", "cg3d evaluate", "cg3d slurm-script"):
        assert command in text, command
    for command in ("demo", "evaluate", "slurm-script"):
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        assert f"usage: cg3d {command}" in capsys.readouterr().out
