"""Find the anatomical images to score and their brain masks (pybids).

One :class:`ImageRecord` per ``sub-<l>[/ses-<l>]/anat/*_<T1w|T2w|FLAIR>.nii[.gz]`` that survives the
participant/session labels and the ``--bids-filter-file`` filters, with the brain mask found in the
``-d NAME=PATH`` derivatives (session-specific first, then subject-level; fMRIPrep/sMRIPrep
``desc-brain_mask`` naming) unless masks are computed at run time (``nonzero``/``skullstrip``).

pybids settings follow fMRIPrep (``fmriprep/config.py``): ``validate=False`` layouts built with an
explicit :class:`~bids.layout.BIDSLayoutIndexer` that skips everything but ``anat/``, no metadata
indexing, and an SQLite index in ``database_dir`` so that re-opening a 1,000-subject dataset is
instant. The index is keyed by a signature of the folder tree (folder names and modification times
of the root, ``sub-*``, ``ses-*`` and ``anat`` folders), so adding or removing files re-indexes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputDataError, NoInputError, NoMatchError, UsageError
from ..records import ImageRecord
from ..settings import MASK_SOURCES, MODALITIES
from .naming import LABEL_RE, parse_name

LOGGER = logging.getLogger("cg3d")
NIFTI_EXTENSIONS = [".nii", ".nii.gz"]
INDEX_VERSION = "cg3d-bids-index-1"  # bump when the indexer settings below change
MAX_SQL_LABELS = 500  # longer label lists are filtered in Python (old SQLite: <= 999 variables)

#: Paths the indexer never visits: fMRIPrep's list plus every datatype folder but ``anat``.
IGNORE_PATTERNS: tuple[Any, ...] = (
    "code", "stimuli", "sourcedata", "models", "derivatives", "phenotype", "logs", "figures",
    re.compile(r"/\."),
    re.compile(r"^/sub-[^/]+/(ses-[^/]+/)?(?!anat(/|$)|ses-)[^/]+"),
)

#: Short entity names accepted in filters, mapped to pybids' names.
ENTITY_ALIASES = {
    "sub": "subject", "ses": "session", "acq": "acquisition", "ce": "ceagent",
    "rec": "reconstruction",
}

CONTAINER_HINT = (
    "This error can be caused by the input data not being accessible inside the container. "
    "Please make sure all volumes are mounted properly (see https://docs.docker.com/engine/reference/"
    "commandline/run/#mount-volume--v---read-only and, for Singularity/Apptainer, the --bind option)."
)


@dataclass
class DiscoveryResult(Mapping):
    """Images per modality (only modalities with images), warnings, and a readable plan.

    Behaves as a read-only ``dict[modality, list[ImageRecord]]`` too.
    """

    images: dict[str, list[ImageRecord]]
    warnings: list[str] = field(default_factory=list)
    bids_dir: Path | None = None
    mask_source: str = "derivatives"

    def __getitem__(self, key: str) -> list[ImageRecord]:
        return self.images[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.images)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def records(self) -> list[ImageRecord]:
        """All records, modality by modality."""
        return [rec for recs in self.images.values() for rec in recs]

    def summary(self) -> str:
        """A table: per modality, images, subjects, sessions, mask sources; then the warnings."""
        head = ("modality", "images", "subjects", "sessions", "masks")
        rows = []
        for modality, recs in self.images.items():
            sources: dict[str, int] = {}
            for rec in recs:
                sources[rec.mask_source] = sources.get(rec.mask_source, 0) + 1
            rows.append((
                modality, str(len(recs)), str(len({r.subject for r in recs})),
                str(len({r.session for r in recs if r.session})),
                ", ".join(f"{src} ({n})" for src, n in sorted(sources.items())),
            ))
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = [f"cg3d input plan ({self.bids_dir}):"]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *rows]]
        computed = [r for r in self.records if r.mask_path is None]
        if computed:
            how = {
                "nonzero": "brain mask = non-zero voxels of the image (inputs must be skull-stripped)",
                "skullstrip": "brain mask computed at run time by deepbet skull stripping",
            }.get(self.mask_source, "brain mask computed at run time")
            names = ", ".join(r.bids_name for r in computed[:8]) + (" ..." if len(computed) > 8 else "")
            lines.append(f"  {len(computed)} image(s) without a precomputed mask: {how}: {names}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# labels and filters
def parse_labels(values: str | Iterable[str] | None, prefix: str = "sub-") -> list[str] | None:
    """Normalise participant/session labels: strip ``prefix``, read label files, validate.

    Each value is a label (``01`` or ``sub-01``) or the path of a text file with labels separated
    by white space/commas (BEP027); ``#`` starts a comment. Returns sorted unique labels, or None.
    """
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    kind = "participant" if prefix == "sub-" else "session"
    labels: set[str] = set()
    for value in values:
        for item in _expand_label_file(str(value), prefix):
            label = item.strip().removeprefix(prefix)
            if not LABEL_RE.fullmatch(label):
                raise UsageError(
                    f"invalid {kind} label {item!r}: BIDS labels may only contain letters and digits "
                    "([0-9a-zA-Z]+; no '_', '-' or spaces)",
                    fix=f"pass the label as it appears in the folder name {prefix}<label>, e.g. "
                    f"{prefix}01 -> 01",
                )
            labels.add(label)
    return sorted(labels)


def _expand_label_file(value: str, prefix: str) -> list[str]:
    path = Path(value).expanduser()
    looks_like_file = "/" in value or os.sep in value or not LABEL_RE.fullmatch(value.removeprefix(prefix))
    if looks_like_file and path.is_file():
        text = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
        return [tok for tok in re.split(r"[\s,]+", text) if tok]
    return [value]


def _query_value(value: Any) -> Any:
    """fMRIPrep's ``_filter_pybids_none_any``: null -> Query.NONE, "*" -> Query.ANY."""
    from bids.layout import Query

    if value is None:
        return Query.NONE
    if value == "*":
        return Query.ANY
    if isinstance(value, (list, tuple)):
        return [_query_value(v) for v in value]
    return value


