"""Stages of sharded scoring: ``group --stage score|graph|rescore --shard i/n``, then ``--stage outputs``.

The rows of different query images are independent given every image's tokens, so one batch's
scoring splits exactly (:mod:`cg3d_bids.core.scoring.shards`):

1. :func:`score_shard` (shard ``i`` of ``n``, per layer): MuSc rows of the ``i``-th slice of the
   batch's images against all of them, plus what the consistent-anomaly graph needs;
2. :func:`graph` (once, per layer): the image graph and its communities from all rows;
3. :func:`rescore_shard` (shard ``i`` of ``n``, per layer): the final rows, community members
   re-scored with the consistent-anomaly tokens excluded;
4. :func:`assemble` (once): the batch's :class:`~cg3d_bids.records.BatchScores`, stored where the
   one-process ``score`` stage would have stored it, so that ``--stage outputs`` (a plain group
   run) finds it and writes the outputs.

Every step writes ``.npz`` files into ``work/shards/<mod>/<batch key>/`` atomically and skips work
whose files exist, so each is a resumable call (a SLURM array task). One shard and ``n`` shards
give byte-identical scores (same device, threads and ``--score-chunk-mb``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_npz
from ..errors import NoInputError, UsageError
from ..records import BatchScores, ImageTokens
from .context import Ref, StageContext, limit_threads, stage
from .memory import check_scoring_memory
from .score import _load_batch, batch_key, batch_scores, select_members

LOGGER = logging.getLogger("cg3d")

__all__ = ["assemble", "graph", "parse_shard", "rescore_shard", "score_shard", "shard_count", "shard_rows"]


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``1 <= i <= n``."""
    try:
        i, n = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r} is not of the form i/n (e.g. 2/4)", fix="give --shard 2/4") from None
    if not 1 <= i <= n:
        raise UsageError(f"--shard {text}: i must be between 1 and n", fix=f"use --shard 1/{max(n, 1)} ... {n}/{n}")
    return i, n


def shard_rows(n_images: int, i: int, n: int) -> list[int]:
    """Images of shard ``i`` of ``n`` (contiguous slices of the batch order, sizes within one)."""
    if n > n_images:
        raise UsageError(f"{n} shards for a batch of {n_images} images", fix=f"use at most {n_images} shards")
    return [int(q) for q in np.array_split(np.arange(n_images), n)[i - 1]]


# ------------------------------------------------------------------------------------------------
def _folder(ctx: StageContext, modality: str, key: str) -> Path:
    return ctx.cache.root / "shards" / modality / key


def _save(path: Path, obj: Any) -> Path:
    write_npz(path, **obj.to_arrays())
    return path


def _load(cls: type, path: Path) -> Any:
    with np.load(path, allow_pickle=False) as data:
        return cls.from_arrays({name: data[name] for name in data.files})


def _required(paths: list[Path], what: str, fix: str) -> None:
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise NoInputError(f"{what}: missing {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}",
                           path=paths[0].parent, fix=fix)


def _tokens(ctx: StageContext, tokens: list[Ref[ImageTokens]], order: list[str], modality: str, batch: int):
    """Key, names, tokens (L, B, N, C) and validity (B, N) of the batch."""
    members = select_members(tokens, order, modality, batch)
    names, array, valid = _load_batch(members)
    return batch_key(ctx, members, batch), names, array, valid


def _layout(ctx: StageContext, tokens: list[Ref[ImageTokens]], order: list[str], modality: str, batch: int):
    """Key, names, layer count and validity (B, N) of the batch, without reading its tokens."""
    from ..records import load_fields

    members = select_members(tokens, order, modality, batch)
    names, valid = [], []
    for ref in members:
        names.append(str(load_fields(ref.path, ("bids_name",))["bids_name"]))
        with np.load(ref.path, allow_pickle=False) as data:
            valid.append(data["valid"])
    layers = len(load_fields(members[0].path, ("layers",))["layers"])
    return batch_key(ctx, members, batch), tuple(names), layers, np.stack(valid)


