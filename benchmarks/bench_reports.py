"""Benchmark of the HTML reports: CPU core-seconds and wall seconds per subject report.

Two cases, each in a fresh subprocess (so the first report pays the imports, as in a pipeline node):

- ``1mm``: the subject report (anomaly mosaic + brain-mask figure + HTML) of one real 1 mm image,
  ``brainles_tcga_lgg/TCGA-DU-7294/T1w.nii.gz`` (240x240x155) with a synthetic anomaly map
  (a smooth blob on the tumour plus low-level texture, inside ``brainmask.nii.gz``), drawn
  ``--repeats`` times: the first (cold) and the median of the others (warm) are reported.
- ``demo``: the 7 subject reports and the group report of ``cg3d demo`` (one process, like the
  workflow's report node), read back from the demo's outputs (``--demo DIR``; the demo is run
  there with the test encoder when the folder has no outputs yet).

Core-seconds are ``time.process_time()`` (all threads of the process), wall is ``time.perf_counter()``.
Prints a Markdown table::

    python benchmarks/bench_reports.py                     # both cases, demo in a temporary folder
    python benchmarks/bench_reports.py --demo /tmp/demo    # reuse (or create) a demo output
    python benchmarks/bench_reports.py --only 1mm --repeats 5
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CG3D_DATA", "/work/shared/data"))
CASE_1MM = DATA / "brainles_tcga_lgg" / "TCGA-DU-7294"


# ------------------------------------------------------------------------------------------------
# children
def _clock() -> tuple[float, float]:
    return time.process_time(), time.perf_counter()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    cpu, wall = _clock()
    return cpu - start[0], wall - start[1]


def _synthetic_1mm(out: Path):
    """Write the inputs of the ``1mm`` case under ``out`` and return its ImageResult."""
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    from cg3d_bids.reports import ImageResult

    image = nib.load(CASE_1MM / "T1w.nii.gz")
    brain = np.asarray(nib.load(CASE_1MM / "brainmask.nii.gz").dataobj) > 0
    lesion = np.asarray(nib.load(CASE_1MM / "lesion.nii.gz").dataobj) > 0
    rng = np.random.default_rng(0)
    texture = ndimage.gaussian_filter(rng.normal(size=brain.shape).astype(np.float32), 3) * 8
    centre = np.argwhere(lesion).mean(0)
    grid = np.indices(brain.shape, dtype=np.float32)
    d2 = sum((grid[i] - centre[i]) ** 2 for i in range(3))
    prob = 1 / (1 + np.exp(-(4 * np.exp(-d2 / (2 * 12.0**2)) + texture - 3.0)))
    prob = np.where(brain, prob, 0).astype(np.float32)
    amask = (prob > 0.5) & brain
    anat = out / "sub-01" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    paths = {
        "probseg": anat / "sub-01_label-anomaly_desc-T1w_probseg.nii.gz",
        "amask": anat / "sub-01_label-anomaly_desc-T1w_mask.nii.gz",
        "brain": anat / "sub-01_label-brain_desc-T1w_mask.nii.gz",
    }
    for key, data in (("probseg", prob), ("amask", amask.astype(np.uint8)), ("brain", brain.astype(np.uint8))):
        nib.save(nib.Nifti1Image(data, image.affine), paths[key])
    return ImageResult(
        bids_name="sub-01_T1w", subject="01", session=None, modality="T1w", entities={},
        image_path=CASE_1MM / "T1w.nii.gz", probseg_path=paths["probseg"], anomaly_mask_path=paths["amask"],
        brain_mask_path=paths["brain"], score=float(prob.max()), rank=1, percentile=100.0, n_images=1,
        flagged=bool(amask.any()), anomalous_volume_mm3=float(amask.sum()), components=[])


def child_1mm(repeats: int) -> dict:
    """Time ``repeats`` subject reports of the 1 mm case (inputs written first, not timed)."""
    with tempfile.TemporaryDirectory(prefix="cg3d-bench-") as tmp:
        result = _synthetic_1mm(Path(tmp))
        start = _clock()
        from cg3d_bids.reports import write_subject_report
        imports = _since(start)
        runs = []
        for k in range(repeats):
            start = _clock()
            write_subject_report(Path(tmp) / f"out{k}", "01", [result], None)
            runs.append(_since(start))
        figs = sorted((Path(tmp) / "out0" / "sub-01" / "figures").iterdir())
        sizes = {p.name: p.stat().st_size for p in figs}
    return {"imports": imports, "runs": runs, "sizes": sizes}


def _demo_results(deriv: Path, bids: Path, modality: str):
    """ImageResults of one modality of a cg3d output, from ``group_<mod>.tsv`` and the file names."""
    from cg3d_bids.reports import ImageResult

    results = []
    with open(deriv / f"group_{modality}.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    for row in rows:
        name = row["bids_name"]
        subject = row["participant_id"].removeprefix("sub-")
        session = None if row["session_id"] in ("", "n/a") else row["session_id"].removeprefix("ses-")
        anat = deriv / f"sub-{subject}" / (f"ses-{session}" if session else "") / "anat"
        prefix = name.rsplit("_", 1)[0]
        ok = row["status"] == "ok"

        def num(key: str, row: dict = row) -> float:
            try:
                return float(row[key])
            except (KeyError, ValueError):
                return math.nan

        results.append(ImageResult(
            bids_name=name, subject=subject, session=session, modality=modality, entities={},
            image_path=bids / row["source"].removeprefix("bids:raw:"),
            probseg_path=anat / f"{prefix}_label-anomaly_desc-{modality}_probseg.nii.gz",
            anomaly_mask_path=anat / f"{prefix}_label-anomaly_desc-{modality}_mask.nii.gz",
            brain_mask_path=anat / f"{prefix}_label-brain_desc-{modality}_mask.nii.gz",
            score=num("score_max"), rank=int(num("rank")) if ok else 0, percentile=num("score_percentile"),
            n_images=len(rows), flagged=row.get("flagged") == "true",
            anomalous_volume_mm3=num("anomaly_volume_mm3"), components=[],
            status=row["status"], error=None if ok else row.get("error")))
    return results


def child_demo(demo: str) -> dict:
    """Time the demo's subject reports (all in this process) and its group report."""
    start = _clock()
    from cg3d_bids.reports import write_group_report, write_subject_report
    imports = _since(start)
    deriv, bids = Path(demo) / "derivatives" / "cg3d", Path(demo) / "bids"
    modalities = sorted(p.stem.removeprefix("group_") for p in deriv.glob("group_*.tsv"))
    results = [r for mod in modalities for r in _demo_results(deriv, bids, mod)]
    subjects = sorted({r.subject for r in results})
    with tempfile.TemporaryDirectory(prefix="cg3d-bench-") as tmp:
        runs = []
        for subject in subjects:
            start = _clock()
            write_subject_report(tmp, subject, [r for r in results if r.subject == subject], None)
            runs.append(_since(start))
        start = _clock()
        for mod in modalities:
            write_group_report(tmp, mod, [r for r in results if r.modality == mod], {})
        group = _since(start)
    return {"imports": imports, "runs": runs, "group": group, "n_images": len(results)}


