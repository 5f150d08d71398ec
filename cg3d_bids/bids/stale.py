"""Stale outputs: files in the output folder of images that are not part of the latest batch.

A ``group`` run defines the batch of each modality it scores: its images, normalised together.
Outputs of other images of that modality found in the output folder (an earlier run on a larger
cohort, images outside ``--participant-label``, an image now skipped as bad data) are **stale**:
their maps were normalised against another batch. Per modality (:func:`check_modality`, called
by the ``group`` stage):

- without ``--remove-stale-outputs`` they stay, are listed in a warning, in the log and in
  ``group_<mod>.json`` (``StaleOutputs``), and an image no longer in the batch gets a row with
  ``status`` ``stale`` in ``group_<mod>.tsv``: the table lists exactly the images whose outputs
  are in the folder;
- with ``--remove-stale-outputs`` their maps, sidecars and figures are deleted (after the new
  table is written, so an interrupted run never leaves a table that lists missing files).

Subject reports (``sub-<label>.html``, ``sub-<label>/figures``) of subjects that no group table
lists any more are handled by :func:`check_subject_reports` after every modality is done.
Modalities a run does not score are left alone (their table and maps still agree).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..logging_setup import FILE_ONLY

LOGGER = logging.getLogger("cg3d")

__all__ = ["StaleImage", "check_modality", "check_subject_reports", "find_stale_images", "image_outputs"]

#: ``<source entities>_label-<anomaly|brain>_desc-<modality>_<probseg|mask>.<ext>``
OUTPUT_RE = re.compile(
    r"^(?P<src>sub-(?P<sub>[0-9A-Za-z]+)(?:_[0-9A-Za-z]+-[0-9A-Za-z]+)*)_label-(?:anomaly|brain)_"
    r"desc-(?P<mod>[0-9A-Za-z]+)_(?:probseg|mask)\.(?:nii\.gz|nii|json|svg|png)$"
)
SHOWN = 10
FLAG = "--remove-stale-outputs"


@dataclass(frozen=True)
class StaleImage:
    """An image with outputs in the folder that is not part of the latest batch of its modality."""

    bids_name: str
    subject: str
    session: str | None
    modality: str
    files: tuple[str, ...] = field(default=())  #: paths relative to the output folder

    def row(self) -> dict[str, Any]:
        """Its ``group_<mod>.tsv`` row (status ``stale``)."""
        return {
            "participant_id": f"sub-{self.subject}", "session_id": f"ses-{self.session}" if self.session else None,
            "bids_name": self.bids_name, "status": "stale",
            "error": f"not in this run's batch: outputs of an earlier run, not comparable with this batch "
                     f"({FLAG} removes them)",
        }


def _session(source: str) -> str | None:
    match = re.search(r"_ses-([0-9A-Za-z]+)", source)
    return match.group(1) if match else None


def image_outputs(out_dir: str | Path, modality: str) -> dict[str, list[str]]:
    """``{bids_name: [relative paths]}`` of every per-image output of ``modality`` in ``out_dir``
    (maps and sidecars in ``sub-*/[ses-*/]anat``, figures in ``sub-*/figures``)."""
    out_dir = Path(out_dir)
    found: dict[str, list[str]] = {}
    for folder in (*out_dir.glob("sub-*/anat"), *out_dir.glob("sub-*/ses-*/anat"), *out_dir.glob("sub-*/figures")):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            match = OUTPUT_RE.match(path.name)
            if match and match.group("mod") == modality and path.is_file():
                name = f"{match.group('src')}_{modality}"
                found.setdefault(name, []).append(path.relative_to(out_dir).as_posix())
    return found


def find_stale_images(out_dir: str | Path, modality: str, keep: Iterable[str]) -> list[StaleImage]:
    """Images of ``modality`` with outputs in ``out_dir`` whose bids name is not in ``keep``."""
    keep = set(keep)
    stale = []
    for name, files in sorted(image_outputs(out_dir, modality).items()):
        if name in keep:
            continue
        subject = name.split("_", 1)[0].removeprefix("sub-")
        stale.append(StaleImage(name, subject, _session(name), modality, tuple(sorted(files))))
    return stale


def remove_files(out_dir: str | Path, relpaths: Iterable[str]) -> None:
    """Delete files of the output folder, then the folders they leave empty (never ``out_dir``)."""
    out_dir = Path(out_dir)
    parents = set()
    for rel in relpaths:
        path = out_dir / rel
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        parents.update(p for p in path.parents if p != out_dir and p.is_relative_to(out_dir))
    for folder in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty


def _names(items: list[str]) -> str:
    return ", ".join(items[:SHOWN]) + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def check_modality(out_dir: str | Path, modality: str, results: Iterable[Any], *, remove: bool
                   ) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
    """Stale outputs of ``modality`` given this batch's ``results`` (:class:`ImageResult`).

    Returns the extra table rows (``stale`` images no longer in the batch; none when removing),
    the ``StaleOutputs`` entry of ``group_<mod>.json`` and the files to delete once the new table
    is written (empty unless ``remove``). Outputs of batch images that are not ``ok`` (skipped or
    failed this time) are stale too, but keep their row with the status of this run.
    """
    results = list(results)
    ok = {r.image.bids_name for r in results if r.ok}
    listed = {r.image.bids_name for r in results}
    stale = find_stale_images(out_dir, modality, ok)
    files = [rel for image in stale for rel in image.files]
    entry = {"Removed": remove, "Images": [image.bids_name for image in stale], "Files": files}
    if not stale:
        return [], entry, []
    names = [image.bids_name for image in stale]
    if remove:
        LOGGER.warning("removing %d stale output file(s) of %d %s image(s) not scored in this run (%s): %s",
                       len(files), len(stale), modality, FLAG, _names(names))
    else:
        LOGGER.warning("%d %s image(s) not scored in this run have outputs in %s from an earlier run: %s; "
                       "they are listed as 'stale' in group_%s.tsv and their files in group_%s.json "
                       "(StaleOutputs); rerun with %s to remove them", len(stale), modality, out_dir,
                       _names(names), modality, modality, FLAG)
    LOGGER.info("stale %s outputs: %s", modality, " ".join(files), extra=FILE_ONLY)  # the list: log file
    rows = [] if remove else [image.row() for image in stale if image.bids_name not in listed]
    return rows, entry, (files if remove else [])


def check_subject_reports(out_dir: str | Path, *, remove: bool) -> list[str]:
    """Subject reports and figure folders of subjects that no ``group_*.tsv`` lists; removed when
    ``remove``. Returns their paths relative to ``out_dir``."""
    from .group_table import read_group_table

    out_dir = Path(out_dir)
    listed = set()
    for table in out_dir.glob("group_*.tsv"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            listed.update(str(row.get("participant_id")) for row in read_group_table(table))
    orphans = []
    for report in sorted(out_dir.glob("sub-*.html")):
        subject = report.name.removesuffix(".html")
        if subject in listed:
            continue
        orphans.append(report.name)
        if (out_dir / subject / "figures").is_dir():
            orphans.append(f"{subject}/figures")
    if not orphans:
        return []
    if remove:
        LOGGER.warning("removing the reports of subjects no group table lists (%s): %s", FLAG, _names(orphans))
        for rel in orphans:
            path = out_dir / rel
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
            if path.parent != out_dir:
                with contextlib.suppress(OSError):
                    path.parent.rmdir()  # sub-<label>/ once empty
    else:
        LOGGER.warning("reports of subjects that no group table lists are in %s: %s; rerun with %s to remove "
                       "them", out_dir, _names(orphans), FLAG)
    return orphans
