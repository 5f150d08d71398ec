"""Scoring over shards of a batch (score rows -> build graph -> re-score rows): byte-identical to
the one-shot run for any partition of the images, with and without consistent anomalies."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch

from cg3d_bids.core.scoring import (
    CodeGraphSettings,
    GraphResult,
    RescoredRows,
    RowScores,
    SmallBatchWarning,
    build_graph,
    codegraph_scores,
    mutual_scores,
    rescore_rows,
    score_rows,
)
from cg3d_bids.core.scoring import shards as shards_module
from test_scoring_codegraph import make_batch

pytestmark = pytest.mark.filterwarnings("ignore::cg3d_bids.core.scoring.SmallBatchWarning")


def partition(n_images: int, n_shards: int, seed: int) -> list[list[int]]:
    """Images dealt into ``n_shards`` uneven, shuffled shards (each non-empty)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_images)
    cuts = np.sort(rng.choice(np.arange(1, n_images), n_shards - 1, replace=False))
    return [sorted(part.tolist(), reverse=bool(k % 2))  # some shards in descending order
            for k, part in enumerate(np.split(order, cuts))]


def sharded(tokens, valid, parts, settings=None, **kwargs):
    """The staged pipeline over ``parts``; returns assembled scores, graph and exclusions."""
    settings = settings or CodeGraphSettings()
    rows = [score_rows(tokens, valid, p, 0.3, codegraph=settings, **kwargs) for p in parts]
    graph = build_graph(rows[::-1], len(tokens), settings)  # order of the rows is irrelevant
    scores = np.zeros(valid.shape, dtype=np.float32)
    excluded = np.zeros(valid.shape, dtype=bool)
    for p, row in zip(parts, rows):
        final = rescore_rows(tokens, valid, p, 0.3, row, graph, **kwargs)
        assert final.images.tolist() == list(p)
        scores[p], excluded[p] = final.scores, final.excluded
    return scores, graph, excluded, rows


def shard_counts(n_images):
    return [1, 2, 3, n_images]


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", [{}, dict(chunk_size=7), dict(block_mb=0.02)])
def test_mutual_rows_of_any_partition_equal_the_full_run(setting, blas):
    tokens, valid, _, _ = make_batch("anisotropic", seed=3, n_images=12)
    full = mutual_scores(tokens, valid, **setting)
    for n_shards in shard_counts(12):
        for p in partition(12, n_shards, seed=n_shards):
            rows = score_rows(tokens, valid, p, 0.3, codegraph=None, **setting)
            assert rows.images.tolist() == p and rows.valid.tolist() == valid[p].tolist()
            assert np.array_equal(rows.scores, full[p])


@pytest.mark.parametrize("groups", [(5,), (4, 3), ()])
def test_codegraph_shards_are_byte_identical_to_one_shot(groups, blas):
    tokens, valid, labels, planted = make_batch("prototypes", seed=4, groups=groups)
    scores, details = codegraph_scores(tokens, valid, return_details=True)
    assert sorted(details.communities) == sorted(planted)  # the test means something
    for n_shards in shard_counts(len(tokens)):
        parts = partition(len(tokens), n_shards, seed=10 + n_shards)
        got, graph, excluded, rows = sharded(tokens, valid, parts)
        assert np.array_equal(got, scores), n_shards
        assert graph.communities == details.communities
        assert np.array_equal(graph.suspicious, details.suspicious)
        assert np.array_equal(excluded, details.excluded)
        assert graph.edge_list == details.edges
        musc = np.zeros_like(got)
        for p, row in zip(parts, rows):
            musc[p] = row.scores
        assert np.array_equal(musc, details.musc_scores)


@pytest.mark.parametrize("setting", [dict(chunk_size=5), dict(block_mb=0.05)])
def test_shards_with_row_blocks_and_members_split_across_shards(setting):
    """Tiles of a few rows (several row blocks per image) and a community spread over shards."""
    tokens, valid, _, planted = make_batch("sphere", seed=5, groups=(6,))
    scores, details = codegraph_scores(tokens, valid, return_details=True, **setting)
    assert details.communities == planted
    members = planted[0]
    parts = [members[::2] + [i for i in range(20) if i not in members][:7],
             members[1::2], [i for i in range(20) if i not in members][7:]]
    got, graph, excluded, _ = sharded(tokens, valid, parts, **setting)
    assert np.array_equal(got, scores)
    assert np.array_equal(excluded, details.excluded)
    assert graph.communities == details.communities


