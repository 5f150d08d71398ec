"""Scoring in stages, over shards of a batch: score rows -> build the graph -> re-score rows.

The app splits the scoring of one layer of a batch of ``B`` images over several processes:

1. :func:`score_rows` (per shard): the MuSc scores of some query images against all ``B``
   images, plus (CoDeGraph on) the per-token quantities the graph needs: a :class:`RowScores`.
2. :func:`build_graph` (once, from the rows of every image): the batch-wide rate prior,
   suspicious tokens, links, edges and validated communities: a :class:`GraphResult`.
3. :func:`rescore_rows` (per shard): images in no community keep their MuSc rows; community
   members are re-scored with their community's consistent-anomaly tokens excluded: a
   :class:`RescoredRows`.

:func:`codegraph_scores` is the same composition in one process (the distance table of step 1
is kept in memory instead of being recomputed in step 3). Every distance minimum comes from a
tile computed with the same GEMM call whichever images a shard holds (:mod:`.tiles`), every
later step is a function of those minima and of the graph, so one shard and any partition into
``n`` shards give byte-identical scores, suspicious flags and communities on the same device,
thread count and ``block_mb``.

The dataclasses hold plain numpy arrays; ``to_arrays`` / ``from_arrays`` convert them to and
from a flat ``dict`` of arrays (for ``numpy.savez``; settings are stored as a JSON string).
Per-token arrays of :class:`RowScores` are *compact*: the valid tokens of the query images,
image after image, each image's in token order (``np.flatnonzero(valid[q])``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from .codegraph import (
    CodeGraphResult,
    CodeGraphSettings,
    RatePrior,
    burnout_test,
    fit_rate_prior,
    image_links,
    leiden_communities,
    max_rank,
    scaled_gaps,
    significant_edges,
    validated,
)
from .mutual import (
    ArrayLike,
    MinDistanceTable,
    _check_query,
    _like,
    build_bank,
    build_table,
    resolve_device,
    check_inputs,
    exact_fp32_matmul,
    mean_smallest,
    musc_k,
    score_row,
    sorted_msv,
    warn_if_small,
)
from .tiles import TileShape, TileWorker, TokenBank, tile_worker
from .workers import core_workers


# ------------------------------------------------------------------------------------------------
# containers
class _Arrays:
    """``to_arrays`` / ``from_arrays`` for frozen dataclasses of arrays, ints, floats, bools and
    :class:`CodeGraphSettings` (a JSON string)."""

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, CodeGraphSettings):
                value = json.dumps(value.to_dict())
            out[f.name] = np.asarray(value)
        return out

    @classmethod
    def from_arrays(cls, arrays) -> _Arrays:
        kwargs = {}
        for f in fields(cls):
            value = np.asarray(arrays[f.name])
            if f.name == "settings":
                kwargs[f.name] = CodeGraphSettings(**json.loads(str(value)))
            elif value.ndim == 0:
                kwargs[f.name] = value.item()
            else:
                kwargs[f.name] = value
        return cls(**kwargs)


@dataclass(frozen=True, eq=False)
class RowScores(_Arrays):
    """MuSc rows of some query images and the per-token inputs of the graph (one layer).

    Attributes
    ----------
    images : (Q,) int64
        The query images (indices into the batch), in query order.
    counts : (B,) int64
        Valid tokens of every image of the batch.
    valid : (Q, N) bool
        Valid tokens of the query images.
    scores : (Q, N) float32
        Plain MuSc scores (0 for invalid tokens): exactly the rows of the full run.
    k : int
        MuSc's ``K = floor(fraction (B - 1))``.
    codegraph : bool
        Whether the per-token arrays below were computed; otherwise they are empty and
        ``n_gaps = 0``, ``distance_floor = nan``.
    n_gaps : int
        ``T``, scaled gaps per token (:func:`~.codegraph.max_rank`).
    distance_floor : float
        ``CodeGraphSettings.distance_floor`` used for the gaps.
    gap_sum, gap_max : (V,) float64
        Sum and largest of each valid token's ``T`` scaled log-gaps (V: valid tokens of the
        query images, compact order).
    rank : (V,) int32
        Burnout rank ``m`` (1-based argmax of the gaps).
    radius : (V,) float64
        Burnout radius ``sqrt(d_(m) d_(m+1))``.
    neighbours : (V, T) int16 (int32 when B > 32767)
        The ``T`` nearest images of each token, nearest first.
    table : (Q, B, M) float32, or (0, 0, 0)
        With ``score_rows(..., keep_table=True)``: the squared per-(token, image) minima of
        the query images (:class:`~.mutual.MinDistanceTable`), so that :func:`rescore_rows`
        does not recompute them (``Q B M 4`` bytes: about 1.8 MB per image at B = 180,
        M = 2,500).
    """

    images: np.ndarray
    counts: np.ndarray
    valid: np.ndarray
    scores: np.ndarray
    k: int
    codegraph: bool
    n_gaps: int
    distance_floor: float
    gap_sum: np.ndarray
    gap_max: np.ndarray
    rank: np.ndarray
    radius: np.ndarray
    neighbours: np.ndarray
    table: np.ndarray

    @property
    def n_images(self) -> int:
        return len(self.counts)

    @property
    def n_tokens(self) -> int:
        return int(self.valid.shape[1])

    def image_slices(self) -> dict[int, slice]:
        """Per query image, its slice of the compact per-token arrays."""
        ends = np.cumsum(self.valid.sum(axis=1))
        starts = ends - self.valid.sum(axis=1)
        return {int(i): slice(int(s), int(e)) for i, s, e in zip(self.images, starts, ends)}


@dataclass(frozen=True, eq=False)
class GraphResult(_Arrays):
    """The batch-wide consistent-anomaly graph of one layer (:func:`build_graph`).

    Attributes
    ----------
    settings : CodeGraphSettings
    valid : (B, N) bool
        Valid tokens of every image (from the rows).
    rate_prior : (2,) float64
        Gamma prior ``(a, b)`` of the gaps' rates (``nan`` when ``T < 2``).
    suspicious : (B, N) bool
        Suspicious tokens.
    burnout_rank : (B, N) int32
        Burnout rank of suspicious tokens, 0 elsewhere.
    radius : (B, N) float64
        Burnout radius of suspicious tokens, 0 elsewhere.
    links : (B, B) int64
        ``links[i, j]``: suspicious tokens of ``i`` linking ``i`` to ``j``.
    expected_links : (B, B) float64
        Their expectation under the batch's null model.
    edges : (E, 2) int64
        Kept image-graph edges ``(i, j)``, ``i < j``.
    edge_weights : (E,) float64
        Their weights (scaled so the median is 1).
    community : (B,) int64
        Community of each image (index into :attr:`communities`), -1 for none.
    """

    settings: CodeGraphSettings
    valid: np.ndarray
    rate_prior: np.ndarray
    suspicious: np.ndarray
    burnout_rank: np.ndarray
    radius: np.ndarray
    links: np.ndarray
    expected_links: np.ndarray
    edges: np.ndarray
    edge_weights: np.ndarray
    community: np.ndarray

    @property
    def n_images(self) -> int:
        return len(self.community)

    @property
    def communities(self) -> list[list[int]]:
        """Communities of 2+ images (sorted image indices), largest first."""
        n = int(self.community.max(initial=-1)) + 1
        return [np.flatnonzero(self.community == c).tolist() for c in range(n)]

    @property
    def edge_list(self) -> list[tuple[int, int, float]]:
        return [(int(i), int(j), float(w)) for (i, j), w in zip(self.edges, self.edge_weights)]


@dataclass(frozen=True, eq=False)
class RescoredRows(_Arrays):
    """Final scores of some query images (:func:`rescore_rows`).

    Attributes
    ----------
    images : (Q,) int64
        The query images, in query order.
    scores : (Q, N) float32
        Final scores: MuSc rows outside communities, re-scored rows for members.
    excluded : (Q, N) bool
        Tokens removed from their community's reference sets (all False outside communities).
    """

    images: np.ndarray
    scores: np.ndarray
    excluded: np.ndarray


# ------------------------------------------------------------------------------------------------
# stage 1: rows
def score_rows(
    tokens: ArrayLike,
    valid: ArrayLike,
    query: Sequence[int] | None = None,
    fraction: float = 0.3,
    *,
    codegraph: CodeGraphSettings | None = None,
    block_mb: float | None = None,
    chunk_size: int | None = None,
    device: str | torch.device = "cpu",
    keep_table: bool = False,
) -> RowScores:
    """MuSc rows of the query images and, with ``codegraph``, the graph's per-token inputs.

    Parameters
    ----------
    tokens : (B, N, C) float array or tensor
        All images of the batch (every image is a reference).
    valid : (B, N) bool
    query : sequence of int, optional
        The images whose rows to compute (all by default).
    fraction : float, default 0.3
        MuSc's ``K = floor(fraction (B - 1))``.
    codegraph : CodeGraphSettings, optional
        Also compute the per-token quantities :func:`build_graph` needs.
    block_mb, chunk_size, device
        As in :func:`~.mutual.mutual_scores`; ``block_mb`` must be the same in every shard
        for byte-identical results.
    keep_table : bool, default False
        Keep the query images' squared-minimum table in the rows (``RowScores.table``):
        :func:`rescore_rows` then re-scores community members from it instead of
        recomputing their rows (same values, so the same results), at ``Q B M 4`` bytes.
    """
    with core_workers(resolve_device(device)):
        tok, val = check_inputs(tokens, valid)
        n_images = int(tok.shape[0])
        k = musc_k(n_images, fraction)
        warn_if_small(n_images)
        table, _, _ = build_table(tok, val, query=query, chunk_size=chunk_size,
                                  block_mb=block_mb, device=device)
        return rows_from_table(table, k, codegraph, keep_table)


def rows_from_table(table: MinDistanceTable, k: int, codegraph: CodeGraphSettings | None,
                    keep_table: bool = False) -> RowScores:
    """:class:`RowScores` of the table's rows (one job per row)."""
    n_images, n_tokens = table.n_images, table.n_tokens
    n_gaps = max_rank(n_images, codegraph) if codegraph is not None else 0

    def one_row(q: int) -> tuple[np.ndarray, ...]:
        with torch.no_grad():
            distances, neighbours = sorted_msv(table, q)
            scores = mean_smallest(distances, k).cpu().numpy()
            if codegraph is None:
                return (scores,)
            return (scores,) + _token_stats(distances, neighbours, n_gaps, codegraph, n_images)

    with core_workers(table.sq.device) as workers:
        parts = workers.map(one_row, range(len(table.rows)))
    scores = np.zeros((len(table.rows), n_tokens), dtype=np.float32)
    valid = np.zeros(scores.shape, dtype=bool)
    for q, image in enumerate(table.rows):
        positions = table.positions[image].numpy()
        valid[q, positions] = True
        scores[q, positions] = parts[q][0]
    if codegraph is None:
        extras = _empty_extras(0, n_images)
    else:
        extras = tuple(np.concatenate([p[i] for p in parts]) for i in range(1, 6))
    return RowScores(
        images=np.asarray(table.rows, dtype=np.int64), counts=table.counts.astype(np.int64),
        valid=valid, scores=scores, k=int(k), codegraph=codegraph is not None, n_gaps=n_gaps,
        distance_floor=codegraph.distance_floor if codegraph is not None else math.nan,
        gap_sum=extras[0], gap_max=extras[1], rank=extras[2], radius=extras[3],
        neighbours=extras[4],
        table=(table.sq.cpu().numpy() if keep_table
               else np.zeros((0, 0, 0), dtype=np.float32)),
    )