def shard_count(ctx: StageContext, kind: str, tokens: list[Ref[ImageTokens]], order: list[str], modality: str,
                batch: int) -> int:
    """The ``n`` of the shards whose ``kind`` files (``rows`` or ``final``) a batch has for every
    layer (the newest complete set when several ``n`` were run)."""
    key, _names, n_layers, _valid = _layout(ctx, tokens, order, modality, batch)
    folder = _folder(ctx, modality, key)
    complete = {}
    for path in folder.glob(f"{kind}-L0-*of*.npz"):
        n = int(path.stem.rsplit("of", 1)[1])
        files = [folder / f"{kind}-L{layer}-{i}of{n}.npz" for layer in range(n_layers) for i in range(1, n + 1)]
        if all(f.exists() for f in files):
            complete[n] = max(f.stat().st_mtime for f in files)
    if not complete:
        step = "score" if kind == "rows" else "rescore"
        raise NoInputError(f"{modality} batch {batch}: no complete set of {step} shards in the work directory",
                           path=folder, fix=f"run `--stage {step} --shard i/n` for every i of one n first")
    return max(complete, key=complete.get)


def _shard_inputs(ctx: StageContext, tokens: list[Ref[ImageTokens]], order: list[str], modality: str, batch: int,
                  shard: str, kind: str):
    """``(i, n, tokens (L, B, N, C), validity (B, N), query images, folder)`` of shard ``"i/n"``;
    checks the scoring memory when some layer's ``kind`` file (``rows`` or ``final``) is missing."""
    i, n = parse_shard(shard)
    limit_threads()
    key, names, array, valid = _tokens(ctx, tokens, order, modality, batch)
    query = shard_rows(len(names), i, n)
    folder = _folder(ctx, modality, key)
    if any(not (folder / f"{kind}-L{layer}-{i}of{n}.npz").exists() for layer in range(array.shape[0])):
        check_scoring_memory(ctx, valid, array.shape[-1], what=f"{modality} batch {batch} shard {i}/{n}",
                             n_shards=n)
    return i, n, array, valid, query, folder


@stage("score_shard", timing="score")
def score_shard(ctx: StageContext, tokens: list[Ref[ImageTokens]], order: list[str], modality: str,
                batch: int, shard: str) -> list[Path]:
    """Step 1 of shard ``shard`` (``"i/n"``): rows of its images, every layer."""
    from ..core.scoring.shards import score_rows

    i, n, array, valid, query, folder = _shard_inputs(ctx, tokens, order, modality, batch, shard, "rows")
    written = _layer_files(folder, "rows", i, n, array.shape[0], lambda layer: score_rows(
        array[layer], valid, query, ctx.settings.method.fraction, codegraph=ctx.settings.codegraph_settings,
        block_mb=ctx.settings.execution.score_chunk_mb, device=ctx.settings.execution.device))
    LOGGER.info("[scores %s batch %d] shard %d/%d: rows of %d image(s) written", modality, batch, i, n, len(query))
    return written


@stage("graph", timing="score")
def graph(ctx: StageContext, tokens: list[Ref[ImageTokens]], order: list[str], modality: str, batch: int,
          shards: int) -> list[Path]:
    """Step 2: the consistent-anomaly graph of every layer, from the rows of all ``shards``."""
    from ..core.scoring.shards import RowScores, build_graph

    key, names, n_layers, _valid = _layout(ctx, tokens, order, modality, batch)
    settings = ctx.settings.codegraph_settings
    written = []
    for layer in range(n_layers):
        path = _folder(ctx, modality, key) / f"graph-L{layer}.npz"
        rows_paths = [_folder(ctx, modality, key) / f"rows-L{layer}-{i}of{shards}.npz" for i in range(1, shards + 1)]
        _required(rows_paths, f"{modality} batch {batch}: the rows of {shards} score shard(s) are not all there",
                  f"run every `--stage score --shard i/{shards}` first (the same n)")
        if settings is not None and not path.exists():
            _save(path, build_graph([_load(RowScores, p) for p in rows_paths], len(names), settings))
        written.append(path)
    return written


