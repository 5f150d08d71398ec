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

The one BIDS file-name parser of cg3d is :func:`parse_name`; :data:`LABEL_RE` is the one pattern
of a BIDS label.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..records import ImageRecord

NII = ".nii.gz"
#: A BIDS label (subject, session, ...): letters and digits only.
LABEL_RE = re.compile(r"[0-9a-zA-Z]+")


def parse_name(filename: str) -> tuple[dict[str, str], str]:
    """``sub-01_ses-a_acq-x_T1w.nii.gz`` -> ({"sub": "01", "ses": "a", "acq": "x"}, "T1w")."""
    stem = filename.split(".", 1)[0]
    *parts, suffix = stem.split("_")
    entities = {}
    for part in parts:
        key, _, value = part.partition("-")
        entities[key] = value
    return entities, suffix


def source_entities(record: ImageRecord) -> str:
    """The source name minus its suffix: ``sub-01_ses-01_acq-hires_run-2`` (original order)."""
    return record.bids_name.rsplit("_", 1)[0]


def anat_dir(record: ImageRecord) -> Path:
    """``sub-<l>[/ses-<l>]/anat``."""
    folder = Path(f"sub-{record.subject}")
    return (folder / f"ses-{record.session}" if record.session else folder) / "anat"


def derivative_name(record: ImageRecord, suffix: str, *, label: str | None = None, desc: str | None = None,
                    extension: str = NII) -> str:
    """``<src>[_label-<label>][_desc-<desc>]_<suffix><extension>``; ``desc`` defaults to the modality."""
    desc = record.modality if desc is None else desc
    parts = [source_entities(record)]
    if label:
        parts.append(f"label-{label}")
    if desc:
        parts.append(f"desc-{desc}")
    return "_".join([*parts, suffix]) + extension


def output_paths(record: ImageRecord, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Every per-image output; relative to the output root, or under ``out_dir`` when given.

    Keys: ``probseg``, ``anomaly_mask``, ``brain_mask`` (NIfTI), the same with ``_json``
    (sidecars), ``figure_probseg`` and ``figure_brain_mask`` (the subject report's SVG
    figures, as :func:`cg3d_bids.reports.subject.figure_names` writes them) and
    ``subject_report`` (``sub-<l>.html``).
    """
    anat = anat_dir(record)
    figures = Path(f"sub-{record.subject}") / "figures"
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
    paths["subject_report"] = subject_report_path(record.subject)
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


def output_uri(relpath: str | Path) -> str:
    """``bids::<relpath>`` (a file of the output dataset itself)."""
    return f"bids::{Path(relpath).as_posix()}"