def _neighbour_dtype(n_images: int) -> type:
    return np.int16 if n_images <= np.iinfo(np.int16).max else np.int32


def _empty_extras(n_gaps: int, n_images: int) -> tuple[np.ndarray, ...]:
    return (np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int32), np.zeros(0),
            np.zeros((0, max(n_gaps, 0)), dtype=_neighbour_dtype(n_images)))


def _token_stats(distances: torch.Tensor, neighbours: torch.Tensor, n_gaps: int,
                 settings: CodeGraphSettings, n_images: int) -> tuple[np.ndarray, ...]:
    """Gap sum, largest gap, burnout rank, burnout radius and nearest images of each token."""
    n = distances.shape[0]
    images = neighbours[:, : max(n_gaps, 0)].cpu().numpy().astype(_neighbour_dtype(n_images))
    if n_gaps < 2:  # too few images for gaps: nothing can be flagged
        return (np.zeros(n), np.zeros(n), np.ones(n, dtype=np.int32), np.zeros(n), images)
    d = distances[:, : n_gaps + 1].cpu().numpy()
    gaps = scaled_gaps(d, n_gaps, settings.distance_floor)
    top = gaps.argmax(axis=1)
    rows = np.arange(n)
    radius = np.sqrt(d[rows, top].astype(np.float64) * d[rows, top + 1])
    return (gaps.sum(axis=1), gaps[rows, top], (top + 1).astype(np.int32), radius, images)