# ------------------------------------------------------------------------------------------------
# parent
def _child(case: str, arg: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, "--child", case, arg], capture_output=True, text=True,
                          env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"{case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ensure_demo(folder: Path) -> Path:
    if not (folder / "derivatives" / "cg3d").is_dir():
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        subprocess.run([sys.executable, "-m", "cg3d_bids", "demo", str(folder), "--test-encoder"], env=env,
                       check=True, capture_output=True)
    return folder


def _fmt(pair) -> str:
    return f"{pair[0]:.2f} | {pair[1]:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("1mm", "demo"))
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--demo", type=Path, help="cg3d demo folder (created when missing)")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "ARG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        case, arg = args.child
        out = child_1mm(int(arg)) if case == "1mm" else child_demo(arg)
        print(json.dumps(out))
        return 0

    print("| case | core-s | wall-s |\n|---|---:|---:|")
    if args.only in (None, "1mm"):
        res = _child("1mm", str(max(args.repeats, 2)))
        warm = [r for r in res["runs"][1:]]
        median = (statistics.median(r[0] for r in warm), statistics.median(r[1] for r in warm))
        print(f"| 1 mm subject report: imports | {_fmt(res['imports'])} |")
        print(f"| 1 mm subject report: first (cold) | {_fmt(res['runs'][0])} |")
        print(f"| 1 mm subject report: median of {len(warm)} warm | {_fmt(median)} |")
        print(f"| figure sizes (bytes) | {', '.join(f'{k}: {v:,}' for k, v in res['sizes'].items())} | |")
    if args.only in (None, "demo"):
        with tempfile.TemporaryDirectory(prefix="cg3d-demo-") as tmp:
            folder = _ensure_demo(args.demo or Path(tmp) / "demo")
            res = _child("demo", str(folder))
        total = (sum(r[0] for r in res["runs"]), sum(r[1] for r in res["runs"]))
        print(f"| demo: imports | {_fmt(res['imports'])} |")
        print(f"| demo: {len(res['runs'])} subject reports, total | {_fmt(total)} |")
        per = (total[0] / len(res["runs"]), total[1] / len(res["runs"]))
        print(f"| demo: per subject report | {_fmt(per)} |")
        print(f"| demo: group report(s) | {_fmt(res['group'])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
