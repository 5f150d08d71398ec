"""3D patch tokens of a cube (CoDeGraph3D Sec. 3.2, method.md §2).

For each axis every slice is encoded by the frozen 2D ViT; consecutive blocks of ``p`` slices
(p = patch size) are averaged, giving a ``(G, G, G)`` grid per axis and layer, permuted to the
common ``(gx, gy, gz)`` grid; each token is L2-normalised (eps 1e-6), projected with one seeded
Gaussian matrix ``R`` (D x k) and the three axes are concatenated (axial, coronal, sagittal) into
``3k`` dims.

Slice orientation (the patch grid's row/column are the slice's first/second array axis):

=========  ===================  ===========  ===========  ============
axis       slice                row          column       pooled axis
=========  ===================  ===========  ===========  ============
axial      ``cube[:, :, z]``    x (gx)       y (gy)       z (gz)
coronal    ``cube[:, y, :]``    x (gx)       z (gz)       y (gy)
sagittal   ``cube[x, :, :]``    y (gy)       z (gz)       x (gx)
=========  ===================  ===========  ===========  ============

All-zero (black) slices are identical images: one is encoded per call and its features reused
(exact). Slices are encoded in batches of at most ``slice_batch`` (and fewer when
``max_batch_mb`` requires), whole groups of ``p`` slices at a time so that pooling is a plain
mean (deterministic, also on CUDA). Pooling and projection run on the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputDataError, UsageError
from .boxes import axis_occupancy
from .projection import projection_tensor

__all__ = ["AXES", "TOKEN_FORMAT", "TokenSet", "batch_slices_for_memory", "black_slices", "token_validity",
           "tokenize_volume"]

#: (name, cube axis that is sliced), in concatenation order.
AXES: tuple[tuple[str, int], ...] = (("axial", 2), ("coronal", 1), ("sagittal", 0))
NORM_EPS = 1e-6
#: Version of what a token is (slicing, pooling, normalisation, projection, concatenation order).
#: Bump it whenever :func:`tokenize_volume` returns different tokens for the same cube, encoder
#: and settings: saved reference cohorts record it and refuse to be mixed with other versions.
TOKEN_FORMAT = 1


@dataclass
class TokenSet:
    """Tokens of one cube."""

    tokens: np.ndarray            #: (L, N, 3k) float32; N = G**3, n = (gx * G + gy) * G + gz
    valid: np.ndarray             #: (N,) bool: the token's p^3 block overlaps the brain mask
    grid: int                     #: G
    layers: tuple[int, ...]       #: 1-based blocks
    is_test: bool = False         #: made with a random test encoder: meaningless
    info: dict[str, Any] = field(default_factory=dict)  #: encoder, weights, timings, counts


class _EncodeClock:
    """Wall and CPU time spent in the encoder's forward passes (CUDA synchronised); CPU time is
    read from ``cpu_clock`` (the process's by default)."""

    def __init__(self, device: torch.device, cpu_clock: Callable[[], float] | None = None):
        self.cuda = torch.device(device).type == "cuda"
        self.cpu_clock = cpu_clock or time.process_time
        self.wall = self.cpu = 0.0

    def __enter__(self) -> None:
        self._t0, self._c0 = time.perf_counter(), self.cpu_clock()

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.wall += time.perf_counter() - self._t0
        self.cpu += self.cpu_clock() - self._c0


def token_validity(mask: np.ndarray, patch: int) -> np.ndarray:
    """``(N,)`` bool: token ``(gx, gy, gz)`` is valid when its ``patch^3`` block overlaps ``mask``."""
    mask = np.asarray(mask, dtype=bool)
    g = mask.shape[0] // patch
    return mask.reshape(g, patch, g, patch, g, patch).any(axis=(1, 3, 5)).reshape(-1)


def black_slices(cube: np.ndarray) -> list[np.ndarray]:
    """Per cube axis, which slices along it are all zero: ``(H,)`` bool each.

    Two reductions of ``cube != 0`` on the host (:func:`.boxes.axis_occupancy`; the cube is a host
    array: ~10x faster on CPU than testing each axis's slices as a tensor, no device round trip).
    """
    return [~occupied for occupied in axis_occupancy(np.asarray(cube) != 0)]


def batch_slices_for_memory(encoder, max_batch_mb: float | None, precision: str) -> int | None:
    """Rough upper bound of slices per forward pass within ``max_batch_mb`` (None: no bound).

    Per token: the widest activations of one block (~40 D bytes in fp32, ~24 D in bf16) plus the
    kept intermediates and the feature buffer (2 x 4 L D bytes).
    """
    if max_batch_mb is None:
        return None
    tokens = encoder.grid**2 + 5  # + class/register tokens
    per_token = encoder.embed_dim * ((24 if precision == "bf16" else 40) + 8 * encoder.num_layers)
    return max(1, int(max_batch_mb * 2**20 // (tokens * per_token)))


def _permutation(axis: int) -> list[int]:
    """Dims of the pooled ``(L, slice, row, col, k)`` tensor that give ``(L, gx, gy, gz, k)``."""
    order = [axis] + [a for a in range(3) if a != axis]  # cube axes of (slice, row, col)
    return [0] + [1 + order.index(a) for a in range(3)] + [4]


def tokenize_volume(
    cube: np.ndarray,
    mask: np.ndarray,
    encoder,
    *,
    projection_dim: int = 128,
    seed: int = 0,
    device: str | torch.device | None = None,
    slice_batch: int = 64,
    precision: str | None = None,
    max_batch_mb: float | None = 4096,
    reuse_black_slices: bool = True,
    cpu_clock: Callable[[], float] | None = None,
) -> TokenSet:
    """Tokens of a standardised cube (see the module docstring).

    Args:
        cube: ``(H, H, H)`` float intensities in [0, 1], RAS voxel order, background 0.
        mask: ``(H, H, H)`` brain mask (token validity).
        encoder: a :class:`cg3d_bids.core.models.SliceEncoder` built with ``img_size=H``.
        projection_dim: k (tokens get 3k dims).
        seed: seed of the projection matrix.
        device: where encoding, pooling and projection run; default the encoder's (the encoder
            is moved there otherwise).
        slice_batch: most slices per forward pass.
        precision: ``fp32``/``bf16``/``auto``; default the encoder's.
        max_batch_mb: rough activation memory bound per forward pass (None: no bound).
        reuse_black_slices: encode one all-zero slice and reuse it (exact; off only for tests).
        cpu_clock: the CPU-seconds clock that times the forward passes (``info``'s
            ``encode_cpu_seconds``); default the whole process's (``time.process_time``). A caller
            that runs other work in threads meanwhile passes a clock that leaves them out.

    Returns: a :class:`TokenSet` with float32 CPU arrays.
    """
    t_start = time.perf_counter()
    p = encoder.patch_size
    cube = np.asarray(cube)
    if cube.ndim != 3 or len(set(cube.shape)) != 1:
        raise UsageError(f"expected a cube of shape (H, H, H), got {cube.shape}",
                         fix="build the cube with preprocessing.make_cube")
    size = cube.shape[0]
    if size % p:
        raise UsageError(
            f"cube size {size} is not a multiple of the encoder's patch size {p}",
            fix=f"use a cube size that is a multiple of {p}, e.g. {max(1, round(size / p)) * p} (paper: 224)",
        )
    if size != encoder.img_size:
        raise UsageError(
            f"cube size {size} differs from the encoder's image size {encoder.img_size}",
            fix=f"build the encoder with create_encoder(..., img_size={size})",
        )
    mask = np.asarray(mask)
    if mask.shape != cube.shape:
        raise UsageError(f"mask shape {mask.shape} differs from the cube's {cube.shape}")
    if not np.isfinite(cube).all():
        raise InputDataError("the cube holds NaN or Inf values", fix="standardise the image before tokenizing")
    if int(slice_batch) < 1:
        raise UsageError(f"slice_batch must be >= 1, got {slice_batch}")

    if device is not None and torch.device(device) != encoder.device:
        encoder.to(device)
    dev = encoder.device
    if precision is not None:
        from .models.encoders import resolve_precision

        mode = resolve_precision(precision, dev)
    else:
        mode = encoder.precision
    bound = batch_slices_for_memory(encoder, max_batch_mb, mode)
    batch = int(slice_batch) if bound is None else max(1, min(int(slice_batch), bound))
    groups_per_chunk = max(1, batch // p)

    g = size // p
    n_layers, dim = encoder.num_layers, encoder.embed_dim
    proj = projection_tensor(dim, projection_dim, seed, dev)
    volume = torch.from_numpy(np.ascontiguousarray(cube, dtype=np.float32)).to(dev)
    black = black_slices(cube) if reuse_black_slices else [np.zeros(size, dtype=bool)] * 3
    black_feats: torch.Tensor | None = None
    n_encoded = n_black = 0
    clock = _EncodeClock(dev, cpu_clock)
    per_axis = []
    with torch.inference_mode():
        for _name, axis in AXES:
            slices = volume.movedim(axis, 0)  # (H, row, col)
            black_cpu = black[axis]
            out = torch.empty((n_layers, g, g, g, projection_dim), dtype=torch.float32, device=dev)
            for g0 in range(0, g, groups_per_chunk):
                g1 = min(g, g0 + groups_per_chunk)
                s0, s1 = g0 * p, g1 * p
                feats = torch.empty((n_layers, s1 - s0, g, g, dim), dtype=torch.float32, device=dev)
                todo = torch.from_numpy(np.flatnonzero(~black_cpu[s0:s1])).to(dev)
                for b0 in range(0, len(todo), batch):
                    idx = todo[b0:b0 + batch]
                    with clock:
                        feats[:, idx] = encoder.forward_slices(slices[s0 + idx], precision=mode)
                    n_encoded += len(idx)
                n_black_here = (s1 - s0) - len(todo)
                if n_black_here:
                    if black_feats is None:
                        with clock:
                            black_feats = encoder.forward_slices(torch.zeros_like(slices[:1]), precision=mode)
                        n_encoded += 1
                    feats[:, torch.from_numpy(np.flatnonzero(black_cpu[s0:s1])).to(dev)] = black_feats
                    n_black += n_black_here
                pooled = feats.view(n_layers, g1 - g0, p, g, g, dim).mean(dim=2)
                pooled = F.normalize(pooled, dim=-1, eps=NORM_EPS)
                out[:, g0:g1] = pooled @ proj
                del feats, pooled
            per_axis.append(out.permute(*_permutation(axis)))
        tokens = torch.cat(per_axis, dim=-1).reshape(n_layers, g**3, 3 * projection_dim)
        tokens = tokens.to("cpu", torch.float32).numpy()

    return TokenSet(
        tokens=tokens,
        valid=token_validity(mask, p),
        grid=g,
        layers=tuple(encoder.layers),
        is_test=bool(getattr(encoder, "is_test", False)),
        info={
            "encoder": encoder.name, "weights_sha256": getattr(encoder, "weights_sha256", None),
            "weights_source": getattr(encoder, "weights_source", None), "precision": mode,
            "device": str(dev), "projection_dim": int(projection_dim), "seed": int(seed),
            "slice_batch": batch, "encoded_slices": n_encoded, "black_slices": n_black,
            "seconds": time.perf_counter() - t_start, "encode_seconds": clock.wall,
            "encode_cpu_seconds": clock.cpu,
        },
    )
