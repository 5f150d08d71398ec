"""Saved reference cohorts ("banks"): their on-disk format, writing, loading and checks.

A bank is what scoring a new image needs from a batch scored earlier: per modality the VALID
tokens of every layer of every bank image, the Nyul landmarks its cubes were standardised with,
every setting that changes a token, and the bank's own score statistics (for calibration and
ranking). Format version 1, a folder readable with numpy and json alone (docs/reference.md)::

    BANK/
      reference.json                 manifest: format, version, checksum, content, made
      <mod>/valid.npy                (B, N) bool: valid (brain) tokens of each bank image
      <mod>/tokens_layer-<LL>.npy    (T, C) float32: the valid tokens of layer LL (1-based ViT
                                     block) of image 0, then image 1, ... (T = sum of counts;
                                     within an image, tokens in grid order, n = (x G + y) G + z)

``reference.json``::

    {"format": "cg3d-reference", "format_version": 1,
     "checksum": "sha256:<hex>",          # sha256 of the canonical JSON of "content"
     "content": {
        "settings": {encoder, weights_sha256, cube_size, fov_mm, layers, projection_dim,
                     random_seed, precision, token_format},
        "modalities": {"T1w": {
            "grid": G, "n_tokens": N, "dim": C, "layers": [...],
            "images": [{"name", "subject", "session", "sha256", "count", "score_max"}, ...],
            "landmarks": {"key", "percentiles", "values", "images"},
            "stats": {"median", "scale", "fraction", "k", "codegraph", "score_max_median"},
            "files": {"valid": {"path", "sha256", "shape", "dtype"},
                      "tokens": [{"layer", "path", "sha256", "shape", "dtype"}, ...]}}}},
     "made": {cg3d_version, created, run_id, command, bids_dir, mask_source, timm_name,
              is_test_encoder, threshold, z_center}}

The canonical JSON is ``json.dumps(content, sort_keys=True, separators=(",", ":"))``; as the
content holds every file's sha256, the checksum identifies the whole bank. ``made`` (when and
how it was made) is informative and outside the checksum, so saving the same batch twice gives
the same checksum. A bank is written into a hidden sibling folder and moved into place at the
end: a reader never sees a half-written bank.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .atomic import write_json
from .errors import BatchTooSmallError, CantCreateError, InputDataError, NoInputError, UsageError
from .hashing import file_sha256

if TYPE_CHECKING:
    from .records import Landmarks

LOGGER = logging.getLogger("cg3d")

__all__ = [
    "FORMAT", "FORMAT_VERSION", "MANIFEST", "TOKEN_SETTINGS", "BankImage", "BankModality", "ReferenceBank",
    "check_bank_destination", "check_bank_size", "check_compatible", "content_checksum", "finish_bank", "load_bank",
    "staging_dir", "token_settings", "write_modality",
]

FORMAT = "cg3d-reference"
#: Version of the bank layout; a bank with a higher version is refused (upgrade cg3d).
FORMAT_VERSION = 1
MANIFEST = "reference.json"
#: Settings that change a token: a ``--reference`` run must match the bank in every one of them.
TOKEN_SETTINGS = ("encoder", "weights_sha256", "cube_size", "fov_mm", "layers", "projection_dim",
                  "random_seed", "precision", "token_format")
#: How to change each token setting on the command line (for error messages).
SETTING_FLAGS = {
    "encoder": "--encoder", "weights_sha256": "--weights (sha256 of the encoder weights)",
    "cube_size": "--cube-size", "fov_mm": "--fov-mm", "layers": "--layers (effective)",
    "projection_dim": "--projection-dim", "random_seed": "--random-seed",
    "precision": "--precision (effective on this device)", "token_format": "token format (cg3d version)",
}


def token_settings(settings: Any) -> dict[str, Any]:
    """The :data:`TOKEN_SETTINGS` of a run's resolved :class:`~cg3d_bids.settings.Settings`."""
    from .core.tokens import TOKEN_FORMAT

    method, run = settings.method, settings.run
    return {
        "encoder": method.encoder, "weights_sha256": run.weights_sha256, "cube_size": int(method.cube_size),
        "fov_mm": float(method.fov_mm), "layers": [int(v) for v in (run.layers or method.layers or ())],
        "projection_dim": int(method.projection_dim), "random_seed": int(method.random_seed),
        "precision": run.precision, "token_format": TOKEN_FORMAT,
    }


