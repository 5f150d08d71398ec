"""MuSc scores of new images against a saved reference cohort (a "bank"), one layer at a time.

MuSc's score of an image depends only on the tokens of the images it is compared with, so a new
image ``q`` scored against ``R`` reference images is exactly its row in a MuSc batch of ``R + 1``
images (the references, then ``q``): for every valid token ``z`` of ``q`` and every reference
``j``, ``d_j(z) = min ||z - t||_2`` over the valid tokens ``t`` of ``j``; the ``R`` distances are
sorted and the mean of the ``K = floor(fraction * R)`` smallest is the score (method.md §3;
:func:`~.mutual.musc_k` of a batch of ``R + 1``).

An image that IS one of the references (``self_index``, e.g. a bank image scored again) is never
compared with itself: its references are the other ``R - 1`` images and its scores equal its row
of the batch of the ``R`` references (``K = floor(fraction * (R - 1))``).

The arithmetic is that of :func:`~.mutual.mutual_scores` (tokens centred on the mean of the
equivalent batch, accumulated image by image in batch order; one exact fp32 GEMM of augmented
tokens per block, with the same orientation and row blocks as the full run's pair, and the
same BLAS library, :mod:`.blas`), so the scores equal the full run's row to float rounding
(with MKL the full run's tiles group several reference images per GEMM, a shape MKL's bits do
not depend on; with OpenBLAS the full run's GEMMs are one image wide, as here).

Memory: the references are read one image at a time per worker thread (:mod:`.workers`; they
may be memory-mapped ``.npy`` slices), so a bank is never materialised as a dense
``(R + 1, N, C)`` array; working memory is, per worker, one reference image and one distance
block, and a ``(n_q, R)`` minimum table per query.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .blas import distance_mm, gemm_library
from .mutual import exact_fp32_matmul, mean_smallest, musc_k, resolve_device
from .tiles import row_blocks, tile_shape
from .workers import core_workers

__all__ = ["ReferenceQuery", "reference_k", "reference_scores"]


@dataclass(frozen=True)
class ReferenceQuery:
    """One image to score: ``tokens`` (N, C), ``valid`` (N,) bool, and ``self_index``: the index
    of the reference that is this same image (left out of its references), or None."""

    tokens: np.ndarray
    valid: np.ndarray
    self_index: int | None = None


def reference_k(n_references: int, fraction: float, self_in_bank: bool = False) -> int:
    """``K`` of a query scored against ``n_references`` images: its row in a batch of
    ``n_references + 1`` (or of ``n_references`` when it is one of them). Raises
    :class:`~cg3d_bids.errors.BatchTooSmallError` when ``K < 1``."""
    return musc_k(n_references if self_in_bank else n_references + 1, fraction)


def _centred(x: torch.Tensor, mean: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cols`` = ``[x^T; 1; |x|^2]`` (C + 2, n) and ``rows`` = ``[-2x, |x|^2, 1]`` (n, C + 2) of
    the centred tokens, built exactly as :class:`~.mutual.TokenBank` builds them."""
    x = x.sub(mean)
    cols = torch.empty((dim + 2, x.shape[0]), dtype=torch.float32, device=x.device)
    cols[:dim] = x.t()
    cols[dim] = 1.0
    torch.linalg.vecdot(x, x, dim=1, out=cols[dim + 1])
    rows = torch.empty((x.shape[0], dim + 2), dtype=torch.float32, device=x.device)
    torch.mul(cols[:dim].t(), -2.0, out=rows[:, :dim])
    rows[:, dim] = cols[dim + 1]
    rows[:, dim + 1] = 1.0
    return cols, rows


def _blocks(rows: torch.Tensor, cols: torch.Tensor, n_rows: int, buffer: torch.Tensor):
    """``(r0, r1, rows[r0:r1] @ cols)``, each block written into the one preallocated ``buffer``
    by the full run's BLAS library (:func:`~.blas.gemm_library`)."""
    library = gemm_library(buffer.device)
    for r0, r1 in row_blocks(rows.shape[0], n_rows):
        block = buffer[: (r1 - r0) * cols.shape[1]].view(r1 - r0, cols.shape[1])
        distance_mm(rows[r0:r1], cols, block, library)
        yield r0, r1, block


def _min_over_rows(rows: torch.Tensor, cols: torch.Tensor, n_rows: int, out: torch.Tensor,
                   buffer: torch.Tensor) -> None:
    """``out`` = column minima of ``rows @ cols``, ``n_rows`` rows per block (the full run's
    ``a -> query`` direction for references before the query)."""
    out.fill_(math.inf)
    for _r0, _r1, block in _blocks(rows, cols, n_rows, buffer):
        torch.minimum(out, block.amin(dim=0), out=out)


def _min_over_cols(rows: torch.Tensor, cols: torch.Tensor, n_rows: int, out: torch.Tensor,
                   buffer: torch.Tensor) -> None:
    """``out`` = row minima of ``rows @ cols`` (references after the query in the full run)."""
    for r0, r1, block in _blocks(rows, cols, n_rows, buffer):
        torch.amin(block, dim=1, out=out[r0:r1])


def _as_float32(x: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float32)
    return torch.from_numpy(np.array(x, dtype=np.float32, order="C")).to(device)  # a copy: x may be a read-only map


