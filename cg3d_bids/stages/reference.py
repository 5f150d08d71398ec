"""Stages of saved reference cohorts (banks, :mod:`cg3d_bids.reference`).

``group --save-reference BANK`` adds one stage per modality after the group stage:

================== ================================================================ ==============
save_reference     the batch's valid tokens, landmarks and statistics into BANK's    ReferenceEntry
                   staging folder (the command line writes the manifest and moves
                   the bank into place when every modality is done)
================== ================================================================ ==============

``participant --reference BANK`` replaces the batch stages (docs/reference.md)::

    prepare -> reference_landmarks (the bank's) -> reference_tokenize -> reference_score
            -> outputs (unchanged: the bank's median and scale calibrate probseg) -> reference_group
            -> subject_reports (unchanged)

================== ================================================================ ==============
reference_landmarks the bank's Nyul landmarks of a modality                          Landmarks
reference_tokenize tokens of the selected images, standardised with them             list[Ref]
reference_score    MuSc scores of each image against the bank's images (one layer    BatchScores
                   at a time, K from the bank's size)
reference_group    rank against the bank's images; reference_<mod>.tsv/.json         GroupSummary
================== ================================================================ ==============
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import Cg3dError, InputDataError
from ..hashing import file_sha256
from ..records import (
    BatchFacts,
    BatchScores,
    GroupSummary,
    ImageResult,
    ImageTokens,
    Landmarks,
    PreparedImage,
    ReferenceEntry,
    load_fields,
)
from ..settings import Affects
from .context import Ref, StageContext, limit_threads, stage

LOGGER = logging.getLogger("cg3d")

__all__ = ["reference_group", "reference_landmarks", "reference_score", "reference_tokenize", "run_bank",
           "save_reference"]

#: Images scored together in one pass over the bank (bounds the query tokens held in memory).
QUERY_GROUP = 16
#: Columns of ``reference_<mod>.tsv`` beyond the group table's, with their data dictionary.
REFERENCE_COLUMNS: dict[str, dict[str, Any]] = {
    "rank": {"LongName": "Rank against the reference bank", "Format": "integer", "Minimum": 1,
             "Description": "1 + the number of the bank's images whose score_max (from the group run that made "
             "the bank) is higher than this image's: 1 = more anomalous than every bank image"},
    "score_percentile": {"LongName": "Percentile against the reference bank", "Format": "number", "Units": "%",
                         "Minimum": 0, "Maximum": 100,
                         "Description": "Share of the bank's images whose score_max is lower or equal (%)"},
    "flagged": {"LongName": "Flagged as anomalous", "Format": "boolean",
                "Levels": {"true": "anomalous by the threshold", "false": "not anomalous"},
                "Description": "Whether the binary anomaly mask (probseg > threshold, probseg calibrated with the "
                "bank's brain-token median and scale) is not empty"},
    "batch": {"LongName": "Scoring batch", "Format": "integer",
              "Description": "n/a: each image is scored against the reference bank on its own, not in a batch"},
    "bank_images": {"LongName": "Reference images", "Format": "integer", "Minimum": 1,
                    "Description": "Bank images the image was compared with (an image that is itself in the bank "
                    "is not compared with itself)"},
    "k": {"LongName": "MuSc K", "Format": "integer", "Minimum": 1,
          "Description": "Nearest bank images averaged per token: floor(fraction * bank_images)"},
    "reference_checksum": {"LongName": "Reference bank checksum", "Format": "string",
                           "Description": "Checksum of the bank scored against (cg3d reference info BANK)"},
}


# ------------------------------------------------------------------------------------------------
# group --save-reference
@stage("save_reference", timing="outputs")
def save_reference(ctx: StageContext, tokens: list[Ref[ImageTokens]], landmarks: Landmarks,
                   scores: list[Ref[BatchScores]], summary: GroupSummary, modality: str) -> ReferenceEntry:
    """Write the modality's part of the bank (``--save-reference``; the modality scored as ONE
    batch) into its staging folder."""
    from ..reference import staging_dir, write_modality

    settings = ctx.settings
    assert settings.execution.save_reference is not None
    if len(scores) != 1:
        raise Cg3dError(f"--save-reference saves one scoring batch per modality; {modality} was scored in "
                        f"{len(scores)}", fix="drop --batch-size when saving a reference bank")
    start = time.monotonic()
    staging = staging_dir(settings.execution.save_reference, settings.run.run_id)
    batch = scores[0].load()
    files = {str(load_fields(ref.path, ("bids_name",))["bids_name"]): ref.path for ref in tokens}
    results = {r.image.bids_name: r for r in summary.results}
    sha256 = {name: file_sha256(results[name].image.path) if name in results else None for name in batch.names}
    entry = write_modality(staging, modality, batch, files, landmarks, results, sha256,
                           fraction=settings.method.fraction, codegraph=settings.method.codegraph)
    LOGGER.info("[reference %s] %d image(s), %d valid tokens per layer saved in %.1f s", modality,
                len(batch.names), sum(i["count"] for i in entry["images"]), time.monotonic() - start)
    return ReferenceEntry(modality=modality, staging=staging, entry=entry)


# ------------------------------------------------------------------------------------------------
# participant --reference
_BANKS: dict[tuple[str, str], Any] = {}


def run_bank(ctx: StageContext):
    """The run's bank (loaded once per process; its checksum must still be the one the run started
    with: a bank replaced during the run is an error, not a silent mix)."""
    from ..reference import load_bank

    settings = ctx.settings
    path, checksum = settings.inputs.reference, settings.run.reference_checksum
    if path is None or checksum is None:
        raise Cg3dError("this stage needs --reference (and the bank's checksum, fixed when the run starts)")
    key = (str(path), checksum)
    if key not in _BANKS:
        bank = load_bank(path, verify=False)
        if bank.checksum != checksum:
            raise InputDataError(f"the reference bank changed during the run (checksum {bank.checksum}, the run "
                                 f"started with {checksum})", path=path, fix="rerun")
        _BANKS[key] = bank
    return _BANKS[key]


@stage("reference_landmarks", timing="landmarks")
def reference_landmarks(ctx: StageContext, modality: str) -> Landmarks:
    """The bank's Nyul landmarks of ``modality``: new images are standardised exactly as its images were."""
    return run_bank(ctx).modality(modality).landmarks_record()