# ------------------------------------------------------------------------------------------------
# stage 2: graph
def build_graph(rows: Sequence[RowScores], n_images: int,
                settings: CodeGraphSettings | None = None) -> GraphResult:
    """The consistent-anomaly graph of a batch from the rows of all its images.

    ``rows`` must hold every image of the batch exactly once (any split, any order) and come
    from :func:`score_rows` with the same ``codegraph`` settings.
    """
    settings = settings or CodeGraphSettings()
    by_image = _rows_by_image(rows, n_images, settings)
    counts = rows[0].counts
    n_tokens = rows[0].n_tokens
    n_gaps = max_rank(n_images, settings)
    valid = np.zeros((n_images, n_tokens), dtype=bool)
    for i, (row, q, _) in by_image.items():
        valid[i] = row.valid[q]
    suspicious = np.zeros_like(valid)
    rank = np.zeros(valid.shape, dtype=np.int32)
    radius = np.zeros(valid.shape, dtype=np.float64)
    links = np.zeros((n_images, n_images), dtype=np.int64)
    expected = np.zeros((n_images, n_images), dtype=np.float64)
    prior = RatePrior(math.nan, math.nan)
    if n_gaps >= 2:
        prior = RatePrior(0.0, 0.0)
        if settings.pooled_scale:
            sums = np.concatenate([row.gap_sum[sl] for row, _, sl in
                                   (by_image[i] for i in range(n_images))])
            prior = fit_rate_prior(sums, n_gaps)
        for i in range(n_images):
            row, _, sl = by_image[i]
            flags = burnout_test(row.gap_max[sl], row.gap_sum[sl], n_gaps, prior) < settings.pvalue
            if not flags.any():
                continue
            ranks = np.where(flags, row.rank[sl], 0)
            positions = np.flatnonzero(valid[i])
            suspicious[i, positions] = flags
            rank[i, positions] = ranks
            radius[i, positions] = np.where(flags, row.radius[sl], 0.0)
            links[i], expected[i] = image_links(row.neighbours[sl], flags, ranks, n_images,
                                                n_gaps, settings.null_tokens)
    edges = significant_edges(links, expected, counts, settings)
    communities = validated(leiden_communities(n_images, edges, settings), links, expected,
                            settings)
    community = np.full(n_images, -1, dtype=np.int64)
    for c, members in enumerate(communities):
        community[members] = c
    return GraphResult(
        settings=settings, valid=valid,
        rate_prior=np.array([prior.shape, prior.rate], dtype=np.float64),
        suspicious=suspicious, burnout_rank=rank, radius=radius, links=links,
        expected_links=expected,
        edges=np.array([(i, j) for i, j, _ in edges], dtype=np.int64).reshape(-1, 2),
        edge_weights=np.array([w for _, _, w in edges], dtype=np.float64),
        community=community,
    )


