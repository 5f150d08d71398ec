"""``group_<mod>.tsv`` + its data dictionary ``group_<mod>.json`` (MRIQC convention; conventions §3.4).

One row per requested image, including failed and skipped ones (``status``/``error``), so that the
table always says what happened to every image. BIDS tabular rules: tab-separated, header line,
``n/a`` for missing values, ``.`` as decimal point, UTF-8, snake_case column names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_json, write_text
from ..records import ImageResult
from .naming import group_paths

STATUS_LEVELS = {
    "ok": "the image was scored",
    "failed": "processing failed; see the error column and logs/",
    "skipped": "the image was not scored (e.g. excluded by a check); see the error column",
    "stale": "the image is not part of this batch, but outputs of an earlier run are in the folder (not "
             "comparable with this batch; --remove-stale-outputs removes them); see StaleOutputs",
}
#: Column added to every row of a run made with the random test encoder (meaningless results).
TEST_ENCODER_COLUMN = {
    "test_encoder": {"LongName": "Made with the random test encoder", "Format": "boolean",
                     "Levels": {"true": "random test encoder: the scores and maps mean nothing"},
                     "Description": "true when the scores were computed with the randomly initialised "
                     "test encoder (test-tiny-vit): the results mean nothing and must not be reported"},
}
TEST_ENCODER_WARNING = ("TEST ENCODER: these results were computed with a randomly initialised test encoder "
                        "(no pretrained weights); the scores and maps mean nothing and must not be reported")

#: Documented columns, in table order.
COLUMNS: dict[str, dict[str, Any]] = {
    "participant_id": {"LongName": "Participant identifier", "Format": "string",
                       "Description": "Label of the participant (sub-<label>)"},
    "session_id": {"LongName": "Session identifier", "Format": "string",
                   "Description": "Session of the image (ses-<label>); n/a for datasets without sessions"},
    "bids_name": {"LongName": "Image name", "Format": "string",
                  "Description": "File name of the source image without extension"},
    "source": {"LongName": "Source image", "Format": "bids_uri",
               "Description": "BIDS URI of the source image in the input dataset (bids:raw:<path>)"},
    "mask_source": {"LongName": "Brain mask source", "Format": "string",
                    "Description": "Where the brain mask came from: derivatives:<name> (a mask of the "
                    "derivatives dataset <name> listed in DatasetLinks), nonzero (non-zero voxels of "
                    "the image) or skullstrip (deepbet), or the BIDS URI of the mask"},
    "batch": {"LongName": "Scoring batch", "Format": "integer", "Minimum": 1,
              "Description": "The chunk of the modality's images this image was scored with (--batch-size: "
              "random non-overlapping chunks, each scored on its own; 1 when the modality is one batch); "
              "n/a for images that were not scored"},
    "score_max": {"LongName": "Subject anomaly score", "Format": "number", "Units": "arbitrary",
                  "Description": "Maximum of the raw voxel-wise anomaly map inside the brain mask "
                  "(the subject-level score used for ranking)"},
    "score_top1pct": {"LongName": "Top-1% mean anomaly score", "Format": "number", "Units": "arbitrary",
                      "Description": "Mean of the 1% highest raw voxel scores inside the brain mask"},
    "score_percentile": {"LongName": "Percentile of the subject score", "Format": "number", "Units": "%",
                         "Minimum": 0, "Maximum": 100,
                         "Description": "Percentile of score_max among the scored images of the modality (all batches) "
                         "(100 = most anomalous)"},
    "rank": {"LongName": "Rank of the subject score", "Format": "integer", "Minimum": 1,
             "Description": "Rank of score_max among the scored images of the modality (1 = most anomalous)"},
    "anomaly_volume_mm3": {"LongName": "Anomalous volume", "Format": "number", "Units": "mm^3", "Minimum": 0,
                           "Description": "Volume of the binary anomaly mask (probseg > threshold)"},
    "n_components": {"LongName": "Anomalous components", "Format": "integer", "Minimum": 0,
                     "Description": "Number of connected components of the binary anomaly mask"},
    "brain_volume_mm3": {"LongName": "Brain volume", "Format": "number", "Units": "mm^3", "Minimum": 0,
                         "Description": "Volume of the brain mask used for scoring"},
    "outside_fraction": {"LongName": "Brain fraction outside the cube", "Format": "number", "Minimum": 0,
                         "Maximum": 1, "Description": "Fraction of the brain mask outside the scoring cube "
                         "(cg3d warns above 0.01: raise --fov-mm)"},
    "flagged": {"LongName": "Flagged as anomalous", "Format": "boolean",
                "Levels": {"true": "anomalous by the batch threshold", "false": "not anomalous"},
                "Description": "Whether the image is anomalous by the batch threshold"},
    "status": {"LongName": "Processing status", "Format": "string", "Levels": STATUS_LEVELS,
               "Description": "Outcome for this image"},
    "error": {"LongName": "Error message", "Format": "string",
              "Description": "Why the image failed or was skipped; n/a when status is ok"},
}

def table_row(result: ImageResult) -> dict[str, Any]:
    """The ``group_<mod>.tsv`` row of one image's result (failed and skipped ones too)."""
    image = result.image
    row: dict[str, Any] = {
        "participant_id": f"sub-{image.subject}",
        "session_id": f"ses-{image.session}" if image.session else None,
        "bids_name": image.bids_name,
        "source": image.source_uri,
        "mask_source": image.mask_source,
        "status": result.status,
        "error": result.error,
    }
    if result.ok:
        row.update({
            "batch": result.batch,
            "score_max": result.score_max, "score_top1pct": result.score_top1pct,
            "score_percentile": result.score_percentile, "rank": result.rank,
            "anomaly_volume_mm3": result.anomaly_volume_mm3, "n_components": result.n_components,
            "brain_volume_mm3": result.brain_volume_mm3, "flagged": result.flagged,
            "outside_fraction": result.outside_fraction,
        })
    return row


