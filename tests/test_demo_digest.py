"""The demo's outputs are byte-for-byte (in content) what they were before the refactor.

``tests/data/demo_digest.json`` was made with ``scripts/demo_digest.py`` from a
``cg3d demo --test-encoder`` run of the code before the pipeline contract was rewritten; it is
updated only where a bug fix changes a value (each such change is named in the commit).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from cg3d_bids.cli.main import main

REPO = Path(__file__).resolve().parents[1]
EXPECTED = REPO / "tests" / "data" / "demo_digest.json"


def _digest_module():
    spec = importlib.util.spec_from_file_location("demo_digest", REPO / "scripts" / "demo_digest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_demo_outputs_match_the_reference_digest(tmp_path):
    assert main(["demo", str(tmp_path / "demo"), "--test-encoder"]) == 0
    got = _digest_module().digest(tmp_path / "demo" / "derivatives" / "cg3d")
    expected = json.loads(EXPECTED.read_text())
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    changed = sorted(name for name in set(expected) & set(got) if expected[name] != got[name])
    assert not (missing or extra or changed), (
        f"demo outputs differ from tests/data/demo_digest.json: missing {missing}, new {extra}, "
        f"changed {changed}; if a bug fix changed them on purpose, rerun "
        "`python scripts/demo_digest.py OUT --write tests/data/demo_digest.json` and say why"
    )


def test_digest_ignores_run_specific_values_and_compression(tmp_path):
    """The digest sees values, not run ids or gzip levels (and does see a changed voxel)."""
    import nibabel as nib
    import numpy as np

    module = _digest_module()
    out = tmp_path / "root" / "derivatives" / "cg3d"
    out.mkdir(parents=True)
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(out / "a.nii.gz"))
    (out / "a.json").write_text(json.dumps({"ModelName": "x", "run_id": "1", "Path": str(tmp_path / "root")}))
    first = module.digest(out)
    nib.Nifti1Image(data, np.eye(4)).to_filename(str(out / "a.nii"))
    (out / "a.nii.gz").write_bytes(__import__("gzip").compress((out / "a.nii").read_bytes(), compresslevel=1))
    (out / "a.nii").unlink()
    (out / "a.json").write_text(json.dumps({"ModelName": "x", "run_id": "2", "Path": "<ROOT>"}))
    assert module.digest(out) == first
    data[0, 0, 0] = 5.0
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(out / "a.nii.gz"))
    assert module.digest(out)["a.nii.gz"] != first["a.nii.gz"]