@stage("reference_tokenize", timing="tokenize")
def reference_tokenize(ctx: StageContext, prepared: list[PreparedImage],
                       landmarks: Landmarks) -> list[Ref[ImageTokens]]:
    """Tokens of every usable image of ``prepared``, standardised with the bank's landmarks."""
    from .tokenize import tokenize_images

    return tokenize_images(ctx, [p for p in prepared if p.usable], landmarks)


@stage("reference_score", timing="score")
def reference_score(ctx: StageContext, tokens: list[Ref[ImageTokens]], prepared: list[PreparedImage],
                    modality: str) -> list[Ref[BatchScores]]:
    """MuSc scores of each image of ``prepared`` that has tokens against the bank's images, per layer
    and averaged; ``median``/``scale`` are the bank's (probseg is calibrated with them). Cached by
    the bank's checksum, the token files and the score settings. One record (a list, as the batch
    stages give the outputs stage)."""
    bank = run_bank(ctx)
    entry = bank.modality(modality)
    refs = {str(load_fields(ref.path, ("bids_name",))["bids_name"]): ref for ref in tokens}
    images = [p for p in prepared if p.image.bids_name in refs]
    if not images:
        from ..errors import NoInputError

        raise NoInputError(f"no {modality} image has tokens to score against the bank",
                           fix="see the warnings above: every image was skipped")
    selves = [entry.index_of_sha256(file_sha256(p.image.path)) for p in images]
    key = ctx.settings.key(Affects.SCORES, bank.checksum, [refs[p.image.bids_name].path.name for p in images], selves)
    path = ctx.cache.scores_path(modality, key)
    ctx.cache.cached(path, BatchScores,
                     lambda: _score(ctx, entry, [refs[p.image.bids_name] for p in images], selves, key))
    return [Ref(path, BatchScores)]


