"""Scoring batches (--batch-size): random, balanced, seeded, and stable when images are added."""

from __future__ import annotations

import pytest

from cg3d_bids.batches import assign_batches, assignment_path, batches_of, load_assignment, save_assignment

NAMES = [f"sub-{i:02d}_T1w" for i in range(1, 14)]


def _sizes(assignment):
    sizes = {}
    for chunk in assignment.values():
        sizes[chunk] = sizes.get(chunk, 0) + 1
    return sizes


def test_no_batch_size_is_one_batch():
    assert set(assign_batches(NAMES, None, 0).values()) == {1}


def test_chunks_are_balanced_at_most_b_and_seeded():
    first = assign_batches(NAMES, 5, seed=0)
    assert sorted(_sizes(first).values()) == [4, 4, 5] and set(first) == set(NAMES)
    assert assign_batches(list(reversed(NAMES)), 5, seed=0) == first, "input order does not matter"
    assert assign_batches(NAMES, 5, seed=1) != first, "the seed shuffles"
    assert assign_batches(NAMES, 13, seed=0) == {n: 1 for n in NAMES}


def test_images_keep_their_chunk_when_images_are_added_or_removed():
    first = assign_batches(NAMES[:10], 5, seed=3)
    grown = assign_batches(NAMES, 5, seed=3, previous=first)
    assert all(grown[n] == first[n] for n in NAMES[:10])
    assert max(_sizes(grown).values()) <= 5 and len(_sizes(grown)) == 3  # a new chunk for the overflow
    shrunk = assign_batches(NAMES[:8], 5, seed=3, previous=grown)
    assert all(shrunk[n] == grown[n] for n in NAMES[:8])


def test_a_smaller_batch_size_deals_anew():
    first = assign_batches(NAMES, 7, seed=0)
    smaller = assign_batches(NAMES, 4, seed=0, previous=first)
    assert max(_sizes(smaller).values()) <= 4 and len(_sizes(smaller)) == 4


def test_batches_in_order_and_the_record_round_trips(tmp_path):
    assignment = assign_batches(NAMES, 5, seed=0)
    chunks = batches_of(assignment, NAMES)
    assert [c for c, _ in chunks] == sorted(_sizes(assignment))
    assert sorted(n for _, members in chunks for n in members) == sorted(NAMES)
    for _, members in chunks:
        assert members == [n for n in NAMES if n in members], "batch order is kept inside a chunk"
    path = assignment_path(tmp_path, "T1w", 5, 0)
    save_assignment(path, assignment)
    assert load_assignment(path) == assignment and load_assignment(tmp_path / "none.json") == {}


def test_bad_arguments():
    with pytest.raises(ValueError):
        assign_batches(["a", "a"], 2, 0)
    with pytest.raises(ValueError):
        assign_batches(["a"], 0, 0)
