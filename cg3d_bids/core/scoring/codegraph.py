"""Consistent-anomaly stage (CoDeGraph), a RECONSTRUCTION from the published description.

CoDeGraph (Gia and Ahn, TMLR 2025, arXiv 2510.10456) is used by the CoDeGraph3D paper with its
default configuration, but its code is not available to us. This module reconstructs it from
the published description (method.md §4). It is NOT the official code: the statistics below and
every constant (all in :class:`CodeGraphSettings`, recorded in the outputs' provenance) are ours.

Problem: when similar anomalies occur in several images, an anomalous token finds look-alikes in
the other anomalous images and its MuSc score collapses. Steps (per layer):

1. Sorted MSV ``d_(1) <= ... <= d_(B-1)`` of every valid token (from MuSc's per-pair minimum
   table). Scaled log-gaps ``g_t = t ln(d_(t+1) / d_(t))``, ``t = 1..T``,
   ``T = floor(max_rank_fraction (B - 1))`` capped at ``B - 2``. By the extreme-value (Renyi)
   argument they are i.i.d. ``Exp(alpha)`` for a normal token, ``alpha`` being its local
   intrinsic dimension, which differs between tokens.
2. Neighbour burnout: a consistent anomaly has a few small distances, then a jump. Rates get a
   Gamma prior ``alpha ~ Gamma(a, b)`` fitted to the whole batch (robustly, from the quartiles
   of the per-token gap sums, so the anomalies themselves do not move it); given the token's
   other gaps, each gap is then Lomax, ``P(g_t > y) = (1 + y / (b + S_-t))^-(a + T - 1)``.
   The token is suspicious when ``T`` times that tail probability of its largest gap is below
   ``pvalue``; its burnout rank ``m`` is that ``t``. This blends a batch-wide alpha (method.md
   §4 step 1; power at small ``T``) with each token's own scale (a single alpha over-flags
   tokens of sparse regions, method.md §4 calibration); ``a = b = 0`` is the pure per-token
   test (Fisher's g).
3. Image graph against a null model taken from the batch itself. A suspicious token of image
   ``i`` links ``i`` to its ``m`` nearest images. The expected number of such links to ``j``
   is ``E_ij = sum_z q_ij(m_z)``, where ``q_ij(m)`` is how often the tokens of ``i`` in general
   have ``j`` among their ``m`` nearest images: this is the background link density, which
   absorbs hub images, site/scanner groups and the batch size. A pair is a candidate edge when
   ``c_ij + c_ji`` (at least ``min_links``) is improbable under ``Poisson(E_ij + E_ji)``, with
   Benjamini-Hochberg over the ``B(B-1)/2`` pairs at ``edge_fdr``. Edge weight: excess links
   per valid token, scaled so the median kept edge weighs 1.
4. Leiden, Constant Potts Model (python-igraph), resolution ``gamma`` on that scale, fixed seed
   (igraph's RNG is set to ``random.Random(seed)`` and restored). A community is kept only if
   the links among all its members together pass a strict Poisson test (``community_pvalue``,
   Bonferroni over the pairs): pooled evidence lets groups of 3+ images through while a pair
   needs strong evidence, so a batch without consistent anomalies keeps its MuSc scores.
5. Within each community, each member's suspicious tokens, and the tokens of the other members
   lying within their burnout radius ``sqrt(d_(m) d_(m+1))`` (unflagged copies of the same
   anomaly), are removed from the reference sets of the other members; members are re-scored
   with MuSc. Images outside any community keep their plain MuSc scores exactly.

Every threshold is a probability under a null model estimated from the batch, so the stage
adapts to the batch size, the feature geometry and the token count instead of being tuned to
one dataset. Known limits: a consistent anomaly needs a handful of tokens per image to make a
significant edge (links are counted per token, treated as independent; spatially clustered
false flags make the Poisson null optimistic, which ``min_links`` and the community test
temper), and a pattern shared by more than ``max_rank_fraction`` of the batch counts as normal.

This module holds the settings and the statistics (steps 1-4 on arrays, no token work).
:mod:`.shards` runs the stage on tokens, in one go (:func:`~.shards.codegraph_scores`) or in
stages over shards of the batch (score rows -> build the graph -> re-score rows).
"""

