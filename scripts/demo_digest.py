#!/usr/bin/env python3
"""Content digest of a demo output folder: what must not change when the code is refactored.

``python scripts/demo_digest.py OUT_DIR`` prints the digest of ``OUT_DIR`` (a ``cg3d`` output
dataset); ``--write FILE`` stores it (``tests/data/demo_digest.json``, compared by
``tests/test_demo_digest.py`` against a fresh ``cg3d demo --test-encoder``).

What is digested, and how:

- NIfTI maps: the decoded voxel data (dtype, shape, bytes), the affine and the voxel sizes, not
  the compressed bytes (the gzip level may change without changing a value);
- JSON (sidecars, ``group_<mod>.json``, ``dataset_description.json``): the parsed content, with
  run-specific values dropped (run id, command line, where the weights were found, the config
  hash, wall-clock timings) and the demo's own folder replaced by ``<ROOT>``;
- ``group_<mod>.tsv`` (not the run's ``logs/timings-*.tsv``), ``README.md``, ``.bidsignore`` and
  ``logs/CITATION.md``: the text.

HTML reports (time stamps), figures (rendering may change) and run logs are not digested.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

#: Keys whose values change from run to run (or with the code's internal layout), not with results.
RUN_SPECIFIC = {"run_id", "command", "weights_source", "config_hash", "Cg3dConfigHash", "runtime_s",
                "timings"}
TEXT_FILES = ("README.md", ".bidsignore", "logs/CITATION.md")


def _clean(value: Any, root: str) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v, root) for k, v in value.items() if k not in RUN_SPECIFIC}
    if isinstance(value, list):
        return [_clean(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(root, "<ROOT>")
    return value


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def nifti_digest(path: Path) -> str:
    """sha256 of the decoded voxels, dtype, shape, affine and zooms of a NIfTI file."""
    import nibabel as nib
    import numpy as np

    image = nib.load(str(path))
    data = np.ascontiguousarray(np.asanyarray(image.dataobj))
    meta = {"dtype": str(data.dtype), "shape": list(data.shape),
            "affine": np.round(image.affine, 6).tolist(),
            "zooms": [round(float(z), 6) for z in image.header.get_zooms()]}
    return _sha(json.dumps(meta, sort_keys=True).encode() + data.tobytes())


def digest(out_dir: str | Path, root: str | Path | None = None) -> dict[str, str]:
    """``{relative path: sha256}`` of every digested file under ``out_dir``.

    ``root`` is the folder whose absolute path is replaced by ``<ROOT>`` in JSON values
    (default: the parent of ``out_dir``'s parent, the demo folder ``OUTDIR`` of ``cg3d demo``).
    """
    out_dir = Path(out_dir).absolute()
    root_text = str(Path(root).absolute() if root else out_dir.parent.parent)
    result: dict[str, str] = {}
    for path in sorted(out_dir.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(out_dir).as_posix()
        if rel.endswith((".nii.gz", ".nii")):
            result[rel] = nifti_digest(path)
        elif rel.endswith(".json"):
            content = _clean(json.loads(path.read_text(encoding="utf-8")), root_text)
            result[rel] = _sha(json.dumps(content, sort_keys=True).encode())
        elif (rel.endswith(".tsv") and not rel.startswith("logs/")) or rel in TEXT_FILES:
            result[rel] = _sha(path.read_text(encoding="utf-8").replace(root_text, "<ROOT>").encode())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="a cg3d output folder (e.g. OUTDIR/derivatives/cg3d)")
    parser.add_argument("--write", type=Path, metavar="FILE", help="store the digest as JSON here")
    args = parser.parse_args(argv)
    result = digest(args.out_dir)
    text = json.dumps(result, indent=1, sort_keys=True) + "\n"
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
