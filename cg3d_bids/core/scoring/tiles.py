"""Exact fp32 squared-distance tiles of a batch of token sets, reduced to per-image minima.

The valid tokens of every image are gathered once into one bank, centred on the batch mean
(distances are translation invariant; centring shrinks the norms and so the cancellation error
of the expansion below) and augmented so that ONE fp32 GEMM gives ``|a|^2 + |b|^2 - 2 a.b``:
the bank holds ``[x; 1; |x|^2]`` column-wise (shape ``(C + 2, T)``, image after image) and
:meth:`TokenBank.row_side` builds ``[-2x, |x|^2, 1]`` for the rows of one image.

Tiles. Every unordered image pair ``(a, b)``, ``a < b``, is computed once and used both ways.
The references ``b > a`` of row image ``a`` are split into *groups* of consecutive images
whose tokens together fill at most ``TileShape.cols`` columns (one image at least); a tile is
``rows`` rows of ``a`` against one group, one GEMM into a preallocated buffer. Its row minima
per reference image give ``a -> b``; its column minima (a running minimum over the row blocks
of ``a``) give ``b -> a``. Several reference images per GEMM keep small images' GEMMs wide
(MKL and GPUs run wide GEMMs closer to their peak) and the tile bounded whatever the image
sizes; the CPU tile shape below is what measured best. On CPU each row image's tiles are one
single-threaded job of :mod:`.workers`.

BLAS library (:mod:`.blas`). With torch's (MKL; the default except on AMD CPUs) a GEMM's
elements do not depend on its shape (tested), so the tile shape is a speed setting only. With
numpy's OpenBLAS (the default on AMD CPUs: 14-18 % less time there) the last bits of an element
depend on the GEMM's shape, so every GEMM is one row block against ONE reference image
(``TileShape.cols == 0``; OpenBLAS runs narrow GEMMs as fast as wide ones, measured): a pair's
GEMM then has the same shape in a full run, in a shard and in :mod:`.reference`'s per-image
scoring, which therefore agree bit for bit or to float rounding as before.

Exactness of shards. The tiles depend only on the valid counts and the tile shape, never on
which images are queried: a run over some query images computes the tiles that touch them,
with the same GEMM calls (same shapes, same operands) as the full run, so every minimum is
bit-identical to the full run's on the same device, thread count and tile shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .blas import distance_mm, gemm_library
from .workers import CoreWorkers

#: Default memory of one distance block in MB (matches the app's ``--score-chunk-mb``).
DEFAULT_BLOCK_MB = 256.0
#: CPU tile shape: rows of the row image and columns (reference tokens) per GEMM. Measured with
#: two worker threads (C = 384; B = 32 x N = 1369, and B = 12 x 1000-2500 valid tokens).
#: MKL: on a 2-core AVX-512 machine 256-1369 rows x 1369-8192 columns all ran at 70-73 % of the
#: 4096^3 matmul; on a 2-core AMD EPYC (AVX2, 512 KB L2 per core) 256 x 4096 ran 7-12 % faster
#: than 512 x 4096 (B = 32, medians of 4 alternated rounds: 6.4 s against 7.2 s) and no slower
#: than 128 or 64 rows. OpenBLAS (numpy's, on that EPYC): one image per GEMM with 256, 512 or
#: 1369 rows, and 256 x 4096 groups, all within 2 % (medians of 4 alternated rounds, 4.60-4.68
#: s). The GEMM is ~92-94 % of a tile's time; the two reductions read the block back.
#: With MKL's default kernels (AVX2, AVX and SSE4.2 checked here; AVX-512 per an earlier stop's
#: note) the tile shape is a speed setting only: shapes whose row blocks are not small
#: (:func:`row_blocks`) give bit-identical minima (tested); a ``chunk_size`` of a few rows runs
#: BLAS's small-matrix kernel, which rounds differently, and so does MKL's reproducibility mode
#: ``MKL_CBWR=COMPATIBLE`` (~2e-6 relative). With OpenBLAS the rows change the last bits
#: (module docstring). ``256 x 4096`` bounds the tile (4 MB) and the BLAS's packed copy of it
#: per thread.
CPU_TILE_ROWS = 256
CPU_TILE_COLS = 4096


@dataclass(frozen=True)
class TileShape:
    """Rows of the row image and the column budget of one GEMM tile.

    A group of reference images is as many consecutive images as fit in ``cols`` columns,
    one image at least (so a tile is ``rows x max(cols, largest valid count)`` at most);
    ``cols == 0``: exactly one image per group.
    """

    rows: int
    cols: int

    def max_bytes(self, max_count: int) -> int:
        """Bytes of the largest distance block."""
        return 4 * self.rows * max(self.cols, max_count)


def tile_shape(max_count: int, block_mb: float | None = None, *, chunk_size: int | None = None,
               device: torch.device | str = "cpu", library: str | None = None) -> TileShape:
    """Tile shape for images of at most ``max_count`` valid tokens within ``block_mb``.

    CPU with torch's BLAS: the cache-friendly :data:`CPU_TILE_ROWS` x :data:`CPU_TILE_COLS`,
    shrunk (columns to one image first, then rows) to fit ``block_mb``. CPU with numpy's BLAS
    (``library``, default :func:`~.blas.gemm_library`): :data:`CPU_TILE_ROWS` rows (fewer to
    fit ``block_mb``) against one image (module docstring). CUDA: the whole budget (all rows of
    an image, as many reference columns as fit), since GPU GEMMs gain from size.
    ``chunk_size`` fixes the rows (legacy setting; at least 1).
    """
    mb = DEFAULT_BLOCK_MB if block_mb is None else float(block_mb)
    if mb <= 0:
        raise ValueError(f"block_mb must be > 0, got {block_mb}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    max_count = max(1, int(max_count))
    floats = int(mb * 2**20 // 4)
    if torch.device(device).type == "cuda":
        rows = max_count if chunk_size is None else int(chunk_size)
        return TileShape(rows, max(max_count, floats // rows))
    one_image = (gemm_library(device) if library is None else library) == "numpy"
    rows = CPU_TILE_ROWS if chunk_size is None else int(chunk_size)
    cols = max_count if one_image else max(max_count, min(CPU_TILE_COLS, floats // rows))
    if chunk_size is None:
        rows = max(1, min(rows, floats // cols))
    return TileShape(min(rows, max_count), 0 if one_image else cols)  # 0: one image per GEMM


def row_blocks(n_rows: int, rows: int) -> list[tuple[int, int]]:
    """``[r0, r1)`` blocks of at most ``rows`` rows covering ``0..n_rows-1``, of equal size
    (+-1).

    Equal blocks, not full blocks and a remainder: a remainder of a few rows would run BLAS's
    small-matrix kernel, whose sums round differently (MKL on AVX2: below ~48 rows), so the
    minima of those rows would depend on the tile shape.
    """
    if n_rows <= 0:
        return []
    n_blocks = -(-int(n_rows) // int(rows))
    bounds = [n_rows * b // n_blocks for b in range(n_blocks + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def column_groups(counts: np.ndarray, first: int, cols: int) -> list[tuple[int, int]]:
    """Consecutive image ranges ``[g0, g1)`` covering ``first..B-1``, each ``<= cols`` tokens
    (or one image)."""
    groups, b, n_images = [], first, len(counts)
    while b < n_images:
        end, width = b + 1, int(counts[b])
        while end < n_images and width + int(counts[end]) <= cols:
            width += int(counts[end])
            end += 1
        groups.append((b, end))
        b = end
    return groups


def widest_group(counts: np.ndarray, cols: int) -> int:
    """Columns of the widest group of :func:`column_groups` over every row image.

    Every image ``i >= 1`` starts a group (for row image ``i - 1``) and the first group from
    ``i`` is the longest run from ``i`` within ``cols``, so the answer is the widest such run
    (two pointers, O(B)).
    """
    counts = [int(c) for c in counts]
    widest, end, width = max(counts), 1, 0
    for start in range(1, len(counts)):
        if end <= start:
            end, width = start + 1, counts[start]
        while end < len(counts) and width + counts[end] <= cols:
            width += counts[end]
            end += 1
        widest = max(widest, width)
        width -= counts[start]
    return widest


# ------------------------------------------------------------------------------------------------
class TokenBank:
    """The valid tokens of every image, gathered once, centred and augmented, on ``device``.

    Attributes
    ----------
    cols : torch.Tensor
        ``(C + 2, T)`` float32, ``[x; 1; |x|^2]`` of all valid tokens, image after image.
    starts : numpy.ndarray
        ``(B + 1,)`` column offsets of the images in ``cols``.
    positions : list of torch.Tensor
        Per image, the token indices (into ``N``) of its valid tokens (CPU).
    counts : numpy.ndarray
        Valid tokens per image.
    blas : str
        Library of the distance GEMMs: ``"numpy"`` or ``"torch"`` (:func:`~.blas.cpu_blas` on
        CPU, chosen once per bank so that a call never mixes them; ``"torch"`` on CUDA).
    """

    def __init__(self, tokens: torch.Tensor, valid: torch.Tensor, device: torch.device,
                 workers: CoreWorkers | None = None):
        workers = workers or CoreWorkers(None, 1)
        self.device = device
        self.blas = gemm_library(device)
        self.n_images, self.n_tokens, self.dim = (int(s) for s in tokens.shape)
        valid_cpu = valid.cpu()
        self.positions = [torch.nonzero(valid_cpu[i]).flatten() for i in range(self.n_images)]
        self.counts = np.array([len(p) for p in self.positions], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.cols = torch.empty((self.dim + 2, int(self.starts[-1])), dtype=torch.float32,
                                device=device)
        # No per-image allocation outlives its job (kept small objects between large freed
        # temporaries fragment the heap): sums go to one table, temporaries to per-thread scratch.
        sums = torch.empty((self.n_images, self.dim), dtype=torch.float32, device=device)

        def scratch() -> torch.Tensor:
            return torch.empty((int(self.counts.max()), self.dim), dtype=torch.float32,
                               device=device)

        images = range(self.n_images)
        workers.map(lambda i: self._gather(tokens, i, sums[i],
                                           workers.local(("bank", id(self)), scratch)), images)
        mean = (sums.to(torch.float64).sum(dim=0) / float(self.counts.sum())).to(torch.float32)
        finite = workers.map(lambda i: self._centre(i, mean,
                                                    workers.local(("bank", id(self)), scratch)),
                             images)
        workers.release(("bank", id(self)))
        if not all(finite):
            raise ValueError(f"image {finite.index(False)} has non-finite valid tokens (NaN, "
                             "Inf, or too large for fp32 distances)")

    def _gather(self, tokens: torch.Tensor, i: int, total: torch.Tensor,
                scratch: torch.Tensor) -> None:
        """Copy image ``i``'s valid tokens (fp32) into the bank and their sum into ``total``."""
        block = self.image_cols(i)[: self.dim]
        x = scratch[: block.shape[1]]
        pos = self.positions[i].to(tokens.device)
        if tokens.dtype == torch.float32 and tokens.device == x.device:
            torch.index_select(tokens[i], 0, pos, out=x)
        else:
            x.copy_(tokens[i].index_select(0, pos))
        block.copy_(x.t())
        torch.sum(x, dim=0, out=total)

    def _centre(self, i: int, mean: torch.Tensor, scratch: torch.Tensor) -> bool:
        """Centre image ``i`` and fill its ``1`` and ``|x|^2`` rows; False if not finite."""
        block = self.image_cols(i)
        x = block[: self.dim]
        x.sub_(mean.unsqueeze(1))
        square = scratch[: x.shape[1]].t()
        torch.mul(x, x, out=square)
        block[self.dim] = 1.0
        torch.sum(square, dim=0, out=block[self.dim + 1])
        return bool(torch.isfinite(block[self.dim + 1]).all())  # NaN/Inf make the norm so

    def image_cols(self, i: int) -> torch.Tensor:
        """``(C + 2, n_i)`` view of image ``i``'s columns."""
        return self.cols[:, int(self.starts[i]): int(self.starts[i + 1])]

    def row_side(self, i: int, index: torch.Tensor | None = None) -> torch.Tensor:
        """``[-2x, |x|^2, 1]`` of image ``i`` (its tokens ``index`` only, if given), contiguous."""
        col = self.image_cols(i)
        if index is not None:
            col = col[:, index.to(self.device)]
        out = torch.empty((col.shape[1], self.dim + 2), dtype=torch.float32, device=self.device)
        torch.mul(col[: self.dim].t(), -2.0, out=out[:, : self.dim])
        out[:, self.dim] = col[self.dim + 1]
        out[:, self.dim + 1] = 1.0
        return out


