"""Names of cg3d's outputs (BIDS Derivatives; conventions §3.2).

A derivative name is ``<source entities>_label-<x>_desc-<modality>_<suffix>``: the source file name
minus its suffix, with its entities in their original order, then ``label`` and ``desc`` (``desc``
last, as in the schema's entity order). Outputs of one image::

    sub-<l>[/ses-<l>]/anat/<src>_label-anomaly_desc-<mod>_probseg.nii.gz (+ .json)
    sub-<l>[/ses-<l>]/anat/<src>_label-anomaly_desc-<mod>_mask.nii.gz    (+ .json)
    sub-<l>[/ses-<l>]/anat/<src>_label-brain_desc-<mod>_mask.nii.gz      (+ .json)
    sub-<l>/figures/<src>_label-anomaly_desc-<mod>_probseg.svg  (and _mask.svg, label-brain _mask.svg)
    sub-<l>.html
and per modality ``group_<mod>.tsv``, ``group_<mod>.json``, ``group_<mod>.html``.

Records may be :class:`~cg3d_bids.bids.discovery.ImageRecord` objects or their ``dict`` form.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

NII = ".nii.gz"


def _get(record: Any, key: str) -> Any:
    if isinstance(record, Mapping):
        return record.get(key)
    return getattr(record, key, None)


def source_entities(record: Any) -> str:
    """The source name minus its suffix: ``sub-01_ses-01_acq-hires_run-2`` (original order)."""
    bids_name = _get(record, "bids_name")
    if bids_name:
        return bids_name.rsplit("_", 1)[0]
    entities = dict(_get(record, "entities") or {})
    entities.setdefault("sub", _get(record, "subject"))
    if _get(record, "session"):
        entities.setdefault("ses", _get(record, "session"))
    ordered = {"sub": entities.pop("sub"), **({"ses": entities.pop("ses")} if "ses" in entities else {})}
    return "_".join(f"{k}-{v}" for k, v in {**ordered, **entities}.items())


def anat_dir(record: Any) -> Path:
    """``sub-<l>[/ses-<l>]/anat``."""
    session = _get(record, "session")
    folder = Path(f"sub-{_get(record, 'subject')}")
    return (folder / f"ses-{session}" if session else folder) / "anat"


def derivative_name(record: Any, suffix: str, *, label: str | None = None, desc: str | None = None,
                    extension: str = NII) -> str:
    """``<src>[_label-<label>][_desc-<desc>]_<suffix><extension>``; ``desc`` defaults to the modality."""
    desc = _get(record, "modality") if desc is None else desc
    parts = [source_entities(record)]
    if label:
        parts.append(f"label-{label}")
    if desc:
        parts.append(f"desc-{desc}")
    return "_".join([*parts, suffix]) + extension


def output_paths(record: Any, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Every per-image output; relative to the output root, or under ``out_dir`` when given.

    Keys: ``probseg``, ``anomaly_mask``, ``brain_mask`` (NIfTI), the same with ``_json``
    (sidecars), ``figure_probseg`` and ``figure_brain_mask`` (the subject report's SVG
    figures, as :func:`cg3d_bids.reports.subject.figure_names` writes them) and
    ``subject_report`` (``sub-<l>.html``).
    """
    anat = anat_dir(record)
    figures = Path(f"sub-{_get(record, 'subject')}") / "figures"
    names = {
        "probseg": ("probseg", "anomaly"),
        "anomaly_mask": ("mask", "anomaly"),
        "brain_mask": ("mask", "brain"),
    }
    paths: dict[str, Path] = {}
    for key, (suffix, label) in names.items():
        paths[key] = anat / derivative_name(record, suffix, label=label)
        paths[f"{key}_json"] = anat / derivative_name(record, suffix, label=label, extension=".json")
        if key != "anomaly_mask":  # the anomaly mask is drawn as a contour on the probseg figure
            paths[f"figure_{key}"] = figures / derivative_name(record, suffix, label=label, extension=".svg")
    paths["subject_report"] = subject_report_path(_get(record, "subject"))
    if out_dir is not None:
        paths = {k: Path(out_dir) / p for k, p in paths.items()}
    return paths


def subject_report_path(subject: str, out_dir: str | Path | None = None) -> Path:
    """``sub-<l>.html`` (one report per subject, sessions as sections)."""
    path = Path(f"sub-{str(subject).removeprefix('sub-')}.html")
    return Path(out_dir) / path if out_dir is not None else path


def group_paths(modality: str, out_dir: str | Path | None = None) -> dict[str, Path]:
    """``group_<mod>.tsv`` / ``.json`` / ``.html`` (keys ``tsv``, ``json``, ``html``)."""
    paths = {ext: Path(f"group_{modality}.{ext}") for ext in ("tsv", "json", "html")}
    return {k: Path(out_dir) / p for k, p in paths.items()} if out_dir is not None else paths


def source_uri(record: Any) -> str:
    """``bids:raw:<relpath of the source image>``."""
    return f"bids:raw:{_get(record, 'relpath')}"


def mask_uri(record: Any) -> str | None:
    """``bids:<derivatives name>:<relpath>`` of the input mask, or None for computed masks."""
    source, relpath = _get(record, "mask_source") or "", _get(record, "mask_relpath")
    if source.startswith("derivatives:") and relpath:
        return f"bids:{source.split(':', 1)[1]}:{relpath}"
    return None


def output_uri(relpath: str | Path) -> str:
    """``bids::<relpath>`` (a file of the output dataset itself)."""
    return f"bids::{Path(relpath).as_posix()}"
