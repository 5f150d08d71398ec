"""Scoring batches: a modality's images split into random, non-overlapping chunks (``--batch-size``).

The CoDeGraph3D paper processes large sets as random non-overlapping chunks scored on their own
(Table 5: B = 180 down to 15; accuracy stable for B >= 30). :func:`assign_batches` does that:

- a first assignment shuffles the images with the run's seed and deals them into
  ``ceil(B / batch_size)`` chunks (sizes differ by at most one);
- later runs keep every image in its chunk (:func:`load_assignment` reads the work dir's record):
  new images fill the smallest chunks that have room, in seeded order, and open new chunks when
  every chunk is full; images no longer in the run leave their chunk. So adding images to a
  cohort re-scores only the chunks that receive them. ``reassign=True`` deals everything anew.

Without ``batch_size`` every image is in chunk 1. Chunks are numbered from 1 (the ``batch``
column of ``group_<mod>.tsv``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .atomic import write_json

__all__ = ["assign_batches", "assignment_path", "batches_of", "load_assignment", "save_assignment"]


def _seeded_order(names: Sequence[str], seed: int) -> list[str]:
    """``names`` (sorted first, so the input order never matters) shuffled with ``seed``."""
    ordered = sorted(names)
    return [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]


def assign_batches(names: Sequence[str], batch_size: int | None, seed: int,
                   previous: Mapping[str, int] | None = None) -> dict[str, int]:
    """``{image: chunk}`` (chunks 1..n) of at most ``batch_size`` images (see the module docstring)."""
    if len(set(names)) != len(names):
        raise ValueError("image names must be unique")
    if batch_size is None:
        return {name: 1 for name in names}
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    kept = {name: int(chunk) for name, chunk in (previous or {}).items() if name in set(names)}
    if any(count > batch_size for count in _sizes(kept).values()):
        kept = {}  # the size was lowered: the old chunks no longer fit, deal anew
    if not kept:
        order = _seeded_order(names, seed)
        n_chunks = max(1, math.ceil(len(order) / batch_size))
        return {name: i % n_chunks + 1 for i, name in enumerate(order)}
    assignment = dict(kept)
    sizes = _sizes(kept)
    for name in _seeded_order([n for n in names if n not in kept], seed):
        room = [chunk for chunk, size in sorted(sizes.items()) if size < batch_size]
        chunk = min(room, key=lambda c: (sizes[c], c)) if room else max(sizes, default=0) + 1
        assignment[name] = chunk
        sizes[chunk] = sizes.get(chunk, 0) + 1
    return assignment


def _sizes(assignment: Mapping[str, int]) -> dict[int, int]:
    sizes: dict[int, int] = {}
    for chunk in assignment.values():
        sizes[chunk] = sizes.get(chunk, 0) + 1
    return sizes


def batches_of(assignment: Mapping[str, int], order: Sequence[str]) -> list[tuple[int, list[str]]]:
    """``(chunk, names in order)`` of every non-empty chunk, by chunk number (``order``: the
    modality's batch order)."""
    chunks: dict[int, list[str]] = {}
    for name in order:
        chunks.setdefault(assignment[name], []).append(name)
    return [(c, chunks[c]) for c in sorted(chunks)]


def assignment_path(work_dir: str | Path, modality: str, batch_size: int | None, seed: int) -> Path:
    """Where a modality's chunk assignment is kept in the work dir (one per size and seed)."""
    return Path(work_dir) / "batches" / f"{modality}_size-{batch_size or 'all'}_seed-{seed}.json"


def load_assignment(path: str | Path) -> dict[str, int]:
    path = Path(path)
    if not path.exists():
        return {}
    return {str(k): int(v) for k, v in json.loads(path.read_text()).items()}


def save_assignment(path: str | Path, assignment: Mapping[str, int]) -> None:
    write_json(path, dict(sorted(assignment.items())))
