"""MuSc mutual scoring of 3D patch tokens (method.md §3, official semantics of MuSc's ``_MSM.py``).

For a valid token ``z`` of image ``i`` and every other image ``j``,
``d_j(z) = min_q ||z - q||_2`` over the valid tokens ``q`` of ``j`` (true Euclidean distance).
The ``B - 1`` values, sorted ascending, are the token's mutual similarity vector (MSV); its score
is the mean of the ``K = floor(fraction * (B - 1))`` smallest. Invalid tokens score 0 and are
never references; an image is never compared with itself.

Computation (memory bounded by a setting, work proportional to the valid-token counts): exact
fp32 distance tiles (:mod:`.tiles`: one GEMM per tile of several reference images, each image
pair computed once and used both ways) reduced to a table of squared per-(token, image) minima
of shape ``(Q, B, M)`` (Q scored images, M the largest valid count); the clamp at 0 and the
square root are applied to the minima only.

On CUDA, TF32 is switched off for the distance GEMMs (``torch.backends.cuda.matmul
.fp32_precision = "ieee"``, restored afterwards): TF32 keeps 10 mantissa bits, far too few for
``|a|^2 + |b|^2 - 2 a.b`` of near neighbours.

Bit-identity of shards: with ``query`` the same tiles are computed with the same shapes as in the
full run (tiles not involving a query image are skipped), so the rows equal those of the full
run exactly on a given device.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ...errors import BatchTooSmallError, DeviceUnavailableError
from .tiles import DEFAULT_BLOCK_MB, TileShape, TokenBank, fill_minima, tile_shape  # noqa: F401
from .workers import core_workers

#: Below this batch size the paper (Table 5) reports degraded, high-variance results.
WARN_BELOW_BATCH = 15

ArrayLike = np.ndarray | torch.Tensor


class SmallBatchWarning(UserWarning):
    """The batch is usable but smaller than the paper recommends."""


# ------------------------------------------------------------------------------------------------
# settings and validation
def musc_k(n_images: int, fraction: float) -> int:
    """``K = floor(fraction * (B - 1))``; raise :class:`BatchTooSmallError` when ``K < 1``.

    A relative tolerance of 1e-9 absorbs binary rounding (``0.3 * 10`` is 3, not 2.999...).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = math.floor(fraction * (n_images - 1) * (1 + 1e-9))
    if k < 1:
        need = minimum_batch_size(fraction)
        raise BatchTooSmallError(
            f"mutual scoring needs K = floor(fraction * (B - 1)) >= 1 nearest images; with "
            f"fraction {fraction} and B = {n_images} images K = {max(k, 0)}: at least {need} "
            f"images are needed at this fraction",
            fix=f"score at least {need} images together (15 or more recommended), "
            f"or raise the fraction",
        )
    return k


def minimum_batch_size(fraction: float) -> int:
    """Smallest ``B`` with ``floor(fraction * (B - 1)) >= 1``."""
    return math.ceil(1.0 / fraction - 1e-9) + 1


def warn_if_small(n_images: int) -> None:
    if n_images < WARN_BELOW_BATCH:
        msg = (f"scoring a batch of {n_images} images: below {WARN_BELOW_BATCH} images "
               f"mutual scoring is less reliable (paper, Table 5)")
        warnings.warn(msg, SmallBatchWarning, stacklevel=3)


def resolve_device(device: str | torch.device) -> torch.device:
    """``torch.device``; :class:`DeviceUnavailableError` when CUDA is asked for but absent."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device {device!r} requested but no CUDA device is visible",
            fix="run on a machine with a GPU (docker --gpus all / apptainer --nv) or use device='cpu'",
        )
    return dev


@contextmanager
def exact_fp32_matmul() -> Iterator[None]:
    """Disable TF32 for CUDA matmuls inside the block (restored on exit)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        previous = matmul.fp32_precision
        matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = previous
    else:  # older torch
        previous = matmul.allow_tf32
        matmul.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32 = previous