def _rows_by_image(rows: Sequence[RowScores], n_images: int,
                   settings: CodeGraphSettings) -> dict[int, tuple[RowScores, int, slice]]:
    """``image -> (rows object, its row index, its compact slice)``; checks the rows agree."""
    if not rows:
        raise ValueError("build_graph needs the rows of every image; got none")
    first = rows[0]
    n_gaps = max_rank(n_images, settings)
    out: dict[int, tuple[RowScores, int, slice]] = {}
    for row in rows:
        if row.n_images != n_images or not np.array_equal(row.counts, first.counts) \
                or row.n_tokens != first.n_tokens:
            raise ValueError("rows come from different batches (B, N or valid counts differ)")
        if not row.codegraph or row.n_gaps != n_gaps \
                or row.distance_floor != settings.distance_floor:
            raise ValueError(
                "rows were not computed with these CodeGraph settings (score_rows(..., "
                "codegraph=settings) with the same max_rank_fraction and distance_floor)")
        slices = row.image_slices()
        for q, image in enumerate(row.images.tolist()):
            if image in out:
                raise ValueError(f"image {image} appears in more than one set of rows")
            out[image] = (row, q, slices[image])
    missing = sorted(set(range(n_images)) - set(out))
    if missing:
        raise ValueError(f"rows of image(s) {missing} are missing")
    return out


