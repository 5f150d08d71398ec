"""Memory check before scoring a batch: refuse early (exit 75) with the fix instead of crashing.

The budget is the memory this process may still use: on CPU the smallest of ``--mem`` and
:func:`~cg3d_bids.resources.available_memory_bytes` (cgroup limit, SLURM allocation,
``MemAvailable``), counting what the process already holds (its resident memory: the loaded
tokens among it); on CUDA the device's free memory. The prediction is
:func:`cg3d_bids.core.scoring.memory.plan_memory`'s, with its margin.

The block setting (``--score-chunk-mb``) is never changed behind the user's back: the tile shape
decides the last bits of the scores, so outputs must not depend on the memory a machine happened
to have. When only a smaller block fits, the error says which ``--score-chunk-mb`` does.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np

from ..errors import TempFailError
from .context import StageContext

LOGGER = logging.getLogger("cg3d")

__all__ = ["check_scoring_memory", "scoring_budget"]


def _resident_bytes() -> int:
    """Resident memory of this process (0 where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def scoring_budget(ctx: StageContext) -> tuple[int | None, int]:
    """``(budget, held)`` in bytes for scoring on the run's device; budget None when unknown.

    CPU: the smallest of the limits that include what this process holds (cgroup, SLURM,
    ``--mem``) and of ``MemAvailable`` plus what it holds; ``held`` is its resident memory.
    CUDA: the device's free memory, nothing held.
    """
    import torch

    from ..core.scoring.mutual import resolve_device
    from ..resources import memory_free_bytes, memory_limit_bytes

    device = resolve_device(ctx.settings.execution.device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), 0
    held = _resident_bytes()
    free = memory_free_bytes()
    limits = [memory_limit_bytes(), None if free is None else free + held]
    mem_gb = ctx.settings.execution.mem_gb
    if mem_gb is not None:
        limits.append(int(mem_gb * 2**30))
    known = [n for n in limits if n is not None]
    return (min(known) if known else None), held


def check_scoring_memory(ctx: StageContext, valid: np.ndarray, dim: int, *, what: str,
                         n_shards: int = 1) -> None:
    """Raise :class:`TempFailError` (75) when scoring one layer of a batch (``valid``: (B, N))
    would not fit; log the plan otherwise."""
    from ..core.scoring.memory import DEFAULT_MARGIN, plan_memory

    budget, held = scoring_budget(ctx)
    if budget is None:
        LOGGER.debug("%s: memory budget unknown, no memory plan", what)
        return
    execution = ctx.settings.execution
    requested = float(execution.score_chunk_mb)
    counts = valid.sum(axis=1)
    plan = plan_memory(budget, len(valid), counts, dim, valid.shape[1], n_shards=n_shards,
                       codegraph=ctx.settings.codegraph_settings, block_mb=requested,
                       device=execution.device, held_bytes=held)
    need = plan.peak * (1 + DEFAULT_MARGIN) + held
    LOGGER.info("[memory %s] scoring needs about %.2f GiB (predicted %.2f GiB per layer + %d %% margin, "
                "%.2f GiB already held) of the %.2f GiB this process may use", what, need / 2**30,
                plan.peak / 2**30, round(100 * DEFAULT_MARGIN), held / 2**30, budget / 2**30)
    LOGGER.debug("%s: %s", what, plan.describe())
    if plan.block_mb < requested:
        smaller = max(1, math.floor(plan.block_mb))
        raise TempFailError(
            f"{what}: scoring blocks of {requested:g} MB do not fit in the "
            f"{budget / 2**30:.2f} GiB this process may use (predicted need "
            f"{plan.peak / 2**30:.2f} GiB at {plan.block_mb:g} MB blocks)",
            fix=f"rerun with --score-chunk-mb {smaller} (the same value for every shard), "
                "or give the run more memory (--mem)",
        )
