"""tokenize_volume on 56^3 cubes (G = 4) with the tiny test encoder: shapes, validity, black-slice
reuse, determinism, projection, and the geometry of the three axes."""

from __future__ import annotations

import numpy as np
import pytest

from _synthetic import single_torch_thread  # noqa: F401 (autouse fixture)
from _synthetic import G, P, brain_in_box, structured_cube, tiny_encoder
from cg3d_bids.errors import InputDataError, UsageError
from cg3d_bids.core.projection import projection_matrix, projection_tensor
from cg3d_bids.core.tokens import AXES, TokenSet, batch_slices_for_memory, token_validity, tokenize_volume


def test_shapes_validity_and_provenance():
    cube, mask = brain_in_box()
    enc = tiny_encoder()
    tok = tokenize_volume(cube, mask, enc, projection_dim=16, seed=0)
    assert isinstance(tok, TokenSet)
    assert tok.tokens.shape == (4, G**3, 48) and tok.tokens.dtype == np.float32
    assert tok.grid == G and tok.layers == (1, 2, 3, 4) and tok.is_test
    assert np.isfinite(tok.tokens).all()
    # validity: the box [8:40, 16:48, 20:44] overlaps cells x 0-2, y 1-3, z 1-3 (p = 14)
    expected = np.zeros((G, G, G), bool)
    expected[0:3, 1:4, 1:4] = True
    assert tok.valid.dtype == bool and np.array_equal(tok.valid, expected.ravel())
    assert np.array_equal(token_validity(mask, P), tok.valid)
    assert tok.info["encoder"] == "test-tiny-vit" and tok.info["projection_dim"] == 16
    assert tok.info["weights_source"].startswith("random-init")


def test_black_slices_are_encoded_once_and_reused_exactly():
    size = 28  # G = 2: one slice per forward pass stays cheap
    cube, mask = brain_in_box(size, lo=(4, 8, 10), hi=(20, 24, 22))
    enc = tiny_encoder("test-tiny-vit", size)
    # one slice per forward pass: both runs encode each slice alone, so equality must be exact
    reused = tokenize_volume(cube, mask, enc, projection_dim=16, slice_batch=1)
    full = tokenize_volume(cube, mask, enc, projection_dim=16, slice_batch=1, reuse_black_slices=False)
    assert np.array_equal(reused.tokens, full.tokens)
    n_black = (size - 16) + (size - 16) + (size - 12)  # outside the box along x, y and z
    assert reused.info["black_slices"] == n_black
    assert reused.info["encoded_slices"] == 3 * size - n_black + 1  # + the one black slice
    assert full.info["encoded_slices"] == 3 * size and full.info["black_slices"] == 0
    # batched: same features up to float rounding
    batched = tokenize_volume(cube, mask, enc, projection_dim=16, slice_batch=20)
    np.testing.assert_allclose(batched.tokens, full.tokens, rtol=0, atol=1e-5)


def test_black_slices_per_axis():
    from cg3d_bids.core.tokens import black_slices

    cube = np.zeros((9, 9, 9), np.float32)
    cube[2, 3:5, 6] = 0.5
    cube[7, 1, 1] = -1.0     # nonzero, even if negative
    black = black_slices(cube)
    for axis in range(3):
        expected = [not cube.take(i, axis=axis).any() for i in range(9)]
        assert black[axis].tolist() == expected, axis


def test_deterministic_for_a_seed_and_different_for_another():
    cube, mask = brain_in_box(28, lo=(2, 5, 9), hi=(26, 20, 27), seed=2)
    enc = tiny_encoder("test-tiny-vit", 28)
    a = tokenize_volume(cube, mask, enc, projection_dim=16, seed=0)
    b = tokenize_volume(cube, mask, enc, projection_dim=16, seed=0)
    c = tokenize_volume(cube, mask, enc, projection_dim=16, seed=1)
    assert np.array_equal(a.tokens, b.tokens)
    assert not np.allclose(a.tokens, c.tokens, atol=1e-3)
    # the same projection for every axis and layer: distances shrink/grow alike, so the seed
    # changes coordinates but barely the norms of the L2-normalised tokens
    na = np.linalg.norm(a.tokens.reshape(4, -1, 3, 16), axis=-1)
    assert a.tokens.shape == (4, 8, 48)
    assert abs(float(na.mean()) - 1.0) < 0.35


