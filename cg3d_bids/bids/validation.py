"""BIDS validation with ``bids-validator-deno`` (the schema-based validator, PyPI; runs offline).

* :func:`validate_bids_input`: the input dataset, restricted to the selected participants and to
  ``anat`` (a configuration file reclassifies issues of other subjects and datatypes as ``ignore``,
  as fMRIPrep's ``validate_input_dir`` does with ``ignoredFiles``). Errors -> exit 16; a missing
  validator is only a warning (fMRIPrep prints "bids-validator does not appear to be installed").
* :func:`validate_derivatives`: the output dataset (tests, CI).

Command (validator 3.x): ``bids-validator-deno <dataset> --format json -o <file> [-c <config>]``;
exit 16 when errors are found. Configuration format: ``{"ignore": [<issue filter>], "warning": [...],
"error": [...]}`` where a filter is a partial issue (``code``, ``subCode``, ``location``...) and a
``location`` not starting with ``/`` is a gitignore-style glob against the dataset-relative path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import BidsValidationError

VALIDATOR = "bids-validator-deno"
#: Datatype folders whose issues cannot affect cg3d (it reads anat/ only).
IGNORED_DATATYPES = ("func", "dwi", "fmap", "perf", "eeg", "ieeg", "meg", "beh", "pet", "micr", "nirs",
                     "motion", "mrs", "emg")
MAX_SHOWN = 10


class ValidatorUnavailable(RuntimeError):
    """The validator is not installed, crashed, or timed out."""


def find_validator() -> str | None:
    """Path of ``bids-validator-deno`` on PATH (or None)."""
    return shutil.which(VALIDATOR)


def run_validator(dataset: str | Path, *, config: dict[str, Any] | None = None, timeout: float | None = None,
                  extra_args: Sequence[str] = ()) -> dict[str, Any]:
    """Run the validator on ``dataset`` and return its JSON result (``issues``, ``summary``)."""
    exe = find_validator()
    if exe is None:
        raise ValidatorUnavailable(f"{VALIDATOR} is not installed (pip install bids-validator-deno, or "
                                   "pip install 'cg3d-bids[test]')")
    env = {**os.environ, "DENO_NO_UPDATE_CHECK": "1", "NO_COLOR": "1"}
    with tempfile.TemporaryDirectory(prefix="cg3d-bids-validator-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [exe, str(dataset), "--format", "json", "-o", str(result), *extra_args]
        if config:
            (Path(tmp) / "config.json").write_text(json.dumps(config))
            cmd += ["-c", str(Path(tmp) / "config.json")]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as exc:
            raise ValidatorUnavailable(f"{VALIDATOR} did not finish within {timeout:.0f} s") from exc
        except OSError as exc:
            raise ValidatorUnavailable(f"{VALIDATOR} could not be started: {exc}") from exc
        if proc.returncode not in (0, 16) or not result.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise ValidatorUnavailable(f"{VALIDATOR} failed (exit {proc.returncode}): " + " | ".join(tail))
        try:
            return json.loads(result.read_text())
        except ValueError as exc:
            raise ValidatorUnavailable(f"{VALIDATOR} wrote unreadable JSON: {exc}") from exc


def issues_by_severity(result: dict[str, Any], severity: str) -> list[dict[str, Any]]:
    """Issues of one severity (``error``, ``warning``, ``ignore``)."""
    return [i for i in result.get("issues", {}).get("issues", []) if i.get("severity") == severity]


def format_issue(issue: dict[str, Any], code_messages: dict[str, str] | None = None) -> str:
    """``CODE[.subCode] /location: first line of the message``."""
    code = issue.get("code", "?") + (f".{issue['subCode']}" if issue.get("subCode") else "")
    text = issue.get("issueMessage") or (code_messages or {}).get(issue.get("code", ""), "")
    text = " ".join(str(text).strip().splitlines()[:1])
    text = text if len(text) <= 160 else text[:157] + "..."
    location = issue.get("location") or ", ".join(issue.get("affects") or [])
    return f"{code} {location}: {text}".strip().rstrip(":")


def _summarise(issues: Iterable[dict[str, Any]], code_messages: dict[str, str]) -> list[str]:
    """One line per code: count, example location, message."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for issue in issues:
        grouped.setdefault(issue.get("code", "?"), []).append(issue)
    lines = []
    for code, items in grouped.items():
        example = items[0].get("location") or ""
        message = " ".join(str(code_messages.get(code, "")).strip().splitlines()[:1])
        text = f": {message}" if message else ""
        lines.append(f"bids-validator warning {code} ({len(items)}x, e.g. {example}){text}")
    return lines


def input_config(bids_dir: str | Path, participant_labels: Sequence[str] | None = None) -> dict[str, Any]:
    """Validator configuration ignoring the subjects not selected and non-anat datatypes."""
    ignore: list[dict[str, str]] = [{"location": f"{dt}/"} for dt in IGNORED_DATATYPES]
    if participant_labels:
        selected = {f"sub-{label.removeprefix('sub-')}" for label in participant_labels}
        for folder in sorted(Path(bids_dir).glob("sub-*")):
            if folder.name not in selected:
                ignore.append({"location": f"{folder.name}/"})
    return {"ignore": ignore}


def validate_bids_input(bids_dir: str | Path, participant_labels: Sequence[str] | None = None, *,
                        timeout: float | None = 3600) -> list[str]:
    """Validate the input dataset; return warnings (strings), raise on errors.

    Raises
    ------
    BidsValidationError (16): the validator found errors in the selected participants' data or at
        the dataset level; lists the first errors and the fix (``--skip-bids-validation``).
    """
    try:
        result = run_validator(bids_dir, config=input_config(bids_dir, participant_labels), timeout=timeout)
    except ValidatorUnavailable as exc:
        if find_validator() is None:
            return [f"{VALIDATOR} does not appear to be installed: the input dataset was not validated "
                    "(install bids-validator-deno, or pass --skip-bids-validation)"]
        return [f"BIDS validation of the input skipped: {exc}"]
    code_messages = result.get("issues", {}).get("codeMessages", {})
    errors = issues_by_severity(result, "error")
    if errors:
        shown = "\n".join(f"    {format_issue(i, code_messages)}" for i in errors[:MAX_SHOWN])
        more = f"\n    ... and {len(errors) - MAX_SHOWN} more" if len(errors) > MAX_SHOWN else ""
        raise BidsValidationError(
            f"the input is not a valid BIDS dataset: bids-validator found {len(errors)} error(s):\n{shown}{more}",
            path=bids_dir,
            fix="fix the dataset (run `bids-validator-deno <bids_dir>` for details; "
            "https://bids-validator.readthedocs.io), or pass --skip-bids-validation to run anyway",
        )
    return _summarise(issues_by_severity(result, "warning"), code_messages)


def validate_derivatives(out_dir: str | Path, *, timeout: float | None = 600) -> tuple[int, list[str]]:
    """Validate an output dataset: (number of errors, messages: errors first, then warnings).

    Raises FileNotFoundError with the install hint when the validator is missing.
    """
    if find_validator() is None:
        raise FileNotFoundError(f"{VALIDATOR} not found on PATH: install the test extra "
                                "(pip install 'cg3d-bids[test]') or pip install bids-validator-deno")
    result = run_validator(out_dir, timeout=timeout)
    code_messages = result.get("issues", {}).get("codeMessages", {})
    errors = issues_by_severity(result, "error")
    messages = [f"error {format_issue(i, code_messages)}" for i in errors]
    messages += [f"warning {format_issue(i, code_messages)}" for i in issues_by_severity(result, "warning")]
    return len(errors), messages