def content_checksum(content: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` of the canonical JSON of a manifest's ``content``."""
    text = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------------
# the loaded bank
@dataclass(frozen=True)
class BankImage:
    """One bank image: its BIDS name, content sha256, valid-token count and subject score."""

    name: str
    subject: str | None
    session: str | None
    sha256: str | None
    count: int
    score_max: float | None


@dataclass(frozen=True)
class BankModality:
    """One modality of a bank (a MuSc batch scored earlier)."""

    root: Path
    modality: str
    grid: int
    n_tokens: int
    dim: int
    layers: tuple[int, ...]
    images: tuple[BankImage, ...]
    landmarks: dict[str, Any]
    stats: dict[str, Any]
    files: dict[str, Any]

    @property
    def size(self) -> int:
        return len(self.images)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(image.name for image in self.images)

    @property
    def offsets(self) -> np.ndarray:
        """Row where each image's tokens start in a layer file (and the total, last)."""
        return np.concatenate([[0], np.cumsum([image.count for image in self.images])]).astype(np.int64)

    def valid(self) -> np.ndarray:
        """(B, N) bool validity of every bank image."""
        return np.load(self.root / self.files["valid"]["path"], allow_pickle=False)

    def layer_tokens(self, index: int) -> np.ndarray:
        """(T, C) float32 valid tokens of layer number ``index`` (0-based), memory-mapped."""
        return np.load(self.root / self.files["tokens"][index]["path"], mmap_mode="r", allow_pickle=False)

    def references(self, index: int) -> list[np.ndarray]:
        """Per bank image, its (count, C) valid tokens of layer ``index`` (views of the map)."""
        tokens, offsets = self.layer_tokens(index), self.offsets
        return [tokens[offsets[i]:offsets[i + 1]] for i in range(self.size)]

    def index_of_sha256(self, sha256: str | None) -> int | None:
        """The bank image with this content (an image is never compared with itself), or None."""
        if not sha256:
            return None
        for i, image in enumerate(self.images):
            if image.sha256 == sha256:
                return i
        return None

    def landmarks_record(self) -> Landmarks:
        """The :class:`~cg3d_bids.records.Landmarks` the bank's cubes were standardised with."""
        from .records import Landmarks

        lm = self.landmarks
        return Landmarks(modality=self.modality, key=str(lm["key"]),
                         percentiles=tuple(float(v) for v in lm["percentiles"]),
                         landmarks=tuple(float(v) for v in lm["values"]), images=tuple(lm["images"]))

    def k(self, fraction: float, self_in_bank: bool = False) -> int:
        """MuSc's K for a new image scored against this bank (see :func:`check_size`)."""
        from .core.scoring.reference import reference_k

        return reference_k(self.size, fraction, self_in_bank)

    def rank(self, score_max: float) -> tuple[int, float, int]:
        """``(rank, percentile, n)`` of a subject score among the bank images' own ``score_max``:
        rank 1 = higher than every bank image; percentile = share of bank images scoring lower or
        equal (%); ``n`` = bank images with a score."""
        scores = np.array([i.score_max for i in self.images if i.score_max is not None], dtype=float)
        rank = int(np.sum(scores > score_max)) + 1
        percentile = 100.0 * float(np.mean(scores <= score_max)) if scores.size else float("nan")
        return rank, percentile, int(scores.size)


@dataclass(frozen=True)
class ReferenceBank:
    """A loaded (and checked) bank: see the module docstring for the format."""

    path: Path
    format_version: int
    checksum: str
    settings: dict[str, Any]
    modalities: dict[str, BankModality]
    made: dict[str, Any]

    @property
    def short_checksum(self) -> str:
        return self.checksum.removeprefix("sha256:")[:12]

    def modality(self, modality: str) -> BankModality:
        try:
            return self.modalities[modality]
        except KeyError:
            raise UsageError(f"the reference bank has no {modality} images (it has {', '.join(self.modalities)})",
                             path=self.path, fix=f"score {modality} against a bank made from {modality} images, "
                             f"or leave it out with --modality") from None

    def sizes(self) -> dict[str, int]:
        return {mod: entry.size for mod, entry in self.modalities.items()}

    def check_size(self, fraction: float) -> None:
        """Refuse a bank too small for ``K = floor(fraction * B_ref) >= 1`` (with the fix)."""
        for mod, entry in self.modalities.items():
            check_bank_size(mod, entry.size, fraction, self.path, entry.stats.get("fraction"))


    def describe(self) -> dict[str, Any]:
        """Plain facts for ``cg3d reference info`` (JSON-able)."""
        return {
            "path": str(self.path), "format": FORMAT, "format_version": self.format_version,
            "checksum": self.checksum, "settings": dict(self.settings), "made": dict(self.made),
            "modalities": {
                mod: {"images": entry.size, "names": list(entry.names), "grid": entry.grid, "dim": entry.dim,
                      "layers": list(entry.layers), "valid_tokens": int(sum(i.count for i in entry.images)),
                      "stats": dict(entry.stats), "landmarks_from": len(entry.landmarks.get("images", []))}
                for mod, entry in self.modalities.items()
            },
            "bytes": sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file()),
        }


def check_bank_size(modality: str, size: int, fraction: float, path: Path | None = None,
                    scored_at: float | None = None) -> None:
    """:class:`BatchTooSmallError` when a new image scored against ``size`` bank images would
    average ``K = floor(fraction * size) < 1`` nearest images."""
    from .core.scoring.reference import reference_k

    try:
        reference_k(size, fraction)
    except BatchTooSmallError:
        need = _minimum_bank(fraction)
        was = f" (the bank was scored at {scored_at})" if scored_at is not None else ""
        raise BatchTooSmallError(
            f"the reference bank's {modality} cohort has {size} image(s): scoring a new image against it "
            f"averages K = floor({fraction} * {size}) = 0 nearest images",
            path=path, fix=f"use a bank of at least {need} {modality} images at --fraction {fraction}, or raise "
            f"--fraction{was}",
        ) from None


def _minimum_bank(fraction: float) -> int:
    """Smallest bank size ``B`` with ``floor(fraction * B) >= 1``."""
    from .core.scoring import minimum_batch_size

    return minimum_batch_size(fraction) - 1


# ------------------------------------------------------------------------------------------------
# loading
def _bad(message: str, path: Path, fix: str | None = None) -> InputDataError:
    return InputDataError(message, path=path, fix=fix or "save the bank again with `cg3d BIDS OUT group "
                          "--save-reference BANK` (a bank must not be edited by hand)")


