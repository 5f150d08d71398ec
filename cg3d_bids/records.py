"""Typed records at the stage boundaries of a run, and their one codec.

One frozen dataclass per boundary::

    ImageRecord --prepare--> PreparedImage --landmarks--> Landmarks
    PreparedImage + Landmarks --tokenize--> ImageTokens --score--> BatchScores
    PreparedImage + BatchScores --outputs--> ImageResult --group--> GroupSummary --> reports

Records are saved by :func:`save` and read back by :func:`load`: JSON for records without
arrays, ``.npz`` (arrays as members, everything else as one JSON member) for records with
arrays. Both formats carry the record's type name and :data:`SCHEMA`, so a file is never read as
the wrong record; paths, tuples and nested records are restored from the type hints. The work
cache (:mod:`cg3d_bids.cache`) decides where records live; nipype nodes pass their file paths.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from .atomic import write_json, write_npz
from .typed import decode
from .core.maps import Component

__all__ = [
    "BatchFacts", "BatchScores", "Community", "FigureSet", "GroupSummary", "ImageRecord", "ImageResult",
    "ImageTokens", "Landmarks",
    "PreparedImage", "RECORD_TYPES", "Record", "SCHEMA", "load", "load_fields", "save",
]

#: Version of the on-disk layout of every record; bump when a field changes meaning.
SCHEMA = 1
R = TypeVar("R", bound="Record")


class Record:
    """Base of the stage records: ``kind`` names the work-cache folder of the record type."""

    kind: ClassVar[str] = ""

    @property
    def has_arrays(self) -> bool:
        return any(isinstance(getattr(self, f.name), np.ndarray) for f in dataclasses.fields(self))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageRecord(Record):
    """One input image to score, as discovery found it (and its brain mask, when one is given).

    ``entities`` holds every entity of the file name in file-name order (``sub``, ``ses``, ``acq``,
    ``rec``, ``run``, ...), keyed by the short BIDS names; ``bids_name`` is the file name without
    extension; ``mask_source`` is ``derivatives:<name>``, ``nonzero`` or ``skullstrip``.
    """

    kind: ClassVar[str] = "inputs"

    subject: str
    session: str | None
    modality: str
    path: Path
    relpath: str
    entities: dict[str, str]
    bids_name: str
    mask_path: Path | None = None
    mask_source: str = ""
    mask_relpath: str | None = None

    @property
    def source_uri(self) -> str:
        """BIDS URI of the image (``bids:raw:<relpath>``)."""
        return f"bids:raw:{self.relpath}"

    @property
    def mask_uri(self) -> str | None:
        """``bids:<derivatives name>:<relpath>`` of the input mask, or None for computed masks."""
        if self.mask_source.startswith("derivatives:") and self.mask_relpath:
            return f"bids:{self.mask_source.split(':', 1)[1]}:{self.mask_relpath}"
        return None


@dataclass(frozen=True)
class PreparedImage(Record):
    """An image checked, masked and placed in the cube: its brain-intensity percentiles (for the
    batch's Nyul landmarks) and the cube's geometry (to map scores back to the native grid).

    ``status`` is ``skipped`` (with ``error``) for an image whose data cannot be used when
    ``--skip-bad-images`` is given; its other fields are then empty.
    """

    kind: ClassVar[str] = "prep"

    image: ImageRecord
    key: str
    status: str = "ok"
    error: str | None = None
    percentiles: tuple[float, ...] = ()
    cube_size: int = 0
    cube_affine: np.ndarray | None = None      #: (4, 4) cube voxel -> world mm
    cube_mask_bits: np.ndarray | None = None   #: ``np.packbits`` of the (H, H, H) cube brain mask
    outside_fraction: float = 0.0              #: share of the brain outside the cube
    brain_voxels_cube: int = 0

    @property
    def usable(self) -> bool:
        return self.status == "ok"

    @property
    def name(self) -> str:
        return self.image.bids_name

    def cube_mask(self) -> np.ndarray:
        """The (H, H, H) bool brain mask of the cube."""
        if self.cube_mask_bits is None:
            raise ValueError(f"{self.name} was skipped: it has no cube")
        size = self.cube_size
        return np.unpackbits(self.cube_mask_bits)[: size**3].reshape((size,) * 3).astype(bool)


@dataclass(frozen=True)
class Landmarks(Record):
    """Nyul standard landmarks learned from every usable image of a modality."""

    kind: ClassVar[str] = "landmarks"

    modality: str
    key: str
    percentiles: tuple[float, ...]
    landmarks: tuple[float, ...]
    images: tuple[str, ...]   #: bids names of the images they were learned from


@dataclass(frozen=True)
class ImageTokens(Record):
    """3D patch tokens of one image: ``tokens`` (L, N, 3k) float32, ``valid`` (N,) bool."""

    kind: ClassVar[str] = "tokens"

    bids_name: str
    modality: str
    key: str
    grid: int
    layers: tuple[int, ...]
    tokens: np.ndarray
    valid: np.ndarray
    is_test: bool = False
    info: dict[str, Any] = field(default_factory=dict)  #: encoder, precision, encoded/black slices, seconds


@dataclass(frozen=True)
class Community:
    """Images linked by the consistent-anomaly stage, with their suspicious-token counts."""

    members: tuple[str, ...]
    n_suspicious: tuple[int, ...]


@dataclass(frozen=True)
class BatchScores(Record):
    """Token scores of one scoring batch: per layer (L, B, N) and averaged (B, N), in ``names`` order.

    ``median`` and ``scale`` (1.4826 MAD) are the robust statistics of the averaged scores of
    the batch's brain tokens: probseg = logistic((raw - median) / scale - z_center).
    """

    kind: ClassVar[str] = "scores"

    modality: str
    key: str
    names: tuple[str, ...]
    grid: int                    #: G: the token grid is (G, G, G), N = G**3
    k: int                       #: MuSc's K = floor(fraction * (B - 1)) of this batch
    scores: np.ndarray
    per_layer: np.ndarray
    valid: np.ndarray
    suspicious: np.ndarray       #: (B, N) int32: layers in which the token was suspicious
    median: float
    scale: float
    communities: tuple[Community, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)
    batch: int = 1               #: chunk number (``--batch-size``), 1 without chunks

    def index(self, bids_name: str) -> int:
        """Row of ``bids_name`` (KeyError naming the batch when it is not in it)."""
        try:
            return self.names.index(bids_name)
        except ValueError:
            raise KeyError(f"{bids_name} is not in the {self.modality} scoring batch") from None


@dataclass(frozen=True)
class FigureSet:
    """The report figures of one image, drawn where its maps were made (paths relative to the
    output folder), and what the anomaly mosaic shows (for its caption)."""

    anomaly: str | None                       #: the anomaly mosaic (SVG)
    mask: str | None                          #: the brain-mask figure (SVG)
    peak_mm: tuple[float, ...] | None = None  #: world mm of the peak probseg voxel
    peak_value: float | None = None           #: peak probseg
    cuts: dict[str, list[float]] | None = None
    anomaly_error: str | None = None
    mask_error: str | None = None


@dataclass(frozen=True)
class ImageResult(Record):
    """The outcome for one requested image: ``ok`` with its summary numbers, ``skipped`` (bad data,
    with ``--skip-bad-images``) or ``failed`` (its outputs could not be written), with ``error``."""

    kind: ClassVar[str] = "results"

    image: ImageRecord
    status: str
    error: str | None = None
    score_max: float | None = None         #: maximum of the raw map in the brain (subject score)
    score_top1pct: float | None = None     #: mean of the top 1 % brain voxels of the raw map
    brain_volume_mm3: float | None = None
    anomaly_volume_mm3: float | None = None
    n_components: int | None = None
    components: tuple[Component, ...] = ()
    outside_fraction: float | None = None  #: share of the brain mask outside the scoring cube
    batch: int | None = None               #: the scoring chunk the image was in (``--batch-size``)
    figures: FigureSet | None = None       #: report figures drawn with the maps
    rank: int | None = None                #: 1 = highest score_max of the modality
    score_percentile: float | None = None  #: share of the modality's images scoring lower or equal (%)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def flagged(self) -> bool:
        return self.ok and (self.anomaly_volume_mm3 or 0.0) > 0


@dataclass(frozen=True)
class BatchFacts:
    """One scoring batch of a modality: its images, K, robust statistics and linked groups."""

    batch: int
    names: tuple[str, ...]
    k: int
    median: float
    scale: float
    communities: tuple[Community, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, scores: BatchScores) -> BatchFacts:
        return cls(batch=scores.batch, names=scores.names, k=scores.k, median=scores.median, scale=scores.scale,
                   communities=scores.communities, timings=dict(scores.timings))


@dataclass(frozen=True)
class GroupSummary(Record):
    """What the group stage wrote for one modality: results with ranks, and its scoring batches."""

    kind: ClassVar[str] = "group"

    modality: str
    results: tuple[ImageResult, ...]
    batches: tuple[BatchFacts, ...]

    @property
    def n_scored(self) -> int:
        return sum(len(b.names) for b in self.batches)

    def batch_size(self, batch: int | None) -> int:
        """Images scored together with an image of chunk ``batch`` (all scored images when unknown)."""
        return next((len(b.names) for b in self.batches if b.batch == batch), self.n_scored)


RECORD_TYPES: dict[str, type[Record]] = {
    cls.__name__: cls for cls in (ImageRecord, PreparedImage, Landmarks, ImageTokens, BatchScores,
                                  ImageResult, GroupSummary)
}


# ------------------------------------------------------------------------------------------------
# codec
def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def save(record: Record, path: str | Path) -> Path:
    """Write ``record`` atomically to ``path`` (``.json`` or ``.npz``, as the record requires)."""
    path = Path(path)
    arrays = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)  # type: ignore[arg-type]
              if isinstance(getattr(record, f.name), np.ndarray)}
    meta = {f.name: _encode(getattr(record, f.name)) for f in dataclasses.fields(record)  # type: ignore[arg-type]
            if f.name not in arrays}
    header = {"record": type(record).__name__, "schema": SCHEMA}
    if arrays:
        if path.suffix != ".npz":
            raise ValueError(f"{type(record).__name__} holds arrays: save it as .npz, not {path.name}")
        write_npz(path, __meta__=np.array(json.dumps({**header, "fields": meta})), **arrays)
    else:
        if path.suffix != ".json":
            raise ValueError(f"{type(record).__name__} has no arrays: save it as .json, not {path.name}")
        write_json(path, {**header, "fields": meta})
    return path


def load_fields(path: str | Path, names: tuple[str, ...]) -> dict[str, Any]:
    """Some non-array fields of a stored record, as stored (JSON values), without reading its arrays."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            stored = json.loads(str(data["__meta__"]))
    else:
        stored = json.loads(path.read_text(encoding="utf-8"))
    return {name: stored["fields"][name] for name in names}


def load(path: str | Path, cls: type[R] | None = None) -> R:
    """Read a record written by :func:`save`; ``cls`` (optional) must match the stored type."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            stored = json.loads(str(data["__meta__"]))
            arrays = {name: data[name] for name in data.files if name != "__meta__"}
    else:
        stored = json.loads(path.read_text(encoding="utf-8"))
    name = stored.get("record")
    record_cls = RECORD_TYPES.get(name)
    if record_cls is None or (cls is not None and record_cls is not cls):
        expected = cls.__name__ if cls else "a cg3d record"
        raise ValueError(f"{path} holds {name!r}, expected {expected}")
    if stored.get("schema") != SCHEMA:
        raise ValueError(f"{path} was written with record schema {stored.get('schema')}, this cg3d reads "
                         f"{SCHEMA}: remove the work directory's cached file (or the folder) and rerun")
    hints = typing.get_type_hints(record_cls)
    values = {k: decode(hints[k], v) for k, v in stored["fields"].items()}
    values.update(arrays)
    return record_cls(**values)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------
# saved reference cohorts (cg3d_bids.reference)
@dataclass(frozen=True)
class ReferenceEntry(Record):
    """One modality of a reference bank being saved by ``group --save-reference``: its arrays are
    in the bank's staging folder ``staging``, ``entry`` is its part of the bank's manifest."""

    kind: ClassVar[str] = "reference"

    modality: str
    staging: Path
    entry: dict[str, Any]


RECORD_TYPES[ReferenceEntry.__name__] = ReferenceEntry
__all__ += ["ReferenceEntry"]
