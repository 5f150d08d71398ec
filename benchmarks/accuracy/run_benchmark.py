#!/usr/bin/env python
"""Run the accuracy benchmark and print ONE Markdown table (rows = method x modality [x cohort]).

    python benchmarks/accuracy/run_benchmark.py --bids /tmp/cg3d_bench/bids --out /tmp/cg3d_bench/runs

Methods:
    codegraph  cg3d with the CoDeGraph stage (``python -m cg3d_bids BIDS OUT group ...``)
    musc       cg3d ``--no-codegraph`` (plain MuSc scoring)
    naive      |z| of Nyul-standardised intensity against the batch (naive_baseline.py)
then ``python -m cg3d_bids evaluate`` on each output (``--patient-labels`` from the lesion
derivatives' participants.tsv, so patients without a voxel mask count at patient level).

Defaults run on a CPU with the RANDOM test encoder (``--encoder test-tiny-vit --device cpu
--cube-size 112``): those numbers test the plumbing, not the method. With weights:
``--encoder dinov2_vitl14 --weights FILE --device cuda --cube-size 224``.

Cohorts: ``all`` = the whole batch; ``semisynthetic`` = only the sub-syn* subjects (same anatomy
sources and the same synthetic contrasts for lesioned and healthy, so no scanner/domain shortcut);
``real`` = only real subjects. The maps always come from the whole batch.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
METHODS = ("codegraph", "musc", "naive")


def cg3d_command(args: argparse.Namespace, out: Path, work: Path, codegraph: bool) -> list[str]:
    """``python -m cg3d_bids BIDS OUT group`` with the benchmark's options (cli/parser.py)."""
    cmd = [sys.executable, "-m", "cg3d_bids", str(args.bids), str(out), "group",
           "--device", args.device, "--encoder", args.encoder, "--cube-size", str(args.cube_size),
           "--skip-bids-validation", "-d", f"masks={args.bids / 'derivatives' / 'masks'}",
           "-w", str(work), "--modality", *args.modality]
    if args.weights:
        cmd += ["--weights", str(args.weights)]
    if args.nprocs:
        cmd += ["--nprocs", str(args.nprocs)]
    if not codegraph:
        cmd.append("--no-codegraph")
    return cmd + list(args.cg3d_args)


def run_method(method: str, args: argparse.Namespace) -> dict:
    """Produce the outputs of one method; returns {out, seconds, rc, log}."""
    out = args.out / method
    log = args.out / f"{method}.log"
    args.out.mkdir(parents=True, exist_ok=True)
    if method == "naive":
        cmd = [sys.executable, str(HERE / "naive_baseline.py"), str(args.bids), str(out),
               "--masks", str(args.bids / "derivatives" / "masks"), "--modality", *args.modality]
    else:
        cmd = cg3d_command(args, out, args.out / f"work-{method}", codegraph=method == "codegraph")
    print(f"[{method}] {' '.join(cmd)}", file=sys.stderr)
    t0 = time.time()
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    seconds = time.time() - t0
    print(f"[{method}] exit {rc} after {seconds:.0f} s (log: {log})", file=sys.stderr)
    return {"out": out, "seconds": seconds, "rc": rc, "log": log, "command": cmd}


def previous_seconds(out: Path, method: str) -> float:
    """Run time of ``method`` recorded in an earlier results.json (NaN if none)."""
    try:
        rows = json.loads((out / "results.json").read_text())["rows"]
        return float(next(r["seconds"] for r in rows if r["method"] == method))
    except (OSError, ValueError, KeyError, StopIteration, TypeError):
        return math.nan


def cohort_participants(bids: Path, cohort: str) -> list[str] | None:
    """Participant labels of a cohort from participants.tsv (None = all)."""
    if cohort == "all":
        return None
    with open(bids / "participants.tsv") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return [r["participant_id"].removeprefix("sub-") for r in rows if r.get("cohort") == cohort]


