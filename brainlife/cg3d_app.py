#!/usr/bin/env python3
"""brainlife.io App: score one new T1w and/or T2w scan against a saved cg3d reference cohort.

Run by ``main`` in the task's working directory, which holds brainlife's ``config.json``
(README.md in this folder lists its keys). Steps:

1. read ``config.json``: ``t1`` and/or ``t2`` (NIfTI files), optional ``mask``, ``reference`` (the
   bank folder written by ``cg3d BIDS OUT group --save-reference BANK``) and options;
2. build a one-subject BIDS dataset in ``cg3d_work/bids`` (the images copied, never modified;
   the mask as a ``desc-brain_mask`` derivative);
3. run ``cg3d BIDS OUT participant --reference BANK`` with the bank's own token settings, in the
   cg3d container (``singularity exec --nv``) when singularity/apptainer is on the PATH, else with
   the installed ``cg3d`` (``CG3D_BRAINLIFE_RUNNER=installed|singularity`` forces one);
4. lay the outputs out as brainlife datatypes (``neuro/mask``: ``<id>/mask.nii.gz``) plus the whole
   cg3d derivatives folder (``raw``), and write ``product.json`` (scores, rank against the bank,
   brainlife messages and a plotly chart).

Standard library only: on a brainlife resource this script runs on the host, cg3d in its container.
Exit code: cg3d's (BEP027 codes), 64 for a bad ``config.json``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

#: cg3d's container (keep the tag equal to cg3d's version: tests/test_brainlife.py checks it).
CONTAINER = "docker://cg3d/cg3d:0.1.0"
#: brainlife input id -> BIDS suffix of the image
MODALITIES = {"t1": "T1w", "t2": "T2w"}
#: Output datasets (registered output ids; README.md): id -> (datatype, what, source file key)
OUTPUTS = {
    "anomaly": ("neuro/mask", "anomaly map (probseg, 0-1)", "probseg"),
    "anomaly_mask": ("neuro/mask", "binary anomaly mask (probseg > threshold)", "anomaly_mask"),
    "brain_mask": ("neuro/mask", "brain mask used", "brain_mask"),
}
EXIT_USAGE = 64
WORK = Path("cg3d_work")


class ConfigError(Exception):
    """A bad ``config.json`` (exit 64 with the message in product.json)."""


# ------------------------------------------------------------------------------------------------
def read_config(path: Path) -> dict[str, Any]:
    """``config.json`` checked: at least one image, a bank, options of the right type."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    images = {key: Path(config[key]) for key in MODALITIES if config.get(key)}
    if not images:
        raise ConfigError("config.json has neither 't1' nor 't2': give at least one image (neuro/anat/t1w or "
                          "neuro/anat/t2w)")
    for key, image in images.items():
        if not image.is_file():
            raise ConfigError(f"config.json '{key}': file not found: {image}")
    if not config.get("reference"):
        raise ConfigError("config.json has no 'reference': give the reference bank (the folder written by "
                          "`cg3d BIDS OUT group --save-reference BANK`)")
    bank = Path(config["reference"])
    if bank.is_file() and bank.name == "reference.json":
        bank = bank.parent
    if not (bank / "reference.json").is_file():
        raise ConfigError(f"config.json 'reference': not a cg3d reference bank (no reference.json): {bank}")
    mask = Path(config["mask"]) if config.get("mask") else None
    if mask is not None and not mask.is_file():
        raise ConfigError(f"config.json 'mask': file not found: {mask}")
    for key in ("fraction", "threshold"):
        if config.get(key) is not None and not isinstance(config[key], (int, float)):
            raise ConfigError(f"config.json '{key}' must be a number, got {config[key]!r}")
    return {"images": images, "bank": bank.absolute(), "mask": mask, "subject": subject_label(config),
            "fraction": config.get("fraction"), "threshold": config.get("threshold"),
            "device": str(config.get("device") or "auto"), "mask_source": str(config.get("mask_source") or "auto"),
            "container": str(config.get("container") or os.environ.get("CG3D_CONTAINER") or CONTAINER),
            "nprocs": int(config.get("nprocs") or 1)}


def subject_label(config: dict[str, Any]) -> str:
    """A BIDS label for the subject: ``subject`` in config, else the first input's brainlife meta
    (``_inputs[].meta.subject``), else ``01``; non-alphanumerics removed."""
    label = config.get("subject")
    for item in config.get("_inputs") or []:
        if not label and isinstance(item, dict):
            label = (item.get("meta") or {}).get("subject")
    label = re.sub(r"[^0-9A-Za-z]", "", str(label or ""))
    return label or "01"


