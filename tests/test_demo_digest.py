"""The demo's outputs are what they were before the refactor.

``tests/data/demo_digest.json`` was made with ``scripts/demo_digest.py`` from a
``cg3d demo --test-encoder`` run; it is updated only where a bug fix changes a value (each such
change is named in the commit). Masks, text and the form of every file must match exactly; float
values within ``demo_digest.RTOL`` (they differ in the last bits from one CPU to another).

History: made before the pipeline contract was rewritten (on an AVX-512 machine); remade at
f83d5dc on an AVX2 machine when it gained its tolerance. Of its 48 files, the 33 without float
values kept their hashes; the 15 with float values (the probseg maps and sidecars, the group
table) differ from the AVX-512 run in the last bits only. MKL's SSE4.2 kernels with ATen's
default ones (``MKL_ENABLE_INSTRUCTIONS=SSE4_2 ATEN_CPU_CAPABILITY=default``) move them by at most
1.5e-5 relative. Since 2946ce1 AMD CPUs score with numpy's OpenBLAS (core/scoring/blas.py): on that
AVX2 machine the same 15 files moved by at most 6.7e-6 in a map (1e-7 relative in the table),
and ``CG3D_CPU_BLAS=torch`` reproduced all 48 files bit for bit.
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
    module = _digest_module()
    got = module.digest(tmp_path / "demo" / "derivatives" / "cg3d")
    diff = module.compare(json.loads(EXPECTED.read_text()), got)
    assert not (diff["missing"] or diff["new"] or diff["changed"]), (
        f"demo outputs differ from tests/data/demo_digest.json: missing {diff['missing']}, new "
        f"{diff['new']}, changed {diff['changed']}; if a bug fix changed them on purpose, rerun "
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
    same = {"missing": [], "new": [], "changed": [], "inexact": []}
    data[0, 0, 0] += 1e-6  # last-bit noise: equal within the tolerance, not bit for bit
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(out / "a.nii.gz"))
    assert module.compare(first, module.digest(out)) == {**same, "inexact": ["a.nii.gz"]}
    data[0, 0, 0] = 5.0  # a real change
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(out / "a.nii.gz"))
    assert module.compare(first, module.digest(out)) == {**same, "changed": ["a.nii.gz"]}
    (out / "a.json").write_text(json.dumps({"ModelName": "y", "run_id": "2", "Path": "<ROOT>"}))
    assert "a.json" in module.compare(first, module.digest(out))["changed"]


def test_masks_and_tables_compare_by_content(tmp_path):
    """Integer maps compare bit for bit; a table's decimals within the tolerance."""
    import nibabel as nib
    import numpy as np

    module = _digest_module()
    out = tmp_path / "root" / "derivatives" / "cg3d"
    out.mkdir(parents=True)
    mask = np.zeros((4, 4, 4), dtype=np.uint8)
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(out / "m.nii.gz"))
    (out / "group_T1w.tsv").write_text("participant_id\tscore\nsub-1\t0.5\n")
    first = module.digest(out)
    mask[1, 1, 1] = 1
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(out / "m.nii.gz"))
    (out / "group_T1w.tsv").write_text("participant_id\tscore\nsub-1\t0.5000001\n")
    diff = module.compare(first, module.digest(out))
    assert diff["changed"] == ["m.nii.gz"] and diff["inexact"] == ["group_T1w.tsv"]
    (out / "group_T1w.tsv").write_text("participant_id\tscore\nsub-2\t0.5\n")
    assert "group_T1w.tsv" in module.compare(first, module.digest(out))["changed"]