def _score(ctx: StageContext, entry: Any, refs: list[Ref[ImageTokens]], selves: list[int | None],
           key: str) -> BatchScores:
    """Scores of the images of ``refs`` (``selves``: the bank index of each, if it is in the bank)."""
    from ..core.scoring.blas import gemm_description
    from ..core.scoring.reference import ReferenceQuery, reference_scores

    limit_threads()
    settings, execution = ctx.settings, ctx.settings.execution
    fraction = settings.method.fraction
    for self_index in selves:
        if self_index is not None:
            LOGGER.info("[reference %s] an image to score is the bank's image %s (same content): it is scored "
                        "against the other %d bank images", entry.modality, entry.names[self_index], entry.size - 1)
    names, per_layer, valid = [], None, None
    start = time.monotonic()
    for g0 in range(0, len(refs), QUERY_GROUP):
        group = [ref.load() for ref in refs[g0:g0 + QUERY_GROUP]]
        group_selves = selves[g0:g0 + QUERY_GROUP]
        for item in group:
            _check_tokens(item, entry)
        if per_layer is None:
            per_layer = np.zeros((len(entry.layers), len(refs), entry.n_tokens), dtype=np.float32)
            valid = np.zeros((len(refs), entry.n_tokens), dtype=bool)
        for layer in range(len(entry.layers)):
            tl = time.monotonic()
            queries = [ReferenceQuery(item.tokens[layer], item.valid, s) for item, s in zip(group, group_selves)]
            rows = reference_scores(queries, entry.references(layer), fraction, device=execution.device,
                                    block_mb=execution.score_chunk_mb)
            for offset, row in enumerate(rows):
                per_layer[layer, g0 + offset] = row
            LOGGER.info("[reference %s] layer %d/%d: %d image(s) against %d bank images in %.1f s (%s)",
                        entry.modality, layer + 1, len(entry.layers), len(group), entry.size,
                        time.monotonic() - tl, gemm_description(execution.device))
        for offset, item in enumerate(group):
            valid[g0 + offset] = item.valid
            names.append(item.bids_name)
    assert per_layer is not None and valid is not None
    stats = entry.stats
    return BatchScores(
        modality=entry.modality, key=key, names=tuple(names), grid=entry.grid, k=entry.k(fraction),
        scores=per_layer.mean(axis=0),
        per_layer=per_layer, valid=valid, suspicious=np.zeros(valid.shape, dtype=np.int32),
        median=float(stats["median"]), scale=float(stats["scale"]),
        timings={"scoring_s": time.monotonic() - start},
    )


def _check_tokens(item: ImageTokens, entry: Any) -> None:
    """The new image's tokens have the bank's layers, grid and size (settings were checked at start)."""
    ours = (tuple(item.layers), int(item.grid), int(item.tokens.shape[1]), int(item.tokens.shape[2]))
    theirs = (tuple(entry.layers), entry.grid, entry.n_tokens, entry.dim)
    if ours != theirs:
        raise InputDataError(f"{item.bids_name}: tokens (layers, grid, N, C) = {ours} do not match the bank's {theirs}",
                             path=entry.root, fix="use the bank's settings (cg3d reference info BANK)")


