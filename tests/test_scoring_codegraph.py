"""Consistent-anomaly stage (CoDeGraph reconstruction, method.md §4): planted consistent anomalies
on several token generators, clean batches, determinism and the statistics it rests on."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from sklearn.metrics import roc_auc_score

from cg3d_bids.core.scoring import (
    CodeGraphResult,
    CodeGraphSettings,
    SmallBatchWarning,
    codegraph_scores,
    mutual_scores,
)
from cg3d_bids.core.scoring import codegraph as cg


# ------------------------------------------------------------------------------------------------
# token generators: normal tokens + a pattern generator for the consistent anomaly
def _unit(rng, dim):
    u = rng.normal(size=dim)
    return u / np.linalg.norm(u)


def gen_prototypes(rng, n_images, n_tokens=200, dim=32, n_protos=30, sigma=0.25):
    """Shared prototypes + isotropic noise; the anomaly sits off prototype 0, tighter."""
    protos = rng.normal(size=(n_protos, dim))
    labels = rng.integers(n_protos, size=(n_images, n_tokens))
    tokens = protos[labels] + sigma * rng.normal(size=(n_images, n_tokens, dim))
    pattern = protos[0] + 1.9 * _unit(rng, dim)
    return tokens, lambda r, n: pattern + 0.3 * sigma * r.normal(size=(n, dim))


def gen_anisotropic(rng, n_images, n_tokens=200, dim=48, n_comp=12, rank=4):
    """Gaussian mixture, low-rank components, per-dimension (anisotropic) noise."""
    means = 3.0 * rng.normal(size=(n_comp, dim))
    bases = rng.normal(size=(n_comp, rank, dim)) * rng.uniform(0.3, 1.5, (n_comp, rank, 1)) * 3 / np.sqrt(dim)
    scales = rng.uniform(0.05, 0.4, size=dim)
    labels = rng.integers(n_comp, size=(n_images, n_tokens))
    latent = rng.normal(size=(n_images, n_tokens, rank))
    tokens = (means[labels] + np.einsum("bnr,bnrc->bnc", latent, bases[labels])
              + scales * rng.normal(size=(n_images, n_tokens, dim)))
    pattern = means[0] + 3.0 * _unit(rng, dim) * np.sqrt((scales**2).sum())
    return tokens, lambda r, n: pattern + 0.15 * scales * r.normal(size=(n, dim))


def gen_sphere(rng, n_images, n_tokens=200, dim=24, n_protos=40, kappa=0.35):
    """Three L2-normalised views concatenated, like the pipeline's tokens."""
    protos = rng.normal(size=(n_protos, 3, dim))
    protos /= np.linalg.norm(protos, axis=-1, keepdims=True)
    labels = rng.integers(n_protos, size=(n_images, n_tokens))
    x = protos[labels] + kappa / np.sqrt(dim) * rng.normal(size=(n_images, n_tokens, 3, dim))
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    pattern = protos[0] + 1.5 * kappa / np.sqrt(dim) * rng.normal(size=(3, dim))
    pattern /= np.linalg.norm(pattern, axis=-1, keepdims=True)

    def anomaly(r, n):
        y = pattern + 0.3 * kappa / np.sqrt(dim) * r.normal(size=(n, 3, dim))
        y /= np.linalg.norm(y, axis=-1, keepdims=True)
        return y.reshape(n, 3 * dim)

    return x.reshape(n_images, n_tokens, 3 * dim), anomaly


GENERATORS = {"prototypes": gen_prototypes, "anisotropic": gen_anisotropic, "sphere": gen_sphere}


