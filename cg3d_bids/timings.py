"""Wall and CPU time of every stage of a run, and the ``logs/timings-<run_id>.tsv`` table.

Each stage call (one nipype node, or the command line's own steps) is measured by
:func:`measure`, which writes one small JSON file into the run's ``timings/`` folder: stage,
modality, images, start and end (Unix seconds) and CPU seconds (user + system of the process
doing the work, every thread included: :func:`time.process_time`). :func:`collect` sums them
per stage and modality: ``wall_s`` is the span from the first start to the last end (calls run
in parallel), ``cpu_s`` the sum over calls, so ``cpu_s / wall_s`` is the parallelism reached.

Stages: ``discover``, ``prepare``, ``landmarks``, ``tokenize`` (whole stage), ``encode`` (encoder
forward passes only, inside tokenize: the CPU time of the encoding thread and torch's threads,
not of the helper threads that prepare the next cube and store tokens meanwhile), ``score``,
``outputs``, ``reports`` and ``total``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_json, write_text

__all__ = ["STAGES", "TimingRow", "collect", "measure", "record", "write_tsv"]

STAGES = ("discover", "prepare", "landmarks", "tokenize", "encode", "score", "outputs", "reports", "total")
COLUMNS = ("stage", "modality", "images", "wall_s", "cpu_s", "start_s", "end_s")
#: ``modality`` of stages that are not per modality
ALL = "all"


@dataclass(frozen=True)
class TimingRow:
    """One row of the timings table."""

    stage: str
    modality: str
    images: int
    wall_s: float
    cpu_s: float
    start_s: float
    end_s: float


def record(folder: str | os.PathLike, stage: str, modality: str, images: int, start: float, end: float,
           cpu: float) -> None:
    """Write one measurement (a JSON file with a unique name) into ``folder``."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    name = f"{stage}-{modality}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
    write_json(Path(folder) / name, {"stage": stage, "modality": modality, "images": int(images),
                                     "start": start, "end": end, "cpu": cpu})


@contextlib.contextmanager
def measure(folder: str | os.PathLike | None, stage: str, modality: str = ALL,
            images: int = 0) -> Iterator[None]:
    """Time the block (wall and process CPU) and :func:`record` it; no-op when ``folder`` is None."""
    if folder is None:
        yield
        return
    start, cpu0 = time.time(), time.process_time()
    try:
        yield
    finally:
        record(folder, stage, modality, images, start, time.time(), time.process_time() - cpu0)


def collect(folder: str | os.PathLike) -> list[TimingRow]:
    """Rows per (stage, modality) in :data:`STAGES` order, from every measurement in ``folder``."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for path in sorted(Path(folder).glob("*.json")):
        try:
            item = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        groups.setdefault((item["stage"], item["modality"]), []).append(item)
    rows = []
    for (stage, modality), items in groups.items():
        start = min(i["start"] for i in items)
        end = max(i["end"] for i in items)
        rows.append(TimingRow(stage, modality, sum(i["images"] for i in items), end - start,
                              sum(i["cpu"] for i in items), start, end))
    return sorted(rows, key=lambda r: (STAGES.index(r.stage), r.modality))


def write_tsv(path: str | os.PathLike, rows: list[TimingRow]) -> Path:
    """The timings table (tab-separated, header :data:`COLUMNS`), written atomically."""
    lines = ["\t".join(COLUMNS)]
    for row in rows:
        lines.append("\t".join([row.stage, row.modality, str(row.images), f"{row.wall_s:.3f}",
                                f"{row.cpu_s:.3f}", f"{row.start_s:.3f}", f"{row.end_s:.3f}"]))
    return write_text(path, "\n".join(lines) + "\n")
