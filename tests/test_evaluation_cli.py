"""``cg3d evaluate`` command line: help text and usage errors (cg3d_bids.cli.evaluate)."""

from __future__ import annotations

import re

import pytest

from cg3d_bids.cli import evaluate as ev
from cg3d_bids.errors import EXIT_USAGE

#: every option with a real default, and the default the help must show (once)
REAL_DEFAULTS = {
    "--gt-pattern": "label-lesion_mask",
    "--n-bins": "10000",
    "--size-edges": "100 1000",
    "--voxel-weighting": "volume",
    "--lock-wait": "0.0",
}


def _option_blocks(help_text: str) -> dict[str, str]:
    """``{first option string: its help block, whitespace normalised}`` of an argparse help text."""
    blocks: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        match = re.match(r"^  (-{1,2}[\w-]+)", line)
        if match:
            current = match.group(1)
            blocks[current] = line
        elif current and line.startswith("      "):
            blocks[current] += " " + line
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in blocks.items()}


@pytest.fixture(name="blocks")
def _blocks(monkeypatch) -> dict[str, str]:
    monkeypatch.setenv("COLUMNS", "100")
    return _option_blocks(ev.build_parser().format_help())


def test_help_shows_each_real_default_once(blocks):
    text = " ".join(blocks.values())
    for option, default in REAL_DEFAULTS.items():
        assert f"(default: {default})" in blocks[option], option
        assert text.count(f"(default: {default})") == 1, option


def test_help_shows_no_bogus_default(blocks):
    text = " ".join(blocks.values())
    for bogus in ("(default: None)", "(default: True)", "(default: False)", "(default: 0)", "(default: [",
                  "(default: SUPPRESS", "(default: ==SUPPRESS=="):
        assert bogus not in text, bogus
    assert "default" not in blocks["--ground-truth"] and "required" in blocks["--ground-truth"]
    for flag in ("--no-report", "--healthy-without-mask", "--verbose", "-v", "--help", "-h"):
        if flag in blocks:
            assert "(default:" not in blocks[flag], flag
    # each option that states a default states exactly one
    assert all(block.count("default") <= 1 for block in blocks.values())
    assert set(REAL_DEFAULTS) <= set(blocks)


def test_help_lists_weighting_choices_matching_rule_and_exit_codes(capsys):
    with pytest.raises(SystemExit) as exc:
        ev.main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--voxel-weighting {volume,count}" in text
    assert "Matching rule: sub and ses equal" in text and "Exit codes: 0 ok, 18" in text


@pytest.mark.parametrize("args, message", [
    (["--n-bins", "1"], "--n-bins must be >= 2"),
    (["--size-edges", "1000", "100"], "--size-edges must be positive and increasing"),
    (["--size-edges", "-5"], "--size-edges must be positive and increasing"),
    (["--voxel-weighting", "area"], "invalid choice: 'area'"),
    (["--lock-wait", "-1"], "'-1' must be >= 0"),
    ([], "the following arguments are required: --ground-truth"),
])
def test_usage_errors_exit_64_with_a_message(tmp_path, capsys, args, message):
    argv = [str(tmp_path), *args] + ([] if not args else ["--ground-truth", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        ev.main(argv)
    assert exc.value.code == EXIT_USAGE == 64
    assert message in capsys.readouterr().err


def test_settings_from_args_carries_every_option(tmp_path):
    args = ev.build_parser().parse_args([
        str(tmp_path), "--ground-truth", str(tmp_path), "--gt-pattern", "desc-lesion_mask",
        "--healthy-without-mask", "-m", "T2w", "FLAIR", "--participant-label", "01", "--n-bins", "100",
        "--size-edges", "50", "500", "--voxel-weighting", "count", "--eval-dir", str(tmp_path / "e"),
        "--no-report"])
    settings = ev.settings_from_args(args)
    assert (settings.gt_pattern, settings.healthy_without_mask, settings.modalities) == (
        "desc-lesion_mask", True, ("T2w", "FLAIR"))
    assert (settings.participants, settings.n_bins, settings.size_edges) == (("01",), 100, (50.0, 500.0))
    assert (settings.voxel_weighting, settings.update_report, settings.eval_dir) == (
        "count", False, tmp_path / "e")
    defaults = ev.settings_from_args(ev.build_parser().parse_args([str(tmp_path), "--ground-truth", "x"]))
    assert defaults == ev.EvaluationSettings()  # the command's defaults are the module's


@pytest.mark.parametrize("eval_dir", [False, True])
def test_a_busy_output_folder_stops_the_evaluation_with_exit_75(tmp_path, capsys, eval_dir):
    """A cg3d run writing OUTPUT_DIR holds its lock: evaluate neither writes there nor reads half a run."""
    from cg3d_bids.errors import EXIT_TEMPFAIL
    from cg3d_bids.locks import EXCLUSIVE, SHARED, FolderLock

    out = tmp_path / "out"
    out.mkdir()
    extra = ["--eval-dir", str(tmp_path / "eval")] if eval_dir else []
    with FolderLock(out, EXCLUSIVE, label="output folder"):
        code = ev.main([str(out), "--ground-truth", str(tmp_path), *extra])
    assert code == EXIT_TEMPFAIL == 75
    err = capsys.readouterr().err
    assert "output folder" in err and str(out) in err and "--lock-wait" in err
    assert not (out / "eval_T1w.tsv").exists() and not (tmp_path / "eval").exists()
    # a reader (--eval-dir) shares the folder with other readers; a writer does not
    with FolderLock(out, SHARED, label="output folder"):
        code = ev.main([str(out), "--ground-truth", str(tmp_path), *extra])
    assert (code == EXIT_TEMPFAIL) != eval_dir


def test_a_read_only_output_folder_is_evaluated_without_a_lock(tmp_path, monkeypatch):
    """An archived (read-only) run folder is read without taking (creating) a lock there."""
    import cg3d_bids.locks as locks

    out = tmp_path / "out"
    out.mkdir()
    taken = []
    monkeypatch.setattr(locks, "FolderLock", lambda *a, **k: taken.append(a) or pytest.fail("locked"))
    monkeypatch.setattr("os.access", lambda path, mode: False)
    code = ev.main([str(out), "--ground-truth", str(tmp_path), "--eval-dir", str(tmp_path / "eval")])
    assert code != 75 and taken == []
    monkeypatch.setattr("os.access", lambda path, mode: True)  # a writable one is locked
    with pytest.raises(pytest.fail.Exception, match="locked"):
        ev.main([str(out), "--ground-truth", str(tmp_path), "--eval-dir", str(tmp_path / "eval")])
    assert len(taken) == 1