@stage("reference_group", timing="reports")
def reference_group(ctx: StageContext, results: list[ImageResult], scores: list[Ref[BatchScores]],
                    modality: str) -> GroupSummary:
    """Rank each scored image against the bank's own images; write ``reference_<mod>.tsv``/``.json``
    (rows of earlier runs into the same output folder are kept; this run's images replace theirs)."""
    from ..core.scoring.reference import reference_k

    settings = ctx.settings
    bank = run_bank(ctx)
    entry = bank.modality(modality)
    batch = scores[0].load()
    ranked, extra, new = [], {}, []
    for result in results:
        if result.ok and result.score_max is not None:
            rank, percentile, _n = entry.rank(result.score_max)
            result = dataclasses.replace(result, rank=rank, score_percentile=percentile)
            self_in_bank = entry.index_of_sha256(file_sha256(result.image.path)) is not None
            n_refs = entry.size - 1 if self_in_bank else entry.size
            if not self_in_bank:
                new.append(result.image.bids_name)
            extra[result.image.bids_name] = {"bank_images": n_refs,
                                             "k": reference_k(entry.size, settings.method.fraction, self_in_bank),
                                             "reference_checksum": bank.checksum}
            LOGGER.info("[reference %s] %s: score_max %.4g, rank %d of %d against the bank (percentile %.0f %%)",
                        modality, result.image.bids_name, result.score_max, rank, n_refs + 1, percentile)
            _annotate_sidecar(settings.inputs.output_dir, result, {
                "Path": str(bank.path), "Checksum": bank.checksum, "Images": entry.size, "K": extra[
                    result.image.bids_name]["k"], "ComparedWith": n_refs, "Rank": rank, "Percentile": percentile,
                "RankOf": n_refs + 1, "BankScoreMaxMedian": entry.stats.get("score_max_median"),
                "Description": "rank of this image's score_max among the bank's images' own score_max (1 = "
                "highest) and the share of them scoring lower or equal (%); BatchMedian and BatchScale are the "
                "bank's brain-token statistics",
            })
        ranked.append(result)
    _write_table(settings.inputs.output_dir, modality, ranked, extra, settings.provenance())
    # the reports' "rank r of n": n = the bank's images and the new one (exact for one new image)
    facts = BatchFacts(batch=batch.batch, names=(*entry.names, *new), k=batch.k, median=batch.median,
                       scale=batch.scale, timings=dict(batch.timings))
    return GroupSummary(modality=modality, results=tuple(ranked), batches=(facts,))


def _annotate_sidecar(out_dir: Path, result: ImageResult, facts: dict[str, Any]) -> None:
    """Add ``ReferenceBank`` (which bank, how the image ranks against it) to the probseg sidecar."""
    import json

    from ..atomic import write_json
    from ..bids.naming import output_paths

    path = output_paths(result.image, out_dir)["probseg_json"]
    sidecar = json.loads(path.read_text(encoding="utf-8"))
    sidecar["ReferenceBank"] = facts
    write_json(path, sidecar)


def table_paths(out_dir: Path, modality: str) -> tuple[Path, Path]:
    """``reference_<mod>.tsv`` and its data dictionary ``reference_<mod>.json``."""
    return out_dir / f"reference_{modality}.tsv", out_dir / f"reference_{modality}.json"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (parallel participant runs share the output folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_table(out_dir: Path, modality: str, results: list[ImageResult], extra: dict[str, dict[str, Any]],
                 provenance: dict[str, Any]) -> None:
    from ..atomic import write_json, write_text
    from ..bids.group_table import columns_for, data_dictionary, format_value, read_group_table, table_row

    tsv, sidecar = table_paths(out_dir, modality)
    with _locked(out_dir / f".reference_{modality}.lock"):
        rows = {row["bids_name"]: row for row in (read_group_table(tsv) if tsv.exists() else [])}
        for result in results:
            rows[result.image.bids_name] = {**table_row(result), "batch": None,
                                            **extra.get(result.image.bids_name, {})}
        ordered = [rows[name] for name in sorted(rows)]
        columns = columns_for(ordered)
        lines = ["\t".join(columns)] + ["\t".join(format_value(row.get(c)) for c in columns) for row in ordered]
        write_text(tsv, "\n".join(lines) + "\n")
        write_json(sidecar, data_dictionary(columns, provenance, REFERENCE_COLUMNS))
        _bidsignore(out_dir)


def _bidsignore(out_dir: Path) -> None:
    """``reference_*`` (the tables) in the output's ``.bidsignore`` (other lines kept)."""
    from ..atomic import write_text

    path = out_dir / ".bidsignore"
    lines = path.read_text().splitlines() if path.exists() else []
    if "reference_*" not in lines:
        write_text(path, "\n".join([*lines, "reference_*"]) + "\n")