def load_bank(path: str | os.PathLike, *, verify: bool = True) -> ReferenceBank:
    """Read and check the bank at ``path`` (its folder, or its ``reference.json``).

    Always checks the manifest (format, version, checksum of the content, shapes and counts,
    minimum size); with ``verify`` also every file's sha256 (reads the whole bank once).
    Raises :class:`NoInputError` (66) when there is no bank, :class:`InputDataError` (65) when it
    is damaged or not a bank.
    """
    root = Path(path).expanduser().absolute()
    if root.is_file() and root.name == MANIFEST:
        root = root.parent
    manifest = root / MANIFEST
    if not root.exists():
        raise NoInputError("the reference bank does not exist", path=root,
                           fix="give the folder written by `cg3d BIDS OUT group --save-reference BANK`")
    if not manifest.is_file():
        raise NoInputError(f"not a cg3d reference bank: {MANIFEST} is missing", path=root,
                           fix="give the folder written by `cg3d BIDS OUT group --save-reference BANK`")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _bad(f"{MANIFEST} cannot be read ({exc})", manifest) from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise _bad(f"{MANIFEST} is not a cg3d reference manifest (format {data.get('format')!r}, expected "
                   f"{FORMAT!r})" if isinstance(data, dict) else f"{MANIFEST} is not a JSON object", manifest)
    version = data.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise _bad(f"bad format_version {version!r}", manifest)
    if version > FORMAT_VERSION:
        raise _bad(f"the bank has format version {version}; this cg3d reads up to {FORMAT_VERSION}", manifest,
                   fix="upgrade cg3d to the version that made the bank (see made.cg3d_version in reference.json)")
    content = data.get("content")
    if not isinstance(content, dict) or content_checksum(content) != data.get("checksum"):
        raise _bad("the bank's content does not match its checksum (edited or damaged)", manifest)
    try:
        bank = _parse(root, data)
    except (KeyError, TypeError, ValueError) as exc:
        raise _bad(f"{MANIFEST} is incomplete: {type(exc).__name__}: {exc}", manifest) from exc
    for entry in bank.modalities.values():
        _check_files(entry, verify)
    bank.check_size(float(next(iter(bank.modalities.values())).stats["fraction"]))
    return bank


