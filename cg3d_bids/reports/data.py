"""Inputs of the HTML reports: one :class:`ImageResult` per requested image and a :class:`Provenance`.

These are plain dataclasses (no numpy, no nibabel) so that the workflow can build them from the JSON
files it keeps in the work directory; the report writers only read the NIfTI files they point to.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..bids.naming import LABEL_RE, output_paths
from ..records import ImageResult as ResultRecord

#: Source entities that are shown as sub-headings (in BIDS order), after subject and session.
_SHOWN_ENTITIES = ("task", "acquisition", "acq", "ce", "rec", "dir", "run", "echo", "part", "chunk")
_ENTITY_SHORT = {"acquisition": "acq", "reconstruction": "rec", "ceagent": "ce", "direction": "dir"}


@dataclass
class ImageResult:
    """Result of one scored (or failed) image, as shown in the subject and group reports.

    Paths point to files that already exist when the image was scored (``status == "ok"``); for a
    failed image they may be missing and are never opened.
    """

    bids_name: str                 #: source file name without extension, e.g. ``sub-01_ses-01_T2w``
    subject: str                   #: label without ``sub-``
    session: str | None            #: label without ``ses-``; ``None`` for session-less datasets
    modality: str                  #: BIDS suffix of the source (``T1w``, ``T2w``, ``FLAIR`` …)
    entities: dict[str, Any]       #: pybids entities of the source (``acquisition``, ``run`` …)
    image_path: Path               #: native input NIfTI
    probseg_path: Path             #: anomaly map in [0, 1] on the native grid (written derivative)
    anomaly_mask_path: Path        #: binary anomaly mask (probseg > threshold, inside the brain)
    brain_mask_path: Path          #: brain mask actually used, on the image grid
    score: float                   #: subject score (maximum of the anomaly map); NaN when failed
    rank: int                      #: 1 = most anomalous image of the batch; 0 when not ranked
    percentile: float              #: share of the batch with a lower or equal score, in %
    n_images: int                  #: batch size B of this modality
    flagged: bool                  #: the image has voxels above the mask threshold
    anomalous_volume_mm3: float    #: volume of the binary anomaly mask
    #: connected components of the anomaly mask: ``centroid_mm`` (x, y, z world mm),
    #: ``volume_mm3``, ``peak`` (maximum of the map inside the component); extra keys are ignored
    components: list[dict[str, Any]] = field(default_factory=list)
    status: str = "ok"             #: ``ok``, ``failed`` or ``skipped``
    error: str | None = None       #: error message of a failed image
    batch: int | None = None       #: scoring chunk (``--batch-size``); None when not chunked
    #: figures drawn with the maps (:class:`cg3d_bids.records.FigureSet`); None: the report draws them
    figures: Any = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def anchor(self) -> str:
        """HTML id of this image's section in ``sub-<label>.html``."""
        return image_anchor(self.bids_name)

    @property
    def label(self) -> str:
        """Short human title: modality plus the entities that distinguish images of one session."""
        parts = [self.modality]
        for key, value in self.entities.items():
            if key in _SHOWN_ENTITIES and value not in (None, ""):
                parts.append(f"{_ENTITY_SHORT.get(key, key)}-{value}")
        return " · ".join(parts)

    @property
    def source_prefix(self) -> str:
        """``bids_name`` without its suffix (the source entities), used to name figures."""
        suffix = f"_{self.modality}"
        return self.bids_name[: -len(suffix)] if self.bids_name.endswith(suffix) else self.bids_name

    def sort_key(self) -> tuple:
        run = self.entities.get("run")
        try:
            run_key = (0, int(run)) if run is not None else (0, 0)
        except (TypeError, ValueError):
            run_key = (1, str(run))
        acq = str(self.entities.get("acquisition", self.entities.get("acq", "")) or "")
        return (self.session or "", self.modality, acq, run_key, self.bids_name)