def bank_facts(bank: Path) -> dict[str, Any]:
    """The bank's manifest (json only: no cg3d needed on the host)."""
    return json.loads((bank / "reference.json").read_text(encoding="utf-8"))


def build_bids(config: dict[str, Any], root: Path) -> tuple[Path, Path | None]:
    """A one-subject BIDS dataset (images copied) and, with a mask, a masks derivative."""
    sub = f"sub-{config['subject']}"
    if root.exists():
        shutil.rmtree(root)
    anat = root / sub / "anat"
    anat.mkdir(parents=True)
    _json(root / "dataset_description.json", {"Name": "brainlife input", "BIDSVersion": "1.10.0",
                                               "DatasetType": "raw"})
    for key, image in config["images"].items():
        shutil.copyfile(image, anat / f"{sub}_{MODALITIES[key]}{_suffix(image)}")
    masks = None
    if config["mask"] is not None:
        masks = root / "derivatives" / "masks"
        (masks / sub / "anat").mkdir(parents=True)
        _json(masks / "dataset_description.json", {"Name": "brainlife mask", "BIDSVersion": "1.10.0",
                                                    "DatasetType": "derivative",
                                                    "GeneratedBy": [{"Name": "brainlife input"}]})
        shutil.copyfile(config["mask"], masks / sub / "anat" / f"{sub}_desc-brain_mask{_suffix(config['mask'])}")
    return root, masks


def _suffix(path: Path) -> str:
    return ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"


def _json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def cg3d_arguments(config: dict[str, Any], bids: Path, masks: Path | None, out: Path, work: Path,
                   manifest: dict[str, Any]) -> list[str]:
    """Arguments of ``cg3d`` (without the executable): the bank's token settings, so they match."""
    settings = manifest["content"]["settings"]
    stats = next(iter(manifest["content"]["modalities"].values()))["stats"]
    modalities = [MODALITIES[key] for key in config["images"]]
    args = [str(bids), str(out), "participant", "--participant-label", config["subject"],
            "--reference", str(config["bank"]), "-w", str(work), "--modality", *modalities,
            "--skip-bids-validation", "--nprocs", str(config["nprocs"]),
            "--encoder", settings["encoder"], "--cube-size", str(settings["cube_size"]),
            "--fov-mm", str(settings["fov_mm"]), "--layers", *map(str, settings["layers"]),
            "--projection-dim", str(settings["projection_dim"]), "--random-seed", str(settings["random_seed"]),
            "--precision", settings["precision"],
            "--fraction", str(config["fraction"] if config["fraction"] is not None else stats["fraction"])]
    if config["threshold"] is not None:
        args += ["--threshold", str(config["threshold"])]
    device = config["device"]
    if device == "auto":
        device = "cuda" if shutil.which("nvidia-smi") else "cpu"
    args += ["--device", device]
    source = config["mask_source"]
    if source == "auto":
        source = "derivatives" if masks is not None else "skullstrip"
    args += ["--mask-source", source]
    if source == "derivatives":
        if masks is None:
            raise ConfigError("mask_source 'derivatives' needs a 'mask' in config.json")
        args += ["-d", f"masks={masks}"]
    return args


def runner(config: dict[str, Any]) -> list[str]:
    """How to call cg3d: in its container when singularity/apptainer is available, else installed."""
    forced = os.environ.get("CG3D_BRAINLIFE_RUNNER", "")
    singularity = shutil.which("singularity") or shutil.which("apptainer")
    if forced == "singularity" or (not forced and singularity):
        if not singularity:
            raise ConfigError("CG3D_BRAINLIFE_RUNNER=singularity but neither singularity nor apptainer is on PATH")
        bank = str(config["bank"])
        return [singularity, "exec", "-e", "--nv", "-B", f"{bank}:{bank}:ro", "-B", f"{Path.cwd()}:{Path.cwd()}",
                config["container"], "cg3d"]
    cg3d = shutil.which("cg3d")
    if not cg3d:
        raise ConfigError("neither singularity/apptainer nor an installed cg3d is on PATH")
    return [cg3d]