def _parse(root: Path, data: dict[str, Any]) -> ReferenceBank:
    content = data["content"]
    settings = dict(content["settings"])
    missing = [key for key in TOKEN_SETTINGS if key not in settings]
    if missing:
        raise KeyError(f"settings {missing}")
    modalities = {}
    for mod, raw in content["modalities"].items():
        images = tuple(BankImage(name=str(i["name"]), subject=i.get("subject"), session=i.get("session"),
                                 sha256=i.get("sha256"), count=int(i["count"]),
                                 score_max=None if i.get("score_max") is None else float(i["score_max"]))
                       for i in raw["images"])
        if not images:
            raise ValueError(f"{mod} has no images")
        if len({i.name for i in images}) != len(images):
            raise ValueError(f"{mod} lists an image twice")
        modalities[mod] = BankModality(
            root=root, modality=mod, grid=int(raw["grid"]), n_tokens=int(raw["n_tokens"]), dim=int(raw["dim"]),
            layers=tuple(int(v) for v in raw["layers"]), images=images, landmarks=dict(raw["landmarks"]),
            stats=dict(raw["stats"]), files=dict(raw["files"]),
        )
    if not modalities:
        raise ValueError("no modality")
    return ReferenceBank(path=root, format_version=int(data["format_version"]), checksum=str(data["checksum"]),
                         settings=settings, modalities=modalities, made=dict(data.get("made") or {}))


def _check_files(entry: BankModality, verify: bool) -> None:
    """Every file is there, inside the bank, with the shape, dtype (and sha256) the manifest says."""
    total = int(sum(i.count for i in entry.images))
    specs = [("valid", entry.files["valid"], (entry.size, entry.n_tokens), "bool")]
    if len(entry.files["tokens"]) != len(entry.layers):
        raise _bad(f"{entry.modality}: {len(entry.files['tokens'])} token files for {len(entry.layers)} layers",
                   entry.root / MANIFEST)
    for layer, spec in zip(entry.layers, entry.files["tokens"]):
        if int(spec["layer"]) != layer:
            raise _bad(f"{entry.modality}: token files out of layer order", entry.root / MANIFEST)
        specs.append((f"layer {layer}", spec, (total, entry.dim), "float32"))
    for what, spec, shape, dtype in specs:
        path = (entry.root / spec["path"]).resolve()
        if not path.is_relative_to(entry.root.resolve()):
            raise _bad(f"{entry.modality} {what}: file path {spec['path']!r} leaves the bank", entry.root / MANIFEST)
        if not path.is_file():
            raise _bad(f"{entry.modality} {what}: file is missing", path)
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise _bad(f"{entry.modality} {what}: not a readable .npy file ({exc})", path) from exc
        if tuple(array.shape) != shape or str(array.dtype) != dtype or list(spec["shape"]) != list(shape):
            raise _bad(f"{entry.modality} {what}: shape {tuple(array.shape)} {array.dtype}, expected {shape} {dtype}",
                       path)
        del array
        if verify and file_sha256(path) != spec["sha256"]:
            raise _bad(f"{entry.modality} {what}: sha256 differs from the manifest (damaged or edited)", path)
    counts = entry.valid().sum(axis=1)
    if [int(c) for c in counts] != [i.count for i in entry.images]:
        raise _bad(f"{entry.modality}: valid-token counts do not match valid.npy", entry.root / MANIFEST)


# ------------------------------------------------------------------------------------------------
# checks against a run
def check_compatible(bank: ReferenceBank, settings: Any) -> None:
    """Stop with a :class:`UsageError` naming both values when a token setting of the resolved
    ``settings`` differs from the bank's (see :data:`TOKEN_SETTINGS`)."""
    ours = token_settings(settings)
    diffs = [(key, bank.settings.get(key), ours[key]) for key in TOKEN_SETTINGS
             if _norm(bank.settings.get(key)) != _norm(ours[key])]
    if not diffs:
        return
    lines = "\n".join(f"    {SETTING_FLAGS[key]}: bank {_show(b)}, this run {_show(r)}" for key, b, r in diffs)
    hint = ""
    if any(key == "weights_sha256" for key, _, _ in diffs):
        hint = "; the encoder weights must be the very file the bank was made with (same sha256)"
    raise UsageError(
        f"the reference bank was made with other token settings than this run:\n{lines}",
        path=bank.path,
        fix=f"rerun with the bank's values (`cg3d reference info {bank.path}` lists them){hint}, or save a new "
        "bank with these settings",
    )


