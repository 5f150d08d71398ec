"""What every stage receives: the run's settings and work cache; and references to stored records."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from .. import records as rec
from ..cache import WorkCache
from ..settings import Settings

__all__ = ["Ref", "StageContext", "limit_threads", "stage"]

T = TypeVar("T", bound=rec.Record)
F = TypeVar("F", bound=Callable)


@dataclass(frozen=True)
class StageContext:
    """The run's :class:`~cg3d_bids.settings.Settings` and its :class:`~cg3d_bids.cache.WorkCache`."""

    settings: Settings
    cache: WorkCache

    @classmethod
    def from_settings(cls, settings: Settings) -> StageContext:
        return cls(settings, WorkCache(settings.execution.work_dir, settings.run.run_id))

    @property
    def timings_dir(self) -> Path:
        return self.cache.run_dir / "timings"


@dataclass(frozen=True)
class Ref(Generic[T]):
    """A record stored at ``path`` (not loaded until :meth:`load`): how stages hand on large records."""

    path: Path
    cls: type[T]

    def load(self) -> T:
        return rec.load(self.path, self.cls)


def stage(name: str, timing: str | None = None) -> Callable[[F], F]:
    """Mark a function as the stage ``name``; ``timing`` is its row in the timings table
    (:data:`cg3d_bids.timings.STAGES`; default ``name``)."""

    def mark(func: F) -> F:
        func.stage_name = name  # type: ignore[attr-defined]
        func.timing_name = timing or name  # type: ignore[attr-defined]
        return func

    return mark


def limit_threads() -> None:
    """One torch thread pool sized by ``OMP_NUM_THREADS`` (set per worker by the command line)."""
    import torch

    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
