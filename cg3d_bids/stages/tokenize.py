"""Stage ``tokenize``: standardised cubes -> 3D patch tokens, the expensive (GPU) stage [method.md §2].

The encoder is built once per call for every image whose tokens are not cached yet; the next
cube is loaded, resampled and standardised in a background thread while the current one is
encoded (loading and resampling release the GIL for much of their time; at most two cubes are
held), and each volume's tokens are written in another while the next one is encoded. The
``encode`` timing counts the CPU time of the encoding thread and torch's threads, not of these two
helpers (:class:`ForegroundClock`). Tokens are cached by the image's prepare key, the landmarks and
every token setting.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .. import timings
from ..records import ImageTokens, Landmarks, PreparedImage
from ..settings import Affects
from .context import Ref, StageContext, limit_threads, stage
from .inputs import load_inputs

LOGGER = logging.getLogger("cg3d")

__all__ = ["build_encoder", "standardised_cube", "tokenize", "tokenize_images", "tokens_key"]


def tokens_key(ctx: StageContext, prepared: PreparedImage, landmarks: Landmarks) -> str:
    return ctx.settings.key(Affects.TOKENS, prepared.key, landmarks.key)


@stage("tokenize")
def tokenize(ctx: StageContext, prepared: list[PreparedImage], landmarks: Landmarks) -> list[Ref[ImageTokens]]:
    """Tokens of every usable image of ``prepared`` (cached); skipped images have none."""
    usable = [p for p in prepared if p.usable and p.image.bids_name in landmarks.images]
    return tokenize_images(ctx, usable, landmarks)


def tokenize_images(ctx: StageContext, usable: list[PreparedImage], landmarks: Landmarks) -> list[Ref[ImageTokens]]:
    """Tokens of ``usable`` (cached), standardised with ``landmarks`` whichever images these were
    learned from (a saved reference cohort's landmarks score images it never saw)."""
    from ..core.tokens import tokenize_volume

    paths = {p.image.bids_name: ctx.cache.tokens_path(landmarks.modality, p.image.bids_name,
                                                       tokens_key(ctx, p, landmarks)) for p in usable}
    todo = [p for p in usable if not paths[p.image.bids_name].exists()]
    if todo:
        limit_threads()
        encoder = build_encoder(ctx)
        method, execution = ctx.settings.method, ctx.settings.execution
        start, encode_wall, encode_cpu = time.time(), 0.0, 0.0
        clock = ForegroundClock()
        with _BackgroundStore(ctx, clock) as store:
            cubes = _prefetched_cubes(ctx, todo, landmarks, clock)
            for done, (prep, volume) in enumerate(zip(todo, cubes), 1):
                t0 = time.monotonic()
                tok = tokenize_volume(volume, prep.cube_mask(), encoder, projection_dim=method.projection_dim,
                                      seed=method.random_seed, device=execution.device,
                                      slice_batch=execution.slice_batch, precision=ctx.settings.run.precision,
                                      cpu_clock=clock)
                encode_wall += tok.info["encode_seconds"]
                encode_cpu += tok.info["encode_cpu_seconds"]
                store.put(prep, ImageTokens(
                    bids_name=prep.image.bids_name, modality=landmarks.modality,
                    key=tokens_key(ctx, prep, landmarks), grid=tok.grid, layers=tuple(tok.layers),
                    tokens=tok.tokens, valid=tok.valid, is_test=tok.is_test,
                    info={k: v for k, v in tok.info.items() if isinstance(v, (int, float, str)) or v is None},
                ))
                elapsed = time.time() - start
                LOGGER.info("[tokens %s %d/%d] %s in %.1f s (elapsed %.0f s, about %.0f s left)",
                            landmarks.modality, done, len(todo), prep.image.bids_name, time.monotonic() - t0,
                            elapsed, elapsed / done * (len(todo) - done))
        timings.record(ctx.timings_dir, "encode", landmarks.modality, len(todo), start, start + encode_wall,
                       encode_cpu)
    return [Ref(paths[p.image.bids_name], ImageTokens) for p in usable]


def standardised_cube(ctx: StageContext, prepared: PreparedImage, landmarks: Landmarks) -> np.ndarray:
    """The image's cube with Nyul-standardised intensities (what the encoder sees)."""
    from ..core.preprocessing import PERCENTILES
    from ..core.preprocessing.nyul import standardise_values

    mask = prepared.cube_mask()
    # the image's own landmarks were computed by ``prepare`` from these very values
    same = tuple(landmarks.percentiles) == tuple(PERCENTILES) and len(prepared.percentiles) == len(PERCENTILES)
    own = prepared.percentiles if same else None
    data = np.zeros(mask.shape, dtype=np.float32)
    data[mask] = standardise_values(_cube_values(ctx, prepared, mask), np.asarray(landmarks.landmarks),
                                    landmarks.percentiles, source=str(prepared.image.path), own=own)
    return data


def _cube_values(ctx: StageContext, prepared: PreparedImage, mask: np.ndarray) -> np.ndarray:
    """The brain intensities of the cube ``prepare`` built (read back), or the cube built again."""
    path = ctx.cache.cube_path(prepared.image, prepared.key)
    try:
        values = np.load(path)
        if values.shape == (int(mask.sum()),):
            return values
    except (OSError, ValueError):  # removed after tokenizing, or unreadable: build it again
        pass
    from ..core.preprocessing import make_cube

    method = ctx.settings.method
    loaded = load_inputs(ctx, prepared.image)
    cube = make_cube(loaded.canonical, loaded.mask, size=method.cube_size, fov_mm=method.fov_mm,
                     warn_outside=False)
    return cube.data[cube.mask]


class ForegroundClock:
    """CPU seconds of this process minus those of its registered helper threads: what the
    encoding thread (and torch's own threads) used. The process clock alone would also count the
    next cube and the last tokens, made in helper threads while the encoder runs, as encoding.
    Without per-thread clocks (``time.pthread_getcpuclockid``: not on every platform) it is the
    process clock."""

    def __init__(self) -> None:
        self._clocks: list[int] = []
        self._lock = threading.Lock()

    def register(self) -> None:
        """Count the calling thread out (a thread pool's ``initializer``)."""
        try:
            clock = time.pthread_getcpuclockid(threading.get_ident())
        except (AttributeError, OSError):
            return
        with self._lock:
            self._clocks.append(clock)

    def __call__(self) -> float:
        with self._lock:
            clocks = list(self._clocks)
        helpers = 0.0
        for clock in clocks:
            with contextlib.suppress(OSError):  # a thread that has ended: its time counts as ours
                helpers += time.clock_gettime(clock)
        return time.process_time() - helpers


def _prefetched_cubes(ctx: StageContext, todo: list[PreparedImage], landmarks: Landmarks,
                      clock: ForegroundClock) -> Iterator[np.ndarray]:
    """:func:`standardised_cube` of each image in order, the next one prepared in a background
    thread while the caller encodes the current one. Errors surface in order."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cg3d-cube", initializer=clock.register) as pool:
        pending = pool.submit(standardised_cube, ctx, todo[0], landmarks) if todo else None
        for index in range(len(todo)):
            result = pending.result()
            pending = (pool.submit(standardised_cube, ctx, todo[index + 1], landmarks)
                       if index + 1 < len(todo) else None)
            yield result


class _BackgroundStore:
    """Stores token records in a background thread while the next volume is encoded (a ViT-L
    record is 25 MB: written in the encoding loop, it would leave a GPU idle for that long). At
    most one record waits; errors surface at the next :meth:`put` or on leaving the block, which
    waits for the last write."""

    def __init__(self, ctx: StageContext, clock: ForegroundClock):
        self.ctx = ctx
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cg3d-store",
                                        initializer=clock.register)
        self._pending: Future | None = None

    def __enter__(self) -> _BackgroundStore:
        return self

    def put(self, prep: PreparedImage, record: ImageTokens) -> None:
        self._wait()
        self._pending = self._pool.submit(self._store, prep, record)

    def _store(self, prep: PreparedImage, record: ImageTokens) -> None:
        self.ctx.cache.store(record)
        self.ctx.cache.cube_path(prep.image, prep.key).unlink(missing_ok=True)  # tokens exist now

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            if exc_type is None:
                self._wait()
            else:  # the block's own error is the one to report; the last write still completes
                with contextlib.suppress(Exception):
                    self._wait()
        finally:
            self._pool.shutdown(wait=True)


def build_encoder(ctx: StageContext):
    """The run's encoder on its device, at the run's resolved precision and layers."""
    from ..core.models import create_encoder

    method, execution, run = ctx.settings.method, ctx.settings.execution, ctx.settings.run
    return create_encoder(method.encoder, weights=method.weights, img_size=method.cube_size,
                          layers=run.layers or method.layers, device=execution.device,
                          precision=run.precision or execution.precision,
                          allow_download=method.allow_download)