# ------------------------------------------------------------------------------------------------
# stage 3: re-scoring
def rescore_rows(
    tokens: ArrayLike,
    valid: ArrayLike,
    query: Sequence[int] | None,
    fraction: float,
    rows: RowScores | Sequence[RowScores],
    graph: GraphResult,
    *,
    block_mb: float | None = None,
    chunk_size: int | None = None,
    device: str | torch.device = "cpu",
) -> RescoredRows:
    """Final scores of the query images.

    Images in no community keep their MuSc rows (from ``rows``, which must hold every query
    image). Community members are re-scored against all images, with each member's excluded
    tokens (suspicious tokens and their look-alikes, :func:`exclusion_masks`) removed from the
    reference sets of the other members of its community: exactly what
    :func:`codegraph_scores` does, with the same tiles.
    """
    tok, val = check_inputs(tokens, valid)
    n_images = int(tok.shape[0])
    k = musc_k(n_images, fraction)
    query = _check_query(query, n_images)
    musc = _musc_rows(rows, query, k, n_images)
    if graph.n_images != n_images or not np.array_equal(graph.valid, val.cpu().numpy()):
        raise ValueError("graph was built for another batch (B or valid tokens differ)")
    scores = np.stack([musc[i] for i in query])
    excluded = np.zeros(scores.shape, dtype=bool)
    members = [i for i in query if graph.community[i] >= 0]
    if members:
        dev = resolve_device(device)
        with core_workers(dev):
            kept = _kept_table(rows, members, dev)
            if kept is None:
                table, bank, shape = build_table(tok, val, query=members, chunk_size=chunk_size,
                                                 block_mb=block_mb, device=dev)
            else:
                bank, shape = build_bank(tok, val, chunk_size=chunk_size, block_mb=block_mb,
                                         device=dev)
                table = MinDistanceTable(kept, tuple(members), bank.positions, bank.counts,
                                         bank.n_tokens)
            final, masks = rescore_table(table, bank, shape, graph, k)
        where = {image: q for q, image in enumerate(query)}
        for image in members:
            scores[where[image]] = final[image]
            excluded[where[image]] = masks[image]
    return RescoredRows(images=np.asarray(query, dtype=np.int64), scores=scores,
                        excluded=excluded)