def test_graph_is_independent_of_the_order_and_split_of_rows():
    tokens, valid, _, _ = make_batch("anisotropic", seed=5, groups=(5,))
    settings = CodeGraphSettings()
    whole = build_graph([score_rows(tokens, valid, None, 0.3, codegraph=settings)], 20, settings)
    parts = partition(20, 4, seed=1)
    rows = [score_rows(tokens, valid, p, 0.3, codegraph=settings) for p in parts]
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
        split = build_graph([rows[i] for i in order], 20, settings)
        for name, value in whole.to_arrays().items():
            assert np.array_equal(split.to_arrays()[name], value), name
    assert whole.communities  # a community was found, so the comparison covers it


def test_rows_and_graph_survive_npz_round_trips():
    tokens, valid, _, _ = make_batch("prototypes", seed=3, groups=(3,))
    settings = CodeGraphSettings(pvalue=1e-4)
    rows = score_rows(tokens, valid, [0, 5, 2], 0.3, codegraph=settings)
    graph = build_graph([score_rows(tokens, valid, None, 0.3, codegraph=settings)], 20, settings)
    final = rescore_rows(tokens, valid, [0, 5, 2], 0.3, rows, graph)
    for obj, cls in ((rows, RowScores), (graph, GraphResult), (final, RescoredRows)):
        buffer = io.BytesIO()
        np.savez(buffer, **obj.to_arrays())
        buffer.seek(0)
        with np.load(buffer) as data:
            back = cls.from_arrays(data)
        for name, value in obj.to_arrays().items():
            assert np.array_equal(back.to_arrays()[name], value, equal_nan=value.dtype.kind == "f"), name
    assert GraphResult.from_arrays(graph.to_arrays()).settings == settings
    again = rescore_rows(tokens, valid, [0, 5, 2], 0.3, RowScores.from_arrays(rows.to_arrays()),
                         GraphResult.from_arrays(graph.to_arrays()))
    assert np.array_equal(again.scores, final.scores)


def test_row_contents():
    tokens, valid, _, _ = make_batch("sphere", seed=1, groups=(4,))
    settings = CodeGraphSettings()
    rows = score_rows(tokens, valid, [7, 3], 0.3, codegraph=settings)
    n_valid = valid[[7, 3]].sum()
    t = 9  # floor(0.5 * 19)
    assert rows.n_gaps == t and rows.k == 5 and rows.counts.tolist() == valid.sum(1).tolist()
    assert rows.gap_sum.shape == rows.gap_max.shape == rows.rank.shape == (n_valid,)
    assert rows.neighbours.shape == (n_valid, t) and rows.neighbours.dtype == np.int16
    assert np.all((rows.rank >= 1) & (rows.rank <= t))
    assert np.all(rows.gap_max <= rows.gap_sum + 1e-12) and np.all(rows.radius > 0)
    own = np.concatenate([np.full(valid[i].sum(), i) for i in (7, 3)])
    assert not np.any(rows.neighbours == own[:, None])  # an image is never its own neighbour
    plain = score_rows(tokens, valid, [7, 3], 0.3)
    assert not plain.codegraph and plain.neighbours.size == 0
    assert np.array_equal(plain.scores, rows.scores)


def test_rescore_without_members_does_no_token_work(monkeypatch):
    tokens, valid, _, planted = make_batch("prototypes", seed=3, groups=(3,))
    settings = CodeGraphSettings()
    rows = score_rows(tokens, valid, None, 0.3, codegraph=settings)
    graph = build_graph([rows], 20, settings)
    outside = [i for i in range(20) if i not in planted[0]][:4]

    def forbidden(*args, **kwargs):
        raise AssertionError("token work for images outside every community")

    monkeypatch.setattr(shards_module, "build_table", forbidden)
    final = rescore_rows(tokens, valid, outside, 0.3, rows, graph)
    assert np.array_equal(final.scores, rows.scores[outside]) and not final.excluded.any()
    with pytest.raises(AssertionError, match="token work"):
        rescore_rows(tokens, valid, planted[0][:1], 0.3, rows, graph)