# ------------------------------------------------------------------------------------------------
def collect_outputs(config: dict[str, Any], out: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Copy the maps into brainlife's layout; return product.json's content."""
    sub = f"sub-{config['subject']}"
    product: dict[str, Any] = {"brainlife": [], "cg3d": {}, "tags": ["cg3d", "anomaly"]}
    content = manifest["content"]
    checksum = manifest["checksum"]
    if manifest.get("made", {}).get("is_test_encoder"):
        product["brainlife"].append({"type": "warning", "msg": "the reference bank was made with cg3d's RANDOM "
                                     "test encoder: the maps and scores mean nothing"})
    for key in config["images"]:
        modality = MODALITIES[key]
        rows = _rows(out / f"reference_{modality}.tsv")
        row = rows.get(f"{sub}_{modality}")
        if row is None or row.get("status") != "ok":
            reason = (row or {}).get("error") or "no result"
            product["brainlife"].append({"type": "error", "msg": f"{modality}: not scored: {reason}"})
            continue
        anat = out / sub / "anat"
        for output_id, (_datatype, _what, name) in OUTPUTS.items():
            label, suffix = {"probseg": ("anomaly", "probseg"), "anomaly_mask": ("anomaly", "mask"),
                             "brain_mask": ("brain", "mask")}[name]
            source = anat / f"{sub}_label-{label}_desc-{modality}_{suffix}.nii.gz"
            dest = Path(f"{key}_{output_id}") / "mask.nii.gz"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest)
        bank_images = content["modalities"][modality]["images"]
        scores = [image["score_max"] for image in bank_images if image.get("score_max") is not None]
        facts = {
            "score_max": _num(row["score_max"]), "score_top1pct": _num(row["score_top1pct"]),
            "rank": _int(row["rank"]), "of": len(scores) + 1, "percentile": _num(row["score_percentile"]),
            "anomaly_volume_mm3": _num(row["anomaly_volume_mm3"]), "n_components": _int(row["n_components"]),
            "flagged": row["flagged"] == "true", "bank_images": _int(row["bank_images"]), "k": _int(row["k"]),
        }
        product["cg3d"][modality] = facts
        product["brainlife"].append({"type": "warning" if facts["flagged"] else "info", "msg": (
            f"{modality}: anomaly score {facts['score_max']:.4g}, rank {facts['rank']} of {facts['of']} against the "
            f"reference bank's {len(scores)} images (percentile {facts['percentile']:.0f}); anomalous volume "
            f"{facts['anomaly_volume_mm3']:.0f} mm^3 in {facts['n_components']} component(s)")})
        product["brainlife"].append({
            "type": "plotly", "name": f"{modality} anomaly score against the reference bank",
            "data": [{"type": "box", "x": scores, "name": "bank", "boxpoints": "all"},
                     {"type": "scatter", "x": [facts["score_max"]], "y": ["bank"], "mode": "markers",
                      "marker": {"size": 14, "color": "red"}, "name": "this scan"}],
            "layout": {"xaxis": {"title": "score_max (maximum of the raw anomaly map)"}, "showlegend": True},
        })
        for output_id in OUTPUTS:
            product[f"{key}_{output_id}"] = {"tags": [modality.lower(), output_id.replace("_", "-")]}
    product["cg3d"]["reference"] = {"path": str(config["bank"]), "checksum": checksum,
                                    "images": {m: len(e["images"]) for m, e in content["modalities"].items()},
                                    "settings": content["settings"]}
    if out.exists():
        shutil.copytree(out, Path("cg3d"), dirs_exist_ok=True)
    return product


def _rows(path: Path) -> dict[str, dict[str, str]]:
    if not path.exists():
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["bids_name"]: row for row in csv.DictReader(fh, delimiter="\t")}


def _num(text: str) -> float:
    return float("nan") if text in ("", "n/a") else float(text)


def _int(text: str) -> int | None:
    return None if text in ("", "n/a") else int(text)


def write_product(product: dict[str, Any]) -> None:
    Path("product.json").write_text(json.dumps(product, indent=2, sort_keys=True, allow_nan=False,
                                               default=str) + "\n", encoding="utf-8")


def main() -> int:
    try:
        config = read_config(Path("config.json"))
        manifest = bank_facts(config["bank"])
        bids, masks = build_bids(config, WORK / "bids")
        out = WORK / "out"
        command = runner(config) + cg3d_arguments(config, bids.absolute(), masks and masks.absolute(),
                                                  out.absolute(), (WORK / "work").absolute(), manifest)
    except ConfigError as exc:
        print(f"cg3d brainlife app: {exc}", file=sys.stderr)
        write_product({"brainlife": [{"type": "error", "msg": str(exc)}]})
        return EXIT_USAGE
    print("running: " + " ".join(command), flush=True)
    status = subprocess.call(command)
    product = collect_outputs(config, out, manifest)
    if status != 0:
        product["brainlife"].insert(0, {"type": "error", "msg": f"cg3d exited with code {status}: see the task log"})
    write_product(_finite(product))
    return status


def _finite(value: Any) -> Any:
    """NaN/inf -> None (product.json is strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
