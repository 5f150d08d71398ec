"""The bundled demo BIDS dataset: content, licences, copying, BIDS validity, reproducibility."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cg3d_bids.demo_data import copy_demo_dataset, demo_dataset_path
from cg3d_bids.errors import CantCreateError
from cg3d_bids.core.preprocessing import load_image, map_mask_to_image

DEMO = demo_dataset_path()
REPO = Path(__file__).resolve().parents[1]
TINY = Path("/work/shared/data/tiny")
PATIENTS = {"ms07", "ms26", "glioma6692", "glioma7294"}


def _participants() -> list[dict[str, str]]:
    with open(DEMO / "participants.tsv", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def test_layout_and_participants():
    rows = _participants()
    labels = sorted(r["participant_id"].removeprefix("sub-") for r in rows)
    assert len(labels) == 7 and all(re.fullmatch(r"[0-9a-zA-Z]+", lab) for lab in labels)
    assert sorted(p.name for p in DEMO.glob("sub-*")) == [f"sub-{lab}" for lab in labels]
    counts = {m: len(list(DEMO.glob(f"sub-*/anat/sub-*_{m}.nii.gz"))) for m in ("T1w", "T2w", "FLAIR")}
    assert counts == {"T1w": 7, "T2w": 4, "FLAIR": 4}
    assert {r["condition"] for r in rows} == {"healthy", "multiple_sclerosis", "glioma"}
    assert {r["participant_id"][4:] for r in rows if r["condition"] != "healthy"} == PATIENTS
    assert "condition" in json.loads((DEMO / "participants.json").read_text())
    for lab in labels:
        assert (DEMO / f"derivatives/masks/sub-{lab}/anat/sub-{lab}_desc-brain_mask.nii.gz").is_file()
        lesion = DEMO / f"derivatives/lesions/sub-{lab}/anat/sub-{lab}_label-lesion_mask.nii.gz"
        assert lesion.is_file() == (lab in PATIENTS)
    for sub in ("masks", "lesions"):
        desc = json.loads((DEMO / "derivatives" / sub / "dataset_description.json").read_text())
        assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"]
    size = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert size < 1_000_000, size


def test_licences_cover_every_subject():
    text = (DEMO / "LICENSES.md").read_text()
    for row in _participants():
        assert row["participant_id"] in text
    for needle in ("CC BY-SA 3.0", "CC BY 3.0", "BSD 2-Clause", "Apache License", "McConnell", "Lesjak"):
        assert needle in text


def test_images_masks_and_lesions_are_consistent():
    for image_path in sorted(DEMO.glob("sub-*/anat/*.nii.gz")):
        lab = image_path.name.split("_")[0][4:]
        image = load_image(image_path)
        mapped = map_mask_to_image(DEMO / f"derivatives/masks/sub-{lab}/anat/sub-{lab}_desc-brain_mask.nii.gz",
                                   image)
        assert not mapped.resampled and mapped.mask.sum() > 10_000
        if lab in PATIENTS:
            lesion = map_mask_to_image(
                DEMO / f"derivatives/lesions/sub-{lab}/anat/sub-{lab}_label-lesion_mask.nii.gz", image,
                brain=False)
            assert not lesion.resampled and 0 < lesion.mask.sum() and not np.any(lesion.mask & ~mapped.mask)


def test_copy_demo_dataset(tmp_path):
    dest = copy_demo_dataset(tmp_path / "bids")
    assert (dest / "dataset_description.json").is_file() and (dest / ".bidsignore").is_file()
    copied = sorted(p.relative_to(dest) for p in dest.rglob("*") if p.is_file())
    shipped = sorted(p.relative_to(DEMO) for p in DEMO.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert set(shipped) <= set(copied)
    (dest / "participants.tsv").write_text("edited")  # writable
    assert copy_demo_dataset(dest) == dest  # an earlier demo copy is refreshed
    assert (dest / "participants.tsv").read_text() == (DEMO / "participants.tsv").read_text()
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.txt").write_text("keep me")
    with pytest.raises(CantCreateError, match="not an earlier demo copy"):
        copy_demo_dataset(other)


def _validator_errors(root: Path) -> list[dict]:
    proc = subprocess.run(["bids-validator-deno", str(root), "--format", "json"], capture_output=True,
                          text=True, timeout=120)
    report = json.loads(proc.stdout)
    return [i for i in report["issues"]["issues"] if i["severity"] == "error"]


@pytest.mark.skipif(shutil.which("bids-validator-deno") is None,
                    reason="bids-validator-deno not installed (pip install bids-validator-deno)")
@pytest.mark.slow
def test_bids_validator(tmp_path):
    dest = copy_demo_dataset(tmp_path / "bids")
    for root in (dest, dest / "derivatives" / "masks", dest / "derivatives" / "lesions"):
        assert _validator_errors(root) == [], root


@pytest.mark.slow
@pytest.mark.skipif(not TINY.is_dir(), reason=f"source fixtures {TINY} not available")
def test_generator_reproduces_shipped_dataset(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("make_demo_dataset", REPO / "scripts" / "make_demo_dataset.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "make_demo_dataset", module)  # dataclasses need it
    spec.loader.exec_module(module)
    out = module.build(TINY, tmp_path / "demo")
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(DEMO) for p in DEMO.rglob("*") if p.is_file())
    for rel in files:
        new, old = (out / rel).read_bytes(), (DEMO / rel).read_bytes()
        if rel.name.endswith(".gz"):  # compare content: zlib builds may compress differently
            new, old = gzip.decompress(new), gzip.decompress(old)
        assert new == old, rel