def normalise_filters(bids_filters: Mapping[str, Any] | None) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Lower-case keys, pybids entity names, Query values. Returns (filters, warnings)."""
    filters: dict[str, dict[str, Any]] = {}
    warnings = []
    known = {m.lower() for m in MODALITIES} | {"mask"}
    for key, query in (bids_filters or {}).items():
        if key.lower() not in known:
            warnings.append(f"bids filter key {key!r} ignored (known keys: {', '.join(sorted(known))})")
            continue
        if not isinstance(query, Mapping):
            raise UsageError(f"bids filter {key!r} must be a JSON object of entity: value, got {query!r}",
                             fix='e.g. {"t1w": {"acquisition": "mprage"}, "mask": {"space": null}}')
        filters[key.lower()] = {ENTITY_ALIASES.get(k, k): _query_value(v) for k, v in query.items()}
    return filters, warnings


def _show_filters(filters: Mapping[str, Any]) -> str:
    def show(v: Any) -> str:
        name = getattr(v, "name", None)
        return {"NONE": "null", "REQUIRED": '"*"', "ANY": '"*"'}.get(name, repr(v)) if name else repr(v)

    return ", ".join(f"{k}={show(v)}" for k, v in filters.items()) or "(none)"


# ------------------------------------------------------------------------------------------------
# pybids layouts with a reusable index
def _tree_signature(root: Path) -> str:
    """Cheap fingerprint of the files that can be indexed: folder names + mtimes down to anat/."""
    digest = hashlib.sha256(f"{INDEX_VERSION}\n{root}\n".encode())

    def visit(path: str, rel: str, depth: int) -> None:
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
            digest.update(f"{rel}:{os.stat(path).st_mtime_ns}\n".encode())
        except OSError:
            return
        for entry in entries:
            name = entry.name
            wanted = (depth == 0 and name.startswith("sub-")) or (depth == 1 and name.startswith("ses-")) \
                or (name == "anat" and depth in (1, 2))
            if wanted and entry.is_dir():
                visit(entry.path, f"{rel}/{name}", depth + 1)

    visit(str(root), ".", 0)
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Exclusive lock on ``folder/.lock`` (no-op where locking is impossible)."""
    try:
        import fcntl

        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / ".lock", "a")
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        handle.close()


def _indexer():
    from bids.layout import BIDSLayoutIndexer

    return BIDSLayoutIndexer(validate=False, ignore=list(IGNORE_PATTERNS), index_metadata=False)