def _norm(value: Any) -> Any:
    """Lists and tuples compare equal (JSON has no tuples)."""
    return [_norm(v) for v in value] if isinstance(value, (list, tuple)) else value


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) or "(none)"
    return "none (random test encoder)" if value is None else str(value)


# ------------------------------------------------------------------------------------------------
# writing
def check_bank_destination(path: Path, bids_dir: Path | None = None) -> None:
    """Fail fast (before any work) when ``--save-reference`` cannot write a bank at ``path``:
    inside the input dataset, an existing file, or an existing folder that is not a bank."""
    path = path.absolute()
    if bids_dir is not None and path.resolve().is_relative_to(bids_dir.resolve()):
        raise UsageError("--save-reference points inside the input BIDS dataset (inputs are never written)",
                         path=path, fix="save the bank outside the dataset")
    if path.exists() and not path.is_dir():
        raise CantCreateError("--save-reference names a file, not a folder", path=path,
                              fix="give a new folder name for the bank")
    if path.is_dir() and any(path.iterdir()) and not (path / MANIFEST).is_file():
        raise CantCreateError("--save-reference names a folder that is not empty and not a cg3d bank", path=path,
                              fix="give a new folder name (an existing bank is replaced, other folders never)")
    probe = path.parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise CantCreateError("cannot write the reference bank's folder", path=path,
                              fix="choose a writable location (in a container, mount it writable)")


def staging_dir(path: Path, run_id: str) -> Path:
    """The hidden sibling folder a run writes its bank into before moving it to ``path``."""
    return path.parent / f".{path.name}.partial-{run_id}"


def write_modality(staging: Path, modality: str, batch: Any, token_files: Mapping[str, Path], landmarks: Any,
                   results: Mapping[str, Any], sha256: Mapping[str, str | None], fraction: float,
                   codegraph: bool) -> dict[str, Any]:
    """Write one modality's arrays into ``staging`` and return its manifest entry.

    ``batch``: the run's :class:`~cg3d_bids.records.BatchScores` (bank images = its ``names``, in
    order; its median and scale become the bank's statistics); ``token_files``: bids name ->
    stored :class:`~cg3d_bids.records.ImageTokens`; ``landmarks``: the run's
    :class:`~cg3d_bids.records.Landmarks`; ``results``: bids name ->
    :class:`~cg3d_bids.records.ImageResult` (for ``score_max`` and the subject/session).
    Reads one token file at a time; each layer file is filled through a memory map.
    """
    from . import records as rec

    names = list(batch.names)
    check_bank_size(modality, len(names), fraction, staging)
    folder = staging / modality
    folder.mkdir(parents=True, exist_ok=True)
    valid = np.asarray(batch.valid, dtype=bool)
    counts = valid.sum(axis=1).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    first = rec.load(token_files[names[0]], rec.ImageTokens)
    layers, dim = tuple(int(v) for v in first.layers), int(first.tokens.shape[2])
    maps = [np.lib.format.open_memmap(folder / f"tokens_layer-{layer:02d}.npy", mode="w+", dtype=np.float32,
                                      shape=(int(offsets[-1]), dim)) for layer in layers]
    for i, name in enumerate(names):
        item = first if i == 0 else rec.load(token_files[name], rec.ImageTokens)
        if item.bids_name != name or not np.array_equal(item.valid, valid[i]) or tuple(item.layers) != layers:
            raise ValueError(f"the token file of {name} does not match the scored batch")
        for m, layer_map in enumerate(maps):
            layer_map[offsets[i]:offsets[i + 1]] = np.asarray(item.tokens[m][valid[i]], dtype=np.float32)
    for layer_map in maps:
        layer_map.flush()
    del maps
    np.save(folder / "valid.npy", valid)
    files = {"valid": _file_entry(staging, folder / "valid.npy"),
             "tokens": [{"layer": layer, **_file_entry(staging, folder / f"tokens_layer-{layer:02d}.npy")}
                        for layer in layers]}
    images = []
    for name, count in zip(names, counts):
        result = results.get(name)
        image = getattr(result, "image", None)
        score = getattr(result, "score_max", None) if result is not None and result.ok else None
        images.append({"name": name, "subject": getattr(image, "subject", None),
                       "session": getattr(image, "session", None), "sha256": sha256.get(name),
                       "count": int(count), "score_max": None if score is None else float(score)})
    scores = [i["score_max"] for i in images if i["score_max"] is not None]
    return {
        "grid": int(batch.grid), "n_tokens": int(valid.shape[1]), "dim": dim, "layers": list(layers),
        "images": images,
        "landmarks": {"key": landmarks.key, "percentiles": list(landmarks.percentiles),
                      "values": list(landmarks.landmarks), "images": list(landmarks.images)},
        "stats": {"median": float(batch.median), "scale": float(batch.scale), "fraction": float(fraction),
                  "k": int(fraction * (len(names) - 1) * (1 + 1e-9)), "codegraph": bool(codegraph),
                  "score_max_median": float(np.median(scores)) if scores else None},
        "files": files,
    }


