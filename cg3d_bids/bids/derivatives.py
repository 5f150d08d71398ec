"""Dataset-level files of the output derivatives dataset and the JSON sidecars (conventions §3.1-3.5).

All writes go through :mod:`cg3d_bids.atomic`, and the dataset files are deterministic (no time
stamps), so that parallel ``participant`` processes sharing ``output_dir`` can write them at the
same time: a reader always sees one complete version.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..atomic import write_json, write_text
from ..records import ImageRecord
from .naming import output_paths, output_uri

BIDS_VERSION = "1.10.0"
CODE_URL = "https://github.com/cg3d/cg3d"
DATASET_NAME = "cg3d: zero-shot anomaly maps"
BIDSIGNORE = ("*.html", "figures", "group_*")

# provenance keys -> sidecar keys; other provenance keys go into "Settings" unless run-specific
_MODEL_KEYS = {
    "encoder": "ModelName", "timm_name": "ModelTimmName", "weights_sha256": "ModelSHA256",
    "is_test_encoder": "ModelIsTestEncoder", "version": "Cg3dVersion", "config_hash": "Cg3dConfigHash",
}
_RUN_SPECIFIC = {"run_id", "command", "weights_source", "runtime_s"}


# ------------------------------------------------------------------------------------------------
# dataset_description.json
def container_info(env: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """``GeneratedBy[0].Container`` from the environment, or None on bare metal.

    Apptainer/Singularity are detected at run time (``APPTAINER_CONTAINER``/
    ``SINGULARITY_CONTAINER`` hold the image path -> ``URI``); otherwise ``CG3D_CONTAINER_TYPE``
    (default ``docker``) and ``CG3D_IMAGE_TAG``, both baked into the image at build time.
    """
    env = os.environ if env is None else env
    tag = env.get("CG3D_IMAGE_TAG")
    for var, kind in (("APPTAINER_CONTAINER", "apptainer"), ("SINGULARITY_CONTAINER", "singularity")):
        image = env.get(var)
        if image:
            info = {"Type": kind}
            if tag:
                info["Tag"] = tag
            info["URI"] = Path(image).absolute().as_uri() if image.startswith("/") else image
            return info
    kind = env.get("CG3D_CONTAINER_TYPE")
    if kind or tag:
        info = {"Type": kind or "docker"}
        if tag:
            info["Tag"] = tag
        return info
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _link(target: Path, out_dir: Path, bids_dir: Path) -> str:
    """Relative path when both ``target`` and ``out_dir`` are inside the raw dataset, else file URI."""
    if out_dir.is_relative_to(bids_dir) and target.is_relative_to(bids_dir):
        return Path(os.path.relpath(target, out_dir)).as_posix()
    return target.as_uri()


def _source_datasets(raw: Mapping[str, Any], bids_dir: Path) -> list[dict[str, str]]:
    doi = str(raw.get("DatasetDOI") or "").strip()
    if not doi:
        return [{"URL": bids_dir.as_uri()}]
    bare = doi.removeprefix("doi:").removeprefix("https://doi.org/").removeprefix("http://doi.org/")
    return [{"DOI": f"doi:{bare}", "URL": f"https://doi.org/{bare}"}]


def dataset_description(out_dir: str | Path, *, bids_dir: str | Path, version: str,
                        derivatives: Mapping[str, str | Path] | None = None,
                        env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The content of the output ``dataset_description.json`` (see :func:`write_dataset_description`)."""
    out_dir, bids_dir = Path(out_dir).absolute(), Path(bids_dir).absolute()
    raw = _read_json(bids_dir / "dataset_description.json")
    generated = {
        "Name": "cg3d", "Version": version,
        "Description": "Training-free zero-shot anomaly detection in 3D brain MRI (CoDeGraph3D)",
        "CodeURL": CODE_URL,
    }
    container = container_info(env)
    if container:
        generated["Container"] = container
    links = {"raw": _link(bids_dir, out_dir, bids_dir)}
    for name, path in (derivatives or {}).items():
        links[name] = _link(Path(path).absolute(), out_dir, bids_dir)
    description: dict[str, Any] = {
        "Name": DATASET_NAME,
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "SourceDatasets": _source_datasets(raw, bids_dir),
        "DatasetLinks": links,
        "HowToAcknowledge": "Cite cg3d and include the text in logs/CITATION.md",
    }
    if raw.get("License"):
        description["License"] = raw["License"]
    return description


