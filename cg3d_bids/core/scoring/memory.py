"""Memory plan of scoring one layer: predicted peak, the tile size, or the fix before any work.

:func:`predict_memory` models the working memory that :func:`~.shards.score_rows`,
:func:`~.shards.rescore_rows` and the one-shot :func:`~.shards.codegraph_scores` /
:func:`~.mutual.mutual_scores` allocate, term by term (bytes; fp32 = 4). Notation: ``B``
images, ``M`` the largest and ``V`` the total valid-token count, ``C`` the token dimension,
``N`` tokens per image (the grid), ``Q`` query images, ``T`` CoDeGraph's gaps per token,
``W`` tile worker threads (CPU: torch's thread count; CUDA: 1).

- gathered tokens: the centred, augmented fp32 bank ``(C + 2) V 4``, the valid-token indices
  ``8 V``, the per-image sums ``B C 4`` and one scratch image per worker ``M C 4``
  (:class:`~.tiles.TokenBank`);
- minimum table: ``Q B M 4`` (:class:`~.mutual.MinDistanceTable`);
- distance tiles: per worker one ``rows x width`` fp32 block (``width``: the widest group of
  reference images), two ``width`` vectors (column minima), one image's row side
  ``M (C + 2) 4`` (:class:`~.tiles.TileWorker`) and the BLAS library's packed copy of the
  GEMM operands on CPU, ``(rows + width) (C + 2) 4`` (measured: MKL packs the whole
  right-hand operand of a single-threaded GEMM; numpy's OpenBLAS, with one reference image per
  GEMM, fits the same term); kept until the call ends (re-scoring reuses
  them; freed memory of this size stays resident with glibc anyway);
- re-score temporaries: per worker, a copy of the kept rows of a pair tile and one image's
  row side, ``rows M 4 + M (C + 2) 4``;
- sorting: per worker, one image's sorted MSV (values, int64 indices and the sort's
  contiguous copy of its input, ``12 M B + 4 M B``);
- CodeGraph gaps: per worker, the float64 temporaries of :func:`~.codegraph.scaled_gaps` for
  one image, ``4 x 8 M (T + 1)``;
- rows: the :class:`~.shards.RowScores` being built (``5 Q N`` scores and masks; with
  CodeGraph ``V_Q (28 + 2 T)`` per-token arrays, twice while they are concatenated);
- graph: :class:`~.shards.GraphResult` (``13 B N + 16 B^2``) and the exclusion masks;
- outputs: final scores and masks ``5 Q N`` plus, in one shot, the details' copies.

The stages run these in sequence; the peak is the largest phase (tiles while the table is
filled, sorting and rows while the rows are built, ...). Buffers above the allocator's mmap
threshold (the bank, the table) return to the system when freed; smaller freed temporaries
mostly stay resident, so later phases count them too. On CUDA the bank, table, tiles and
sorting live on the device and are the prediction (``torch.cuda.max_memory_allocated``
semantics; the caching allocator may reserve a little more); rows and CodeGraph arrays are host
memory, reported as ``host_peak``. Not included: the caller's input tokens and the process
baseline (Python, torch and the libraries, python-igraph included: ~35 MB when the first
community is searched): pass them as ``held_bytes`` to :func:`plan_memory`.
Tested against the measured peak RSS of subprocesses (``tests/test_scoring_memory.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ...errors import TempFailError
from .codegraph import CodeGraphSettings, max_rank
from .tiles import DEFAULT_BLOCK_MB, TileShape, tile_shape, widest_group

STAGES = ("one-shot", "score", "rescore", "graph")
#: Safety margin of :func:`plan_memory` on the predicted working memory: measured peaks were
#: 0.90-1.15x the prediction (tests/test_scoring_memory.py; allocator caching).
DEFAULT_MARGIN = 0.15
#: Smallest block setting the plan tries before giving up (MB): tiles of a few rows.
MIN_BLOCK_MB = 1.0
_F32, _I64 = 4, 8


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted working memory of one stage of one layer.

    Attributes
    ----------
    stage : str
        ``"one-shot"``, ``"score"``, ``"rescore"`` or ``"graph"``.
    peak : int
        Predicted peak bytes on the scoring device (host memory on CPU).
    host_peak : int
        Predicted peak host bytes (equal to ``peak`` on CPU).
    phases : dict
        Bytes alive in each phase of the stage (the peak is their maximum).
    terms : dict
        The terms the phases are made of (bytes).
    block_mb : float
        The block setting the estimate is for.
    tile : TileShape
        The tile shape that setting gives.
    """

    stage: str
    peak: int
    host_peak: int
    phases: dict[str, int]
    terms: dict[str, int]
    block_mb: float
    tile: TileShape

    def describe(self) -> str:
        """One line per term, for the log."""
        lines = [f"{self.stage}: predicted peak {_gib(self.peak)}"
                 + (f" (host {_gib(self.host_peak)})" if self.host_peak != self.peak else "")]
        lines += [f"  {name}: {_gib(value)}" for name, value in self.terms.items() if value]
        return "\n".join(lines)