def open_layout(root: Path, database_dir: Path | None = None, *, prefix: str = "raw",
                derivative: bool = False, reset: bool = False):
    """A pybids layout of ``root``; indexed once per tree signature when ``database_dir`` is set.

    A ``layout_index.sqlite`` directly in ``database_dir`` (e.g. ``pybids layout BIDS DB
    --no-validate``, fMRIPrep FAQ) is trusted and used as is for the raw dataset. Otherwise the
    index lives in ``database_dir/<prefix>-<signature>/``, built in a temporary folder and renamed
    into place (a killed run never leaves a partial index), under a file lock (parallel
    ``participant`` jobs build it once).
    """
    from bids.layout import BIDSLayout

    config = ["bids", "derivatives"] if derivative else ["bids"]
    if database_dir is None:
        return BIDSLayout(root, validate=False, config=config, indexer=_indexer(), is_derivative=derivative)
    database_dir = Path(database_dir)
    if not derivative and not reset and (database_dir / "layout_index.sqlite").exists():
        layout = BIDSLayout(root, validate=False, database_path=database_dir)
        if Path(layout.root) == Path(root):
            return layout
        LOGGER.warning("the BIDS index in %s was made for %s, not %s; not using it", database_dir,
                       layout.root, root)
    target = database_dir / f"{prefix}-{_tree_signature(root)}"
    try:
        with _locked(database_dir):
            if reset and target.exists():
                shutil.rmtree(target)
            if not (target / "layout_index.sqlite").exists():
                _build_index(root, target, config, derivative)
                _prune_old_indexes(database_dir, prefix, keep=target)
    except OSError as exc:  # read-only or full database folder: index in memory, as without one
        LOGGER.warning("cannot write the BIDS index in %s (%s); indexing in memory", database_dir, exc)
        return BIDSLayout(root, validate=False, config=config, indexer=_indexer(), is_derivative=derivative)
    return BIDSLayout(root, validate=False, database_path=target)