@stage("rescore_shard", timing="score")
def rescore_shard(ctx: StageContext, tokens: list[Ref[ImageTokens]], order: list[str], modality: str,
                  batch: int, shard: str) -> list[Path]:
    """Step 3 of shard ``shard``: final rows of its images, every layer."""
    from ..core.scoring.shards import GraphResult, RescoredRows, RowScores, rescore_rows

    i, n, array, valid, query, folder = _shard_inputs(ctx, tokens, order, modality, batch, shard, "final")

    rows_paths = [folder / f"rows-L{layer}-{i}of{n}.npz" for layer in range(array.shape[0])]
    _required(rows_paths, f"{modality} batch {batch}: shard {i}/{n} has no rows",
              f"run `--stage score --shard {i}/{n}` first")

    def final(layer: int) -> RescoredRows:
        rows = _load(RowScores, rows_paths[layer])
        if ctx.settings.codegraph_settings is None:
            return RescoredRows(images=rows.images, scores=rows.scores,
                                excluded=np.zeros(rows.scores.shape, dtype=bool))
        graph_path = folder / f"graph-L{layer}.npz"
        _required([graph_path], f"{modality} batch {batch}: no graph", "run `--stage graph` first")
        return rescore_rows(array[layer], valid, query, ctx.settings.method.fraction, rows,
                            _load(GraphResult, graph_path), block_mb=ctx.settings.execution.score_chunk_mb,
                            device=ctx.settings.execution.device)

    return _layer_files(folder, "final", i, n, array.shape[0], final)


def _layer_files(folder: Path, kind: str, i: int, n: int, n_layers: int,
                 make: Callable[[int], Any]) -> list[Path]:
    """``<kind>-L<layer>-<i>of<n>.npz`` of every layer in ``folder``, each written with
    ``make(layer)`` unless it is there already (a rerun resumes)."""
    written = []
    for layer in range(n_layers):
        path = folder / f"{kind}-L{layer}-{i}of{n}.npz"
        if not path.exists():
            _save(path, make(layer))
        written.append(path)
    return written


@stage("assemble", timing="score")
def assemble(ctx: StageContext, tokens: list[Ref[ImageTokens]], order: list[str], modality: str, batch: int,
             shards: int) -> BatchScores:
    """Step 4: the batch's :class:`BatchScores` from the final rows of all ``shards`` and the graphs."""
    from ..core.scoring.shards import GraphResult, RescoredRows

    key, names, n_layers, valid = _layout(ctx, tokens, order, modality, batch)
    folder = _folder(ctx, modality, key)

    def make() -> BatchScores:
        per_layer = np.zeros((n_layers,) + valid.shape, dtype=np.float32)
        suspicious, communities = [], []
        for layer in range(n_layers):
            paths = [folder / f"final-L{layer}-{i}of{shards}.npz" for i in range(1, shards + 1)]
            _required(paths, f"{modality} batch {batch}: the final rows of {shards} shard(s) are not all there",
                      f"run every `--stage rescore --shard i/{shards}` first")
            for path in paths:
                final = _load(RescoredRows, path)
                per_layer[layer, final.images] = final.scores
            if ctx.settings.codegraph_settings is not None:
                graph_result = _load(GraphResult, folder / f"graph-L{layer}.npz")
                suspicious.append(graph_result.suspicious)
                communities.append(graph_result.communities)
        return batch_scores(modality, key, batch, names, valid, per_layer, suspicious, communities,
                            ctx.settings.method.fraction, {"shards": float(shards)})

    return ctx.cache.cached(ctx.cache.scores_path(modality, key), BatchScores, make)
