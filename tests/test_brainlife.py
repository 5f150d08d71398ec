"""The brainlife.io App (``brainlife/``): config.json in, brainlife datatypes and product.json out.

The end-to-end test runs ``brainlife/main`` in a task folder holding a fake ``config.json`` on the
demo data, with "the installed cg3d" being a ``cg3d`` shim for the code under test on the PATH
(no singularity needed); the bank is saved from the demo's three healthy subjects.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cg3d_bids import __version__
from cg3d_bids.cli.main import main as cg3d_main
from cg3d_bids.demo_data import copy_demo_dataset

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "brainlife"
HEALTHY = ("healthychris", "healthyixi012", "healthymni152")
PATIENT = "glioma7294"
FAST = ["--device", "cpu", "--encoder", "test-tiny-vit", "--cube-size", "56", "--nprocs", "1",
        "--skip-bids-validation", "--projection-dim", "16"]


def _app():
    spec = importlib.util.spec_from_file_location("cg3d_app", APP / "cg3d_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_bank(folder: Path, fraction: float = 0.5) -> Path:
    """Just a manifest (what the App reads on the host)."""
    folder.mkdir(parents=True)
    manifest = {"format": "cg3d-reference", "format_version": 1, "checksum": "sha256:x", "made": {},
                "content": {"settings": {"encoder": "test-tiny-vit", "weights_sha256": None, "cube_size": 56,
                                         "fov_mm": 156.0, "layers": [1, 2], "projection_dim": 16, "random_seed": 0,
                                         "precision": "fp32", "token_format": 1},
                            "modalities": {"T1w": {"stats": {"fraction": fraction}, "images": []}}}}
    (folder / "reference.json").write_text(json.dumps(manifest))
    return folder


def _shim(folder: Path) -> Path:
    """A ``cg3d`` executable running the code under test (what ``pip install -e .`` gives in CI)."""
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "cg3d"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m cg3d_bids \"$@\"\n")
    shim.chmod(0o755)
    return folder


def test_main_is_executable_and_the_container_tag_is_cg3ds_version():
    assert os.access(APP / "main", os.X_OK) and (APP / "main").read_text().startswith("#!/bin/bash")
    assert _app().CONTAINER == f"docker://cg3d/cg3d:{__version__}"
    readme = (APP / "README.md").read_text()
    for datatype in ("neuro/anat/t1w", "neuro/anat/t2w", "neuro/mask", "raw"):
        assert datatype in readme
    assert "product.json" in readme and "brainlife.io/docs" in readme


def test_bad_configs_are_refused_with_a_message_in_product_json(tmp_path, monkeypatch):
    app = _app()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"reference": str(tmp_path)}))
    assert app.main() == 64
    product = json.loads((tmp_path / "product.json").read_text())
    assert product["brainlife"][0]["type"] == "error" and "neither 't1' nor 't2'" in product["brainlife"][0]["msg"]
    image = tmp_path / "t1.nii.gz"
    image.write_bytes(b"x")
    for config, message in [({"t1": str(image)}, "no 'reference'"),
                            ({"t1": str(image), "reference": str(tmp_path)}, "no reference.json"),
                            ({"t1": str(tmp_path / "no.nii.gz"), "reference": "x"}, "file not found"),
                            ({"t1": str(image), "reference": str(_fake_bank(tmp_path / "b")), "fraction": "a"},
                             "must be a number")]:
        (tmp_path / "config.json").write_text(json.dumps(config))
        with pytest.raises(app.ConfigError, match=message):
            app.read_config(tmp_path / "config.json")


def test_cg3d_is_called_with_the_banks_settings_in_its_container_when_singularity_is_there(tmp_path, monkeypatch):
    app = _app()
    bank = _fake_bank(tmp_path / "bank", fraction=0.5)
    image = tmp_path / "t1.nii.gz"
    image.write_bytes(b"x")
    (tmp_path / "config.json").write_text(json.dumps({
        "t1": str(image), "reference": str(bank / "reference.json"), "device": "cpu",
        "_inputs": [{"id": "t1", "meta": {"subject": "pat-01"}}]}))
    config = app.read_config(tmp_path / "config.json")
    assert config["subject"] == "pat01" and config["bank"] == bank
    args = app.cg3d_arguments(config, tmp_path / "bids", None, tmp_path / "out", tmp_path / "w",
                              app.bank_facts(bank))
    joined = " ".join(args)
    assert "participant --participant-label pat01 --reference" in joined
    assert "--cube-size 56" in joined and "--layers 1 2" in joined and "--projection-dim 16" in joined
    assert "--fraction 0.5" in joined and "--mask-source skullstrip" in joined and "--modality T1w" in joined
    fake = _shim(tmp_path / "bin")
    (fake / "singularity").write_text("#!/bin/sh\n")
    (fake / "singularity").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CG3D_BRAINLIFE_RUNNER", raising=False)
    command = app.runner(config)
    assert command[:4] == [str(fake / "singularity"), "exec", "-e", "--nv"] and command[-2:] == [app.CONTAINER, "cg3d"]
    assert f"{bank}:{bank}:ro" in command
    monkeypatch.setenv("CG3D_BRAINLIFE_RUNNER", "installed")
    assert app.runner(config) == [str(fake / "cg3d")]


@pytest.fixture(scope="module")
def demo_bank(tmp_path_factory):
    root = tmp_path_factory.mktemp("brainlife")
    bids = copy_demo_dataset(root / "bids")
    status = cg3d_main([str(bids), str(root / "out-bank"), "group", "--participant-label", *HEALTHY,
                        "--modality", "T1w", "-d", f"masks={bids / 'derivatives' / 'masks'}", "--fraction", "0.5",
                        "--save-reference", str(root / "bank"), "-w", str(root / "work"), *FAST])
    assert status == 0
    return root, bids, root / "bank"


@pytest.mark.slow
def test_the_app_scores_one_scan_with_a_fake_config(demo_bank, tmp_path):
    _root, bids, bank = demo_bank
    inputs = tmp_path / "input"
    for name, source in (("t1/t1.nii.gz", bids / f"sub-{PATIENT}" / "anat" / f"sub-{PATIENT}_T1w.nii.gz"),
                         ("mask/mask.nii.gz", bids / "derivatives" / "masks" / f"sub-{PATIENT}" / "anat" /
                          f"sub-{PATIENT}_desc-brain_mask.nii.gz")):
        (inputs / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, inputs / name)
    before = {p: p.read_bytes() for p in inputs.rglob("*.nii.gz")}
    task = tmp_path / "task"
    task.mkdir()
    (task / "config.json").write_text(json.dumps({
        "t1": "../input/t1/t1.nii.gz", "mask": "../input/mask/mask.nii.gz", "reference": str(bank),
        "device": "cpu", "_inputs": [{"id": "t1", "meta": {"subject": PATIENT}}]}))
    env = {**os.environ, "PATH": f"{_shim(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "CG3D_BRAINLIFE_RUNNER": "installed", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([str(APP / "main")], cwd=task, env=env, capture_output=True, text=True, timeout=900,
                            check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    source = nib.load(inputs / "t1" / "t1.nii.gz")
    anomaly = nib.load(task / "t1_anomaly" / "mask.nii.gz")
    binary = np.asarray(nib.load(task / "t1_anomaly_mask" / "mask.nii.gz").dataobj)
    brain = np.asarray(nib.load(task / "t1_brain_mask" / "mask.nii.gz").dataobj)
    values = np.asarray(anomaly.dataobj)
    assert anomaly.shape == source.shape and np.allclose(anomaly.affine, source.affine, atol=1e-5)
    assert 0 <= values.min() and values.max() <= 1 and set(np.unique(binary)) <= {0, 1}
    assert np.all(values[brain == 0] == 0) and brain.sum() > 0
    assert (task / "cg3d" / f"sub-{PATIENT}.html").exists() and (task / "cg3d" / "reference_T1w.tsv").exists()

    product = json.loads((task / "product.json").read_text())
    facts = product["cg3d"]["T1w"]
    rows = (task / "cg3d" / "reference_T1w.tsv").read_text().splitlines()
    row = dict(zip(rows[0].split("\t"), rows[1].split("\t")))
    assert facts["score_max"] == float(row["score_max"]) and facts["rank"] == int(row["rank"])
    assert facts["of"] == 4 and facts["bank_images"] == 3 and facts["k"] == 1
    assert product["cg3d"]["reference"]["checksum"] == json.loads((bank / "reference.json").read_text())["checksum"]
    kinds = [item["type"] for item in product["brainlife"]]
    assert "plotly" in kinds and "warning" in kinds  # the test-encoder warning at least
    assert any(f"rank {facts['rank']} of 4" in item.get("msg", "") for item in product["brainlife"])
    assert product["t1_anomaly"]["tags"] == ["t1w", "anomaly"]
    assert {p: p.read_bytes() for p in inputs.rglob("*.nii.gz")} == before, "inputs are never modified"
