"""MuSc mutual scoring of 3D patch tokens (method.md §3, official semantics of MuSc's ``_MSM.py``).

For a valid token ``z`` of image ``i`` and every other image ``j``,
``d_j(z) = min_q ||z - q||_2`` over the valid tokens ``q`` of ``j`` (true Euclidean distance).
The ``B - 1`` values, sorted ascending, are the token's mutual similarity vector (MSV); its score
is the mean of the ``K = floor(fraction * (B - 1))`` smallest. Invalid tokens score 0 and are
never references; an image is never compared with itself.

Computation (memory bounded by a setting, work proportional to the valid-token counts):

- the valid tokens of every image are gathered once, centred on the batch mean (distances are
  translation invariant; centring shrinks the norms and so the cancellation error of the
  expansion below) and augmented to ``[x, 1, |x|^2]`` (column side) / ``[-2x, |x|^2, 1]`` (row
  side), so that ONE fp32 GEMM gives ``|a|^2 + |b|^2 - 2 a.b`` for a whole block;
- each unordered image pair ``(a, b)``, ``a < b``, is computed once, in blocks of at most
  ``chunk_size`` rows of ``a`` written into one preallocated buffer; the block's row minima give
  ``a -> b`` and its column minima ``b -> a``;
- minima are kept squared in a table of shape ``(Q, B, M)`` (Q scored images, M the largest
  valid count); the clamp at 0 and the square root are applied to the minima only.

On CUDA, TF32 is switched off for the distance GEMMs (``torch.backends.cuda.matmul
.fp32_precision = "ieee"``, restored afterwards): TF32 keeps 10 mantissa bits, far too few for
``|a|^2 + |b|^2 - 2 a.b`` of near neighbours.

Bit-identity of shards: with ``query`` the same blocks are computed with the same shapes in the
same order as in the full run (pairs not involving a query image are skipped), so the rows
equal those of the full run exactly on a given device.
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

#: Below this batch size the paper (Table 5) reports degraded, high-variance results.
WARN_BELOW_BATCH = 15
#: Default memory of one block of pairwise distances (matches ``--score-chunk-mb``).
DEFAULT_BLOCK_MB = 256.0

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


def chunk_rows(max_count: int, chunk_size: int | None, block_mb: float | None) -> int:
    """Rows of one distance block: ``chunk_size``, else what fits in ``block_mb`` (fp32)."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return int(chunk_size)
    mb = DEFAULT_BLOCK_MB if block_mb is None else float(block_mb)
    if mb <= 0:
        raise ValueError(f"block_mb must be > 0, got {block_mb}")
    return max(1, int(mb * 2**20 // (4 * max(1, max_count))))


# ------------------------------------------------------------------------------------------------
# gathered tokens
class TokenBank:
    """The valid tokens of every image, gathered once, centred and augmented, on ``device``.

    ``cols[j]`` is ``[x; 1; |x|^2]`` of shape ``(C + 2, n_j)`` (contiguous);
    :meth:`row_side` builds ``[-2x, |x|^2, 1]`` of shape ``(n_i, C + 2)`` so that
    ``row_side(i) @ cols[j]`` is the squared-distance block of ``(i, j)``.
    ``positions[j]`` holds the token indices (into ``N``) of image ``j``'s valid tokens.
    """

    def __init__(self, tokens: torch.Tensor, valid: torch.Tensor, device: torch.device):
        self.device = device
        self.n_images, self.n_tokens, self.dim = (int(s) for s in tokens.shape)
        valid_cpu = valid.cpu()
        self.positions = [torch.nonzero(valid_cpu[i]).flatten() for i in range(self.n_images)]
        self.counts = np.array([len(p) for p in self.positions], dtype=np.int64)
        # one reusable scratch image: no per-image temporaries (they fragment the heap)
        self._scratch = torch.empty((int(self.counts.max()), self.dim), dtype=torch.float32,
                                    device=device)
        mean = self._mean(tokens)
        self.cols = [self._gather(tokens, i, mean) for i in range(self.n_images)]
        del self._scratch

    def _image(self, tokens: torch.Tensor, i: int) -> torch.Tensor:
        """Valid tokens of image ``i`` as fp32 on the device, in the scratch buffer."""
        pos = self.positions[i].to(tokens.device)
        out = self._scratch[: len(pos)]
        if tokens.dtype == torch.float32 and tokens.device == out.device:
            torch.index_select(tokens[i], 0, pos, out=out)
        else:
            out.copy_(tokens[i].index_select(0, pos))
        return out

    def _mean(self, tokens: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        for i in range(self.n_images):
            total += self._image(tokens, i).sum(dim=0).to(torch.float64)
        return (total / float(self.counts.sum())).to(torch.float32)

    def _gather(self, tokens: torch.Tensor, i: int, mean: torch.Tensor) -> torch.Tensor:
        x = self._image(tokens, i).sub_(mean)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"image {i} has non-finite valid tokens (NaN or Inf)")
        out = torch.empty((self.dim + 2, x.shape[0]), dtype=torch.float32, device=self.device)
        out[: self.dim] = x.t()
        out[self.dim] = 1.0
        torch.linalg.vecdot(x, x, dim=1, out=out[self.dim + 1])
        return out

    def row_side(self, i: int) -> torch.Tensor:
        """``[-2x, |x|^2, 1]`` of image ``i``, shape ``(n_i, C + 2)``, contiguous."""
        col = self.cols[i]
        out = torch.empty((col.shape[1], self.dim + 2), dtype=torch.float32, device=self.device)
        torch.mul(col[: self.dim].t(), -2.0, out=out[:, : self.dim])
        out[:, self.dim] = col[self.dim + 1]
        out[:, self.dim + 1] = 1.0
        return out


class BlockWorker:
    """Squared-distance blocks of image pairs in one preallocated buffer, rows chunked."""

    def __init__(self, bank: TokenBank, rows_per_block: int):
        self.bank = bank
        self.rows = int(rows_per_block)
        max_n = int(bank.counts.max())
        self.rows = min(self.rows, max_n)
        self._buffer = torch.empty(self.rows * max_n, dtype=torch.float32, device=bank.device)
        self._colmin = torch.empty(max_n, dtype=torch.float32, device=bank.device)

    def blocks(self, row_side: torch.Tensor, b: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(r0, r1, block)``: squared distances of rows ``r0:r1`` of ``row_side`` to image ``b``.

        The block is a view of the shared buffer, valid until the next iteration.
        """
        col = self.bank.cols[b]
        n_a, n_b = row_side.shape[0], col.shape[1]
        for r0 in range(0, n_a, self.rows):
            r1 = min(n_a, r0 + self.rows)
            block = self._buffer[: (r1 - r0) * n_b].view(r1 - r0, n_b)
            torch.mm(row_side[r0:r1], col, out=block)
            yield r0, r1, block

    def pair_minima(
        self,
        row_side: torch.Tensor,
        b: int,
        row_out: torch.Tensor | None,
        col_out: torch.Tensor | None,
        *,
        exclude_rows: torch.Tensor | None = None,
        exclude_cols: torch.Tensor | None = None,
    ) -> None:
        """Row minima (``a -> b``) into ``row_out`` and column minima (``b -> a``) into ``col_out``.

        ``exclude_rows`` / ``exclude_cols`` (bool over the rows of ``a`` / tokens of ``b``) remove
        tokens from the reference side: excluded rows never give a column minimum, excluded
        columns never give a row minimum. Empty reference sets give ``+inf``.
        """
        if col_out is not None:
            col_out.fill_(math.inf)
        colmin = self._colmin[: self.bank.cols[b].shape[1]]
        for r0, r1, block in self.blocks(row_side, b):
            if col_out is not None:
                if exclude_rows is None:
                    torch.amin(block, dim=0, out=colmin)
                    torch.minimum(col_out, colmin, out=col_out)
                else:
                    keep = ~exclude_rows[r0:r1]
                    if bool(keep.any()):
                        torch.minimum(col_out, block[keep].amin(dim=0), out=col_out)
            if row_out is not None:
                if exclude_cols is not None:
                    block.masked_fill_(exclude_cols.unsqueeze(0), math.inf)
                torch.amin(block, dim=1, out=row_out[r0:r1])


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


def _fill_table(bank: TokenBank, worker: BlockWorker, rows: tuple[int, ...]) -> torch.Tensor:
    n_img, max_n = bank.n_images, int(bank.counts.max())
    table = torch.full((len(rows), n_img, max_n), math.inf, dtype=torch.float32, device=bank.device)
    where = {image: q for q, image in enumerate(rows)}
    for a in range(n_img):
        partners = [b for b in range(a + 1, n_img) if a in where or b in where]
        if not partners:
            continue
        row_side = bank.row_side(a)
        for b in partners:
            row_out = table[where[a], b, : bank.counts[a]] if a in where else None
            col_out = table[where[b], a, : bank.counts[b]] if b in where else None
            worker.pair_minima(row_side, b, row_out, col_out)
    return table


def build_table(
    tokens: ArrayLike,
    valid: ArrayLike,
    *,
    query: Sequence[int] | None = None,
    chunk_size: int | None = None,
    block_mb: float | None = None,
    device: str | torch.device = "cpu",
) -> tuple[MinDistanceTable, TokenBank, BlockWorker]:
    """Table plus the gathered tokens and block worker (reused by the CoDeGraph stage)."""
    tok, val = check_inputs(tokens, valid)
    dev = resolve_device(device)
    rows = _check_query(query, int(tok.shape[0]))
    with torch.no_grad(), exact_fp32_matmul():
        bank = TokenBank(tok, val, dev)
        worker = BlockWorker(bank, chunk_rows(int(bank.counts.max()), chunk_size, block_mb))
        sq = _fill_table(bank, worker, rows)
    table = MinDistanceTable(sq, rows, bank.positions, bank.counts, bank.n_tokens)
    return table, bank, worker


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
        Rows per distance block; overrides ``block_mb``.
    block_mb : float, optional
        Memory of one distance block in MB (default 256).
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
    """``(Q, N)`` MuSc scores of the table's rows with ``K = k``."""
    return torch.stack([score_row(table, q, k) for q in range(len(table.rows))])


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
        Rows (tokens of one image) per distance block; overrides ``block_mb``.
    block_mb : float, optional
        Memory of one distance block in MB (default 256). Working memory is one block, the
        gathered fp32 tokens and the ``(Q, B, max valid count)`` minimum table.
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
    tok, val = check_inputs(tokens, valid)
    k = musc_k(int(tok.shape[0]), fraction)
    warn_if_small(int(tok.shape[0]))
    table = min_distance_table(tok, val, query=query, chunk_size=chunk_size,
                               block_mb=block_mb, device=device)
    with torch.no_grad():
        scores = scores_from_table(table, k)
    return _like(scores, tokens)
