"""One clean console (:mod:`cg3d_bids.logging_setup`): cg3d's messages one line each on stderr,
nipype's chatter and tracebacks in the run's log file only, a data error printed once with the
file and the fix; and clear messages for paths that cannot be used."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from bids_fixtures import make_bids_dataset
from cg3d_bids import logging_setup
from cg3d_bids.cli.main import main
from test_e2e import FAST


@pytest.fixture
def logs(tmp_path, capsys):
    """Console logging as a cg3d command sets it up, plus a log file; restored afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    logging_setup.configure(0)
    handler = logging_setup.add_file(tmp_path / "cg3d.log")
    yield tmp_path / "cg3d.log"
    root.removeHandler(handler)
    handler.close()
    root.handlers[:], root.level = saved


def test_nipype_goes_to_the_log_file_only(logs, capsys):
    import nipype  # noqa: F401  (installs its stdout handler when first imported)

    logging.getLogger("nipype.workflow").info("[Node] Setting-up something")
    logging.getLogger("nipype.workflow").error("Node crashed\nTraceback (most recent call last): ...")
    logging.getLogger("cg3d").info("cg3d says hello")
    out, err = capsys.readouterr()
    assert out == "", "nothing on stdout"
    assert "nipype" not in err and "Setting-up" not in err
    assert err.count("cg3d says hello") == 1
    text = logs.read_text()
    assert "Setting-up something" in text and "Node crashed" in text and "cg3d says hello" in text


def test_one_line_per_event_and_tracebacks_in_the_file(logs, capsys):
    log = logging.getLogger("cg3d")
    try:
        raise ValueError("boom")
    except ValueError:
        log.error("writing failed:\n  file: x.nii.gz\n  fix: rerun", exc_info=True)
    log.error("only in the file", extra=logging_setup.FILE_ONLY)
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [err.strip()], err
    assert "writing failed: | file: x.nii.gz | fix: rerun" in err and "Traceback" not in err
    assert "only in the file" not in err
    text = logs.read_text()
    assert "Traceback" in text and "ValueError: boom" in text and "only in the file" in text


def test_output_folder_under_a_file(tmp_path, capsys):
    """Item 9: an output folder below a regular file: exit 73, no permissions advice."""
    make_bids_dataset(tmp_path / "bids", subjects=["01"], modalities=("T1w",))
    (tmp_path / "afile").write_text("x")
    status = main([str(tmp_path / "bids"), str(tmp_path / "afile" / "out"), "group", "-w",
                   str(tmp_path / "work"), *FAST])
    err = capsys.readouterr().err
    assert status == 73, err
    assert "is a file" in err and "not under a file" in err
    assert "permissions" not in err and "-u $(id -u)" not in err


@pytest.mark.slow
def test_data_error_is_one_clear_message(tmp_path):
    """A corrupt image: the message, the file and the fix once on stderr, nothing on stdout, no
    nipype lines or traceback on the console; the traceback is in the run's log file."""
    paths = make_bids_dataset(tmp_path / "bids", subjects=["01", "02", "03", "04", "05"], modalities=("T1w",),
                              seed=12)
    bad = tmp_path / "bids" / "sub-03" / "anat" / "sub-03_T1w.nii.gz"
    bad.write_bytes(b"not a nifti")
    cmd = [sys.executable, "-m", "cg3d_bids", str(tmp_path / "bids"), str(tmp_path / "out"), "group", "-w",
           str(tmp_path / "work"), *FAST, "--nprocs", "2", "--modality", "T1w", "-d", f"masks={paths['masks_dir']}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 65, proc.stderr
    assert proc.stdout == ""
    err = proc.stderr
    assert "nipype" not in err and "Traceback" not in err and "Node " not in err, err
    assert err.count("cannot read the image") == 1 and err.count(f"file: {bad}") == 1
    assert err.count("fix:") == 1 and "--skip-bad-images" in err
    (log,) = (tmp_path / "work" / "runs").glob("*/cg3d.log")
    text = log.read_text()
    assert "Traceback" in text and "nipype.workflow" in text