def _kept_table(rows: RowScores | Sequence[RowScores], members: list[int],
                device: torch.device) -> torch.Tensor | None:
    """The members' rows of the kept tables (``keep_table=True``), or None if any is absent."""
    found = {}
    for row in [rows] if isinstance(rows, RowScores) else rows:
        if row.table.size:
            for q, image in enumerate(row.images.tolist()):
                found[image] = row.table[q]
    if any(m not in found for m in members):
        return None
    return torch.from_numpy(np.stack([found[m] for m in members])).to(device)


def _musc_rows(rows: RowScores | Sequence[RowScores], query: tuple[int, ...], k: int,
               n_images: int) -> dict[int, np.ndarray]:
    """MuSc score rows of the query images from one or several :class:`RowScores`."""
    rows = [rows] if isinstance(rows, RowScores) else list(rows)
    out = {}
    for row in rows:
        if row.n_images != n_images or row.k != k:
            raise ValueError("rows come from another batch or fraction (B or K differ)")
        for q, image in enumerate(row.images.tolist()):
            out[image] = row.scores[q]
    missing = [i for i in query if i not in out]
    if missing:
        raise ValueError(f"rows of query image(s) {missing} are missing")
    return out


def exclusion_masks(bank: TokenBank, shape: TileShape, members: list[int],
                    graph: GraphResult) -> list[torch.Tensor]:
    """Tokens of each member removed from the other members' reference sets (compact order).

    Its own suspicious tokens and, with ``expand_exclusion``, every token lying within the
    burnout radius of a suspicious token of another member (its unflagged look-alikes). Only
    the suspicious tokens' rows are multiplied, one GEMM per ordered member pair; one job per
    member.
    """
    device = bank.device
    flags = [torch.from_numpy(graph.suspicious[a][graph.valid[a]]).to(device) for a in members]
    if not graph.settings.expand_exclusion:
        return [f.clone() for f in flags]

    def source(x: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.nonzero(flags[x]).flatten()
        radius = graph.radius[members[x]][graph.valid[members[x]]][index.cpu().numpy()]
        return (bank.row_side(members[x], index),
                torch.from_numpy(radius * radius).to(device=device, dtype=torch.float32))

    def mask(y: int) -> torch.Tensor:
        worker = tile_worker(workers, bank, shape)
        out = flags[y].clone()
        for x, (lhs, radii2) in enumerate(sources):
            if x != y and lhs.shape[0]:
                out |= worker.near_any(lhs, radii2, members[y])
        return out

    with core_workers(device) as workers:
        sources = workers.map(source, range(len(members)))
        return workers.map(mask, range(len(members)))


def rescore_table(table: MinDistanceTable, bank: TokenBank, shape: TileShape,
                  graph: GraphResult, k: int) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Re-score the table's rows that belong to a community, in place.

    Returns the final ``(N,)`` score row and the ``(N,)`` exclusion mask of each re-scored image.
    """
    where = {image: q for q, image in enumerate(table.rows)}
    scores, excluded = {}, {}
    with core_workers(bank.device) as workers, torch.no_grad(), exact_fp32_matmul():
        for members in graph.communities:
            targets = [a for a in members if a in where]
            if not targets:
                continue
            masks = exclusion_masks(bank, shape, members, graph)
            pairs = [(x, y) for x in range(len(members)) for y in range(x + 1, len(members))
                     if members[x] in where or members[y] in where]
            workers.map(lambda xy, members=members, masks=masks: _rescore_pair(
                tile_worker(workers, bank, shape), table, members, masks, where, *xy), pairs)
            rows = workers.map(lambda a: score_row(table, where[a], k), targets)
            for a, row in zip(targets, rows):
                scores[a] = row.cpu().numpy()
                mask = np.zeros(table.n_tokens, dtype=bool)
                mask[table.positions[a].numpy()] = masks[members.index(a)].cpu().numpy()
                excluded[a] = mask
    return scores, excluded


def _rescore_pair(worker: TileWorker, table: MinDistanceTable, members: list[int],
                  masks: list[torch.Tensor], where: dict[int, int], x: int, y: int) -> None:
    """Minima of one member pair with the exclusions, into the table rows it touches."""
    a, b = members[x], members[y]
    n_a, n_b = int(worker.bank.counts[a]), int(worker.bank.counts[b])
    worker.pair_minima(
        worker.bank.row_side(a), b,
        table.sq[where[a], b, :n_a] if a in where else None,
        table.sq[where[b], a, :n_b] if b in where else None,
        exclude_rows=masks[x], exclude_cols=masks[y],
    )


# ------------------------------------------------------------------------------------------------
# one shot
def codegraph_scores(
    tokens: ArrayLike,
    valid: ArrayLike,
    fraction: float = 0.3,
    *,
    settings: CodeGraphSettings | None = None,
    device: str | torch.device = "cpu",
    return_details: bool = False,
    chunk_size: int | None = None,
    block_mb: float | None = None,
) -> ArrayLike | tuple[ArrayLike, CodeGraphResult]:
    """MuSc scores corrected for consistent anomalies (CoDeGraph reconstruction, one layer).

    The composition :func:`score_rows` -> :func:`build_graph` -> :func:`rescore_rows` in one
    process, with the distance table kept in memory between the stages.

    Parameters
    ----------
    tokens : (B, N, C) numpy array or torch tensor, float
    valid : (B, N) bool
    fraction : float, default 0.3
        MuSc's ``K = floor(fraction * (B - 1))``.
    settings : CodeGraphSettings, optional
        Constants of the stage (defaults documented there).
    device : str or torch.device, default "cpu"
    return_details : bool, default False
        Also return a :class:`~.codegraph.CodeGraphResult`.
    chunk_size, block_mb : optional
        Distance-tile size, as in :func:`~cg3d_bids.core.scoring.mutual_scores`.

    Returns
    -------
    scores : (B, N) float32, same kind as ``tokens``
        Images outside any community keep their plain MuSc scores exactly.
    details : CodeGraphResult
        Only with ``return_details=True``.
    """
    settings = settings or CodeGraphSettings()
    with core_workers(resolve_device(device)):
        tok, val = check_inputs(tokens, valid)
        n_images = int(tok.shape[0])
        k = musc_k(n_images, fraction)
        warn_if_small(n_images)
        table, bank, shape = build_table(tok, val, chunk_size=chunk_size, block_mb=block_mb,
                                         device=device)
        rows = rows_from_table(table, k, settings)
        graph = build_graph([rows], n_images, settings)
        final, masks = rescore_table(table, bank, shape, graph, k)
    scores = rows.scores.copy()
    excluded = np.zeros(scores.shape, dtype=bool)
    for image, row in final.items():
        scores[image] = row
        excluded[image] = masks[image]
    out = _like(torch.from_numpy(scores), tokens)
    if not return_details:
        return out
    return out, details_of(graph, rows.scores, excluded)


def details_of(graph: GraphResult, musc_scores: np.ndarray, excluded: np.ndarray) -> CodeGraphResult:
    """:class:`~.codegraph.CodeGraphResult` of a run from its graph, MuSc scores and exclusions."""
    return CodeGraphResult(
        communities=graph.communities,
        n_suspicious=graph.suspicious.sum(axis=1).astype(np.int64),
        suspicious=graph.suspicious,
        excluded=excluded,
        burnout_rank=graph.burnout_rank.astype(np.int64),
        edges=graph.edge_list,
        links=graph.links,
        expected_links=graph.expected_links,
        rate_prior=(float(graph.rate_prior[0]), float(graph.rate_prior[1])),
        musc_scores=musc_scores,
        settings=graph.settings,
    )
