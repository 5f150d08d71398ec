"""The work cache: where every intermediate lives, under which key, and what a run recorded.

Layout of the work directory (``-w``)::

    prep/<mod>/<image>_<key>.npz         PreparedImage   key: image + mask content, cube settings
    cubes/<mod>/<image>_<key>.npy        the cube's brain intensities (prepare -> tokenize; removed
                                         once the image's tokens exist, rebuilt if ever needed again)
    landmarks/<mod>/landmarks_<key>.json Landmarks       key: the prepared images' keys
    tokens/<mod>/<image>_<key>.npz       ImageTokens     key: prep key, landmarks key, token settings
    scores/<mod>/scores_<key>.npz        BatchScores     key: token files, score settings
    skullstrip/<mod>/<image>_<sha>.nii.gz                deepbet masks, by image content
    bids_db/                                             the pybids index
    runs/<run_id>/                       one folder per run:
        settings.toml  cg3d.log          the run's settings and log
        inputs/<mod>/<image>.json        the ImageRecords handed to the workflow
        prep/<mod>/<image>.json          PreparedImage of images skipped as bad data
        results/<mod>/<image>.json       ImageResult of every requested image
        group/<mod>.json                 GroupSummary
        reference/<mod>.json             ReferenceEntry (group --save-reference)
        errors/<context>.json            failures (the first one by time decides the exit code)
        skipped/<image>.json             images left out as bad data (--skip-bad-images)
        timings/*.json                   per stage call: wall and CPU time
        nipype/  crash/                  nipype's node folders and crash files

Content-keyed files are shared by every run and written atomically, so concurrent runs (HPC
array jobs) may race on them safely; a rerun finds them and skips the work. nipype's own node
caching is not used: its folders are per run (``runs/<run_id>/nipype``).
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from . import records as rec
from .atomic import write_json
from .errors import Cg3dError

__all__ = ["Failure", "WorkCache"]

R = TypeVar("R", bound=rec.Record)


@dataclass(frozen=True)
class Failure:
    """A recorded stage failure."""

    context: str
    type: str
    message: str
    exit_code: int
    time_ns: int
    traceback: str


class WorkCache:
    """The work directory of one run (``root``) and the folder of the run itself."""

    def __init__(self, root: str | os.PathLike, run_id: str):
        self.root = Path(root)
        self.run_id = str(run_id)

    @property
    def run_dir(self) -> Path:
        return self.root / "runs" / self.run_id

    # -- paths of records -------------------------------------------------------------------------
    def path_for(self, record: rec.Record) -> Path:
        """Where ``record`` is (or will be) stored."""
        if isinstance(record, rec.ImageRecord):
            return self.run_dir / "inputs" / record.modality / f"{record.bids_name}.json"
        if isinstance(record, rec.PreparedImage):
            if not record.usable:  # a skipped image is never cached: a rerun checks it again
                return self.run_dir / "prep" / record.image.modality / f"{record.image.bids_name}.json"
            return self.prep_path(record.image, record.key)
        if isinstance(record, rec.Landmarks):
            return self.root / "landmarks" / record.modality / f"landmarks_{record.key}.json"
        if isinstance(record, rec.ImageTokens):
            return self.root / "tokens" / record.modality / f"{record.bids_name}_{record.key}.npz"
        if isinstance(record, rec.BatchScores):
            return self.root / "scores" / record.modality / f"scores_{record.key}.npz"
        if isinstance(record, rec.ImageResult):
            return self.run_dir / "results" / record.image.modality / f"{record.image.bids_name}.json"
        if isinstance(record, rec.GroupSummary):
            return self.run_dir / "group" / f"{record.modality}.json"
        if isinstance(record, rec.ReferenceEntry):
            return self.run_dir / "reference" / f"{record.modality}.json"
        raise TypeError(f"no cache location for {type(record).__name__}")

    def prep_path(self, image: rec.ImageRecord, key: str) -> Path:
        return self.root / "prep" / image.modality / f"{image.bids_name}_{key}.npz"

    def cube_path(self, image: rec.ImageRecord, key: str) -> Path:
        return self.root / "cubes" / image.modality / f"{image.bids_name}_{key}.npy"

    def landmarks_path(self, modality: str, key: str) -> Path:
        return self.root / "landmarks" / modality / f"landmarks_{key}.json"

    def tokens_path(self, modality: str, bids_name: str, key: str) -> Path:
        return self.root / "tokens" / modality / f"{bids_name}_{key}.npz"

    def scores_path(self, modality: str, key: str) -> Path:
        return self.root / "scores" / modality / f"scores_{key}.npz"

    def skullstrip_path(self, image: rec.ImageRecord, image_sha: str) -> Path:
        return self.root / "skullstrip" / image.modality / f"{image.bids_name}_{image_sha[:16]}.nii.gz"

    # -- reading and writing records --------------------------------------------------------------
    def store(self, record: rec.Record) -> Path:
        """Save ``record`` where :meth:`path_for` says (content-keyed files are written once)."""
        path = self.path_for(record)
        keyed = not path.is_relative_to(self.run_dir)
        if not (keyed and path.exists()):
            rec.save(record, path)
        return path

    def cached(self, path: Path, cls: type[R], make: Callable[[], R]) -> R:
        """The record at ``path`` if it is there (and readable), else ``make()`` saved there."""
        if path.exists():
            try:
                return rec.load(path, cls)
            except (ValueError, OSError, KeyError) as exc:  # a file of an older cg3d: recompute
                import logging

                logging.getLogger("cg3d").warning("recomputing %s (%s)", path, exc)
        record = make()
        rec.save(record, path)
        return record

    # -- what happened in this run ----------------------------------------------------------------
    def record_failure(self, context: str, exc: BaseException) -> Failure:
        """Write a failing stage's error where the command line finds it (and return it)."""
        failure = Failure(
            context=context, type=type(exc).__name__,
            message=exc.render() if isinstance(exc, Cg3dError) else f"{type(exc).__name__}: {exc}",
            exit_code=int(getattr(exc, "exit_code", 1)), time_ns=time.time_ns(),
            traceback="".join(traceback.format_exception(exc)),
        )
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in context)
        write_json(self.run_dir / "errors" / f"{safe}.json", failure.__dict__)
        return failure

    def first_failure(self) -> Failure | None:
        """The earliest recorded failure of this run (by time, not by name)."""
        failures = []
        for path in (self.run_dir / "errors").glob("*.json"):
            try:
                failures.append(Failure(**json.loads(path.read_text())))
            except (ValueError, TypeError, OSError):
                continue
        return min(failures, key=lambda f: f.time_ns, default=None)

    def record_skipped(self, image: rec.ImageRecord, reason: str) -> None:
        write_json(self.run_dir / "skipped" / f"{image.bids_name}.json",
                   {"bids_name": image.bids_name, "modality": image.modality, "error": reason})

    def skipped(self) -> dict[str, str]:
        """``{bids_name: reason}`` of the images this run left out as bad data."""
        out: dict[str, str] = {}
        for path in sorted((self.run_dir / "skipped").glob("*.json")):
            data: dict[str, Any] = json.loads(path.read_text())
            out[data["bids_name"]] = data["error"]
        return out