def make_batch(generator, seed, n_images=20, groups=(), n_anomalous=15):
    """Tokens, validity (one image half invalid) and anomaly labels; ``groups``: images per
    planted pattern (each group gets its own pattern)."""
    rng = np.random.default_rng(seed)
    tokens, pattern = GENERATORS[generator](rng, n_images)
    n_tokens = tokens.shape[1]
    valid = rng.random((n_images, n_tokens)) < 0.9
    valid[1, : n_tokens // 2] = False
    labels = np.zeros(valid.shape, dtype=bool)
    order = rng.permutation(n_images)
    planted, start = [], 0
    for g, size in enumerate(groups):
        if g > 0:
            pattern = GENERATORS[generator](np.random.default_rng(10_000 + 7 * seed + g), 2)[1]
        members = sorted(order[start:start + size].tolist())
        start += size
        planted.append(members)
        for i in members:
            idx = rng.choice(np.flatnonzero(valid[i]), n_anomalous, replace=False)
            tokens[i, idx] = pattern(rng, n_anomalous)
            labels[i, idx] = True
    return tokens.astype(np.float32), valid, labels, planted


def auroc(labels, valid, scores):
    return roc_auc_score(labels[valid], np.asarray(scores)[valid])


# ------------------------------------------------------------------------------------------------
# acceptance (method.md §4): (a) planted consistent anomalies, (b) clean batches, (c) determinism
@pytest.mark.slow
@pytest.mark.parametrize("generator", sorted(GENERATORS))
@pytest.mark.parametrize("m", [3, 5, 8])
def test_planted_consistent_anomaly_is_restored(generator, m):
    tokens, valid, labels, planted = make_batch(generator, seed=m, groups=(m,))
    scores, details = codegraph_scores(tokens, valid, return_details=True)
    musc = mutual_scores(tokens, valid)
    assert np.array_equal(details.musc_scores, musc)
    assert auroc(labels, valid, musc) <= 0.8, "MuSc must fail on this batch for the test to mean anything"
    assert auroc(labels, valid, scores) >= 0.95
    assert details.communities == planted
    # every planted token was flagged or excluded from its community's references
    assert np.all(details.excluded[labels])
    outside = [i for i in range(len(tokens)) if i not in planted[0]]
    assert np.array_equal(scores[outside], musc[outside])


@pytest.mark.slow
def test_two_different_patterns_give_two_communities():
    tokens, valid, labels, planted = make_batch("prototypes", seed=4, groups=(5, 4))
    scores, details = codegraph_scores(tokens, valid, return_details=True)
    assert sorted(details.communities) == sorted(planted)
    assert auroc(labels, valid, scores) >= 0.95 > 0.6 >= auroc(labels, valid, details.musc_scores)


def test_pair_with_a_shared_anomaly_at_batch_fifteen():
    tokens, valid, labels, planted = make_batch("prototypes", seed=102, n_images=15, groups=(2,))
    scores, details = codegraph_scores(tokens, valid, return_details=True)
    assert details.communities == planted
    assert auroc(labels, valid, scores) >= 0.95 > 0.8 >= auroc(labels, valid, details.musc_scores)


@pytest.mark.slow
@pytest.mark.parametrize("generator", sorted(GENERATORS))
def test_clean_batch_keeps_musc_scores(generator):
    tokens, valid, _, _ = make_batch(generator, seed=21)
    scores, details = codegraph_scores(tokens, valid, return_details=True)
    assert details.communities == []
    assert np.array_equal(scores, mutual_scores(tokens, valid))
    assert details.n_suspicious.sum() < 0.01 * valid.sum()  # a few chance flags at most


@pytest.mark.slow
def test_unique_anomalies_form_no_community():
    tokens, valid, labels, _ = make_batch("sphere", seed=7, n_images=30, groups=(1, 1, 1))
    scores, details = codegraph_scores(tokens, valid, return_details=True)
    assert details.communities == []
    assert auroc(labels, valid, scores) >= 0.95


@pytest.mark.slow
def test_site_shift_of_a_whole_group_is_not_an_anomaly():
    """Every token of 8 images shifted (scanner/site effect): the link null absorbs it."""
    tokens, valid, _, _ = make_batch("sphere", seed=11)
    nn = np.median(cdist(tokens[0][valid[0]], tokens[2][valid[2]]).min(axis=1))
    rng = np.random.default_rng(0)
    group = rng.permutation(20)[:8]
    tokens[group] += (2.0 * nn * _unit(rng, tokens.shape[2])).astype(np.float32)
    scores, details = codegraph_scores(tokens, valid, return_details=True)
    assert details.n_suspicious[group].sum() > 0.5 * valid[group].sum()  # flagged, yet ...
    assert details.communities == []  # ... no edge beyond the group's own background
    settings = CodeGraphSettings(null_tokens="ordinary")
    _, details = codegraph_scores(tokens, valid, settings=settings, return_details=True)
    assert details.communities == [sorted(group.tolist())]  # the option that would see it


@pytest.mark.slow
def test_unflagged_copies_are_excluded_through_the_burnout_radius():
    """One unflagged copy per image keeps a consistent anomaly's score low; the look-alikes
    within the burnout radius of flagged tokens are excluded too (per-token test, strict p)."""
    tokens, valid, labels, planted = make_batch("anisotropic", seed=5, groups=(5,))
    strict = CodeGraphSettings(pvalue=1e-6, pooled_scale=False)
    scores, details = codegraph_scores(tokens, valid, settings=strict, return_details=True)
    assert details.communities == planted
    assert (details.suspicious & labels).sum() < labels.sum()  # not every copy flagged ...
    assert np.all(details.excluded[labels])  # ... yet every copy excluded
    assert auroc(labels, valid, scores) >= 0.95
    narrow = dataclasses.replace(strict, expand_exclusion=False)
    assert auroc(labels, valid, codegraph_scores(tokens, valid, settings=narrow)) < 0.93


def test_community_needs_pooled_evidence():
    """A pair with modest excess is dropped; four images with the same per-pair excess stay."""
    links = np.zeros((20, 20), dtype=np.int64)
    expected = np.full((20, 20), 0.5)
    for group in ([0, 1], [2, 3, 4, 5]):
        for i in group:
            for j in group:
                links[i, j] = 4 if i != j else 0
    settings = CodeGraphSettings()
    assert cg.validated([[0, 1], [2, 3, 4, 5]], links, expected, settings) == [[2, 3, 4, 5]]
    assert cg.community_pvalue([0, 1], links, expected) > settings.community_pvalue / 190


@pytest.mark.slow
def test_deterministic_for_a_seed():
    tokens, valid, _, _ = make_batch("anisotropic", seed=5, groups=(5,))
    first, d1 = codegraph_scores(tokens, valid, return_details=True)
    second, d2 = codegraph_scores(tokens, valid, return_details=True)
    assert np.array_equal(first, second)
    assert d1.communities == d2.communities and d1.edges == d2.edges
    assert np.array_equal(d1.suspicious, d2.suspicious)
    _, d3 = codegraph_scores(tokens, valid, settings=CodeGraphSettings(seed=7), return_details=True)
    assert d3.communities == d1.communities


@pytest.mark.slow
def test_global_random_state_untouched_and_restored():
    tokens, valid, _, _ = make_batch("prototypes", seed=3, groups=(3,))
    random.seed(123)
    expected = [random.random() for _ in range(3)]
    random.seed(123)
    _, details = codegraph_scores(tokens, valid, return_details=True)
    assert details.communities  # Leiden did run
    assert [random.random() for _ in range(3)] == expected


# ------------------------------------------------------------------------------------------------
# API
@pytest.mark.slow
def test_details_structure_and_types():
    tokens, valid, labels, planted = make_batch("sphere", seed=5, groups=(5,))
    scores, details = codegraph_scores(torch.from_numpy(tokens), torch.from_numpy(valid),
                                       return_details=True)
    assert isinstance(scores, torch.Tensor) and scores.dtype == torch.float32
    assert isinstance(details, CodeGraphResult)
    b, n = valid.shape
    assert details.suspicious.shape == (b, n) and details.suspicious.dtype == bool
    assert not (details.suspicious & ~valid).any() and not (details.excluded & ~valid).any()
    assert np.array_equal(details.n_suspicious, details.suspicious.sum(axis=1))
    assert np.all((details.burnout_rank > 0) == details.suspicious)
    assert all(i < j and w > 0 for i, j, w in details.edges)
    assert all(len(c) >= 2 for c in details.communities)
    assert details.settings == CodeGraphSettings()
    assert np.all(scores.numpy()[~valid] == 0)
    plain = codegraph_scores(tokens, valid)
    assert isinstance(plain, np.ndarray) and np.array_equal(plain, scores.numpy())


def test_small_batch_runs():
    tokens, valid, _, _ = make_batch("prototypes", seed=1, n_images=5)
    with pytest.warns(SmallBatchWarning):
        scores = codegraph_scores(tokens, valid)
    assert scores.shape == valid.shape


def test_settings_are_frozen_and_validated():
    settings = CodeGraphSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.pvalue = 0.5
    assert settings.to_dict()["resolution"] == settings.resolution
    for bad in (dict(pvalue=0), dict(edge_fdr=1.5), dict(min_links=0), dict(resolution=0),
                dict(max_rank_fraction=0), dict(null_tokens="x"), dict(distance_floor=0)):
        with pytest.raises(ValueError):
            CodeGraphSettings(**bad)


# ------------------------------------------------------------------------------------------------
# the statistics
def test_burnout_pvalues_are_calibrated_under_the_null():
    """Gaps i.i.d. Exp(alpha), alpha ~ Gamma(a, b): p-values are (conservatively) uniform."""
    rng = np.random.default_rng(0)
    n, t = 200_000, 9
    alpha = rng.gamma(6.0, 1 / 2.0, size=n)  # a = 6, b = 2
    gaps = rng.exponential(1 / alpha[:, None], size=(n, t))
    prior = cg.fit_rate_prior(gaps.sum(axis=1), t)
    assert prior.shape == pytest.approx(6.0, rel=0.2) and prior.rate == pytest.approx(2.0, rel=0.2)
    for p in (1e-3, 1e-2, 0.05):
        for used in (prior, cg.RatePrior(0.0, 0.0)):
            rate = np.mean(cg.burnout_pvalues(gaps, used)[0] < p)
            assert 0.3 * p < rate <= 1.15 * p


def test_burnout_detects_a_jump_and_its_rank():
    distances = np.array([[1.0, 1.02, 1.05, 1.06, 1.08, 1.1, 1.12],
                          [0.2, 0.21, 0.22, 1.0, 1.02, 1.03, 1.05]])
    gaps = cg.scaled_gaps(distances, 5, 1e-3)
    p, rank = cg.burnout_pvalues(gaps, cg.RatePrior(0.0, 0.0))
    assert p[0] > 0.1 and p[1] < 1e-3 and rank[1] == 3
    radius = cg.burnout_radius(distances, rank)
    assert radius[1] == pytest.approx(np.sqrt(0.22 * 1.0))


def test_edges_need_excess_over_the_background_links():
    links = np.zeros((4, 4), dtype=np.int64)
    expected = np.full((4, 4), 1.0)
    links[0, 1] = links[1, 0] = 12
    links[2, 3] = 3  # three links where two are expected: chance
    edges = cg.significant_edges(links, expected, np.full(4, 100), CodeGraphSettings())
    assert [(i, j) for i, j, _ in edges] == [(0, 1)] and edges[0][2] == pytest.approx(1.0)


def test_benjamini_hochberg():
    p = np.array([1e-4, 0.02, 0.03, 0.5])
    assert cg.benjamini_hochberg(p, 0.05).tolist() == [True, True, True, False]
    assert cg.benjamini_hochberg(p, 0.001).tolist() == [True, False, False, False]
