"""The app's memory check before scoring (stages/memory.py): budget from the limits that apply,
refusal with exit 75 and a fix that fits, never a silently changed block setting."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from cg3d_bids import resources
from cg3d_bids.core.scoring.memory import DEFAULT_MARGIN, predict_memory
from cg3d_bids.errors import TempFailError
from cg3d_bids.settings import Settings
from cg3d_bids.stages import memory

GIB = 2**30
B, N, M, C = 40, 4096, 2500, 384


def ctx(**execution) -> SimpleNamespace:
    return SimpleNamespace(settings=Settings().replace(execution={"device": "cpu", **execution}))


def valid() -> np.ndarray:
    v = np.zeros((B, N), dtype=bool)
    v[:, :M] = True
    return v


@pytest.fixture
def machine(monkeypatch):
    """A fake machine: ``set(limit=, free=, held=)`` in bytes (None: unknown)."""
    state = {"limit": None, "free": None, "held": 0}
    monkeypatch.setattr(resources, "memory_limit_bytes", lambda *a, **k: state["limit"])
    monkeypatch.setattr(resources, "memory_free_bytes", lambda *a, **k: state["free"])
    monkeypatch.setattr(memory, "_resident_bytes", lambda: state["held"])
    monkeypatch.setattr("torch.get_num_threads", lambda: 2)
    return lambda **kw: state.update(kw)


def need(block_mb: float, held: int) -> int:
    peak = predict_memory("one-shot", B, M, C, N, block_mb=block_mb, workers=2).peak
    return math.ceil(peak * (1 + DEFAULT_MARGIN)) + held


def test_budget_is_the_smallest_limit(machine):
    machine(limit=8 * GIB, free=3 * GIB, held=GIB)
    assert memory.scoring_budget(ctx()) == (4 * GIB, GIB)  # free memory plus what it holds
    assert memory.scoring_budget(ctx(mem_gb=2.0)) == (2 * GIB, GIB)
    machine(free=None)
    assert memory.scoring_budget(ctx()) == (8 * GIB, GIB)
    machine(limit=None)
    assert memory.scoring_budget(ctx()) == (None, GIB)


def test_enough_memory_passes_and_unknown_budget_is_not_checked(machine):
    machine(free=need(256, GIB) - GIB + 1, held=GIB)
    memory.check_scoring_memory(ctx(), valid(), C, what="T1w batch 1")
    machine(free=None, limit=None)
    memory.check_scoring_memory(ctx(), valid(), C, what="T1w batch 1")


def test_a_smaller_block_that_fits_is_named_not_used(machine):
    low, high = need(1, 0), need(256, 0)
    assert low < high  # the window where only a smaller block fits exists
    machine(limit=(low + high) // 2)
    with pytest.raises(TempFailError) as info:
        memory.check_scoring_memory(ctx(), valid(), C, what="T1w batch 1")
    assert info.value.exit_code == 75
    text = str(info.value)
    assert "T1w batch 1" in text and "256 MB" in text
    block = int(text.split("--score-chunk-mb ")[1].split()[0])
    assert 1 <= block < 256 and need(block, 0) <= (low + high) // 2
    memory.check_scoring_memory(ctx(score_chunk_mb=block), valid(), C, what="T1w batch 1")


def test_too_little_memory_suggests_shards_or_a_smaller_batch(machine):
    machine(limit=need(1, 0) // 2)
    with pytest.raises(TempFailError) as info:
        memory.check_scoring_memory(ctx(), valid(), C, what="T1w batch 1")
    assert info.value.exit_code == 75
    assert "--batch-size" in str(info.value)
