"""Group-level outputs: the per-modality table and report, and the subject reports."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_json
from ..config import RunConfig

LOGGER = logging.getLogger("cg3d")


def _read(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def rank_and_percentile(scores: list[float]) -> tuple[list[int], list[float]]:
    """Rank 1 = highest score; percentile = share of the batch with a lower or equal score (%)."""
    values = np.asarray(scores, dtype=float)
    order = np.argsort(-values, kind="stable")
    ranks = np.empty(len(values), dtype=int)
    ranks[order] = np.arange(1, len(values) + 1)
    percentiles = [100.0 * float(np.mean(values <= v)) for v in values]
    return ranks.tolist(), percentiles


def collect_results(
    records: list[dict[str, Any]], result_files: list[str], score_file: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-image results in batch order, with rank/percentile, and batch facts from scoring."""
    results = [_read(path) for path in result_files]
    by_name = {res["bids_name"]: res for res in results}
    ordered = [by_name.get(rec["bids_name"], {"bids_name": rec["bids_name"], "status": "failed",
                                               "error": "no result"}) for rec in records]
    ok = [i for i, res in enumerate(ordered) if res.get("status") == "ok"]
    ranks, percentiles = rank_and_percentile([ordered[i]["score_max"] for i in ok])
    for i, rank, pct in zip(ok, ranks, percentiles):
        ordered[i]["rank"] = rank
        ordered[i]["score_percentile"] = pct
    with np.load(score_file) as data:
        communities = json.loads(str(data["communities"]))
        timings = json.loads(str(data["timings"]))
        suspicious = data["suspicious"].sum(axis=1).tolist()
        n_images = int(data["valid"].shape[0])
        # batch order of the scores (images skipped as bad data are not in it): token file names
        scored = [str(name).rsplit("_", 1)[0] for name in data["names"]]
    named = [
        {"id": k + 1, "members": [scored[i] for i in members],
         "n_suspicious": [int(suspicious[i]) for i in members]}
        for k, members in enumerate(communities)
    ]
    return ordered, {"communities": named, "timings": timings, "n_images": n_images}


def table_rows(records: list[dict[str, Any]], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of ``group_<mod>.tsv``: one per requested image, failed ones included."""
    rows = []
    for rec, res in zip(records, results):
        row = {
            "participant_id": f"sub-{rec['subject']}",
            "session_id": f"ses-{rec['session']}" if rec.get("session") else None,
            "bids_name": rec["bids_name"],
            "source": f"bids:raw:{rec['relpath']}",
            "mask_source": rec.get("mask_source"),
            "status": res.get("status", "failed"),
            "error": res.get("error"),
        }
        if res.get("status") == "ok":
            row.update({
                "score_max": res["score_max"],
                "score_top1pct": res.get("score_top1pct"),
                "score_percentile": res.get("score_percentile"),
                "rank": res.get("rank"),
                "anomaly_volume_mm3": res.get("anomaly_volume_mm3"),
                "n_components": res.get("n_components"),
                "brain_volume_mm3": res.get("brain_volume_mm3"),
                "flagged": bool(res.get("anomaly_volume_mm3", 0) > 0),
            })
        rows.append(row)
    return rows


def write_group_outputs(
    records: list[dict[str, Any]], result_files: list[str], score_file: str, modality: str,
    cfg: RunConfig, provenance: dict[str, Any],
) -> str:
    """Group table and group report of one modality; returns a summary JSON in the work dir."""
    from ..bids.group_table import write_group_table
    from ..reports import write_group_report

    results, batch = collect_results(records, result_files, score_file)
    rows = table_rows(records, results)
    out_dir = Path(cfg.output_dir)
    write_group_table(out_dir, modality, rows, provenance)
    k = int(np.floor(cfg.fraction * (batch["n_images"] - 1)))
    facts = {
        "B": batch["n_images"], "K": k, "fraction": cfg.fraction, "cube_size": cfg.cube_size,
        "layers": provenance.get("layers"), "device": cfg.device, "threshold": cfg.threshold,
        "runtime_s": batch["timings"],
    }
    image_results = [_image_result(rec, res, modality, batch["n_images"], cfg) for rec, res in zip(records, results)]
    write_group_report(out_dir, modality, image_results, facts, batch["communities"], _provenance(provenance))
    summary = Path(cfg.work_dir) / "results" / modality / "group.json"
    write_json(summary, {
        "modality": modality, "records": records, "results": results, "batch": facts,
        "communities": batch["communities"],
    })
    return str(summary)


def write_subject_reports(group_files: list[str], cfg: RunConfig, provenance: dict[str, Any],
                          subjects: list[str] | None = None) -> list[str]:
    """One ``sub-<label>.html`` per subject (only ``subjects`` when given), all modalities and
    sessions inside."""
    from ..reports import write_subject_report

    per_subject: dict[str, list] = {}
    for path in group_files:
        summary = _read(path)
        for rec, res in zip(summary["records"], summary["results"]):
            if subjects is not None and rec["subject"] not in subjects:
                continue
            item = _image_result(rec, res, summary["modality"], summary["batch"]["B"], cfg)
            per_subject.setdefault(rec["subject"], []).append(item)
    written = []
    start = time.monotonic()
    for done, (subject, items) in enumerate(sorted(per_subject.items()), 1):
        t0 = time.monotonic()
        written.append(str(write_subject_report(Path(cfg.output_dir), subject, items, _provenance(provenance))))
        elapsed = time.monotonic() - start
        LOGGER.info("[reports %d/%d] sub-%s in %.1f s (elapsed %.0f s, about %.0f s left)", done,
                    len(per_subject), subject, time.monotonic() - t0, elapsed,
                    elapsed / done * (len(per_subject) - done))
    return written


def _image_result(rec: dict[str, Any], res: dict[str, Any], modality: str, n_images: int, cfg: RunConfig):
    from ..bids.naming import output_paths
    from ..reports import ImageResult

    paths = output_paths(rec, Path(cfg.output_dir))
    ok = res.get("status") == "ok"
    return ImageResult(
        bids_name=rec["bids_name"], subject=rec["subject"], session=rec.get("session"),
        modality=modality, entities=rec.get("entities", {}), image_path=Path(rec["image_path"]),
        probseg_path=paths["probseg"], anomaly_mask_path=paths["anomaly_mask"],
        brain_mask_path=paths["brain_mask"],
        score=float(res["score_max"]) if ok else float("nan"),
        rank=int(res.get("rank", 0)), percentile=float(res.get("score_percentile", float("nan"))),
        n_images=n_images, flagged=bool(ok and res.get("anomaly_volume_mm3", 0) > 0),
        anomalous_volume_mm3=float(res.get("anomaly_volume_mm3", 0.0)),
        components=res.get("components", []), status=res.get("status", "failed"), error=res.get("error"),
    )


def _provenance(provenance: dict[str, Any]):
    from ..reports import Provenance

    return Provenance.from_dict(provenance)