def _build_index(root: Path, target: Path, config: list[str], derivative: bool) -> None:
    """Index ``root`` into a temporary folder, then rename it to ``target``."""
    from bids.layout import BIDSLayout

    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        BIDSLayout(root, validate=False, config=config, indexer=_indexer(), is_derivative=derivative,
                   database_path=tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "layout_index.sqlite").exists():  # not built meanwhile by another process
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _prune_old_indexes(database_dir: Path, prefix: str, keep: Path, n_keep: int = 2) -> None:
    """Remove all but the ``n_keep`` newest indexes of ``prefix`` (never ``keep``)."""
    old = sorted(database_dir.glob(f"{prefix}-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in [p for p in old if p != keep][n_keep - 1:]:
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# checks of the inputs
def check_bids_dir(bids_dir: str | os.PathLike) -> Path:
    """The input dataset must exist and have a ``dataset_description.json``."""
    root = Path(bids_dir).expanduser().absolute()
    if not root.is_dir():
        raise NoInputError("the input BIDS dataset does not exist", path=root,
                           fix="pass the folder that holds dataset_description.json and sub-*/ "
                           "(and mount it into the container, e.g. -v /data:/data:ro)")
    if not (root / "dataset_description.json").is_file():
        raise NoInputError(
            "the input folder is not a BIDS dataset (no dataset_description.json)", path=root,
            fix="pass the root of the BIDS dataset (the folder with dataset_description.json and sub-*/); "
            "convert DICOMs with e.g. dcm2bids/heudiconv first",
        )
    _check_json(root / "dataset_description.json")
    return root


def _check_json(path: Path) -> None:
    """A ``dataset_description.json`` must be a readable JSON object (pybids fails obscurely)."""
    try:
        ok = isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (OSError, ValueError) as exc:
        raise InputDataError(f"cannot read {path.name}: {exc}", path=path,
                             fix="fix the JSON syntax (e.g. with `python -m json.tool FILE`)") from exc
    if not ok:
        raise InputDataError(f"{path.name} is not a JSON object", path=path,
                             fix='write an object, e.g. {"Name": "...", "BIDSVersion": "1.10.0"}')


def check_derivatives(derivatives: Mapping[str, str | os.PathLike] | None) -> dict[str, Path]:
    """``NAME -> PATH`` derivatives: each must exist and hold a ``dataset_description.json``."""
    checked: dict[str, Path] = {}
    for name, path in (derivatives or {}).items():
        if name == "raw":
            raise UsageError("the derivatives name 'raw' is reserved for the input dataset "
                             "(bids:raw: URIs)", path=path, fix=f"use another name, e.g. -d masks={path}")
        path = Path(path).expanduser().absolute()
        if not path.is_dir():
            raise NoInputError(f"derivatives dataset {name!r} does not exist", path=path,
                               fix=f"check the path given as -d {name}=PATH (and mount it into the container)")
        if not (path / "dataset_description.json").is_file():
            raise NoInputError(
                f"derivatives dataset {name!r} has no dataset_description.json", path=path,
                fix="point -d at the root of a BIDS derivatives dataset, or add a dataset_description.json "
                '{"Name": ..., "BIDSVersion": "1.10.0", "DatasetType": "derivative", '
                '"GeneratedBy": [{"Name": "<tool>"}]}',
            )
        _check_json(path / "dataset_description.json")
        checked[name] = path
    return checked


# ------------------------------------------------------------------------------------------------
# records
def _relpath(path: Path, root: Path) -> str:
    """POSIX path of ``path`` relative to ``root`` (also across symbolic links)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return Path(os.path.relpath(path.resolve(), root.resolve())).as_posix()


def _record(root: Path, path: Path, modality: str) -> ImageRecord:
    entities, _suffix = parse_name(path.name)
    return ImageRecord(
        subject=entities.get("sub", ""), session=entities.get("ses") or None, modality=modality,
        path=path, relpath=_relpath(path, root), entities=entities, bids_name=path.name.split(".", 1)[0],
    )


def _query(layout, **query: Any) -> list[Path]:
    try:
        files = layout.get(return_type="filename", **query)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"invalid BIDS filter: {exc}",
                         fix="use pybids entity names (subject, session, acquisition, run, "
                         "reconstruction, ...) in --bids-filter-file") from exc
    return sorted(Path(f) for f in files)


def _mask_score(mask_entities: Mapping[str, str], image_entities: Mapping[str, str]) -> int | None:
    """Entities the mask shares with the image; None when a mask entity contradicts the image."""
    score = 0
    for key, value in mask_entities.items():
        if key in {"sub", "ses", "desc", "space"}:
            continue
        if image_entities.get(key) != value:
            return None
        score += 1
    return score


MaskIndex = dict[tuple[str, str | None], list[tuple[dict[str, str], Path]]]


def _index_masks(layout, subjects: Sequence[str], mask_desc: str, mask_filters: Mapping[str, Any]) -> MaskIndex:
    """All candidate masks of one derivatives dataset in one query, keyed by (subject, session)."""
    from bids.layout import Query

    query = {"datatype": "anat", "suffix": "mask", "desc": mask_desc, "space": Query.NONE,
             "extension": NIFTI_EXTENSIONS, **mask_filters}
    if len(set(subjects)) <= MAX_SQL_LABELS:
        query["subject"] = sorted(set(subjects))
    index: MaskIndex = {}
    for path in _query(layout, **query):
        entities = parse_name(path.name)[0]
        index.setdefault((entities.get("sub", ""), entities.get("ses")), []).append((entities, path))
    return index


def _find_mask(mask_indexes: Mapping[str, MaskIndex], record: ImageRecord,
               warnings: list[str]) -> tuple[str, Path] | None:
    """First derivatives dataset with a matching mask; session-specific beats subject-level, and
    among those the mask sharing most entities (acq, run, ...) with the image."""
    sessions = [record.session, None] if record.session else [None]
    for name, index in mask_indexes.items():
        for session in sessions:
            scored = []
            for entities, path in index.get((record.subject, session), []):
                score = _mask_score(entities, record.entities)
                if score is not None:
                    scored.append((-score, str(path), path))
            if scored:
                scored.sort()
                if len(scored) > 1 and scored[0][0] == scored[1][0]:
                    warnings.append(f"{record.bids_name}: several masks match in {name!r}; using "
                                    f"{scored[0][2].name} (not {scored[1][2].name})")
                return name, scored[0][2]
    return None


def _mask_example(record: ImageRecord, mask_desc: str) -> str:
    folder = f"sub-{record.subject}" + (f"/ses-{record.session}" if record.session else "")
    prefix = f"sub-{record.subject}" + (f"_ses-{record.session}" if record.session else "")
    return f"{folder}/anat/{prefix}_desc-{mask_desc}_mask.nii.gz"


def _missing_mask_error(missing: list[ImageRecord], derivatives: Mapping[str, Path], mask_desc: str,
                        mask_filters: Mapping[str, Any]) -> NoInputError:
    first = missing[0]
    where = (", ".join(f"{n}={p}" for n, p in derivatives.items()) if derivatives
             else "no derivatives dataset was given (-d/--derivatives)")
    others = "" if len(missing) == 1 else (
        f" (and {len(missing) - 1} more: " + ", ".join(r.bids_name for r in missing[1:6])
        + (" ..." if len(missing) > 6 else "") + ")"
    )
    extra = f" matching the mask filters {_show_filters(mask_filters)}" if mask_filters else ""
    return NoInputError(
        f"no brain mask (desc-{mask_desc}_mask){extra} for {first.bids_name}{others}; searched: {where}",
        path=first.path,
        fix=f"give a derivatives dataset with the masks, e.g. -d masks=/path/to/masks holding "
        f"{_mask_example(first, mask_desc)} (fMRIPrep/sMRIPrep, SynthStrip or HD-BET renamed to BIDS); "
        "or use --mask-source nonzero for skull-stripped inputs, or --mask-source skullstrip to compute "
        "masks with deepbet",
    )


# ------------------------------------------------------------------------------------------------
def discover_images(
    bids_dir: str | os.PathLike,
    *,
    modalities: Sequence[str] = ("T1w", "T2w"),
    participant_labels: str | Sequence[str] | None = None,
    session_labels: str | Sequence[str] | None = None,
    bids_filters: Mapping[str, Any] | None = None,
    derivatives: Mapping[str, str | os.PathLike] | None = None,
    mask_source: str = "derivatives",
    mask_desc: str = "brain",
    database_dir: str | os.PathLike | None = None,
    reset_database: bool = False,
) -> DiscoveryResult:
    """Images to score per modality, with their masks.

    Raises
    ------
    NoInputError (66): ``bids_dir`` missing/not BIDS; a derivatives PATH missing/not BIDS; no image
        of any requested modality; an image without a mask when ``mask_source="derivatives"``.
    NoMatchError (18): participant labels not in the dataset; session labels matching nothing;
        bids filters matching nothing.
    UsageError (64): invalid labels, filters or ``mask_source``.
    """
    root = check_bids_dir(bids_dir)
    if mask_source not in MASK_SOURCES:
        raise UsageError(f"unknown mask source {mask_source!r}", fix=f"use one of {', '.join(MASK_SOURCES)}")
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
        raise UsageError(f"unknown modality {', '.join(unknown)}", fix=f"use {', '.join(MODALITIES)}")
    deriv_paths = check_derivatives(derivatives)
    subjects = parse_labels(participant_labels, "sub-")
    sessions = parse_labels(session_labels, "ses-")
    filters, warnings = normalise_filters(bids_filters)
    db = Path(database_dir).expanduser().absolute() if database_dir else None

    layout = open_layout(root, db, reset=reset_database)
    _check_subjects(layout, root, subjects)
    if sessions:
        _check_sessions(layout, root, subjects, sessions, warnings)

    images: dict[str, list[ImageRecord]] = {}
    for modality in dict.fromkeys(modalities):
        user = filters.get(modality.lower(), {})
        query = {"datatype": "anat", "suffix": modality, "extension": NIFTI_EXTENSIONS, **user}
        if subjects and len(subjects) <= MAX_SQL_LABELS:
            query["subject"] = subjects
        records = [_record(root, p, modality) for p in _query(layout, **query)]
        if subjects:
            records = [r for r in records if r.subject in subjects]
        if sessions:
            records = [r for r in records if r.session is None or r.session in sessions]
        if not records and user:
            unfiltered = {k: v for k, v in query.items() if k in {"datatype", "suffix", "extension", "subject"}}
            if _query(layout, **unfiltered):
                raise NoMatchError(
                    f"Querying BIDS dataset at {root} got an empty result for {modality}. Please, check "
                    f"out your currently set filters: {modality.lower()}: {_show_filters(user)}",
                    fix="fix or remove the filters in --bids-filter-file (null = entity absent, "
                    '"*" = any value)',
                )
        if records:
            images[modality] = records
        else:
            where = f" for participant(s) {', '.join(subjects)}" if subjects else ""
            warnings.append(f"no {modality} images found{where}; {modality} is skipped")
    if not images:
        if any(filters.get(m.lower()) for m in modalities):
            shown = "; ".join(f"{m.lower()}: {_show_filters(filters[m.lower()])}"
                              for m in modalities if filters.get(m.lower()))
            raise NoMatchError(f"Querying BIDS dataset at {root} got an empty result. Please, check out "
                               f"your currently set filters: {shown}",
                               fix="fix or remove the filters in --bids-filter-file")
        where = f" for participant(s) {', '.join(subjects)}" if subjects else ""
        raise NoInputError(
            f"no {' or '.join(modalities)} images found{where} (looked for "
            f"sub-*/[ses-*/]anat/*_{{{','.join(modalities)}}}.nii[.gz])", path=root,
            fix="check --modality (T1w, T2w, FLAIR), the labels and filters, and the file names",
        )

    _attach_masks(images, deriv_paths, db, mask_source, mask_desc, filters.get("mask", {}),
                  reset_database, warnings)
    return DiscoveryResult(images=images, warnings=warnings, bids_dir=root, mask_source=mask_source)


def _entity_values(layout, entity: str, subjects: Sequence[str] | None = None) -> set[str]:
    """Distinct values of an entity in the index (one SQL query; ``get_subjects()`` loads every file)."""
    from bids.layout.models import Tag

    query = layout.session.query(Tag._value).filter(Tag.entity_name == entity)
    if subjects:
        paths = layout.session.query(Tag.file_path).filter(
            Tag.entity_name == "subject", Tag._value.in_(list(subjects)))
        query = query.filter(Tag.file_path.in_(paths))
    return {str(value) for (value,) in query.distinct()}


def _check_subjects(layout, root: Path, subjects: list[str] | None) -> None:
    if not subjects:
        return
    available = _entity_values(layout, "subject")
    missing = [s for s in subjects if s not in available]
    if missing:
        raise NoMatchError(
            "Data for requested participant(s) label(s) not found. Could not find data for "
            f"participant(s): {', '.join(missing)} (no sub-<label>/[ses-*/]anat/ data in {root}). "
            + CONTAINER_HINT,
            path=root,
            fix=f"check --participant-label (labels found: {', '.join(sorted(available)[:20]) or 'none'}"
            f"{' ...' if len(available) > 20 else ''})",
        )


def _check_sessions(layout, root: Path, subjects: list[str] | None, sessions: list[str],
                    warnings: list[str]) -> None:
    available = _entity_values(layout, "session", subjects)
    missing = [s for s in sessions if s not in available]
    if len(missing) == len(sessions) and available:
        raise NoMatchError(
            f"Session label(s) {', '.join(missing)} not found in {root}"
            + (f" for participant(s) {', '.join(subjects)}" if subjects else ""),
            path=root, fix=f"check --session-label (sessions found: {', '.join(sorted(available))})",
        )
    if missing and available:
        using = ", ".join(sorted(set(sessions) - set(missing)))
        warnings.append(f"session(s) {', '.join(missing)} not found; using {using}")


def _attach_masks(images: dict[str, list[ImageRecord]], derivatives: Mapping[str, Path],
                  db: Path | None, mask_source: str, mask_desc: str, mask_filters: Mapping[str, Any],
                  reset: bool, warnings: list[str]) -> None:
    if mask_source != "derivatives":
        for modality, recs in images.items():
            images[modality] = [dataclasses.replace(r, mask_source=mask_source) for r in recs]
        return
    layouts = {
        name: open_layout(path, db, prefix=f"deriv-{name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}",
                          derivative=True, reset=reset)
        for name, path in derivatives.items()
    }
    subjects = [r.subject for recs in images.values() for r in recs]
    indexes = {name: _index_masks(layout, subjects, mask_desc, mask_filters) for name, layout in layouts.items()}
    missing = []
    for modality, recs in images.items():
        attached = []
        for rec in recs:
            found = _find_mask(indexes, rec, warnings)
            if found is None:
                missing.append(rec)
                continue
            name, path = found
            attached.append(dataclasses.replace(rec, mask_path=path, mask_source=f"derivatives:{name}",
                                                mask_relpath=_relpath(path, derivatives[name])))
        images[modality] = attached
    if missing:
        raise _missing_mask_error(missing, derivatives, mask_desc, mask_filters)