def _file_entry(staging: Path, path: Path) -> dict[str, Any]:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    entry = {"path": path.relative_to(staging).as_posix(), "sha256": file_sha256(path),
             "shape": list(array.shape), "dtype": str(array.dtype)}
    del array
    return entry


def finish_bank(path: Path, staging: Path, settings: Mapping[str, Any], entries: Mapping[str, dict[str, Any]],
                made: Mapping[str, Any]) -> ReferenceBank:
    """Write the manifest into ``staging``, check the result, and move it to ``path`` (an existing
    bank there is replaced; the old one is removed only after the new one is in place)."""
    content = {"settings": dict(settings), "modalities": {mod: entries[mod] for mod in sorted(entries)}}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "checksum": content_checksum(content),
                "content": content, "made": {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                             **dict(made)}}
    write_json(staging / MANIFEST, manifest)
    load_bank(staging, verify=True)  # what we wrote reads back
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}-{time.time_ns()}"
        os.replace(path, old)
    os.replace(staging, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return load_bank(path, verify=False)


def bank_summary_lines(bank: ReferenceBank) -> list[str]:
    """Human-readable lines for ``cg3d reference info`` and the logs."""
    facts = bank.describe()
    made = facts["made"]
    lines = [
        f"reference bank {bank.path}",
        f"  format {FORMAT} v{bank.format_version}, checksum {bank.checksum}",
        f"  size on disk {facts['bytes'] / 1e6:.1f} MB",
        f"  made {made.get('created', '?')} by cg3d {made.get('cg3d_version', '?')} (run {made.get('run_id', '?')})",
    ]
    if made.get("command"):
        lines.append(f"    command: {made['command']}")
    if made.get("bids_dir"):
        lines.append(f"    from: {made['bids_dir']} (masks: {made.get('mask_source', '?')})")
    lines.append("  token settings (a --reference run must match every one):")
    for key in TOKEN_SETTINGS:
        lines.append(f"    {key}: {_show(bank.settings.get(key))}")
    if made.get("is_test_encoder"):
        lines.append("    WARNING: made with the RANDOM test encoder: its scores mean nothing")
    for mod, entry in bank.modalities.items():
        stats = entry.stats
        lines.append(f"  {mod}: {entry.size} images, {sum(i.count for i in entry.images)} valid tokens "
                     f"(grid {entry.grid}^3, {entry.dim} dims, layers {' '.join(map(str, entry.layers))})")
        lines.append(f"    scored at fraction {stats['fraction']} (K = {stats['k']}), consistent-anomaly stage "
                     f"{'on' if stats.get('codegraph') else 'off'}; brain-token median {stats['median']:.6g}, "
                     f"scale (1.4826 MAD) {stats['scale']:.6g}")
        lines.append(f"    Nyul landmarks learned from {len(entry.landmarks.get('images', []))} image(s)")
        lines.append(f"    images: {', '.join(entry.names)}")
    return lines


def as_json(bank: ReferenceBank) -> str:
    return json.dumps(bank.describe(), indent=2, sort_keys=True)