def evaluate(method: str, run: dict, args: argparse.Namespace, cohort: str) -> dict[str, dict]:
    """``cg3d evaluate`` of one output folder and cohort; returns {modality: result json}."""
    lesions = args.bids / "derivatives" / "lesions"
    cmd = [sys.executable, "-m", "cg3d_bids", "evaluate", str(run["out"]), "--ground-truth", str(lesions),
           "--patient-labels", str(lesions / "participants.tsv"), "--modality", *args.modality]
    eval_dir = run["out"]
    participants = cohort_participants(args.bids, cohort)
    if participants is not None:
        eval_dir = args.out / f"eval-{cohort}" / method
        cmd += ["--participant-label", *participants, "--eval-dir", str(eval_dir)]
    with open(args.out / f"evaluate-{method}-{cohort}.log", "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    if rc != 0:
        print(f"[{method}/{cohort}] cg3d evaluate exited {rc}", file=sys.stderr)
    results = {}
    for mod in args.modality:
        path = eval_dir / f"eval_{mod}.json"
        if rc == 0 and path.is_file():
            results[mod] = json.loads(path.read_text())
    return results


# ------------------------------------------------------------------------------------------------
COLUMNS = ("method", "modality", "cohort", "lesioned/healthy", "patient AUROC", "patient AP", "voxel AUROC",
           "voxel AP", "Dice-max", "IoU", "threshold", "LTPR <100", "LTPR 100-1000", "LTPR >1000",
           "Dice (own mask)", "run time (s)")


def _pct(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _ltpr(entry: dict) -> str:
    if not entry["n_lesions"]:
        return "n/a (0)"
    return f"{entry['tpr']:.2f} ({entry['n_detected']}/{entry['n_lesions']})"


def table_row(method: str, mod: str, cohort: str, result: dict | None, seconds: float, rc: int) -> list[str]:
    if result is None:
        return [method, mod, cohort, f"failed (exit {rc})"] + ["-"] * (len(COLUMNS) - 5) + [f"{seconds:.0f}"]
    m = result["metrics"]
    lw = {e["bin"]: e for e in result["lesionwise"]["at_dice_max_threshold"]}
    bins = [b for b in lw if b != "all"]
    thr = m.get("voxel_threshold")
    flag = "*" if (m.get("voxel_predicted_fraction") or 0) > 0.5 else ""
    return [method, mod, cohort, f"{m['n_lesioned']}/{m['n_healthy']}", _pct(m["patient_auroc"]),
            _pct(m["patient_ap"]), _pct(m["voxel_auroc"]), _pct(m["voxel_ap"]), _pct(m["voxel_dice_max"]),
            _pct(m["voxel_iou"]), "n/a" if thr is None else f"{thr:.3f}{flag}",
            *[_ltpr(lw[b]) for b in bins[:3]], _pct(m.get("mask_dice")), f"{seconds:.0f}"]


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--bids", type=Path, required=True, help="dataset from build_dataset.py")
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs and results.md")
    parser.add_argument("--build", action="store_true", help="build the dataset first if --bids is missing")
    parser.add_argument("--resolution", type=float, default=2.0, help="with --build: voxel size in mm")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--modality", nargs="+", default=["T1w", "T2w", "FLAIR"])
    parser.add_argument("--cohorts", nargs="+", choices=("all", "semisynthetic", "real"),
                        default=["all", "semisynthetic"])
    parser.add_argument("--encoder", default="test-tiny-vit", help="cg3d --encoder (dinov2_vitl14 with weights)")
    parser.add_argument("--weights", type=Path, help="cg3d --weights FILE")
    parser.add_argument("--device", default="cpu", help="cg3d --device (cuda with a GPU)")
    parser.add_argument("--cube-size", type=int, default=112, help="cg3d --cube-size (224 = paper)")
    parser.add_argument("--nprocs", type=int, help="cg3d --nprocs")
    parser.add_argument("--reuse", action="store_true", help="skip a method whose output folder exists")
    parser.add_argument("cg3d_args", nargs=argparse.REMAINDER, help="after --: extra cg3d options")
    args = parser.parse_args(argv)
    args.bids, args.out = args.bids.absolute(), args.out.absolute()
    args.cg3d_args = [a for a in args.cg3d_args if a != "--"]
    if not (args.bids / "participants.tsv").is_file():
        if not args.build:
            parser.error(f"{args.bids} is not a benchmark dataset; build it or pass --build")
        sys.path.insert(0, str(HERE))
        from build_dataset import build

        build(args.bids, args.resolution)
    rows, summary = [], []
    for method in args.methods:
        if args.reuse and (args.out / method).is_dir():
            run = {"out": args.out / method, "seconds": previous_seconds(args.out, method), "rc": 0}
        else:
            run = run_method(method, args)
        for cohort in args.cohorts:
            results = evaluate(method, run, args, cohort) if run["rc"] == 0 else {}
            for mod in args.modality:
                rows.append(table_row(method, mod, cohort, results.get(mod), run["seconds"], run["rc"]))
                summary.append({"method": method, "modality": mod, "cohort": cohort, "rc": run["rc"],
                                "seconds": run["seconds"], "metrics": results.get(mod, {}).get("metrics"),
                                "lesionwise": results.get(mod, {}).get("lesionwise")})
    table = markdown(rows)
    header = (f"Encoder {args.encoder} on {args.device}, cube {args.cube_size}; dataset {args.bids}. "
              "Metrics in % except threshold and LTPR (fraction, detected/lesions, at the Dice-max "
              "threshold); run time = the whole method run (all modalities). * = the Dice-max "
              "threshold marks > 50 % of the brain voxels (no separation; LTPR trivially high).")
    (args.out / "results.md").write_text(header + "\n\n" + table + "\n")
    (args.out / "results.json").write_text(json.dumps(
        {"settings": {k: str(v) for k, v in vars(args).items()}, "rows": summary}, indent=2, default=str) + "\n")
    print(header + "\n")
    print(table)
    return 0 if all(r[3].find("failed") < 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