def test_kept_tables_rescore_without_recomputing_rows(monkeypatch):
    """``keep_table=True``: re-scoring reads the kept minima (same bytes, no new table)."""
    tokens, valid, _, planted = make_batch("prototypes", seed=4, groups=(5,))
    scores, details = codegraph_scores(tokens, valid, return_details=True)
    settings = CodeGraphSettings()
    parts = partition(len(tokens), 3, seed=7)
    rows = [score_rows(tokens, valid, p, 0.3, codegraph=settings, keep_table=True) for p in parts]
    assert all(r.table.shape == (len(p), len(tokens), valid.sum(1).max())
               for r, p in zip(rows, parts))
    graph = build_graph(rows, len(tokens), settings)
    assert graph.communities == details.communities == planted

    def forbidden(*args, **kwargs):
        raise AssertionError("rows recomputed although their tables were kept")

    monkeypatch.setattr(shards_module, "build_table", forbidden)
    got = np.zeros_like(scores)
    for p, row in zip(parts, rows):
        got[p] = rescore_rows(tokens, valid, p, 0.3, RowScores.from_arrays(row.to_arrays()),
                              graph).scores
    assert np.array_equal(got, scores)


def test_stage_inputs_are_checked():
    tokens, valid, _, _ = make_batch("prototypes", seed=2, n_images=10)
    settings = CodeGraphSettings()
    a = score_rows(tokens, valid, [0, 1, 2, 3, 4], 0.3, codegraph=settings)
    b = score_rows(tokens, valid, [5, 6, 7, 8, 9], 0.3, codegraph=settings)
    with pytest.raises(ValueError, match=r"missing"):
        build_graph([a], 10, settings)
    with pytest.raises(ValueError, match="more than one"):
        build_graph([a, b, a], 10, settings)
    with pytest.raises(ValueError, match="settings"):
        build_graph([a, b], 10, CodeGraphSettings(max_rank_fraction=0.3))
    with pytest.raises(ValueError, match="settings"):
        build_graph([a, score_rows(tokens, valid, [5, 6, 7, 8, 9], 0.3)], 10, settings)
    with pytest.raises(ValueError, match="none"):
        build_graph([], 10, settings)
    graph = build_graph([a, b], 10, settings)
    with pytest.raises(ValueError, match=r"query image\(s\) \[5\]"):
        rescore_rows(tokens, valid, [4, 5], 0.3, a, graph)
    with pytest.raises(ValueError, match="fraction"):
        rescore_rows(tokens, valid, [4], 0.5, a, graph)
    other = valid.copy()
    other[0, np.flatnonzero(valid[0])[0]] = False
    with pytest.raises(ValueError, match="another batch"):
        rescore_rows(tokens, other, [4], 0.3, a, graph)


def test_shards_on_a_small_batch_without_gaps():
    """B = 3 at fraction 0.5: T = 1 gap, nothing can be flagged; stages still compose."""
    tokens, valid, _, _ = make_batch("prototypes", seed=2, n_images=3)
    settings = CodeGraphSettings()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallBatchWarning)
        one = codegraph_scores(tokens, valid, fraction=0.5, settings=settings)
        rows = [score_rows(tokens, valid, [i], 0.5, codegraph=settings) for i in (2, 0, 1)]
        graph = build_graph(rows, 3, settings)
        got = np.concatenate([rescore_rows(tokens, valid, [i], 0.5, r, graph).scores
                              for i, r in zip((2, 0, 1), rows)])
    assert not graph.suspicious.any() and graph.communities == []
    assert np.array_equal(got, one[[2, 0, 1]])
    assert np.isnan(graph.rate_prior).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_shards_match_cuda_one_shot():
    tokens, valid, _, planted = make_batch("prototypes", seed=4, groups=(5,))
    scores = codegraph_scores(tokens, valid, device="cuda")
    got, graph, _, _ = sharded(tokens, valid, partition(20, 3, seed=0), device="cuda")
    assert graph.communities == planted
    assert np.array_equal(got, scores)
