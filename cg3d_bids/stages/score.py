"""Stage ``score``: MuSc mutual scoring (+ the consistent-anomaly stage) of one batch, per layer,
layers averaged [method.md §3-§5]. Cached by the token files and the score settings."""

from __future__ import annotations

import logging
import time

import numpy as np

from ..errors import BatchTooSmallError
from ..records import BatchScores, Community, ImageTokens
from ..settings import Affects
from .context import Ref, StageContext, limit_threads, stage
from .memory import check_scoring_memory

LOGGER = logging.getLogger("cg3d")

__all__ = ["batch_key", "batch_scores", "score", "select_members"]


@stage("score")
def score(ctx: StageContext, tokens: list[Ref[ImageTokens]], order: list[str], modality: str,
          batch: int = 1) -> BatchScores:
    """Scores of the images of ``order`` (bids names, batch order: chunk ``batch`` of the modality);
    images without tokens (skipped as bad data) are left out of the batch."""
    members = select_members(tokens, order, modality, batch)
    key = batch_key(ctx, members, batch)
    return ctx.cache.cached(ctx.cache.scores_path(modality, key), BatchScores,
                            lambda: _score(ctx, members, modality, key, batch))


def select_members(tokens: list[Ref[ImageTokens]], order: list[str], modality: str,
                   batch: int) -> list[Ref[ImageTokens]]:
    """The token files of the batch's images in batch ``order`` (images without tokens, skipped
    as bad data, are left out)."""
    refs = {_name_of(ref): ref for ref in tokens}
    members = [refs[name] for name in order if name in refs]
    if not members:
        raise BatchTooSmallError(f"no {modality} image of batch {batch} has tokens to score",
                                 fix="see the warnings above: every image was skipped")
    return members


def batch_key(ctx: StageContext, members: list[Ref[ImageTokens]], batch: int) -> str:
    """Cache key of a batch's scores: its token files (their content keys) and the score settings."""
    return ctx.settings.key(Affects.SCORES, [ref.path.name for ref in members], batch)


def _name_of(ref: Ref[ImageTokens]) -> str:
    """The image a token file belongs to (read from the file, never parsed from its name)."""
    from ..records import load_fields

    return str(load_fields(ref.path, ("bids_name",))["bids_name"])


def _load_batch(batch: list[Ref[ImageTokens]]) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """Names, tokens (L, B, N, C) and validity (B, N) of the batch, one token file in memory at a time."""
    names, tokens, valid = [], None, None
    for index, ref in enumerate(batch):
        item = ref.load()
        if tokens is None:
            tokens = np.empty((item.tokens.shape[0], len(batch)) + item.tokens.shape[1:], dtype=np.float32)
            valid = np.empty((len(batch), item.valid.shape[0]), dtype=bool)
        tokens[:, index] = item.tokens
        valid[index] = item.valid
        names.append(item.bids_name)
    return tuple(names), tokens, valid


def _score(ctx: StageContext, members: list[Ref[ImageTokens]], modality: str, key: str,
           batch: int) -> BatchScores:
    from ..core.scoring import codegraph_scores, mutual_scores
    from ..core.scoring.blas import gemm_description

    limit_threads()
    settings, execution = ctx.settings, ctx.settings.execution
    names, tokens, valid = _load_batch(members)
    per_layer = np.zeros((tokens.shape[0],) + valid.shape, dtype=np.float32)
    check_scoring_memory(ctx, valid, tokens.shape[-1], what=f"{modality} batch {batch}")
    suspicious, communities = [], []
    codegraph = settings.codegraph_settings
    t0 = time.monotonic()
    for layer in range(tokens.shape[0]):
        tl = time.monotonic()
        if codegraph is not None:
            scores, details = codegraph_scores(tokens[layer], valid, fraction=settings.method.fraction,
                                               settings=codegraph, device=execution.device,
                                               block_mb=execution.score_chunk_mb, return_details=True)
            suspicious.append(np.asarray(details.suspicious))
            communities.append(details.communities)
        else:
            scores = mutual_scores(tokens[layer], valid, fraction=settings.method.fraction,
                                   device=execution.device, block_mb=execution.score_chunk_mb)
        per_layer[layer] = np.asarray(scores, dtype=np.float32)
        LOGGER.info("[scores %s] layer %d/%d: %d images in %.1f s (%s)", modality, layer + 1, tokens.shape[0],
                    len(members), time.monotonic() - tl, gemm_description(execution.device))
    return batch_scores(modality, key, batch, names, valid, per_layer, suspicious, communities,
                        settings.method.fraction, {"scoring_s": time.monotonic() - t0})


def batch_scores(modality: str, key: str, batch: int, names: tuple[str, ...], valid: np.ndarray,
                 per_layer: np.ndarray, suspicious: list[np.ndarray], communities: list[list[list[int]]],
                 fraction: float, timings: dict[str, float]) -> BatchScores:
    """The :class:`BatchScores` record of per-layer scores (L, B, N) and, with the consistent-
    anomaly stage, each layer's suspicious tokens (B, N) and communities (image indices): layers
    averaged, the batch's robust statistics, suspicious counts and the union of the communities."""
    from ..core.maps import robust_stats
    from ..core.scoring import musc_k

    mean = per_layer.mean(axis=0)
    median, scale = robust_stats(mean[valid])
    counts = np.zeros(valid.shape, dtype=np.int32)
    for flags in suspicious:
        counts += np.asarray(flags, dtype=np.int32)
    groups: list[list[int]] = []
    for layer in communities:
        for community in layer:
            if sorted(community) not in groups:
                groups.append(sorted(community))
    per_image = counts.sum(axis=1)
    return BatchScores(
        modality=modality, key=key, names=tuple(names), grid=round(valid.shape[1] ** (1 / 3)),
        k=musc_k(len(names), fraction), batch=batch, scores=mean, per_layer=per_layer, valid=valid,
        suspicious=counts, median=median, scale=scale,
        communities=tuple(Community(members=tuple(names[i] for i in group),
                                    n_suspicious=tuple(int(per_image[i]) for i in group)) for group in groups),
        timings=timings,
    )