def test_projection_matrix_is_seeded_gaussian_and_cached():
    r = projection_matrix(384, 128, seed=0)
    assert r.shape == (384, 128) and r.dtype == np.float32 and not r.flags.writeable
    assert r is projection_matrix(384, 128, seed=0)
    assert abs(float(r.std()) - 1 / np.sqrt(128)) < 0.002 and abs(float(r.mean())) < 0.002
    assert not np.array_equal(r, projection_matrix(384, 128, seed=1))
    # numpy PCG64 stream pinned: changing the generator would silently change every token
    expected = np.random.Generator(np.random.PCG64(0)).standard_normal(3) / np.sqrt(128)
    np.testing.assert_allclose(r[0, :3], expected, rtol=1e-6)
    np.testing.assert_allclose(r[0, :3], [0.0111131, -0.0116765, 0.0566059], atol=1e-6)
    t = projection_tensor(384, 128, 0, "cpu")
    assert np.array_equal(t.numpy(), r)
    with pytest.raises(ValueError):
        projection_matrix(0, 128)


def _bright_cell_cube(cell: tuple[int, int, int]) -> np.ndarray:
    cube = structured_cube()
    cube[tuple(slice(i * P, (i + 1) * P) for i in cell)] = 1.0
    return cube


# Positions differ in every coordinate, so any axis swap or flip in any view moves one of them.
CELLS = [(0, 1, 2), (2, 0, 3), (3, 2, 1), (1, 3, 0)]


def test_geometry_bright_block_lands_in_its_grid_cell_for_every_axis():
    """A bright p^3 block at cell (gx, gy, gz) changes token n = (gx G + gy) G + gz most.

    Score = distance to the same token of the volume without the block (mutual scoring with one
    reference image), per axis (axial, coronal, sagittal parts of the 3k vector) and combined.
    """
    enc = tiny_encoder()
    k = 32
    base = structured_cube()
    mask = np.ones(base.shape, bool)
    ref = tokenize_volume(base, mask, enc, projection_dim=k).tokens
    for cell in CELLS:
        tok = tokenize_volume(_bright_cell_cube(cell), mask, enc, projection_dim=k).tokens
        diff = np.linalg.norm(tok - ref, axis=-1).mean(axis=0)  # (N,)
        n = (cell[0] * G + cell[1]) * G + cell[2]
        assert int(np.argmax(diff)) == n, (cell, np.unravel_index(int(np.argmax(diff)), (G,) * 3))
        assert diff[n] > 5 * np.sort(diff)[-2]
        for index, (axis_name, _axis) in enumerate(AXES):
            part = np.linalg.norm((tok - ref)[..., index * k:(index + 1) * k], axis=-1).mean(axis=0)
            found = np.unravel_index(int(np.argmax(part)), (G,) * 3)
            assert tuple(int(v) for v in found) == cell, (axis_name, cell, found)
        # without a reference: the token farthest from the batch median token
        score = np.linalg.norm(tok - np.median(tok, axis=1, keepdims=True), axis=-1).mean(axis=0)
        assert int(np.argmax(score)) == n, cell


def test_batch_bounded_by_memory_setting():
    enc = tiny_encoder()
    per = batch_slices_for_memory(enc, 1.0, "fp32")
    assert per is not None and 1 <= per < 64
    assert batch_slices_for_memory(enc, None, "fp32") is None
    cube, mask = brain_in_box()
    small = tokenize_volume(cube, mask, enc, projection_dim=16, slice_batch=64, max_batch_mb=1.0)
    assert small.info["slice_batch"] == per
    free = tokenize_volume(cube, mask, enc, projection_dim=16, slice_batch=64, max_batch_mb=None)
    assert free.info["slice_batch"] == 64
    np.testing.assert_allclose(small.tokens, free.tokens, rtol=0, atol=1e-5)


def test_input_errors_are_clear():
    enc = tiny_encoder()
    with pytest.raises(UsageError, match="multiple of the encoder's patch size 14"):
        tokenize_volume(np.zeros((50,) * 3, np.float32), np.ones((50,) * 3, bool), enc)
    with pytest.raises(UsageError, match="img_size=70"):
        tokenize_volume(np.zeros((70,) * 3, np.float32), np.ones((70,) * 3, bool), enc)
    with pytest.raises(UsageError, match="cube of shape"):
        tokenize_volume(np.zeros((56, 56, 42), np.float32), np.ones((56, 56, 42), bool), enc)
    bad = structured_cube()
    bad[3, 4, 5] = np.nan
    with pytest.raises(InputDataError, match="NaN"):
        tokenize_volume(bad, np.ones(bad.shape, bool), enc)