# ------------------------------------------------------------------------------------------------
class TileWorker:
    """Squared-distance tiles in one preallocated buffer, reduced to minima.

    On CPU the reductions run in numpy (its ``min`` is 2-4x faster than ``torch.amin``, whose
    dim-0 reduction is not vectorised) on views of the torch buffer; on CUDA in torch.
    ``gemm_calls`` counts the GEMMs run (tests use it to check that shards skip work).
    """

    def __init__(self, bank: TokenBank, shape: TileShape):
        self.bank = bank
        max_n = int(bank.counts.max())
        self.shape = TileShape(min(shape.rows, max_n), shape.cols)
        self.width = max(widest_group(bank.counts, shape.cols), max_n)
        dev = bank.device
        self._buffer = torch.empty(self.shape.rows * self.width, dtype=torch.float32, device=dev)
        self._colmin = torch.empty(self.width, dtype=torch.float32, device=dev)
        self._tmp = torch.empty(self.width, dtype=torch.float32, device=dev)
        self._numpy = dev.type == "cpu"
        self.gemm_calls = 0

    def _block(self, lhs: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        block = self._buffer[: lhs.shape[0] * rhs.shape[1]].view(lhs.shape[0], rhs.shape[1])
        distance_mm(lhs, rhs, block, self.bank.blas)
        self.gemm_calls += 1
        return block

    def group_minima(self, row_side: torch.Tensor, g0: int, g1: int,
                     row_out: torch.Tensor | None,
                     col_out: Sequence[tuple[int, torch.Tensor]]) -> None:
        """Minima of the tiles of ``row_side`` (one image) against reference images ``g0..g1-1``.

        ``row_out``: ``(B, >= n_a)`` table row of the row image, or None; ``row_out[j, :n_a]``
        receives the row minima against image ``j``. ``col_out``: ``(j, out)`` pairs;
        ``out[:n_j]`` receives image ``j``'s minima against the row image.
        """
        bank = self.bank
        c0 = int(bank.starts[g0])
        width = int(bank.starts[g1]) - c0
        rhs = bank.cols[:, c0: c0 + width]
        segments = [(j, int(bank.starts[j]) - c0, int(bank.starts[j + 1]) - c0)
                    for j in range(g0, g1)]
        amin, minimum, wrap = (np.min, np.minimum, torch.Tensor.numpy) if self._numpy else \
            (torch.amin, torch.minimum, lambda t: t)
        run, tmp = wrap(self._colmin[:width]), wrap(self._tmp[:width])
        rows_out = None if row_out is None else wrap(row_out)
        n_rows = row_side.shape[0]
        for r0, r1 in row_blocks(n_rows, self.shape.rows):
            block = wrap(self._block(row_side[r0:r1], rhs))
            if col_out:
                amin(block, 0, out=run if r0 == 0 else tmp)
                if r0:
                    minimum(run, tmp, out=run)
            if rows_out is not None:
                for j, s, e in segments:
                    amin(block[:, s:e], 1, out=rows_out[j, r0:r1])
        for j, out in col_out:
            _, s, e = segments[j - g0]
            out[: e - s].copy_(self._colmin[s:e])

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
        """Minima of one image pair with tokens removed from the reference side.

        Row minima (``a -> b``) into ``row_out``, column minima (``b -> a``) into ``col_out``;
        ``exclude_rows`` / ``exclude_cols`` (bool over the rows of ``a`` / tokens of ``b``):
        excluded rows never give a column minimum, excluded columns never give a row minimum.
        Empty reference sets give ``+inf``.
        """
        rhs = self.bank.image_cols(b)
        if col_out is not None:
            col_out.fill_(math.inf)
        n_rows = row_side.shape[0]
        for r0, r1 in row_blocks(n_rows, self.shape.rows):
            block = self._block(row_side[r0:r1], rhs)
            if col_out is not None:
                keep = None if exclude_rows is None else ~exclude_rows[r0:r1]
                if keep is None:
                    torch.minimum(col_out, block.amin(dim=0), out=col_out)
                elif bool(keep.any()):
                    torch.minimum(col_out, block[keep].amin(dim=0), out=col_out)
            if row_out is not None:
                if exclude_cols is not None:
                    block.masked_fill_(exclude_cols.unsqueeze(0), math.inf)
                torch.amin(block, dim=1, out=row_out[r0:r1])

    def near_any(self, lhs: torch.Tensor, radii2: torch.Tensor, b: int) -> torch.Tensor:
        """Bool over image ``b``'s tokens: within ``radii2`` (squared) of any row of ``lhs``.

        ``lhs``: row-side vectors (``(f, C + 2)``, e.g. suspicious tokens of other images).
        """
        rhs = self.bank.image_cols(b)
        near = torch.zeros(rhs.shape[1], dtype=torch.bool, device=self.bank.device)
        for r0, r1 in row_blocks(lhs.shape[0], self.shape.rows):
            block = self._block(lhs[r0:r1], rhs)
            near |= (block < radii2[r0:r1].unsqueeze(1)).any(dim=0)
        return near


# ------------------------------------------------------------------------------------------------
def tile_worker(workers: CoreWorkers, bank: TokenBank, shape: TileShape) -> TileWorker:
    """The calling thread's :class:`TileWorker` (one buffer per worker thread)."""
    return workers.local(("tiles", id(bank), shape), lambda: TileWorker(bank, shape))


def fill_minima(bank: TokenBank, shape: TileShape, table: torch.Tensor, rows: Sequence[int],
                workers: CoreWorkers | None = None) -> int:
    """Fill ``table[q, j, :n]`` (squared minima of image ``rows[q]`` against image ``j``).

    Computes every tile that touches a row image, with the full run's shapes; one job per row
    image (:mod:`.workers`). Every table entry is written by exactly one tile, so the result
    does not depend on the scheduling. Returns the number of GEMMs run.
    """
    workers = workers or CoreWorkers(None, 1)
    where = {image: q for q, image in enumerate(rows)}
    units = [a for a in range(bank.n_images)
             if a in where or any(j in where for j in range(a + 1, bank.n_images))]
    calls = workers.map(lambda a: _row_image(tile_worker(workers, bank, shape), table, a, where),
                        units)
    return sum(calls)


def _row_image(worker: TileWorker, table: torch.Tensor, a: int, where: dict[int, int]) -> int:
    """All needed tiles of row image ``a``; the number of GEMMs run."""
    bank = worker.bank
    qa = where.get(a)
    todo = []
    for g0, g1 in column_groups(bank.counts, a + 1, worker.shape.cols):
        col_out = [(j, table[where[j], a]) for j in range(g0, g1) if j in where]
        if qa is not None or col_out:
            todo.append((g0, g1, col_out))
    before = worker.gemm_calls
    if todo:
        row_side = bank.row_side(a)
        for g0, g1, col_out in todo:
            worker.group_minima(row_side, g0, g1, None if qa is None else table[qa], col_out)
    return worker.gemm_calls - before