def write_dataset_description(out_dir: str | Path, *, bids_dir: str | Path, version: str,
                              derivatives: Mapping[str, str | Path] | None = None) -> Path:
    """Write ``<out_dir>/dataset_description.json`` atomically (skipped when already identical).

    ``GeneratedBy`` (Name, Version, CodeURL, Container), ``SourceDatasets`` (the raw ``DatasetDOI``,
    else a ``file://`` URL), ``DatasetLinks`` (``raw`` = ``../..`` when the output is
    ``<bids>/derivatives/<x>``, plus every mask derivative by name) and the raw ``License``.
    """
    path = Path(out_dir) / "dataset_description.json"
    content = dataset_description(out_dir, bids_dir=bids_dir, version=version, derivatives=derivatives)
    if _read_json(path) != content:
        write_json(path, content)
    return path


def previous_version(out_dir: str | Path) -> str | None:
    """cg3d version recorded in an existing output ``dataset_description.json`` (None if absent);
    fMRIPrep's ``check_pipeline_version`` uses the same to warn about mixed versions."""
    generated = _read_json(Path(out_dir) / "dataset_description.json").get("GeneratedBy") or [{}]
    first = generated[0] if isinstance(generated, list) and generated else {}
    return first.get("Version") if isinstance(first, dict) and first.get("Name") == "cg3d" else None


# ------------------------------------------------------------------------------------------------
# .bidsignore and README
def write_bidsignore(out_dir: str | Path, *, statmap: bool = False) -> Path:
    """``*.html``, ``figures`` (no trailing slash: the validator ignores ``figures/``), ``group_*``
    (+ ``*_statmap.*`` for raw score maps). Lines already in the file are kept."""
    path = Path(out_dir) / ".bidsignore"
    wanted = [*BIDSIGNORE, *(["*_statmap.*"] if statmap else [])]
    existing = path.read_text().splitlines() if path.exists() else []
    lines = wanted + [line for line in existing if line.strip() and line not in wanted]
    text = "\n".join(lines) + "\n"
    if not path.exists() or path.read_text() != text:
        write_text(path, text)
    return path


README = """\
# cg3d outputs

Voxel-wise zero-shot anomaly maps of 3D brain MRI computed by cg3d{version} (CoDeGraph3D), a
BIDS-App. This folder is a BIDS Derivatives dataset; `dataset_description.json` links it to the
input (raw) dataset and to the derivatives the brain masks came from.

Per image (`sub-<label>[/ses-<label>]/anat/`, named after the source image):

- `*_label-anomaly_desc-<T1w|T2w|FLAIR>_probseg.nii.gz`: anomaly score in [0, 1] (higher = more
  anomalous) on the native grid of the source image, 0 outside the brain mask. The sidecar records
  the monotone transform from the raw score (`ScoreTransform`), the model and its weights (SHA-256).
- `*_label-anomaly_desc-<mod>_mask.nii.gz`: binary anomaly mask (probseg > `Threshold`, see the
  sidecar), `"Type": "Lesion"`.
- `*_label-brain_desc-<mod>_mask.nii.gz`: the brain mask actually used, on the image grid.

Per modality: `group_<mod>.tsv` (one row per requested image, including failed ones, with the
subject-level scores, ranks and flags) documented by `group_<mod>.json`, and `group_<mod>.html`.
Per subject: `sub-<label>.html` with figures in `sub-<label>/figures/`. Logs, the configuration of
every run and the boilerplate to cite (`CITATION.md`) are in `logs/`.

Files that are not BIDS (reports, figures, group tables) are listed in `.bidsignore`.
"""


TEST_ENCODER_BANNER = """\
> **WARNING: TEST ENCODER.** The outputs in this folder were computed with a randomly initialised
> test encoder (`test-tiny-vit`, no pretrained weights). The maps, scores and tables mean
> **nothing** and must not be used or reported. Rerun without `--encoder test-tiny-vit` (or the
> demo without `--test-encoder`) for real results.

"""


def write_readme(out_dir: str | Path, *, version: str | None = None, test_encoder: bool = False) -> Path:
    """Write ``README.md`` (what the files are) atomically, unless already identical; a run made
    with the random test encoder gets a warning banner at the top."""
    path = Path(out_dir) / "README.md"
    text = README.format(version=f" {version}" if version else "")
    if test_encoder:
        title, _, body = text.partition("\n\n")
        text = f"{title}\n\n{TEST_ENCODER_BANNER}{body}"
    if not path.exists() or path.read_text() != text:
        write_text(path, text)
    return path


