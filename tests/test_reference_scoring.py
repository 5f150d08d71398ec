"""Scoring new images against a saved cohort equals their row of the MuSc batch (core, arrays only)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from cg3d_bids.core.scoring import mutual_scores
from cg3d_bids.core.scoring.reference import ReferenceQuery, reference_k, reference_scores
from cg3d_bids.errors import BatchTooSmallError

RTOL = 1e-5


def _batch(seed: int = 0, b: int = 8, n: int = 125, c: int = 24):
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(size=(12, c))
    tokens = (prototypes[rng.integers(0, 12, size=(b, n))] + 0.3 * rng.normal(size=(b, n, c))).astype(np.float32)
    valid = rng.random((b, n)) > 0.25
    return tokens, valid


def _full_row(tokens, valid, row, fraction, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mutual_scores(tokens, valid, fraction, query=[row], **kw)[0]


@pytest.mark.parametrize("fraction", [0.3, 0.5, 1.0])
@pytest.mark.parametrize("block_mb", [256, 0.002])
def test_new_image_scores_equal_its_row_of_the_batch(fraction, block_mb, blas):
    tokens, valid = _batch()
    refs = [tokens[i][valid[i]] for i in range(7)]
    expected = _full_row(tokens, valid, 7, fraction, block_mb=block_mb)
    (got,) = reference_scores([ReferenceQuery(tokens[7], valid[7])], refs, fraction, block_mb=block_mb)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=1e-7)
    assert got.dtype == np.float32 and (got[~valid[7]] == 0).all()


@pytest.mark.parametrize("member", [0, 3, 6])
def test_a_bank_image_is_never_compared_with_itself(member, blas):
    """Scoring a bank image reproduces its row of the bank's own batch (K from B_ref - 1)."""
    tokens, valid = _batch(seed=1, b=7)
    refs = [tokens[i][valid[i]] for i in range(7)]
    expected = _full_row(tokens, valid, member, 0.5)
    (got,) = reference_scores([ReferenceQuery(tokens[member], valid[member], self_index=member)], refs, 0.5)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=1e-7)
    (as_new,) = reference_scores([ReferenceQuery(tokens[member], valid[member])], refs, 0.5)
    assert not np.allclose(as_new, expected, rtol=RTOL)  # compared with its own copy: leaving it out matters


def test_queries_are_scored_independently_and_references_may_be_memory_maps(tmp_path):
    tokens, valid = _batch(seed=2, b=9)
    bank_rows = np.concatenate([tokens[i][valid[i]] for i in range(7)])
    np.save(tmp_path / "layer.npy", bank_rows)
    mapped = np.load(tmp_path / "layer.npy", mmap_mode="r")
    offsets = np.concatenate([[0], np.cumsum(valid[:7].sum(axis=1))])
    refs = [mapped[offsets[i]:offsets[i + 1]] for i in range(7)]
    both = reference_scores([ReferenceQuery(tokens[7], valid[7]), ReferenceQuery(tokens[8], valid[8])], refs, 0.3)
    for q in (7, 8):
        (alone,) = reference_scores([ReferenceQuery(tokens[q], valid[q])], refs, 0.3)
        np.testing.assert_array_equal(both[q - 7], alone)
        batch = np.concatenate([tokens[:7], tokens[q:q + 1]])
        mask = np.concatenate([valid[:7], valid[q:q + 1]])
        np.testing.assert_allclose(alone, _full_row(batch, mask, 7, 0.3), rtol=RTOL, atol=1e-7)


def test_the_equality_fails_for_a_wrong_k_or_a_wrong_reference_set():
    """The comparisons above can fail: another K or one reference less changes the scores."""
    tokens, valid = _batch(seed=3)
    refs = [tokens[i][valid[i]] for i in range(7)]
    (got,) = reference_scores([ReferenceQuery(tokens[7], valid[7])], refs, 0.3)
    assert reference_k(7, 0.3) == 2 and reference_k(6, 0.3) == 1  # floor(0.3 * B_ref), not floor(0.3 * (B_ref - 1))
    wrong_k = _full_row(tokens[1:], valid[1:], 6, 0.3)  # a batch of 7: K = 1 with six references
    assert not np.allclose(got, wrong_k, rtol=RTOL)
    (fewer,) = reference_scores([ReferenceQuery(tokens[7], valid[7])], refs[:-1], 0.3)
    assert not np.allclose(got, fewer, rtol=RTOL)


def test_k_comes_from_the_bank_size_and_a_too_small_bank_is_refused():
    assert reference_k(3, 0.5) == 1 and reference_k(3, 0.5, self_in_bank=True) == 1
    assert reference_k(10, 0.3) == 3
    with pytest.raises(BatchTooSmallError, match="K = floor"):
        reference_k(3, 0.3)
    tokens, valid = _batch(b=4)
    with pytest.raises(BatchTooSmallError):
        reference_scores([ReferenceQuery(tokens[3], valid[3])], [tokens[i][valid[i]] for i in range(3)], 0.3)


def test_bad_inputs_are_named():
    tokens, valid = _batch(b=4)
    refs = [tokens[i][valid[i]] for i in range(3)]
    empty = np.zeros_like(valid[3])
    with pytest.raises(ValueError, match="no valid token"):
        reference_scores([ReferenceQuery(tokens[3], empty)], refs, 0.5)
    with pytest.raises(ValueError, match="dims"):
        reference_scores([ReferenceQuery(tokens[3], valid[3])], [refs[0], refs[1][:, :5]], 0.5)
    bad = tokens[3].copy()
    bad[valid[3].argmax()] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        reference_scores([ReferenceQuery(bad, valid[3])], refs, 0.5)
    damaged = [refs[0], refs[1].copy(), refs[2]]
    damaged[1][3, 2] = np.inf
    with pytest.raises(ValueError, match="reference image has non-finite"):
        reference_scores([ReferenceQuery(tokens[3], valid[3])], damaged, 0.5)
    with pytest.raises(ValueError, match="no reference"):
        reference_scores([ReferenceQuery(tokens[3], valid[3])], [], 0.5)