@dataclass(frozen=True)
class MemoryPlan:
    """A plan that fits: the block setting to use and the estimates of each stage."""

    block_mb: float
    n_shards: int
    budget: int
    estimates: list[MemoryEstimate] = field(default_factory=list)

    @property
    def peak(self) -> int:
        """Largest predicted working memory of the stages (without margin or held memory)."""
        return max(e.peak for e in self.estimates)

    def describe(self) -> str:
        head = (f"memory plan: {self.n_shards} shard(s), block {self.block_mb:g} MB, predicted "
                f"working memory {_gib(self.peak)} (budget {_gib(self.budget)})")
        return "\n".join([head] + [e.describe() for e in self.estimates])


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _counts(valid_counts: int | Sequence[int] | np.ndarray, n_images: int) -> np.ndarray:
    """Per-image valid counts (a single int is every image's count)."""
    counts = np.asarray(valid_counts, dtype=np.int64)
    if counts.ndim == 0:
        counts = np.full(n_images, int(counts), dtype=np.int64)
    if counts.shape != (n_images,) or counts.min(initial=1) < 1:
        raise ValueError(f"valid_counts must be one positive count or {n_images} counts")
    return counts


def _workers(device: torch.device, workers: int | None) -> int:
    if device.type != "cpu":
        return 1
    return max(1, int(workers if workers is not None else torch.get_num_threads()))