@dataclass
class Provenance:
    """Settings and software that produced the results (shown in every report).

    Build it from the run's provenance dictionary with :meth:`from_dict`; keys that are not fields
    are kept in :attr:`extra` and shown too.
    """

    version: str = "unknown"                 #: cg3d version
    encoder: str = "unknown"                 #: encoder name, e.g. ``dinov2_vitl14``
    weights_sha256: str | None = None        #: sha256 of the weights file actually loaded
    weights_source: str | None = None        #: where they came from (hub cache, file, baked)
    is_test_encoder: bool = False            #: random test encoder: numbers mean nothing
    seed: int | None = None                  #: random projection seed
    cube_size: int | None = None             #: H of the H^3 cube
    layers: list[int] | None = None          #: 1-based encoder blocks
    fraction: float | None = None            #: MuSc fraction (K = floor(fraction (B - 1)))
    projection_dim: int | None = None        #: random projection dimension per axis
    codegraph: bool | None = None            #: consistent-anomaly stage enabled
    codegraph_pvalue: float | None = None
    codegraph_resolution: float | None = None
    device: str | None = None
    precision: str | None = None
    threshold: float | None = None           #: probseg threshold of the binary anomaly mask
    z_center: float | None = None            #: probseg = logistic(z - z_center)
    fov_mm: float | None = None
    timm_name: str | None = None
    config_hash: str | None = None
    run_id: str | None = None
    command: str | None = None               #: command line
    extra: dict[str, Any] = field(default_factory=dict)

    _ALIASES = {"random_seed": "seed", "command_line": "command", "cg3d_version": "version"}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Provenance:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known: dict[str, Any] = {}
        extra: dict[str, Any] = dict((data or {}).get("extra") or {})
        for key, value in (data or {}).items():
            if key == "extra":
                continue
            name = cls._ALIASES.get(key, key)
            if name in names:
                known[name] = value
            else:
                extra[key] = value
        if known.get("layers") is not None:
            known["layers"] = [int(v) for v in known["layers"]]
        known["is_test_encoder"] = bool(known.get("is_test_encoder", False))
        return cls(**known, extra=extra)

    def rows(self) -> list[tuple[str, Any]]:
        """(name, value) pairs for the settings table, most important first."""
        labels = [
            ("cg3d version", self.version),
            ("encoder", self.encoder + (" (random TEST encoder)" if self.is_test_encoder else "")),
            ("timm model", self.timm_name),
            ("weights sha256", self.weights_sha256),
            ("weights source", self.weights_source),
            ("random projection seed", self.seed),
            ("projection dim (per axis)", self.projection_dim),
            ("layers (1-based)", ", ".join(str(v) for v in self.layers) if self.layers else None),
            ("cube size (voxels)", self.cube_size),
            ("cube field of view (mm)", self.fov_mm),
            ("fraction f", self.fraction),
            ("consistent-anomaly stage (CoDeGraph)",
             None if self.codegraph is None else ("on" if self.codegraph else "off")),
            ("CoDeGraph p-value", self.codegraph_pvalue),
            ("CoDeGraph resolution", self.codegraph_resolution),
            ("probseg transform centre z", self.z_center),
            ("mask threshold (probseg)", self.threshold),
            ("device", self.device),
            ("precision", self.precision),
            ("config hash", self.config_hash),
            ("run id", self.run_id),
            ("command line", self.command),
        ]
        rows = [(k, v) for k, v in labels if v not in (None, "")]
        rows += [(k, v) for k, v in sorted(self.extra.items()) if v not in (None, "")]
        return rows


def report_image(result: ResultRecord, out_dir: Path, n_images: int) -> ImageResult:
    """The report's view of one image's :class:`~cg3d_bids.records.ImageResult` (paths in ``out_dir``)."""
    image = result.image
    paths = output_paths(image, out_dir)
    return ImageResult(
        bids_name=image.bids_name, subject=image.subject, session=image.session, modality=image.modality,
        entities=dict(image.entities), image_path=image.path, probseg_path=paths["probseg"],
        anomaly_mask_path=paths["anomaly_mask"], brain_mask_path=paths["brain_mask"],
        score=float(result.score_max) if result.ok and result.score_max is not None else float("nan"),
        rank=int(result.rank or 0),
        percentile=float(result.score_percentile) if result.score_percentile is not None else float("nan"),
        n_images=n_images, flagged=result.flagged, anomalous_volume_mm3=float(result.anomaly_volume_mm3 or 0.0),
        components=[dataclasses.asdict(c) for c in result.components], status=result.status, error=result.error,
        batch=result.batch, figures=result.figures,
    )


def image_anchor(bids_name: str) -> str:
    """HTML id of an image section: ``img-`` + the BIDS name with unsafe characters replaced."""
    return "img-" + re.sub(r"[^0-9A-Za-z_-]+", "-", bids_name)


def check_label(label: str, what: str = "subject") -> str:
    """Return ``label`` without its ``sub-``/``ses-`` prefix; raise ``ValueError`` if not alphanumeric."""
    label = str(label).removeprefix("sub-" if what == "subject" else "ses-")
    if not LABEL_RE.fullmatch(label):
        raise ValueError(f"invalid {what} label {label!r}: BIDS labels are alphanumeric")
    return label


def finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
