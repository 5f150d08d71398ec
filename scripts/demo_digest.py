#!/usr/bin/env python3
"""Content digest of a demo output folder: what must not change when the code is refactored.

``python scripts/demo_digest.py OUT_DIR`` prints the digest of ``OUT_DIR`` (a ``cg3d`` output
dataset); ``--write FILE`` stores it (``tests/data/demo_digest.json``, compared by
``tests/test_demo_digest.py`` against a fresh ``cg3d demo --test-encoder``); ``--compare FILE``
compares ``OUT_DIR`` with a stored digest (exit 1 if they differ).

Each file's entry has three parts:

- ``exact``: sha256 of its whole normalised content (equal means bit-identical values);
- ``form``: sha256 of everything but its floating-point values, compared exactly;
- ``values``: its floating-point values (or, for a float map, a summary of them), compared within
  :data:`RTOL` / :data:`ATOL`. Float results differ in the last bits from one CPU to another
  (BLAS and the encoder's kernels round differently with AVX2 and AVX-512), so a digest made on
  one machine must still match on another; a real change moves them far more than that.

What is digested, and how:

- NIfTI maps: dtype, shape, affine and voxel sizes, the voxel bytes of integer maps (masks), and
  for float maps the means over a 6 x 6 x 6 grid of blocks plus the sum, minimum and maximum;
  not the compressed bytes (the gzip level may change without changing a value);
- JSON (sidecars, ``group_<mod>.json``, ``dataset_description.json``): the parsed content, with
  run-specific values dropped (run id, command line, where the weights were found, the config
  hash, wall-clock timings) and the demo's own folder replaced by ``<ROOT>``;
- ``group_<mod>.tsv`` (not the run's ``logs/timings-*.tsv``): its cells, decimal numbers as
  values; ``README.md``, ``.bidsignore`` and ``logs/CITATION.md``: the text.

HTML reports (time stamps), figures (rendering may change) and run logs are not digested.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

#: Keys whose values change from run to run (or with the code's internal layout), not with results.
RUN_SPECIFIC = {"run_id", "command", "weights_source", "config_hash", "Cg3dConfigHash", "runtime_s",
                "timings"}
TEXT_FILES = ("README.md", ".bidsignore", "logs/CITATION.md")
#: Tolerance of the float values (relative, absolute): far above cross-CPU rounding (~1e-6
#: relative), far below what a changed computation does.
RTOL, ATOL = 1e-3, 1e-6
#: Blocks per axis of a float map's summary.
BLOCKS = 6


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


def _entry(exact: bytes, form: bytes, values: list[float]) -> dict[str, Any]:
    return {"exact": _sha(exact), "form": _sha(form), "values": [float(f"{v:.9g}") for v in values]}


def nifti_entry(path: Path) -> dict[str, Any]:
    """Entry of a NIfTI file: decoded voxels, dtype, shape, affine and zooms."""
    import nibabel as nib

    image = nib.load(str(path))
    data = np.ascontiguousarray(np.asanyarray(image.dataobj))
    meta = {"dtype": str(data.dtype), "shape": list(data.shape),
            "affine": np.round(image.affine, 6).tolist(),
            "zooms": [round(float(z), 6) for z in image.header.get_zooms()]}
    form = json.dumps(meta, sort_keys=True).encode()
    if not np.issubdtype(data.dtype, np.floating):
        return _entry(form + data.tobytes(), form + data.tobytes(), [])
    values = data.astype(np.float64)
    blocks = [values]
    for axis in range(min(3, values.ndim)):
        blocks = [part for block in blocks for part in np.array_split(block, BLOCKS, axis=axis)]
    summary = [float(b.mean()) if b.size else 0.0 for b in blocks]
    return _entry(form + data.tobytes(), form,
                  summary + [float(values.sum()), float(values.min()), float(values.max())])


def _split_floats(value: Any, values: list[float]) -> Any:
    """``value`` with every float replaced by a placeholder (appended to ``values``)."""
    if isinstance(value, dict):
        return {k: _split_floats(v, values) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [_split_floats(v, values) for v in value]
    if isinstance(value, float):
        values.append(value)
        return "<float>"
    return value


def json_entry(content: Any) -> dict[str, Any]:
    values: list[float] = []
    form = _split_floats(content, values)
    return _entry(json.dumps(content, sort_keys=True).encode(), json.dumps(form).encode(), values)


def _is_decimal(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return any(c in cell for c in ".eE") and cell.lower() not in ("nan", "inf", "-inf")


def tsv_entry(text: str) -> dict[str, Any]:
    values: list[float] = []
    rows = []
    for line in text.splitlines():
        cells = line.split("\t")
        decimal = [_is_decimal(c) for c in cells]
        values.extend(float(c) for c, d in zip(cells, decimal) if d)
        rows.append("\t".join("<float>" if d else c for c, d in zip(cells, decimal)))
    return _entry(text.encode(), "\n".join(rows).encode(), values)


def text_entry(text: str) -> dict[str, Any]:
    return _entry(text.encode(), text.encode(), [])


def digest(out_dir: str | Path, root: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """``{relative path: entry}`` of every digested file under ``out_dir``.

    ``root`` is the folder whose absolute path is replaced by ``<ROOT>`` in JSON values
    (default: the parent of ``out_dir``'s parent, the demo folder ``OUTDIR`` of ``cg3d demo``).
    """
    out_dir = Path(out_dir).absolute()
    root_text = str(Path(root).absolute() if root else out_dir.parent.parent)
    result: dict[str, dict[str, Any]] = {}
    for path in sorted(out_dir.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(out_dir).as_posix()
        if rel.endswith((".nii.gz", ".nii")):
            result[rel] = nifti_entry(path)
        elif rel.endswith(".json"):
            result[rel] = json_entry(_clean(json.loads(path.read_text(encoding="utf-8")), root_text))
        elif rel.endswith(".tsv") and not rel.startswith("logs/"):
            result[rel] = tsv_entry(path.read_text(encoding="utf-8").replace(root_text, "<ROOT>"))
        elif rel in TEXT_FILES:
            result[rel] = text_entry(path.read_text(encoding="utf-8").replace(root_text, "<ROOT>"))
    return result


def compare(expected: dict[str, dict[str, Any]], got: dict[str, dict[str, Any]],
            rtol: float = RTOL, atol: float = ATOL) -> dict[str, list[str]]:
    """Files ``missing`` from ``got``, ``new`` in it, ``changed`` (form, or values beyond the
    tolerance) and ``inexact`` (equal within the tolerance, not bit for bit)."""
    common = sorted(set(expected) & set(got))
    changed, inexact = [], []
    for name in common:
        a, b = expected[name], got[name]
        if a["exact"] == b["exact"]:
            continue
        if (a["form"] != b["form"] or len(a["values"]) != len(b["values"])
                or not np.allclose(b["values"], a["values"], rtol=rtol, atol=atol, equal_nan=True)):
            changed.append(name)
        else:
            inexact.append(name)
    return {"missing": sorted(set(expected) - set(got)), "new": sorted(set(got) - set(expected)),
            "changed": changed, "inexact": inexact}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="a cg3d output folder (e.g. OUTDIR/derivatives/cg3d)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", type=Path, metavar="FILE", help="store the digest as JSON here")
    action.add_argument("--compare", type=Path, metavar="FILE",
                        help="compare with a stored digest (or another output folder)")
    parser.add_argument("--root", type=Path, help="folder shown as <ROOT> in JSON values (default: "
                        "OUT_DIR/../..; give it when comparing folders at different depths)")
    args = parser.parse_args(argv)
    result = digest(args.out_dir, args.root)
    if args.compare:
        other = (digest(args.compare, args.root) if args.compare.is_dir()
                 else json.loads(args.compare.read_text(encoding="utf-8")))
        diff = compare(other, result)
        for kind, names in diff.items():
            print(f"{kind}: {len(names)}" + "".join(f"\n  {n}" for n in names))
        same = len(set(result) & set(other)) - len(diff["changed"]) - len(diff["inexact"])
        print(f"bit-identical: {same} of {len(result)}")
        return 1 if diff["missing"] or diff["new"] or diff["changed"] else 0
    text = json.dumps(result, indent=1, sort_keys=True) + "\n"
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
