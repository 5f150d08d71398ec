"""MuSc mutual scoring: exact semantics against a brute-force reference, memory settings,
shards, input kinds, errors and determinism (method.md §3)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from cg3d_bids.errors import BatchTooSmallError, DeviceUnavailableError
from cg3d_bids.core.scoring import (
    SmallBatchWarning,
    min_distance_table,
    minimum_batch_size,
    musc_k,
    mutual_scores,
    sorted_msv,
)
from cg3d_bids.core.scoring import mutual as mutual_module
from cg3d_bids.core.scoring import tiles


# ------------------------------------------------------------------------------------------------
# helpers
def reference_scores(tokens: np.ndarray, valid: np.ndarray, fraction: float) -> np.ndarray:
    """Independent float64 brute force: explicit loops over images, exact cdist distances."""
    n_images = len(tokens)
    k = int(math.floor(fraction * (n_images - 1) + 1e-9))
    out = np.zeros(valid.shape, dtype=np.float64)
    for i in range(n_images):
        mins = []
        for j in range(n_images):
            if j == i:
                continue
            d = cdist(tokens[i][valid[i]].astype(np.float64), tokens[j][valid[j]].astype(np.float64))
            mins.append(d.min(axis=1))
        msv = np.sort(np.stack(mins, axis=1), axis=1)
        out[i][valid[i]] = msv[:, :k].mean(axis=1)
    return out


def random_batch(seed: int, n_images: int = 9, n_tokens: int = 120, dim: int = 24):
    """Random tokens, random masks, two images with many invalid tokens."""
    rng = np.random.default_rng(seed)
    tokens = rng.normal(size=(n_images, n_tokens, dim)).astype(np.float32)
    valid = rng.random((n_images, n_tokens)) < 0.8
    valid[1] = rng.random(n_tokens) < 0.1
    valid[2, : n_tokens - 5] = False
    return tokens, valid


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallBatchWarning)
        return fn(*args, **kwargs)


# ------------------------------------------------------------------------------------------------
# semantics
@pytest.mark.parametrize("fraction", [0.3, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_bruteforce_reference(seed, fraction, blas):
    tokens, valid = random_batch(seed, n_images=11)
    scores = quiet(mutual_scores, tokens, valid, fraction)
    expected = reference_scores(tokens, valid, fraction)
    assert scores.shape == valid.shape and scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    assert np.all(scores[~valid] == 0)
    assert np.all(scores[valid] > 0)


def test_sorted_msv_matches_bruteforce():
    tokens, valid = random_batch(3, n_images=7)
    table = min_distance_table(tokens, valid)
    for i in (0, 1, 2):
        distances, images = sorted_msv(table, i)
        others = [j for j in range(7) if j != i]
        full = np.stack([cdist(tokens[i][valid[i]], tokens[j][valid[j]]).min(axis=1) for j in others], 1)
        order = np.argsort(full, axis=1, kind="stable")
        np.testing.assert_allclose(distances.numpy(), np.take_along_axis(full, order, 1), atol=1e-4)
        assert np.array_equal(images.numpy(), np.array(others)[order])


def test_invalid_tokens_are_never_references():
    tokens, valid = random_batch(4)
    base = quiet(mutual_scores, tokens, valid)
    poisoned = tokens.copy()
    # invalid tokens become exact copies of valid tokens of image 0: distance 0 if they counted
    src = tokens[0][valid[0]]
    for i in range(1, len(tokens)):
        idx = np.flatnonzero(~valid[i])
        poisoned[i, idx] = src[np.arange(len(idx)) % len(src)]
    assert np.array_equal(quiet(mutual_scores, poisoned, valid), base)


def test_near_duplicates_far_from_origin_are_accurate():
    """Centring keeps |a|^2 + |b|^2 - 2ab accurate for tokens sharing a large common offset."""
    rng = np.random.default_rng(5)
    tokens = (50.0 + 1e-2 * rng.normal(size=(6, 80, 16))).astype(np.float32)
    valid = np.ones((6, 80), dtype=bool)
    scores = quiet(mutual_scores, tokens, valid)
    np.testing.assert_allclose(scores, reference_scores(tokens, valid, 0.3), rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# memory settings, shards, input kinds, determinism
@pytest.mark.parametrize("setting", [dict(chunk_size=1), dict(chunk_size=7), dict(chunk_size=500),
                                     dict(block_mb=1e-3), dict(block_mb=1000.0)])
def test_chunk_and_memory_settings_do_not_change_scores(setting, blas):
    tokens, valid = random_batch(6)
    base = quiet(mutual_scores, tokens, valid)
    # small row blocks run BLAS's small-matrix kernels, which round differently
    np.testing.assert_allclose(quiet(mutual_scores, tokens, valid, **setting), base, rtol=1e-6)


def test_row_blocks_are_equal_and_cover_the_rows():
    assert tiles.row_blocks(0, 256) == []
    assert tiles.row_blocks(100, 256) == [(0, 100)]
    assert tiles.row_blocks(513, 256) == [(0, 171), (171, 342), (342, 513)]
    for n, rows in [(1, 1), (257, 256), (1000, 7), (4096, 256)]:
        blocks = tiles.row_blocks(n, rows)
        sizes = [r1 - r0 for r0, r1 in blocks]
        assert blocks[0][0] == 0 and blocks[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
        assert max(sizes) <= rows and max(sizes) - min(sizes) <= 1


def test_tile_shapes_give_bit_identical_minima(blas):
    """With torch's BLAS (MKL) the CPU tile shape is a speed setting only: shapes whose row
    blocks are not small (equal blocks, no few-row remainder) give the same bits, with one or
    several images per GEMM. OpenBLAS's last bits depend on the GEMM shape: with numpy's BLAS
    every GEMM is one row block against one reference image, the rows change only the last
    bits, and one shape gives the same bits every time."""
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randn(4, 600, 384, generator=gen)
    valid = torch.rand(4, 600, generator=gen) > 0.3  # ~420 valid tokens per image
    bank = tiles.TokenBank(tokens, valid, torch.device("cpu"))
    assert bank.blas == blas
    shapes = [(tiles.CPU_TILE_ROWS, tiles.CPU_TILE_COLS), (512, 4096), (400, 450), (150, 900)]
    if blas == "numpy":
        shapes = [(tiles.CPU_TILE_ROWS, 0), (tiles.CPU_TILE_ROWS, 0), (512, 0), (150, 0)]
    tables = []
    for rows, cols in shapes:
        table = torch.full((4, 4, 600), math.inf)
        tiles.fill_minima(bank, tiles.TileShape(rows, cols), table, range(4))
        tables.append(table)
    assert bool(torch.isfinite(tables[0][0, 1, : bank.counts[0]]).all())
    assert torch.equal(tables[1], tables[0])
    for table in tables[2:]:
        if blas == "torch":
            assert torch.equal(table, tables[0])
        else:
            torch.testing.assert_close(table, tables[0], rtol=1e-5, atol=1e-4)


def test_tile_shape_respects_the_block_memory(blas):
    for max_count, block_mb in [(1000, 1.0), (2500, 256.0), (300, 1e-3), (5000, 4.0)]:
        shape = tiles.tile_shape(max_count, block_mb)
        # one whole image per group at least (cols 0: exactly one)
        assert shape.rows >= 1 and (shape.cols >= max_count or shape.cols == 0)
        if shape.rows > 1:
            assert shape.max_bytes(max_count) <= block_mb * 2**20
    assert tiles.tile_shape(1000, 1.0, chunk_size=5).rows == 5
    one_image = blas == "numpy"  # OpenBLAS: one reference image per GEMM (cols 0)
    assert tiles.tile_shape(100, None) == tiles.TileShape(100, 0 if one_image else tiles.CPU_TILE_COLS)
    assert tiles.tile_shape(100, None, library="torch").cols == tiles.CPU_TILE_COLS
    assert tiles.tile_shape(2000, 4.0, library="numpy") == tiles.TileShape(256, 0)
    assert tiles.tile_shape(2000, 1.0, library="numpy") == tiles.TileShape(131, 0)  # 1 MB / 2000 floats
    cuda = tiles.tile_shape(1000, 64.0, device="cuda")
    assert cuda.rows == 1000 and cuda.max_bytes(1000) <= 64 * 2**20
    for bad in (dict(chunk_size=0), dict(block_mb=0.0)):
        with pytest.raises(ValueError):
            tiles.tile_shape(10, **{"block_mb": 1.0, **bad})


def test_column_groups_cover_the_references_once():
    counts = np.array([5, 9, 3, 3, 12, 1, 7])
    for first in range(len(counts)):
        groups = tiles.column_groups(counts, first, cols=12)
        covered = [j for g0, g1 in groups for j in range(g0, g1)]
        assert covered == list(range(first, len(counts)))
        for g0, g1 in groups:
            assert g1 - g0 == 1 or counts[g0:g1].sum() <= 12
    rng = np.random.default_rng(0)
    for _ in range(300):  # widest_group (two pointers) against every group of every row image
        counts = rng.integers(1, 20, size=rng.integers(2, 15))
        cols = int(rng.integers(1, 60))
        widths = [counts[g0:g1].sum() for first in range(1, len(counts))
                  for g0, g1 in tiles.column_groups(counts, first, cols)]
        assert tiles.widest_group(counts, cols) == max(max(widths), counts.max())


def _tiles_used(monkeypatch, tokens, valid, **kwargs):
    used = []
    original = tiles.TileWorker.group_minima

    def recording(self, row_side, g0, g1, row_out, col_out):
        used.append((len(row_side), g0, g1, row_out is not None, tuple(j for j, _ in col_out)))
        return original(self, row_side, g0, g1, row_out, col_out)

    with monkeypatch.context() as patch:  # undone on exit; the fixtures' patches stay
        patch.setattr(tiles.TileWorker, "group_minima", recording)
        quiet(mutual_scores, tokens, valid, **kwargs)
    return used


def test_tiles_cover_every_pair_once_and_shards_skip_the_rest(monkeypatch, blas):
    tokens, _ = random_batch(8, n_images=8)
    valid = np.arange(tokens.shape[1])[None, :] < 40 + 9 * np.arange(8)[:, None]
    counts = valid.sum(axis=1)  # distinct: they identify the row image of a tile
    # 2-row tiles, ~220 reference columns per tile per worker thread: 2-4 images per GEMM
    setting = dict(chunk_size=2, block_mb=4 * 2 * 220 * torch.get_num_threads() / 2**20)
    full = _tiles_used(monkeypatch, tokens, valid, **setting)
    rows_of = {int(n): i for i, n in enumerate(counts)}
    pairs = sorted((rows_of[n], j) for n, g0, g1, _, _ in full for j in range(g0, g1))
    assert pairs == [(a, b) for a in range(8) for b in range(a + 1, 8)]
    if blas == "torch":
        assert any(g1 - g0 > 1 for _, g0, g1, _, _ in full)  # several images per GEMM
    else:
        assert all(g1 - g0 == 1 for _, g0, g1, _, _ in full)  # one image per GEMM
    part = _tiles_used(monkeypatch, tokens, valid, **setting, query=[3])
    assert set(part) <= {(n, g0, g1, rows_of[n] == 3, (3,) if g0 <= 3 < g1 else ())
                         for n, g0, g1, _, _ in full}
    assert {(n, g0, g1) for n, g0, g1, _, _ in part} == {
        (n, g0, g1) for n, g0, g1, _, _ in full if rows_of[n] == 3 or g0 <= 3 < g1}


def test_torch_thread_count_is_restored():
    tokens, valid = random_batch(9, n_images=8)
    before = torch.get_num_threads()
    quiet(mutual_scores, tokens, valid)
    assert torch.get_num_threads() == before


def test_query_validation():
    tokens, valid = random_batch(8, n_images=6)
    for bad in ([], [0, 0], [6], [-1]):
        with pytest.raises(ValueError):
            quiet(mutual_scores, tokens, valid, query=bad)


def test_numpy_and_torch_inputs_give_the_same_scores():
    tokens, valid = random_batch(9)
    from_numpy = quiet(mutual_scores, tokens, valid)
    from_torch = quiet(mutual_scores, torch.from_numpy(tokens), torch.from_numpy(valid))
    assert isinstance(from_numpy, np.ndarray) and isinstance(from_torch, torch.Tensor)
    assert from_torch.dtype == torch.float32 and from_torch.shape == valid.shape
    assert np.array_equal(from_torch.numpy(), from_numpy)
    half = quiet(mutual_scores, tokens.astype(np.float16), valid)
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, from_numpy, rtol=2e-2)


def test_bit_identical_across_calls(blas):
    tokens, valid = random_batch(10)
    assert np.array_equal(quiet(mutual_scores, tokens, valid), quiet(mutual_scores, tokens, valid))


# ------------------------------------------------------------------------------------------------
# errors and warnings
def test_batch_too_small_error_names_the_numbers():
    tokens, valid = random_batch(11, n_images=4)
    with pytest.raises(BatchTooSmallError) as info:
        mutual_scores(tokens, valid, fraction=0.3)
    message = str(info.value)
    assert "B = 4" in message and "0.3" in message and "at least 5 images" in message
    assert info.value.exit_code == 66


def test_five_images_at_default_fraction_work_with_a_warning():
    tokens, valid = random_batch(12, n_images=5)
    with pytest.warns(SmallBatchWarning, match="5 images"):
        scores = mutual_scores(tokens, valid, fraction=0.3)
    np.testing.assert_allclose(scores, reference_scores(tokens, valid, 0.3), rtol=1e-4, atol=1e-4)


def test_no_warning_from_fifteen_images():
    tokens, valid = random_batch(13, n_images=15, n_tokens=20, dim=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SmallBatchWarning)
        mutual_scores(tokens, valid)


def test_k_and_minimum_batch_size():
    assert musc_k(11, 0.3) == 3 and musc_k(20, 0.3) == 5 and musc_k(5, 0.3) == 1
    assert minimum_batch_size(0.3) == 5 and minimum_batch_size(0.1) == 11
    assert minimum_batch_size(0.5) == 3 and minimum_batch_size(1.0) == 2
    for fraction in (0.05, 0.1, 0.25, 0.3, 0.5, 0.7, 1.0):
        b = minimum_batch_size(fraction)
        assert musc_k(b, fraction) >= 1
        with pytest.raises(BatchTooSmallError):
            musc_k(b - 1, fraction)
    with pytest.raises(ValueError):
        musc_k(10, 0.0)


def test_bad_inputs():
    tokens, valid = random_batch(14, n_images=6)
    with pytest.raises(ValueError, match="shape"):
        quiet(mutual_scores, tokens[0], valid)
    with pytest.raises(ValueError, match="valid must have shape"):
        quiet(mutual_scores, tokens, valid[:, :-1])
    empty = valid.copy()
    empty[3] = False
    with pytest.raises(ValueError, match=r"\[3\]"):
        quiet(mutual_scores, tokens, empty)
    broken = tokens.copy()
    broken[2, np.flatnonzero(valid[2])[0], 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        quiet(mutual_scores, broken, valid)
    broken[2] = tokens[2]
    broken[2, np.flatnonzero(~valid[2])[0], 0] = np.nan  # NaN in an invalid token is fine
    scores = quiet(mutual_scores, broken, valid)
    assert np.array_equal(scores, quiet(mutual_scores, tokens, valid))


# ------------------------------------------------------------------------------------------------
# devices
def test_tf32_switched_off_inside_and_restored():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with mutual_module.exact_fp32_matmul():
        assert matmul.fp32_precision == "ieee"
    assert matmul.fp32_precision == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_cuda_requested_without_gpu_is_a_clear_error():
    tokens, valid = random_batch(15, n_images=6)
    with pytest.raises(DeviceUnavailableError, match="cuda"):
        quiet(mutual_scores, tokens, valid, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    tokens, valid = random_batch(16, n_images=10)
    cpu = quiet(mutual_scores, tokens, valid)
    gpu = quiet(mutual_scores, tokens, valid, device="cuda")
    np.testing.assert_allclose(gpu, cpu, rtol=1e-5, atol=1e-5)
    part = quiet(mutual_scores, tokens, valid, device="cuda", query=[4, 2])
    assert np.array_equal(part, gpu[[4, 2]])