# ------------------------------------------------------------------------------------------------
def predict_memory(
    stage: str,
    n_images: int,
    valid_counts: int | Sequence[int] | np.ndarray,
    dim: int,
    n_tokens: int,
    *,
    n_query: int | None = None,
    codegraph: CodeGraphSettings | bool | None = True,
    block_mb: float | None = None,
    device: str | torch.device = "cpu",
    workers: int | None = None,
) -> MemoryEstimate:
    """Predicted peak working memory of one stage of one layer (see the module docstring).

    Parameters
    ----------
    stage : {"one-shot", "score", "rescore", "graph"}
        ``one-shot``: :func:`~.shards.codegraph_scores` (``codegraph`` on) or
        :func:`~.mutual.mutual_scores`; ``score`` / ``rescore``: one shard's
        :func:`~.shards.score_rows` / :func:`~.shards.rescore_rows` (``n_query`` images;
        for ``rescore`` the bound where all of them are community members);
        ``graph``: :func:`~.shards.build_graph` with the rows of all images loaded.
    n_images : int
        ``B``.
    valid_counts : int or sequence of int
        Valid tokens per image, or one count for all (e.g. the largest).
    dim : int
        Token dimension ``C``.
    n_tokens : int
        Tokens per image ``N`` (the grid, e.g. 16^3 = 4096).
    n_query : int, optional
        Query images of the shard (default ``B``).
    codegraph : CodeGraphSettings or bool, default True
        CoDeGraph on (its settings give ``T``) or off.
    block_mb : float, optional
        The tile memory setting (default 256 MB, ``--score-chunk-mb``).
    device : str or torch.device, default "cpu"
    workers : int, optional
        CPU tile worker threads (default: torch's thread count).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    dev = torch.device(device)
    counts = _counts(valid_counts, n_images)
    q = n_images if n_query is None else int(n_query)
    if not 1 <= q <= n_images:
        raise ValueError(f"n_query must be in [1, {n_images}], got {n_query}")
    settings = (CodeGraphSettings() if codegraph is True else codegraph) or None
    t = max(0, max_rank(n_images, settings)) if settings is not None else 0
    n_w = _workers(dev, workers)
    mb = DEFAULT_BLOCK_MB if block_mb is None else float(block_mb)
    m, v, b, c, n = int(counts.max()), int(counts.sum()), n_images, int(dim), int(n_tokens)
    v_q = int(np.sort(counts)[::-1][:q].sum())  # the query images' valid tokens, at most
    tile = tile_shape(m, mb / n_w, device=dev)
    width = max(widest_group(counts, tile.cols), m)  # the widest group of reference images
    rows = min(tile.rows, m)

    per_token = 28 + 2 * t if settings is not None else 0  # RowScores arrays per token
    v_rows = v if stage == "one-shot" else v_q
    q_rows = n_images if stage == "one-shot" else q
    packing = (rows + width) * (c + 2) * _F32 if dev.type == "cpu" else 0
    one_tile = rows * width * _F32 + 2 * width * _F32 + m * (c + 2) * _F32 + packing

    terms = {
        "gathered tokens": (c + 2) * v * _F32 + v * _I64 + (b + n_w * m) * c * _F32,
        "minimum table": q * b * m * _F32,
        "distance tiles": n_w * one_tile,
        "re-score temporaries": n_w * (rows * m + m * (c + 2)) * _F32
        if settings is not None else 0,
        "sorting": n_w * 16 * m * b,
        "codegraph gaps": n_w * 4 * 8 * m * (t + 1) if settings is not None else 0,
        "rows": 5 * q_rows * n + v_rows * per_token,
        "rows (concatenation)": v_rows * per_token,
        "graph": (13 * b * n + 16 * b * b) if settings is not None else 0,
        "outputs": 5 * q_rows * n + (8 * b * n if stage == "one-shot" and settings else 0),
    }
    on_device = {"gathered tokens", "minimum table", "distance tiles", "re-score temporaries",
                 "sorting"}
    codegraph_on = settings is not None
    phases = _phases(stage, terms, codegraph_on)
    if dev.type == "cpu":
        peak = host_peak = max(phases.values())
    else:
        device_terms = {k: (val if k in on_device else 0) for k, val in terms.items()}
        host_terms = {k: (0 if k in on_device else val) for k, val in terms.items()}
        peak = max(_phases(stage, device_terms, codegraph_on).values())
        host_peak = max(_phases(stage, host_terms, codegraph_on).values())
    return MemoryEstimate(stage, int(peak), int(host_peak), phases, terms, mb, tile)


def _phases(stage: str, t: dict[str, int], codegraph: bool) -> dict[str, int]:
    """Bytes alive in each phase of a stage."""
    if stage == "graph":
        return {"graph": t["rows"] + t["graph"]}
    bank, table, tiles = t["gathered tokens"], t["minimum table"], t["distance tiles"]
    fill = bank + table + tiles
    build = (table + tiles + t["sorting"] + t["codegraph gaps"] + t["rows"]
             + t["rows (concatenation)"])
    if stage == "score" or not codegraph:  # the bank is freed once the table is filled
        return {"fill table": fill, "build rows": build}
    rescore = fill + t["re-score temporaries"] + t["sorting"] + t["graph"] + t["outputs"]
    if stage == "rescore":
        return {"fill table": fill, "re-score": rescore}
    # one-shot CoDeGraph: the bank and the table stay until re-scoring ends, and the freed
    # temporaries of building the rows stay resident (the allocator keeps them)
    return {"fill table": fill, "build rows": build + bank,
            "re-score": rescore + t["codegraph gaps"] + t["rows"] + t["rows (concatenation)"]}


# ------------------------------------------------------------------------------------------------
def plan_memory(
    budget_bytes: int,
    n_images: int,
    valid_counts: int | Sequence[int] | np.ndarray,
    dim: int,
    n_tokens: int,
    *,
    n_shards: int = 1,
    codegraph: CodeGraphSettings | bool | None = True,
    block_mb: float | None = None,
    device: str | torch.device = "cpu",
    workers: int | None = None,
    held_bytes: int = 0,
    held_bytes_per_image: int = 0,
    margin: float = DEFAULT_MARGIN,
) -> MemoryPlan:
    """Fit scoring of one layer into ``budget_bytes``, or raise :class:`TempFailError` (75).

    Keeps ``block_mb`` (default 256) when it fits, else the largest smaller block setting
    that does (halving down to :data:`MIN_BLOCK_MB`). With ``n_shards == 1`` the one-shot
    stage is planned; otherwise every stage of one shard (``ceil(B / n_shards)`` query images)
    and the graph stage. ``held_bytes`` (process baseline) and ``held_bytes_per_image`` (e.g.
    the loaded tokens of every layer and the per-layer scores) are memory the caller holds
    meanwhile, counted against the budget; the predicted working memory counts ``1 + margin``
    times (:data:`DEFAULT_MARGIN`). Results are byte-identical across shard counts
    only for equal block settings: pass the returned ``block_mb`` to every shard.

    Raises
    ------
    TempFailError
        Exit code 75; the message gives the predicted need, the budget and the fix: a
        ``--shards`` value that fits (when sharding helps) and a ``--batch-size`` that does.
    """
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be > 0, got {budget_bytes}")
    if n_shards < 1 or n_shards > n_images:
        raise ValueError(f"n_shards must be in [1, {n_images}], got {n_shards}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    counts = _counts(valid_counts, n_images)
    kw = dict(codegraph=codegraph, device=device, workers=workers, margin=margin)
    held = int(held_bytes) + int(held_bytes_per_image) * n_images
    requested = DEFAULT_BLOCK_MB if block_mb is None else float(block_mb)
    mb = requested
    while True:
        estimates = _stage_estimates(n_images, counts, dim, n_tokens, n_shards, mb, kw)
        if _need(estimates, margin) + held <= budget_bytes:
            return MemoryPlan(mb, n_shards, int(budget_bytes), estimates)
        if mb <= MIN_BLOCK_MB:
            break
        mb = max(MIN_BLOCK_MB, mb / 2)
    need = _need(estimates, margin) + held
    raise TempFailError(
        f"scoring one layer of {n_images} images (up to {int(counts.max())} valid tokens, "
        f"C = {dim}) in {n_shards} shard(s) needs at least about {_gib(need)} (smallest block "
        f"{MIN_BLOCK_MB:g} MB, {100 * margin:.0f} % margin, including {_gib(held)} held by "
        f"the run), above the {_gib(budget_bytes)} budget",
        fix=_fix(budget_bytes, n_images, counts, dim, n_tokens, n_shards, kw,
                 int(held_bytes), int(held_bytes_per_image)),
    )


def _need(estimates: list[MemoryEstimate], margin: float) -> int:
    return int(math.ceil(max(e.peak for e in estimates) * (1 + margin)))


def _stage_estimates(n_images: int, counts: np.ndarray, dim: int, n_tokens: int,
                     n_shards: int, mb: float, kw: dict) -> list[MemoryEstimate]:
    kw = {k: v for k, v in kw.items() if k != "margin"}
    if n_shards == 1:
        return [predict_memory("one-shot", n_images, counts, dim, n_tokens, block_mb=mb, **kw)]
    q = math.ceil(n_images / n_shards)
    stages = ["score", "rescore"] + (["graph"] if kw.get("codegraph") else [])
    return [predict_memory(s, n_images, counts, dim, n_tokens, n_query=q, block_mb=mb, **kw)
            for s in stages]


def _fits(budget: int, n_images: int, counts: np.ndarray, dim: int, n_tokens: int,
          n_shards: int, kw: dict, held: int, per_image: int) -> bool:
    estimates = _stage_estimates(n_images, counts, dim, n_tokens, n_shards, MIN_BLOCK_MB, kw)
    return _need(estimates, kw["margin"]) + held + per_image * n_images <= budget


def _fix(budget: int, n_images: int, counts: np.ndarray, dim: int, n_tokens: int,
         n_shards: int, kw: dict, held: int, per_image: int) -> str:
    """The smallest ``--shards`` that fits (if any) and the largest ``--batch-size`` that does."""
    fixes = []
    shards = next((s for s in range(n_shards + 1, n_images + 1)
                   if _fits(budget, n_images, counts, dim, n_tokens, s, kw, held, per_image)),
                  None)
    if shards is not None:
        fixes.append(f"score in {shards} shards (`cg3d slurm-script --shards {shards}`, or the steps "
                     f"`--stage score|rescore --shard i/{shards}`)")
    ranked = np.sort(counts)[::-1]
    batch = next((b for b in range(n_images - 1, 1, -1)
                  if _fits(budget, b, ranked[:b], dim, n_tokens, min(n_shards, b), kw, held,
                           per_image)), None)
    if batch is not None:
        fixes.append(f"--batch-size {batch}" + (f" (with --shards {n_shards})"
                                                 if n_shards > 1 else ""))
    if not fixes:
        return "give the run more memory (--mem) or use a device with more memory"
    return " or ".join(fixes) + ", or give the run more memory (--mem)"