def reference_scores(
    queries: Sequence[ReferenceQuery],
    references: Sequence[np.ndarray | torch.Tensor],
    fraction: float = 0.3,
    *,
    chunk_size: int | None = None,
    block_mb: float | None = None,
    device: str | torch.device = "cpu",
) -> list[np.ndarray]:
    """MuSc scores (one layer) of each query against ``references``.

    Parameters
    ----------
    queries : sequence of ReferenceQuery
        Images to score, each independently of the others.
    references : sequence of (n_j, C) float arrays
        The VALID tokens of each reference image (compact, in grid order); read one at a time.
    fraction : float
        MuSc's fraction f: ``K = floor(f * number of references of the query)``.
    chunk_size, block_mb : optional
        Rows per distance block, or its memory in MB, as in :func:`~.mutual.mutual_scores`.
    device : str or torch.device

    Returns
    -------
    list of (N,) float32 numpy arrays, 0 for invalid tokens.
    """
    if not references:
        raise ValueError("no reference images")
    dev = resolve_device(device)
    n_refs = len(references)
    ks = [reference_k(n_refs, fraction, q.self_index is not None) for q in queries]
    with torch.no_grad(), exact_fp32_matmul():
        # pass 1: per-reference sums (fp32 per image, fp64 across images, as TokenBank._mean) and counts
        sums, counts, dim = [], [], None
        for ref in references:
            x = _as_float32(ref, dev)
            if x.ndim != 2 or x.shape[0] == 0:
                raise ValueError(f"a reference image has tokens of shape {tuple(x.shape)}; expected (n > 0, C)")
            dim = int(x.shape[1]) if dim is None else dim
            if x.shape[1] != dim:
                raise ValueError(f"reference tokens have {x.shape[1]} dims, expected {dim}")
            total = x.sum(dim=0)
            if not bool(torch.isfinite(total).all()):  # NaN/Inf anywhere reach the column sums
                raise ValueError("a reference image has non-finite tokens (NaN or Inf)")
            sums.append(total.to(torch.float64))
            counts.append(int(x.shape[0]))
        assert dim is not None
        prepared = [_prepare_query(q, i, sums, counts, dim, dev, chunk_size, block_mb) for i, q in enumerate(queries)]
        # pass 2: one reference image per job (one per worker thread at a time) against every query
        tables = [torch.full((p.n, n_refs), math.inf, dtype=torch.float32, device=dev) for p in prepared]
        max_n = max([*counts, *(p.n for p in prepared)])
        floats = max(p.n_rows for p in prepared) * max_n

        def one_reference(j: int) -> None:
            buffer = workers.local(key, lambda: torch.empty(floats, dtype=torch.float32, device=dev))
            x = _as_float32(references[j], dev)
            for p, table in zip(prepared, tables):
                if j == p.self_index:
                    continue
                cols, rows = _centred(x, p.mean, dim)
                if p.self_index is None or j < p.self_index:
                    _min_over_rows(rows, p.cols, p.n_rows, table[:, j], buffer)
                else:
                    _min_over_cols(p.rows, cols, p.n_rows, table[:, j], buffer)

        with core_workers(dev) as workers:  # each job writes its own column of every table
            key = ("reference block", id(tables))
            workers.map(one_reference, range(n_refs))
            workers.release(key)
        out = []
        for p, table, k in zip(prepared, tables, ks):
            values, _ = torch.sort(table, dim=1, stable=True)
            if p.self_index is not None:
                values = values[:, :-1]  # its own column (+inf) sorts last
            distances = values.clamp_(min=0.0).sqrt_()
            scores = torch.zeros(p.n_tokens, dtype=torch.float32, device=dev)
            scores[p.positions] = mean_smallest(distances, k)
            out.append(scores.cpu().numpy().astype(np.float32, copy=False))
    return out


@dataclass
class _Query:
    n: int
    n_tokens: int
    positions: torch.Tensor
    mean: torch.Tensor
    cols: torch.Tensor
    rows: torch.Tensor
    n_rows: int
    self_index: int | None


def _prepare_query(query: ReferenceQuery, number: int, sums: list[torch.Tensor], counts: list[int], dim: int,
                   dev: torch.device, chunk_size: int | None, block_mb: float | None) -> _Query:
    """The query's compact tokens, the mean of its equivalent batch and its augmented sides."""
    tokens = np.asarray(query.tokens)
    valid = np.asarray(query.valid, dtype=bool)
    if tokens.ndim != 2 or tokens.shape[1] != dim or valid.shape != (tokens.shape[0],):
        raise ValueError(f"query {number}: tokens {tokens.shape} / valid {valid.shape} do not match (N, {dim})")
    positions = np.flatnonzero(valid)
    if positions.size == 0:
        raise ValueError(f"query {number} has no valid token: nothing to score")
    x = _as_float32(tokens[positions], dev)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"query {number} has non-finite valid tokens (NaN or Inf)")
    self_index = query.self_index
    if self_index is not None and not 0 <= self_index < len(counts):
        raise ValueError(f"query {number}: self_index {self_index} is not a reference index")
    total = torch.zeros(dim, dtype=torch.float64, device=dev)
    for s in sums:  # batch order: the references, then the query (unless it is one of them)
        total += s
    n_total = sum(counts)
    if self_index is None:
        total += x.sum(dim=0).to(torch.float64)
        n_total += int(x.shape[0])
    mean = (total / float(n_total)).to(torch.float32)
    cols, rows = _centred(x, mean, dim)
    batch_counts = counts if self_index is not None else [*counts, int(x.shape[0])]
    max_n = max(batch_counts)
    n_rows = tile_shape(max_n, block_mb, chunk_size=chunk_size, device=dev).rows
    return _Query(n=int(x.shape[0]), n_tokens=int(tokens.shape[0]), positions=torch.from_numpy(positions).to(dev),
                  mean=mean, cols=cols, rows=rows, n_rows=n_rows, self_index=self_index)
