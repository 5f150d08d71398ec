"""``cg3d demo OUTDIR``: copy the bundled demo dataset and run the group level on it.

The demo dataset (4 mm T1w/T2w/FLAIR of 7 subjects made from public data, licences in its
``LICENSES.md``) is small enough for a CPU. Its configuration: cube 112^3, DINOv2 ViT-S/14,
T1w (the only modality with 7 images; T2w/FLAIR have 4, below the minimum batch of 5).
``--test-encoder`` swaps in a tiny random ViT so the demo runs with no weights at all; the
numbers then mean nothing, and the outputs say so.

Then "score one new scan" (docs/reference.md): a reference bank is saved from the three healthy
subjects (a group run of just them into ``derivatives/cg3d-bank``, ``--save-reference
reference-T1w``) and one patient, sub-glioma7294, is scored against it alone (``participant
--reference`` into ``derivatives/cg3d-reference``). Three images are too few for MuSc's default
fraction 0.3 (K = floor(0.3 * 2) = 0 in their batch, floor(0.3 * 3) = 0 against the bank), so both
steps use ``--fraction 0.5`` (K = 1). ``--no-reference`` skips these steps.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from . import run
from .parser import Cg3dArgumentParser, HelpFormatter

LOGGER = logging.getLogger("cg3d")

#: The demo's reference cohort (its healthy subjects), the patient scored against it, and the
#: fraction that gives K >= 1 with three references (see the module docstring).
HEALTHY = ("healthychris", "healthyixi012", "healthymni152")
PATIENT = "glioma7294"
REFERENCE_FRACTION = "0.5"


def build_parser() -> Cg3dArgumentParser:
    parser = Cg3dArgumentParser(
        prog="cg3d demo",
        description="Run cg3d on the bundled demo BIDS dataset (CPU, small configuration).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("outdir", type=lambda s: Path(s).expanduser().absolute(),
                        help="folder that receives bids/ (the demo dataset), derivatives/cg3d/ and work/")
    parser.add_argument("--test-encoder", action="store_true",
                        help="use the tiny random test encoder (no weights needed; results mean nothing)")
    parser.add_argument("--encoder", default="dinov2_vits14", help="encoder (ignored with --test-encoder)")
    parser.add_argument("--weights", metavar="FILE", help="encoder weights file (default: baked or cached weights)")
    parser.add_argument("--allow-download", action="store_true", help="download weights from the HF hub")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--cube-size", type=int, default=112, help="cube edge in voxels")
    parser.add_argument("--nprocs", type=int, default=1, help="nipype processes")
    parser.add_argument("--no-codegraph", action="store_true", help="plain MuSc scoring")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip saving a reference bank of the healthy subjects and scoring one patient against it")
    return parser


def main(argv: list[str]) -> int:
    """``cg3d demo OUTDIR [options]``; returns the exit code of the group run."""
    from ..demo_data import copy_demo_dataset

    args = build_parser().parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)
    bids = copy_demo_dataset(args.outdir / "bids")
    common = [
        "--modality", "T1w", "-d", f"masks={bids / 'derivatives' / 'masks'}",
        "--device", args.device, "--cube-size", str(args.cube_size),
        "-w", str(args.outdir / "work"), "--nprocs", str(args.nprocs),
    ]
    if args.test_encoder:
        print("=" * 78 + "\nWARNING: demo with the RANDOM test encoder (test-tiny-vit): the maps and "
              "scores\nmean NOTHING. They only show that the pipeline runs end to end.\n" + "=" * 78,
              file=sys.stderr)
        common += ["--encoder", "test-tiny-vit"]
    else:
        common += ["--encoder", args.encoder]
        if args.weights:
            common += ["--weights", args.weights]
        if args.allow_download:
            common += ["--allow-download"]
    if args.no_codegraph:
        common += ["--no-codegraph"]
    derivatives = args.outdir / "derivatives"
    status = run.main([str(bids), str(derivatives / "cg3d"), "group", *common])
    if status != 0:
        return status
    print(f"demo outputs: {derivatives / 'cg3d'} (open group_T1w.html)", file=sys.stderr)
    if args.no_reference:
        return status
    return score_one_new_scan(bids, args.outdir, common)


def score_one_new_scan(bids: Path, outdir: Path, common: list[str]) -> int:
    """Save a bank of the healthy subjects, then score one patient against it alone."""
    from ..reference import load_bank

    bank, derivatives = outdir / "reference-T1w", outdir / "derivatives"
    print(f"demo: saving a reference bank of the {len(HEALTHY)} healthy subjects in {bank} "
          f"(--fraction {REFERENCE_FRACTION}: three images are too few at 0.3)", file=sys.stderr)
    status = run.main([str(bids), str(derivatives / "cg3d-bank"), "group", "--participant-label", *HEALTHY,
                       "--fraction", REFERENCE_FRACTION, "--save-reference", str(bank), *common])
    if status != 0:
        return status
    print(f"demo: scoring sub-{PATIENT} alone against the bank", file=sys.stderr)
    out = derivatives / "cg3d-reference"
    status = run.main([str(bids), str(out), "participant", "--participant-label", PATIENT, "--reference", str(bank),
                       "--fraction", REFERENCE_FRACTION, *common])
    if status == 0:
        table = (out / "reference_T1w.tsv").read_text().splitlines()
        row = dict(zip(table[0].split("\t"), next(r for r in table[1:] if PATIENT in r).split("\t")))
        print(f"demo: sub-{PATIENT} against the bank {load_bank(bank, verify=False).short_checksum} of "
              f"{len(HEALTHY)} healthy subjects: score_max {float(row['score_max']):.4g}, rank {row['rank']} of "
              f"{len(HEALTHY) + 1}; outputs: {out} (open sub-{PATIENT}.html); bank: cg3d reference info {bank}",
              file=sys.stderr)
    return status