def format_value(value: Any) -> str:
    """One TSV cell: ``n/a`` for None/NaN/empty, ``true``/``false``, exact floats, no tabs/newlines."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "inf" if math.isinf(value) and value > 0 else ("-inf" if math.isinf(value) else repr(value))
    text = " ".join(str(value).split())
    return text or "n/a"


def rank_and_percentile(scores: Sequence[float]) -> tuple[list[int], list[float]]:
    """Rank 1 = highest score (ties in input order); percentile = share of the scores that are lower
    or equal, in %."""
    values = np.asarray(scores, dtype=float)
    order = np.argsort(-values, kind="stable")
    ranks = np.empty(len(values), dtype=int)
    ranks[order] = np.arange(1, len(values) + 1)
    percentiles = [100.0 * float(np.mean(values <= v)) for v in values]
    return ranks.tolist(), percentiles


def _fill_ranks(rows: list[dict[str, Any]]) -> None:
    """Rank and percentile among ``ok`` rows, where the caller gave none."""
    scored = [r for r in rows if r.get("status") == "ok" and _number(r.get("score_max")) is not None]
    ranks, percentiles = rank_and_percentile([_number(r["score_max"]) for r in scored])
    for row, rank, pct in zip(scored, ranks, percentiles):
        if row.get("rank") is None:
            row["rank"] = rank
        if row.get("score_percentile") is None:
            row["score_percentile"] = pct


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def columns_for(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Documented columns first, then extra columns in order of first appearance."""
    extra: dict[str, None] = {}
    for row in rows:
        for key in row:
            if key not in COLUMNS:
                extra.setdefault(key, None)
    return [*COLUMNS, *extra]


def data_dictionary(columns: Sequence[str], provenance: Mapping[str, Any] | None = None,
                    column_docs: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """BIDS data dictionary of ``columns`` (+ top-level ``GeneratedBy`` and ``Provenance``)."""
    docs = {**COLUMNS, **(column_docs or {})}
    dictionary: dict[str, Any] = {}
    for name in columns:
        dictionary[name] = dict(docs.get(name) or {
            "LongName": name.replace("_", " "),
            "Description": f"Additional column {name!r} reported by cg3d (undocumented)",
        })
    provenance = dict(provenance or {})
    dictionary["GeneratedBy"] = [{"Name": "cg3d", **({"Version": provenance["version"]}
                                                     if provenance.get("version") else {})}]
    dictionary["Provenance"] = provenance
    return dictionary


def write_group_table(out_dir: str | Path, modality: str, rows: Sequence[Mapping[str, Any]],
                      provenance: Mapping[str, Any] | None = None, *,
                      column_docs: Mapping[str, Mapping[str, Any]] | None = None,
                      extra: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``group_<mod>.tsv`` and ``group_<mod>.json`` atomically; return their paths.

    ``rows``: one dict per requested image with (a subset of) :data:`COLUMNS`; missing values are
    ``n/a``; ``rank``/``score_percentile`` are computed among ``ok`` rows when not given. Extra keys
    become extra columns (after the documented ones), documented from ``column_docs``. Rows without
    ``status`` are ``ok`` unless they carry an ``error``.
    ``extra``: more top-level keys of the JSON (e.g. ``StaleOutputs``). A run made with the random
    test encoder (``provenance["is_test_encoder"]``) gets a ``test_encoder`` column (true in every
    row of this run's images) and a top-level ``Warning``.
    """
    rows = [dict(r) for r in rows]
    extra = dict(extra or {})
    if (provenance or {}).get("is_test_encoder"):
        for row in rows:
            row.setdefault("test_encoder", row.get("status") != "stale" or None)
        column_docs = {**TEST_ENCODER_COLUMN, **(column_docs or {})}
        extra = {"Warning": TEST_ENCODER_WARNING, **extra}
    for row in rows:
        row.setdefault("status", "failed" if row.get("error") else "ok")
        if row["status"] not in STATUS_LEVELS:
            raise ValueError(f"status {row['status']!r} not in {sorted(STATUS_LEVELS)}")
    _fill_ranks(rows)
    columns = columns_for(rows)
    lines = ["\t".join(columns)] + ["\t".join(format_value(row.get(c)) for c in columns) for row in rows]
    paths = group_paths(modality, out_dir)
    write_text(paths["tsv"], "\n".join(lines) + "\n")
    write_json(paths["json"], {**data_dictionary(columns, provenance, column_docs), **extra})
    return paths["tsv"], paths["json"]


def read_group_table(path: str | Path) -> list[dict[str, Any]]:
    """Read a group TSV back: ``n/a`` -> None, numbers and booleans parsed per the dictionary."""
    path = Path(path)
    formats = {name: doc.get("Format") for name, doc in {**COLUMNS, **TEST_ENCODER_COLUMN}.items()}
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    rows = []
    for line in lines[1:]:
        row: dict[str, Any] = {}
        for name, cell in zip(header, line.split("\t")):
            row[name] = _parse(cell, formats.get(name))
        rows.append(row)
    return rows


def _parse(cell: str, fmt: str | None) -> Any:
    if cell == "n/a":
        return None
    if fmt == "boolean":
        return cell == "true"
    if fmt == "integer":
        return int(cell)
    if fmt == "number":
        return float(cell)
    return cell