def _as_tensor(x: ArrayLike) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def check_inputs(tokens: ArrayLike, valid: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes ``(B, N, C)`` / ``(B, N)`` as CPU-or-device tensors; every image has a valid token."""
    tok, val = _as_tensor(tokens), _as_tensor(valid)
    if tok.ndim != 3:
        raise ValueError(f"tokens must have shape (B, N, C), got {tuple(tok.shape)}")
    if tuple(val.shape) != tuple(tok.shape[:2]):
        raise ValueError(f"valid must have shape {tuple(tok.shape[:2])}, got {tuple(val.shape)}")
    if not tok.is_floating_point():
        raise ValueError(f"tokens must be floating point, got {tok.dtype}")
    val = val.to(torch.bool)
    empty = torch.nonzero(~val.any(dim=1)).flatten().tolist()
    if empty:
        raise ValueError(f"image(s) {empty} have no valid token: nothing to compare with")
    return tok, val


def _check_query(query: Sequence[int] | None, n_images: int) -> tuple[int, ...]:
    if query is None:
        return tuple(range(n_images))
    rows = tuple(int(q) for q in query)
    if not rows:
        raise ValueError("query is empty")
    if len(set(rows)) != len(rows) or min(rows) < 0 or max(rows) >= n_images:
        raise ValueError(f"query must hold distinct image indices in [0, {n_images}), got {rows}")
    return rows


# ------------------------------------------------------------------------------------------------
# per-pair minimum table
@dataclass
class MinDistanceTable:
    """Squared minimum distances of every scored token to every image of the batch.

    Attributes
    ----------
    sq : torch.Tensor
        ``(Q, B, M)`` float32. ``sq[q, j, p]`` is the squared distance from the ``p``-th valid
        token of image ``rows[q]`` (compact order, see ``positions``) to its nearest valid token of
        image ``j``. ``+inf`` where ``j == rows[q]`` and for ``p >= counts[rows[q]]``. Values may be
        slightly negative (fp32 expansion): clamp before taking roots.
    rows : tuple of int
        The scored images (``query`` order).
    positions : list of torch.Tensor
        For every image of the batch, the token indices of its valid tokens.
    counts : numpy.ndarray
        Valid tokens per image.
    n_tokens : int
        ``N``.
    """

    sq: torch.Tensor
    rows: tuple[int, ...]
    positions: list[torch.Tensor]
    counts: np.ndarray
    n_tokens: int

    @property
    def n_images(self) -> int:
        return int(self.sq.shape[1])

    def row_of(self, image: int) -> int:
        return self.rows.index(image)


def build_table(
    tokens: ArrayLike,
    valid: ArrayLike,
    *,
    query: Sequence[int] | None = None,
    chunk_size: int | None = None,
    block_mb: float | None = None,
    device: str | torch.device = "cpu",
) -> tuple[MinDistanceTable, TokenBank, TileShape]:
    """Table plus the gathered tokens and the tile shape (reused by the CoDeGraph stage).

    ``block_mb`` bounds the tiles of all worker threads together (:mod:`.workers`).
    """
    tok, val = check_inputs(tokens, valid)
    dev = resolve_device(device)
    rows = _check_query(query, int(tok.shape[0]))
    with core_workers(dev) as workers, torch.no_grad(), exact_fp32_matmul():
        bank, shape = build_bank(tok, val, chunk_size=chunk_size, block_mb=block_mb, device=dev)
        sq = empty_table(bank, len(rows))
        fill_minima(bank, shape, sq, rows, workers)  # tile buffers kept for re-scoring
    table = MinDistanceTable(sq, rows, bank.positions, bank.counts, bank.n_tokens)
    return table, bank, shape


def build_bank(tok: torch.Tensor, val: torch.Tensor, *, chunk_size: int | None,
               block_mb: float | None, device: torch.device) -> tuple[TokenBank, TileShape]:
    """The gathered tokens and the tile shape of checked inputs (no distances yet).

    ``block_mb`` bounds the tiles of all worker threads together (:mod:`.workers`).
    """
    with core_workers(device) as workers, torch.no_grad():
        bank = TokenBank(tok, val, device, workers)
        mb = (DEFAULT_BLOCK_MB if block_mb is None else float(block_mb)) / workers.n
        shape = tile_shape(int(bank.counts.max()), mb, chunk_size=chunk_size, device=device)
    return bank, shape


def empty_table(bank: TokenBank, n_rows: int) -> torch.Tensor:
    """``(n_rows, B, M)`` float32 table filled with ``+inf``."""
    return torch.full((n_rows, bank.n_images, int(bank.counts.max())), math.inf,
                      dtype=torch.float32, device=bank.device)


def min_distance_table(
    tokens: ArrayLike,
    valid: ArrayLike,
    *,
    query: Sequence[int] | None = None,
    chunk_size: int | None = None,
    block_mb: float | None = None,
    device: str | torch.device = "cpu",
) -> MinDistanceTable:
    """Squared per-(image, reference image) minimum distances of every valid token.

    Parameters
    ----------
    tokens : (B, N, C) float array or tensor
    valid : (B, N) bool array or tensor
    query : sequence of int, optional
        Images to tabulate (rows); all by default. Only pairs involving them are computed.
    chunk_size : int, optional
        Rows per distance tile (legacy setting; the tile shape is otherwise tuned).
    block_mb : float, optional
        Memory bound of the distance tiles in MB (default 256, the app's ``--score-chunk-mb``),
        shared by the CPU worker threads (one per torch thread).
    device : str or torch.device
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns
    -------
    MinDistanceTable
    """
    return build_table(tokens, valid, query=query, chunk_size=chunk_size, block_mb=block_mb,
                       device=device)[0]


# ------------------------------------------------------------------------------------------------
# MSV and scores
def sorted_msv(table: MinDistanceTable, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted MSV of the valid tokens of ``table.rows[q]``.

    Returns
    -------
    distances : torch.Tensor
        ``(n_i, B - 1)`` float32, ascending true distances (``+inf`` for empty reference sets).
    images : torch.Tensor
        ``(n_i, B - 1)`` int64, the image realising each distance (stable order on ties).
    """
    n = int(table.counts[table.rows[q]])
    values, images = torch.sort(table.sq[q, :, :n].t(), dim=1, stable=True)
    values, images = values[:, :-1], images[:, :-1]  # the image itself (+inf) sorts last
    return values.clamp_(min=0.0).sqrt_(), images


def mean_smallest(distances: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the first ``k`` columns of ascending ``distances``, ignoring ``+inf`` entries.

    Without ``+inf`` (plain MuSc) this is exactly ``distances[:, :k].mean(1)``; ``+inf`` can only
    appear when a reference set was emptied (CoDeGraph exclusions); a token without any finite
    distance scores 0.
    """
    head = distances[:, :k]
    finite = torch.isfinite(head)
    if bool(finite.all()):
        return head.mean(dim=1)
    total = torch.where(finite, head, torch.zeros_like(head)).sum(dim=1)
    count = finite.sum(dim=1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def score_row(table: MinDistanceTable, q: int, k: int) -> torch.Tensor:
    """``(N,)`` MuSc scores of image ``table.rows[q]`` (0 for invalid tokens)."""
    distances, _ = sorted_msv(table, q)
    out = torch.zeros(table.n_tokens, dtype=torch.float32, device=table.sq.device)
    out[table.positions[table.rows[q]].to(out.device)] = mean_smallest(distances, k)
    return out


def scores_from_table(table: MinDistanceTable, k: int) -> torch.Tensor:
    """``(Q, N)`` MuSc scores of the table's rows with ``K = k`` (one job per row)."""
    with core_workers(table.sq.device) as workers, torch.no_grad():
        return torch.stack(workers.map(lambda q: score_row(table, q, k), range(len(table.rows))))


def _like(scores: torch.Tensor, tokens: ArrayLike) -> ArrayLike:
    if isinstance(tokens, torch.Tensor):
        return scores.to(tokens.device)
    return scores.cpu().numpy().astype(np.float32, copy=False)


def mutual_scores(
    tokens: ArrayLike,
    valid: ArrayLike,
    fraction: float = 0.3,
    *,
    query: Sequence[int] | None = None,
    chunk_size: int | None = None,
    block_mb: float | None = None,
    device: str | torch.device = "cpu",
) -> ArrayLike:
    """MuSc mutual scores of every token of a batch (one layer).

    Parameters
    ----------
    tokens : (B, N, C) numpy array or torch tensor, float
        Tokens of ``B`` images. Any float dtype; distances are computed in fp32.
    valid : (B, N) bool
        Valid (brain) tokens. Invalid tokens score 0 and are never references.
    fraction : float, default 0.3
        ``K = floor(fraction * (B - 1))`` smallest MSV entries are averaged (MuSc's code: 0.3).
    query : sequence of int, optional
        Score only these images (against all ``B``): the result equals exactly those rows of
        the full run. Only image pairs involving a query image are computed (shards).
    chunk_size : int, optional
        Rows (tokens of one image) per distance tile (legacy setting; tuned otherwise).
    block_mb : float, optional
        Memory bound of the distance tiles in MB (default 256). Working memory is the tiles,
        the gathered fp32 tokens and the ``(Q, B, max valid count)`` minimum table (see
        :mod:`.memory` for the full prediction).
    device : str or torch.device, default "cpu"
        ``"cpu"``, ``"cuda"``, ``"cuda:N"``.

    Returns
    -------
    scores : (B, N) or (len(query), N) float32
        numpy in -> numpy out; torch in -> torch out (on the input's device).

    Raises
    ------
    BatchTooSmallError
        When ``K < 1``.
    """
    with core_workers(resolve_device(device)):
        tok, val = check_inputs(tokens, valid)
        k = musc_k(int(tok.shape[0]), fraction)
        warn_if_small(int(tok.shape[0]))
        table = min_distance_table(tok, val, query=query, chunk_size=chunk_size,
                                   block_mb=block_mb, device=device)
        scores = scores_from_table(table, k)
    return _like(scores, tokens)