#: What :func:`remove_if_without_outputs` may find in a folder it removes.
DATASET_FILES = ("dataset_description.json", "README.md", ".bidsignore")


def remove_if_without_outputs(out_dir: str | Path) -> bool:
    """Remove ``out_dir`` when it holds nothing but the dataset-level files (a run that created it
    and failed before writing any output); returns whether it was removed."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir() or any(p.name not in DATASET_FILES for p in out_dir.iterdir()):
        return False
    for name in DATASET_FILES:
        (out_dir / name).unlink(missing_ok=True)
    try:
        out_dir.rmdir()
    except OSError:  # another run wrote into it meanwhile
        return False
    return True


# ------------------------------------------------------------------------------------------------
# sidecars
def model_fields(model: Mapping[str, Any] | None) -> dict[str, Any]:
    """Provenance dict -> ``ModelName``, ``ModelSHA256``, ``Cg3dVersion``, ``Cg3dConfigHash``, ...

    Method settings go to ``Settings``; run-specific keys (run id, command line, weights path) are
    left out so that the sidecars of identical computations are identical.
    """
    fields: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    for key, value in (model or {}).items():
        if value is None or key in _RUN_SPECIFIC:
            continue
        if key in _MODEL_KEYS:
            fields[_MODEL_KEYS[key]] = value
        else:
            settings[key] = value
    if settings:
        fields["Settings"] = settings
    return fields


def _relpaths(record: ImageRecord) -> dict[str, str]:
    return {k: p.as_posix() for k, p in output_paths(record).items()}


def _common(record: ImageRecord, description: str, sources: list[str], model: Mapping[str, Any] | None) -> dict:
    """Description, Sources, SpatialReference (the source image) and the model provenance."""
    return {"Description": description, "Sources": sources, "SpatialReference": record.source_uri,
            **model_fields(model)}


def probseg_sidecar(record: ImageRecord, *, transform: Mapping[str, Any] | None = None,
                    model: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> dict:
    """Sidecar of ``*_label-anomaly_desc-<mod>_probseg``: sources = the image and the brain mask
    used; ``transform`` (e.g. ``ScoreTransform``, ``BatchMedian``) and ``model`` provenance added."""
    modality = record.modality
    description = (f"Voxel-wise zero-shot anomaly score in [0, 1] (higher = more anomalous) of the "
                   f"{modality} image, on its native grid; 0 outside the brain mask")
    paths = _relpaths(record)
    sidecar = _common(record, description, [record.source_uri, output_uri(paths["brain_mask"])], model)
    sidecar.update(transform or {})
    sidecar.update(extra or {})
    return sidecar


def anomaly_mask_sidecar(record: ImageRecord, threshold: float, *, model: Mapping[str, Any] | None = None,
                         extra: Mapping[str, Any] | None = None) -> dict:
    """Sidecar of ``*_label-anomaly_desc-<mod>_mask``: ``Type: Lesion`` and the ``Threshold``."""
    paths = _relpaths(record)
    description = ("Binarised anomaly map: voxels of the brain mask whose anomaly score (probseg) "
                   "is greater than Threshold")
    sidecar = {"Type": "Lesion", **_common(
        record, description, [output_uri(paths["probseg"]), output_uri(paths["brain_mask"])], model)}
    sidecar["Threshold"] = float(threshold)
    sidecar.update(extra or {})
    return sidecar


def brain_mask_sidecar(record: ImageRecord, *, model: Mapping[str, Any] | None = None,
                       extra: Mapping[str, Any] | None = None) -> dict:
    """Sidecar of ``*_label-brain_desc-<mod>_mask`` (the mask actually used): ``Type: Brain``,
    ``Sources`` = the derivatives mask (or the image for computed masks), ``MaskSource``."""
    modality = record.modality
    source = record.mask_source or "derivatives"
    original = record.mask_uri
    if original:
        description = (f"Brain mask used for scoring: {original} mapped onto the grid of the {modality} "
                       "image (nearest neighbour)")
        sources = [original]
    elif source == "nonzero":
        description = f"Brain mask used for scoring: the non-zero voxels of the (skull-stripped) {modality} image"
        sources = [record.source_uri]
    else:
        description = f"Brain mask used for scoring: deepbet skull stripping of the {modality} image"
        sources = [record.source_uri]
    sidecar = {"Type": "Brain", **_common(record, description, sources, model), "MaskSource": source}
    sidecar.update(extra or {})
    return sidecar