from __future__ import annotations

import math
import random
import threading
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import optimize, stats

_IGRAPH_RNG_LOCK = threading.Lock()


@dataclass(frozen=True)
class CodeGraphSettings:
    """Every constant of the consistent-anomaly stage (reconstruction; see module docstring).

    Attributes
    ----------
    pvalue : float, default 1e-3
        A token is suspicious when the (Bonferroni over ranks) tail probability of its largest
        scaled log-gap is below this. Not corrected for the number of tokens: scattered false
        flags are harmless, only flags concentrating on image pairs make edges (step 3).
    pooled_scale : bool, default True
        Fit a batch-wide Gamma prior on the gaps' rates (robust quartile fit); False uses
        each token's own gaps only (Fisher's g; weaker when ``T`` is small).
    max_rank_fraction : float, default 0.5
        Largest burnout rank considered, as a fraction of ``B - 1``: a pattern shared by more
        than about half of the batch is treated as normal.
    distance_floor : float, default 1e-3
        Distances are floored at this fraction of the token's ``d_(T+1)`` before logarithms
        (exact duplicates would give infinite gaps).
    null_tokens : {"all", "ordinary"}, default "all"
        Tokens of an image whose neighbour images define the null link rates ``q_ij(m)``:
        all its valid tokens (a shift shared by most tokens of a group of images, such as a
        scanner or site effect, then explains its own links and forms no edge) or only the
        non-suspicious ones (more power, but a group-wide shift becomes a community).
    edge_fdr : float, default 0.05
        False discovery rate of candidate image-graph edges (Benjamini-Hochberg over the
        ``B(B-1)/2`` pairs; in a batch without consistent anomalies, the probability of any
        candidate edge).
    community_pvalue : float, default 1e-3
        A community found by Leiden is kept only when all links between its members together
        are improbable under the null at this family-wise level (Bonferroni over the pairs):
        pooling the pairs gives power to groups of 3+ images, while a community of two must
        pass a strict pair test.
    min_links : int, default 3
        Fewest suspicious-token links an edge needs (both directions together).
    resolution : float, default 0.5
        CPM resolution ``gamma``; edge weights are scaled so the median kept edge weighs 1, so
        a community needs an internal edge density of about ``gamma`` typical edges.
    expand_exclusion : bool, default True
        Within a community, also exclude the tokens lying within the burnout radius
        ``sqrt(d_(m) d_(m+1))`` of a suspicious token of another member: the unflagged copies
        of a consistent anomaly (one unflagged copy per image is enough to keep its score low).
    leiden_iterations : int, default -1
        Leiden iterations (negative: until stable).
    leiden_beta : float, default 0.01
        Randomness of Leiden's refinement step.
    seed : int, default 0
        Seed of Leiden's random number generator.
    """

    pvalue: float = 1e-3
    pooled_scale: bool = True
    max_rank_fraction: float = 0.5
    distance_floor: float = 1e-3
    null_tokens: str = "all"
    edge_fdr: float = 0.05
    community_pvalue: float = 1e-3
    min_links: int = 3
    resolution: float = 0.5
    expand_exclusion: bool = True
    leiden_iterations: int = -1
    leiden_beta: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("pvalue", "edge_fdr", "community_pvalue"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value}")
        if not 0.0 < self.max_rank_fraction <= 1.0:
            raise ValueError(f"max_rank_fraction must be in (0, 1], got {self.max_rank_fraction}")
        if not 0.0 < self.distance_floor < 1.0:
            raise ValueError(f"distance_floor must be in (0, 1), got {self.distance_floor}")
        if self.null_tokens not in ("all", "ordinary"):
            raise ValueError(f"null_tokens must be 'all' or 'ordinary', got {self.null_tokens!r}")
        if self.min_links < 1:
            raise ValueError(f"min_links must be >= 1, got {self.min_links}")
        if self.resolution <= 0:
            raise ValueError(f"resolution must be > 0, got {self.resolution}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CodeGraphResult:
    """Details of one run of the consistent-anomaly stage.

    Attributes
    ----------
    communities : list of list of int
        Communities of 2+ images (sorted image indices), largest first.
    n_suspicious : (B,) int ndarray
        Suspicious tokens per image.
    suspicious : (B, N) bool ndarray
        Suspicious tokens (never set for invalid tokens).
    excluded : (B, N) bool ndarray
        Tokens removed from the reference sets of their community (suspicious tokens of
        community members and their look-alikes); empty outside communities.
    burnout_rank : (B, N) int ndarray
        Burnout rank ``m`` of suspicious tokens, 0 elsewhere.
    edges : list of (int, int, float)
        Kept image-graph edges ``(i, j, weight)``, ``i < j``, weights scaled (median 1).
    links : (B, B) int ndarray
        ``links[i, j]``: suspicious tokens of ``i`` linking ``i`` to ``j``.
    expected_links : (B, B) float ndarray
        Their expectation under the batch's own null model.
    rate_prior : (float, float)
        Fitted Gamma prior ``(a, b)`` of the gaps' exponential rates (``nan`` if skipped).
    musc_scores : (B, N) float32 ndarray
        Plain MuSc scores of the same batch.
    settings : CodeGraphSettings
    """

    communities: list[list[int]]
    n_suspicious: np.ndarray
    suspicious: np.ndarray
    excluded: np.ndarray
    burnout_rank: np.ndarray
    edges: list[tuple[int, int, float]]
    links: np.ndarray
    expected_links: np.ndarray
    rate_prior: tuple[float, float]
    musc_scores: np.ndarray
    settings: CodeGraphSettings = field(default_factory=CodeGraphSettings)


# ------------------------------------------------------------------------------------------------
# steps 1-2: scaled log-gaps and neighbour burnout
def max_rank(n_images: int, settings: CodeGraphSettings) -> int:
    """``T``: number of scaled gaps tested per token."""
    return int(min(n_images - 2, math.floor(settings.max_rank_fraction * (n_images - 1))))


def scaled_gaps(distances: np.ndarray, n_gaps: int, floor: float) -> np.ndarray:
    """``g_t = t ln(d_(t+1) / d_(t))``, ``t = 1..T``, from ascending MSVs ``(n, >= T + 1)``.

    Distances are floored at ``floor * d_(T+1)`` (exact duplicates); non-finite gaps are 0.
    """
    d = distances[:, : n_gaps + 1].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        d = np.maximum(d, np.maximum(floor * d[:, -1:], 1e-12))
        g = np.arange(1, n_gaps + 1, dtype=np.float64) * np.log(d[:, 1:] / d[:, :-1])
    return np.where(np.isfinite(g), g, 0.0)


@dataclass(frozen=True)
class RatePrior:
    """Gamma prior (``shape`` a, ``rate`` b) on the exponential rate ``alpha`` of the gaps."""

    shape: float
    rate: float


def fit_rate_prior(sums: np.ndarray, n_gaps: int, max_shape: float = 1e6) -> RatePrior:
    """Gamma prior of the per-token rates, fitted robustly to the per-token gap sums.

    With ``g_t ~ Exp(alpha)`` i.i.d. and ``alpha ~ Gamma(a, b)``, the sum ``S`` of ``T`` gaps
    follows ``b * BetaPrime(T, a)``. ``a`` matches the interquartile range of ``log S`` and
    ``b`` its median: quartiles ignore the consistent anomalies (a minority of tokens with one
    huge gap), which would otherwise drag a likelihood fit towards heavy tails. Returns
    ``a = b = 0`` (per-token scale only) when fewer than 10 tokens have gaps.
    """
    s = sums[np.isfinite(sums) & (sums > 0)]
    if len(s) < 10:
        return RatePrior(0.0, 0.0)
    q25, q50, q75 = np.quantile(np.log(s), [0.25, 0.5, 0.75])

    def iqr(log_a: float) -> float:
        lo, hi = stats.betaprime.ppf([0.25, 0.75], n_gaps, math.exp(log_a))
        return math.log(hi) - math.log(lo)

    lo_a, hi_a = math.log(1e-2), math.log(max_shape)
    if iqr(hi_a) >= q75 - q25:
        log_a = hi_a
    elif iqr(lo_a) <= q75 - q25:
        log_a = lo_a
    else:
        log_a = optimize.brentq(lambda x: iqr(x) - (q75 - q25), lo_a, hi_a, xtol=1e-10)
    a = math.exp(log_a)
    return RatePrior(a, math.exp(q50) / float(stats.betaprime.median(n_gaps, a)))


def burnout_pvalues(gaps: np.ndarray, prior: RatePrior) -> tuple[np.ndarray, np.ndarray]:
    """Burnout p-values and ranks of tokens from their scaled gaps ``(n, T)``.

    For each gap, the posterior predictive given the token's other gaps and the batch prior is
    Lomax: ``P(g_t > y) = (1 + y / (b + S_-t))^-(a + T - 1)``. The token's p-value is ``T``
    times that of its largest gap (Bonferroni over ranks); ``a = b = 0`` is the per-token test
    (Fisher's g). The rank is the argmax ``t`` (1-based).
    """
    top = gaps.argmax(axis=1)
    gmax = gaps[np.arange(len(gaps)), top]
    return burnout_test(gmax, gaps.sum(axis=1), gaps.shape[1], prior), top + 1


def burnout_test(gap_max: np.ndarray, gap_sum: np.ndarray, n_gaps: int,
                 prior: RatePrior) -> np.ndarray:
    """Burnout p-values from each token's largest scaled gap and gap sum (see
    :func:`burnout_pvalues`); what the sharded graph stage keeps per token."""
    rest = prior.rate + gap_sum - gap_max
    with np.errstate(divide="ignore", invalid="ignore"):
        log_p = math.log(n_gaps) - (prior.shape + n_gaps - 1) * np.log1p(gap_max / rest)
    log_p = np.where(rest > 0, log_p, -np.inf)
    log_p = np.where(gap_max > 0, log_p, 0.0)
    return np.exp(np.minimum(log_p, 0.0))


def burnout_radius(distances: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """``sqrt(d_(m) d_(m+1))`` of each token (``rank`` m >= 1): look-alikes lie closer."""
    rows = np.arange(len(distances))
    return np.sqrt(distances[rows, rank - 1].astype(np.float64) * distances[rows, rank])


# ------------------------------------------------------------------------------------------------
# step 3: links and their null model
def image_links(images: np.ndarray, suspicious: np.ndarray, rank: np.ndarray, n_images: int,
                n_gaps: int, null_tokens: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """Observed and expected links of one image to every image.

    ``images``: ``(n, >= T)`` sorted neighbour images of the image's valid tokens.
    """
    top = images[:, :n_gaps].astype(np.int64)
    null = top if null_tokens == "all" else top[~suspicious]
    # q[j, m - 1]: share of the null tokens with j among their m nearest images, shrunk by one
    # pseudo-token towards the uniform m / (B - 1).
    cell = (null * n_gaps + np.arange(n_gaps)).ravel()
    hits = np.bincount(cell, minlength=n_images * n_gaps).astype(np.float64)
    hits = hits.reshape(n_images, n_gaps)
    m = np.arange(1, n_gaps + 1, dtype=np.float64)
    q = (np.cumsum(hits, axis=1) + m / (n_images - 1)) / (len(null) + 1.0)
    ranks = rank[suspicious]
    per_rank = np.bincount(ranks - 1, minlength=n_gaps).astype(np.float64)
    expected = q @ per_rank
    linked = top[suspicious][np.arange(n_gaps)[None, :] < ranks[:, None]]
    observed = np.bincount(linked, minlength=n_images).astype(np.int64)
    return observed, expected


def edge_pvalues(links: np.ndarray, expected: np.ndarray,
                 settings: CodeGraphSettings) -> np.ndarray:
    """``(B, B)`` upper-triangular Poisson p-values of the pairs' symmetric link counts.

    1 where an edge is impossible (fewer than ``min_links`` links, or no excess).
    """
    c = np.triu(links + links.T, k=1).astype(np.float64)
    mu = np.triu(expected + expected.T, k=1)
    testable = (c >= settings.min_links) & (c > mu)
    pvalues = np.ones_like(mu)
    pvalues[testable] = stats.poisson.sf(c[testable] - 1, mu[testable])
    return pvalues


def benjamini_hochberg(pvalues: np.ndarray, level: float) -> np.ndarray:
    """Bool mask of discoveries at false discovery rate ``level`` (all entries tested)."""
    flat = pvalues.ravel()
    order = np.argsort(flat, kind="stable")
    ranked = flat[order]
    ok = ranked <= level * np.arange(1, len(flat) + 1) / len(flat)
    keep = np.zeros(len(flat), dtype=bool)
    if ok.any():
        keep[order[: int(np.flatnonzero(ok).max()) + 1]] = True
    return keep.reshape(pvalues.shape)


def significant_edges(links: np.ndarray, expected: np.ndarray, counts: np.ndarray,
                      settings: CodeGraphSettings) -> list[tuple[int, int, float]]:
    """Edges whose symmetric link count is improbable under the null; scaled weights."""
    n_images = len(counts)
    pvalues = edge_pvalues(links, expected, settings)
    upper = np.triu_indices(n_images, k=1)
    keep = np.zeros_like(pvalues, dtype=bool)
    keep[upper] = benjamini_hochberg(pvalues[upper], settings.edge_fdr)
    kept: list[tuple[int, int, float]] = []
    for i, j in zip(*np.nonzero(keep)):
        c = float(links[i, j] + links[j, i])
        mu = float(expected[i, j] + expected[j, i])
        kept.append((int(i), int(j), (c - mu) / (0.5 * (counts[i] + counts[j]))))
    if kept:
        scale = float(np.median([w for _, _, w in kept]))
        kept = [(i, j, w / scale) for i, j, w in kept]
    return kept


def community_pvalue(members: list[int], links: np.ndarray, expected: np.ndarray) -> float:
    """Poisson tail of all links between the members together."""
    idx = np.ix_(members, members)
    c = float(links[idx].sum())
    mu = float(expected[idx].sum())
    return float(stats.poisson.sf(c - 1, mu)) if c > mu else 1.0


def validated(communities: list[list[int]], links: np.ndarray, expected: np.ndarray,
              settings: CodeGraphSettings) -> list[list[int]]:
    """Communities whose pooled links pass ``community_pvalue`` (Bonferroni over pairs)."""
    n_images = len(links)
    level = settings.community_pvalue / max(1, n_images * (n_images - 1) // 2)
    return [g for g in communities if community_pvalue(g, links, expected) < level]


# ------------------------------------------------------------------------------------------------
# step 4: Leiden CPM
def leiden_communities(n_images: int, edges: list[tuple[int, int, float]],
                       settings: CodeGraphSettings) -> list[list[int]]:
    """Communities of 2+ images of the weighted graph (CPM, fixed seed)."""
    if not edges:
        return []
    import igraph

    graph = igraph.Graph(n=n_images, edges=[(i, j) for i, j, _ in edges])
    graph.es["weight"] = [w for _, _, w in edges]
    with _IGRAPH_RNG_LOCK:
        igraph.set_random_number_generator(random.Random(settings.seed))
        try:
            partition = graph.community_leiden(
                objective_function="CPM", weights="weight", resolution=settings.resolution,
                beta=settings.leiden_beta, n_iterations=settings.leiden_iterations,
            )
        finally:
            igraph.set_random_number_generator(random)
    groups = [sorted(int(v) for v in members) for members in partition if len(members) >= 2]
    return sorted(groups, key=lambda g: (-len(g), g))
